"""The compute floor of a run: every hospital's training, evaluation and DP accounting in
one warm process, with no Flower, no processes and no network in between.

It does what the hospitals and the server do in a round, in the same order: each hospital
evaluates the incoming global model (from round 2 on), opens its privacy ledger, trains one
round with :func:`~fedrun_trainer.hospital.train.train_round` and saves the ledger; then the server
averages the updates (FedAvg). A final evaluation follows the last round.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedrun_core.api import FederatedRun
from fedrun_trainer.common.data import Table, load_hospital_data
from fedrun_trainer.common.model import Weights, build_model, get_weights
from fedrun_trainer.common.privacy import (
    PrivacyLedger,
    new_ledger,
    open_ledger,
    plan_terms,
    save_ledger,
)
from fedrun_trainer.hospital.train import evaluate, train_round
from fedrun_trainer.server.strategy import aggregate_fedavg

__all__ = ["FloorResult", "compute_floor"]


@dataclass(frozen=True)
class FloorResult:
    """Seconds per round, the final evaluation's seconds and the untimed warm-up's."""

    round_s: list[float]
    final_eval_s: float
    warmup_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.round_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.round_s)


@dataclass(frozen=True)
class _Hospital:
    name: str
    train: Table
    test: Table
    ledger_uri: str


def _hospitals(run: FederatedRun, data_dir: Path, ledger_dir: Path) -> list[_Hospital]:
    spec = run.spec
    out = []
    for h in spec.hospitals:
        uri = (data_dir / f"{h.name}.{spec.data.format}").resolve().as_uri()
        data = load_hospital_data(uri, spec.data, spec.training.test_fraction, spec.training.seed)
        out.append(
            _Hospital(h.name, data.train, data.test, (ledger_dir / f"{h.name}.json").as_uri())
        )
    return out


def _ledger(run: FederatedRun, h: _Hospital, fresh: bool = False) -> PrivacyLedger | None:
    """The hospital's ledger as a hospital opens it (``fresh``: a new one, not on disk)."""
    spec = run.spec
    if not spec.privacy.enabled:
        return None
    terms = plan_terms(spec)
    if fresh:
        return new_ledger(hospital=h.name, n_train=len(h.train), **terms)
    return open_ledger(h.ledger_uri, hospital=h.name, n_train=len(h.train), **terms)


def _hospital_round(
    run: FederatedRun, model: nn.Module, h: _Hospital, weights: Weights, server_round: int
) -> tuple[Weights, int]:
    """One hospital's reply to a train request: evaluate first (after round 1), then train."""
    if server_round > 1:
        evaluate(model, weights, h.test)
    ledger = _ledger(run, h)
    result = train_round(
        model,
        h.train,
        weights,
        training=run.spec.training,
        privacy=run.spec.privacy,
        ledger=ledger,
        server_round=server_round,
        hospital=h.name,
    )
    if result.ledger is not None:
        save_ledger(h.ledger_uri, result.ledger)
    return result.weights, result.num_examples


def _warm_up(run: FederatedRun, model: nn.Module, h: _Hospital, weights: Weights) -> float:
    """One untimed round on a throwaway ledger: first-use costs (Opacus, torch) paid once."""
    started = time.perf_counter()
    train_round(
        model,
        h.train,
        weights,
        training=run.spec.training,
        privacy=run.spec.privacy,
        ledger=_ledger(run, h, fresh=True),
        server_round=1,
        hospital=h.name,
    )
    evaluate(model, weights, h.test)
    return time.perf_counter() - started


def compute_floor(run: FederatedRun, data_dir: Path) -> FloorResult:
    """Time ``run``'s rounds in this process on the hospitals' files in ``data_dir``."""
    spec = run.spec
    with tempfile.TemporaryDirectory(prefix="fedrun-floor-") as ledgers:
        hospitals = _hospitals(run, data_dir, Path(ledgers))
        model = build_model(spec.training, hospitals[0].train.x.shape[1], seed=spec.training.seed)
        weights = get_weights(model)
        warmup = _warm_up(run, model, hospitals[0], weights)
        rounds: list[float] = []
        for server_round in range(1, spec.rounds + 1):
            started = time.perf_counter()
            replies = [_hospital_round(run, model, h, weights, server_round) for h in hospitals]
            weights = aggregate_fedavg(replies)
            rounds.append(time.perf_counter() - started)
        started = time.perf_counter()
        for h in hospitals:
            evaluate(model, weights, h.test)
        final = time.perf_counter() - started
    return FloorResult(rounds, final, warmup)

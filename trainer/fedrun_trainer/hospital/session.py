"""One hospital's work for one Flower message: its data, its ledger, its model.

A session is built afresh for every message (Flower starts a process per message), so
everything that must outlive a message lives on disk or S3: the data (read-only) and the
privacy ledger (read, checked, trained, written back before replying).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrun_core import names as constants
from fedrun_core.api import ledger_uri
from fedrun_core.schema import DataCounts
from fedrun_trainer.common.data import Table, load_hospital_data
from fedrun_trainer.common.model import build_model
from fedrun_trainer.common.privacy import (
    BudgetExceeded,
    LedgerRefused,
    PrivacyLedger,
    checked_history,
    open_ledger,
    plan_privacy,
    plan_terms,
    save_ledger,
)
from fedrun_trainer.common.protocol import Outcome
from fedrun_trainer.common.settings import HospitalConfigError, RunSettings
from fedrun_trainer.hospital import kept_update
from fedrun_trainer.hospital.train import EvalResult, evaluate, train_round

__all__ = ["HospitalConfigError", "HospitalSession", "LedgerRefused", "TrainOutcome"]

Weights = list[np.ndarray]
#: A server lineage as the server mints it (a uuid4's hex), or empty (an older server).
LINEAGE = re.compile(r"[0-9a-f]{0,64}")
log = logging.getLogger("fedrun.hospital")


@dataclass(frozen=True)
class TrainOutcome:
    """What the hospital replies to a train request."""

    outcome: Outcome
    message: str = ""
    weights: Weights | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    scores: dict[str, list[int]] = field(default_factory=dict)


def _scores(result: EvalResult) -> dict[str, list[int]]:
    """The per-bin score counts of a test split, for the server's pooled AUROC."""
    if result.score_counts is None:
        return {}
    negatives, positives = result.score_counts
    return {"negatives": negatives, "positives": positives}


def _eval_dict(result: EvalResult) -> dict[str, float]:
    out = {
        "num_examples": float(result.num_examples),
        "loss": result.loss,
        "accuracy": result.accuracy,
    }
    if result.auroc is not None:
        out["auroc"] = result.auroc
    if result.auprc is not None:
        out["auprc"] = result.auprc
    return out


def local_ledger_uri(uri: str, state_dir: Path) -> str:
    """Point a default ``file://`` ledger under the pod's state mount at this process's dir."""
    prefix = f"file://{constants.STATE_DIR}/"
    if uri.startswith(prefix):
        return (state_dir / uri.removeprefix(prefix)).resolve().as_uri()
    return uri


def resume_from_server(
    ledger: PrivacyLedger, server_history: list[tuple[float, float, int]]
) -> PrivacyLedger:
    """The ledger, or the server's record of this hospital's steps when that is longer.

    The server's record covers its own lineage (``ledger.lineage``); when it knows more
    steps than the ledger has spent in that lineage (the ledger was lost with a pod), the
    difference is added (a ledger that knows nothing before this lineage takes the
    server's record as it is). Only the record of what was spent is taken from the server
    (a longer one can only raise ε); the σ and q of the next steps stay the plan's.
    ``server_history`` must have passed :func:`~fedrun_trainer.common.privacy.checked_history`.
    """
    server_steps = sum(n for _, _, n in server_history)
    spent = ledger.lineage_steps_spent
    if server_steps <= spent:
        return ledger
    log.warning(
        "hospital %s: the local ledger knows %d DP steps, the server %d; resuming from the "
        "server's record (was the ledger lost with a pod?)",
        ledger.hospital,
        ledger.steps,
        server_steps,
    )
    if ledger.lineage_steps == 0:
        return ledger.with_history(server_history)
    sigma, q, _ = server_history[-1]
    return ledger.with_history([*ledger.history, (sigma, q, server_steps - spent)])


#: Sessions opened by :func:`prepare` in this process, by (config, hospital, state dir).
_PREPARED: dict[tuple[str, str, Path], HospitalSession] = {}


@dataclass
class HospitalSession:
    """The run settings, this hospital's spec and its train/test split."""

    settings: RunSettings
    name: str
    train_table: Table
    test_table: Table
    state_dir: Path
    counts: DataCounts | None = None

    @classmethod
    def open(cls, config_path: str, hospital: str, state_dir: Path) -> HospitalSession:
        """Load the run and this hospital's data; raises ``DataError`` on bad data.

        A session :func:`prepare` opened in this process (or, through ``fork()``, in its
        parent) is returned as it is: the data is then read once per executor start.
        """
        prepared = _PREPARED.get((config_path, hospital, state_dir))
        if prepared is not None:
            return prepared
        settings = RunSettings.load(config_path)
        spec = settings.hospital(hospital)
        run = settings.run.spec
        data = load_hospital_data(
            spec.data_uri, run.data, run.training.test_fraction, run.training.seed
        )
        return cls(settings, hospital, data.train, data.test, state_dir, data.counts)

    @property
    def n_features(self) -> int:
        return int(self.train_table.x.shape[1])

    def summary(self) -> dict[str, float]:
        """Counts the server may know: sizes, feature count and what the missing-value
        policies did (:class:`~fedrun_core.schema.DataCounts`), never raw values."""
        return {
            "num_train": float(len(self.train_table)),
            "num_test": float(len(self.test_table)),
            "num_features": float(self.n_features),
            **(self.counts.to_metrics() if self.counts is not None else {}),
        }

    def _model(self) -> Any:
        return build_model(self.settings.model_spec(), self.n_features, seed=self.settings.seed)

    def evaluate(self, weights: Weights) -> tuple[dict[str, float], dict[str, list[int]]]:
        """Held-out metrics of ``weights`` on this hospital's test split, and the per-bin
        counts of its test scores per class (:mod:`fedrun_trainer.common.scores`)."""
        result = evaluate(self._model(), weights, self.test_table)
        return _eval_dict(result), _scores(result)

    def ledger_uri(self) -> str:
        return local_ledger_uri(ledger_uri(self.settings.run, self.name), self.state_dir)

    def open_ledger(self) -> PrivacyLedger | None:
        """This hospital's ledger on the spec's plan (None with privacy off).

        Raises :class:`~fedrun_trainer.common.privacy.LedgerRefused` for a stored ledger of
        another run or under other terms; the hospital then fails before it trains.
        """
        spec = self.settings.run.spec
        if not spec.privacy.enabled:
            return None
        return open_ledger(
            self.ledger_uri(),
            hospital=self.name,
            n_train=len(self.train_table),
            run_uid=self.settings.run_uid,
            **plan_terms(spec),
        )

    def train(
        self,
        weights: Weights,
        server_round: int,
        evaluate_first: bool,
        server_history: list[tuple[float, float, int]] | None = None,
        lineage: str = "",
    ) -> TrainOutcome:
        """Evaluate the incoming model if asked, then train one round within the budget.

        ``server_history`` is the server's record of this hospital's DP steps; when the
        local ledger knows fewer steps (it was lost with a pod), training resumes from the
        server's record, so ε is never counted from zero again. ``lineage`` is the server's
        (see :meth:`~fedrun_trainer.common.privacy.PrivacyLedger.for_lineage`). Every reply
        also reports the steps this lineage spent that the server's record lacks (a round
        whose reply the server never got), so its account catches up with the ledger.
        """
        evaluation, scores = self.evaluate(weights) if evaluate_first else ({}, {})
        spec = self.settings.run.spec
        uri = self.ledger_uri()
        ledger = self.open_ledger()
        record: list[tuple[float, float, int]] = []
        behind = 0
        if not LINEAGE.fullmatch(lineage):
            raise HospitalConfigError(
                f"the server sent a lineage that is not an id ({lineage[:80]!r}): refused"
            )
        if ledger is not None:
            ledger = ledger.for_lineage(lineage)
            record = checked_history(server_history or [], "the server's record of spent steps")
            ledger = resume_from_server(ledger, record)
            behind = max(0, ledger.lineage_steps_spent - sum(n for _, _, n in record))
        try:
            result = train_round(
                self._model(),
                self.train_table,
                weights,
                training=spec.training,
                privacy=spec.privacy,
                ledger=ledger,
                server_round=server_round,
                proximal_mu=self.settings.proximal_mu,
                hospital=self.name,
            )
        except BudgetExceeded as err:
            assert ledger is not None
            return TrainOutcome(
                Outcome.BUDGET,
                str(err),
                evaluation=evaluation,
                privacy=self._privacy(ledger.epsilon, ledger, steps=behind),
                scores=scores,
            )
        if result.skipped:
            assert ledger is not None
            return self._retried(weights, server_round, ledger, behind, evaluation, scores)
        if result.ledger is not None:
            kept_update.save(
                self.state_dir,
                kept_update.KeptUpdate(
                    run_uid=self.settings.run_uid,
                    server_round=server_round,
                    start_digest=kept_update.digest(weights),
                    weights=list(result.weights),
                    num_examples=result.num_examples,
                    loss=result.loss,
                ),
            )
            save_ledger(uri, result.ledger)
        return TrainOutcome(
            Outcome.OK,
            weights=list(result.weights),
            metrics={"num_examples": float(result.num_examples), "loss": result.loss},
            evaluation=evaluation,
            privacy=self._privacy(result.epsilon, result.ledger, steps=result.steps + behind),
            scores=scores,
        )

    def _retried(
        self,
        weights: Weights,
        server_round: int,
        ledger: PrivacyLedger,
        missing: int,
        evaluation: dict[str, float],
        scores: dict[str, list[int]],
    ) -> TrainOutcome:
        """The answer to a round the ledger shows as trained: nothing is trained or charged.

        The server is told the steps its record lacks (those of the round it lost), so its
        account agrees with the ledger again; the update is the one sent the first time
        when it was kept (:mod:`~fedrun_trainer.hospital.kept_update`), else the global
        model with no examples (no weight in the average).
        """
        privacy = self._privacy(ledger.epsilon, ledger, steps=missing)
        kept = kept_update.load(self.state_dir, self.settings.run_uid, server_round, weights)
        log.warning(
            "hospital %s: round %d was already trained (the server lost it); answering with %s",
            self.name,
            server_round,
            "the update kept from then" if kept is not None else "no update (none was kept)",
        )
        if kept is None:
            return TrainOutcome(
                Outcome.OK,
                weights=[np.asarray(w, dtype=np.float32).copy() for w in weights],
                metrics={"num_examples": 0.0, "loss": float("nan")},
                evaluation=evaluation,
                privacy=privacy,
                scores=scores,
            )
        return TrainOutcome(
            Outcome.OK,
            weights=list(kept.weights),
            metrics={"num_examples": float(kept.num_examples), "loss": kept.loss},
            evaluation=evaluation,
            privacy=privacy,
            scores=scores,
        )

    @staticmethod
    def _privacy(epsilon: float, ledger: Any, steps: int) -> dict[str, float]:
        if ledger is None:
            return {"epsilon": 0.0}
        return {
            "epsilon": float(epsilon),
            "noise_multiplier": float(ledger.noise_multiplier),
            "sample_rate": float(ledger.sample_rate),
            "steps": float(steps),
            "steps_per_round": float(ledger.steps_per_round),
            "total_steps": float(ledger.steps),
        }


def prepare(config_path: str, hospital: str, state_dir: Path) -> HospitalSession:
    """Open the session and compute its privacy plan once, for the children of this process.

    The warm executor calls it before it forks a child per Flower message: each child then
    finds the hospital's tables already read and the plan's σ already calibrated (Opacus'
    search takes about a second of CPU; its result is cached per process by
    ``noise_multiplier_for_run``). Raises what :meth:`HospitalSession.open` raises; nothing
    is kept then, and the child that opens the session reports the problem.
    """
    session = HospitalSession.open(config_path, hospital, state_dir)
    spec = session.settings.run.spec
    if spec.privacy.enabled:
        plan_privacy(n_train=len(session.train_table), **plan_terms(spec))
    _PREPARED[(config_path, hospital, state_dir)] = session
    return session

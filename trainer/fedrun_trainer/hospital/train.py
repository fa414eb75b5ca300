"""One hospital's local training round (DP-SGD with Opacus) and evaluation.

A round: fresh copy of the model, load the global weights, check the privacy budget
*before* touching the data, train ``local_epochs`` with SGD (DP-SGD through Opacus
``make_private`` with the ledger's σ when privacy is on), record the accountant history in
the ledger. The caller saves the ledger *before* replying to the server, so a crash after
training is charged and a retried round is not trained twice.

Randomness: the data split is deterministic (spec seed), but the DP noise and the Poisson
batches must never repeat. Processes forked from a warm parent inherit its random state,
so every round reseeds torch, numpy and ``random`` from ``os.urandom`` mixed with the
hospital and round; two hospitals or two rounds never draw the same noise.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from opacus import PrivacyEngine
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrun_core.api import PrivacySpec, TrainingSpec
from fedrun_trainer.common.data import Table
from fedrun_trainer.common.model import Weights, get_weights, set_weights
from fedrun_trainer.common.privacy import PrivacyLedger

__all__ = [
    "EvalResult",
    "RoundResult",
    "evaluate",
    "fresh_seed",
    "predict_logits",
    "train_round",
]


@dataclass(frozen=True)
class RoundResult:
    """What a hospital reports after a round.

    ``skipped`` is True when the ledger shows ``server_round`` was already trained (a retried
    round): then ``weights`` are the global weights unchanged, ``num_examples`` is 0 (no
    weight in FedAvg) and nothing is charged.
    """

    weights: Weights
    num_examples: int
    loss: float
    epsilon: float
    ledger: PrivacyLedger | None
    steps: int
    noise_multiplier: float
    skipped: bool = False


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics; ``auroc``/``auprc`` are None when the split has a single class."""

    num_examples: int
    loss: float
    auroc: float | None
    auprc: float | None
    accuracy: float


def fresh_seed(hospital: str, server_round: int) -> int:
    """A 63-bit seed from ``os.urandom`` mixed with hospital, round, pid and time."""
    tag = f"{hospital}/{server_round}/{os.getpid()}/{time.time_ns()}".encode()
    digest = hashlib.sha256(os.urandom(32) + tag).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _dataset(table: Table) -> TensorDataset:
    return TensorDataset(torch.from_numpy(table.x), torch.from_numpy(table.y))


def _pull_towards(
    params: Sequence[nn.Parameter], anchor: Sequence[torch.Tensor], factor: float
) -> None:
    """FedProx: one gradient step on (μ/2)‖w − w_global‖², ``factor = lr·μ``.

    The proximal term does not depend on patient data, so it is applied after the (noisy)
    optimizer step rather than through Opacus's per-sample gradients: no privacy cost.
    """
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            p.sub_(factor * (p - a))


def train_round(
    model: nn.Module,
    train: Table,
    global_weights: Sequence[npt.NDArray[np.floating]],
    *,
    training: TrainingSpec,
    privacy: PrivacySpec,
    ledger: PrivacyLedger | None,
    server_round: int,
    proximal_mu: float = 0.0,
    hospital: str | None = None,
    seed: int | None = None,
) -> RoundResult:
    """Train one round on ``train`` starting from ``global_weights``.

    ``model`` is only a template (it is copied; Opacus hooks never stick to it). With
    privacy enabled a ``ledger`` is required: training uses its σ, and before any step the
    round's ε (history + this round's steps) is checked against the target, raising
    :class:`~fedrun_trainer.common.privacy.BudgetExceeded` when it would be exceeded. The returned
    ledger has the new history; the caller saves it. ``seed`` overrides the fresh entropy
    (tests only). With privacy disabled ε is reported as 0.
    """
    if len(train) == 0:
        raise ValueError("no training rows")
    name = hospital or (ledger.hospital if ledger else "hospital")
    if privacy.enabled and ledger is None:
        raise ValueError("privacy is enabled but no ledger was given")
    if ledger is not None and server_round in ledger.rounds_trained:
        return RoundResult(
            weights=[np.asarray(w, dtype=np.float32).copy() for w in global_weights],
            num_examples=0,
            loss=float("nan"),
            epsilon=ledger.epsilon,
            ledger=ledger,
            steps=0,
            noise_multiplier=ledger.noise_multiplier,
            skipped=True,
        )

    _reseed(fresh_seed(name, server_round) if seed is None else seed)
    base = copy.deepcopy(model)
    set_weights(base, global_weights)
    base.train()
    module: nn.Module = base
    params = [p for p in base.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=training.learning_rate)
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        _dataset(train), batch_size=training.batch_size, shuffle=True
    )
    steps = len(loader) * training.local_epochs
    criterion = nn.BCEWithLogitsLoss()

    engine: PrivacyEngine | None = None
    sigma = 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        # Opacus's hooks on a first layer whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        if privacy.enabled:
            assert ledger is not None
            sample_rate = 1.0 / len(loader)
            ledger.check_budget(steps, sample_rate)  # raises BudgetExceeded before training
            sigma = ledger.noise_multiplier
            engine = PrivacyEngine(accountant=ledger.accountant)
            engine.accountant.history = list(ledger.history)
            module, optimizer, loader = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=sigma,
                max_grad_norm=privacy.max_grad_norm,
                poisson_sampling=True,
            )

        loss_sum, seen = 0.0, 0
        for _ in range(training.local_epochs):
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                logits = module(x).reshape(-1)
                if len(y) == 0:
                    # Poisson sampling drew an empty batch: still take the (noise-only)
                    # step, which the accountant counts and the DP analysis assumes.
                    loss = logits.sum() * 0.0
                else:
                    loss = criterion(logits, y)
                    loss_sum += float(loss.detach()) * len(y)
                    seen += len(y)
                loss.backward()
                optimizer.step()
                if proximal_mu > 0:
                    _pull_towards(params, anchor, training.learning_rate * proximal_mu)

    new_ledger = ledger
    epsilon = 0.0
    if engine is not None and ledger is not None:
        new_ledger = ledger.with_round(server_round, engine.accountant.history)
        epsilon = new_ledger.epsilon
    return RoundResult(
        weights=get_weights(base),  # Opacus wraps ``base`` in place; its tensors are trained
        num_examples=len(train),
        loss=loss_sum / seen if seen else float("nan"),
        epsilon=epsilon,
        ledger=new_ledger,
        steps=steps,
        noise_multiplier=sigma,
    )


def predict_logits(
    model: nn.Module, weights: Sequence[npt.NDArray[np.floating]], x: npt.NDArray[np.float32]
) -> torch.Tensor:
    """Logits of the positive class for rows ``x`` under ``weights`` (``model`` is not changed)."""
    module = copy.deepcopy(model)
    set_weights(module, weights)
    module.eval()
    with torch.no_grad():
        logits: torch.Tensor = module(torch.from_numpy(np.ascontiguousarray(x)))
    return logits.reshape(-1).double()


def evaluate(
    model: nn.Module, weights: Sequence[npt.NDArray[np.floating]], test: Table
) -> EvalResult:
    """BCE loss, AUROC, AUPRC (average precision) and accuracy at 0.5 on ``test``."""
    n = len(test)
    if n == 0:
        return EvalResult(0, float("nan"), None, None, float("nan"))
    logits = predict_logits(model, weights, test.x)
    y_t = torch.from_numpy(test.y).double()
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, y_t))
    p = torch.sigmoid(logits).numpy()
    y = test.y.astype(np.float64)
    accuracy = float(np.mean((p >= 0.5) == (y == 1.0)))
    two_classes = 0 < y.sum() < n
    auroc = float(roc_auc_score(y, p)) if two_classes else None
    auprc = float(average_precision_score(y, p)) if two_classes else None
    if auroc is not None and math.isnan(auroc):
        auroc = None
    return EvalResult(n, loss, auroc, auprc, accuracy)

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from opacus import PrivacyEngine
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from fedrun_core.api import PrivacySpec, TrainingSpec
from fedrun_trainer.common.data import Table
from fedrun_trainer.common.model import Weights, get_weights, set_weights
from fedrun_trainer.common.privacy import HistoryEntry, PrivacyLedger
from fedrun_trainer.common.scores import score_counts

__all__ = [
    "GRAD_SAMPLE_MODE",
    "EvalResult",
    "PoissonBatches",
    "RoundResult",
    "Rows",
    "Training",
    "batch_loader",
    "evaluate",
    "fresh_seed",
    "poisson_loader",
    "predict_logits",
    "start_training",
    "train_round",
]

#: How Opacus computes per-sample gradients: torch's ExpandedWeights. For fedrun's models
#: (``nn.Linear`` and ``nn.ReLU`` only) it was the fastest of Opacus's modes (hooks, ew,
#: functorch, ghost; docs/benchmarks.md). Clipping is per sample in every mode and the
#: accountant sees the same steps, so ε does not depend on it.
GRAD_SAMPLE_MODE = "ew"


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
    #: Per-bin counts of negatives' and positives' scores (:mod:`..common.scores`).
    score_counts: tuple[list[int], list[int]] | None = None


def fresh_seed(hospital: str, server_round: int) -> int:
    """A 63-bit seed from ``os.urandom`` mixed with hospital, round, pid and time."""
    tag = f"{hospital}/{server_round}/{os.getpid()}/{time.time_ns()}".encode()
    digest = hashlib.sha256(os.urandom(32) + tag).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A table's features and labels as tensors, fetched a whole batch at a time.

    ``DataLoader`` calls :meth:`__getitems__` with a batch's indices, so a batch costs one
    indexing operation instead of one per row and a stack; with :func:`batch_loader`'s
    pass-through collate this made a training step about 30 % faster (docs/benchmarks.md).
    """

    def __init__(self, table: Table) -> None:
        self.x = torch.from_numpy(table.x)
        self.y = torch.from_numpy(table.y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.x[rows], self.y[rows]


class PoissonBatches(Sampler[list[int]]):
    """DP-SGD's Poisson sampling: ``steps`` batches, each holding every one of ``n`` rows
    independently with probability ``q = 1/steps`` (so a batch may be empty).

    Each batch is drawn as a size ``K ~ Binomial(n, q)`` and then ``K`` distinct rows
    uniformly at random, which is the same distribution as ``n`` independent coin flips,
    in time proportional to the batch rather than to ``n``. Opacus's own sampler draws
    ``n`` uniforms per batch, so an epoch cost ``n²/batch``: at a million rows DP-SGD ran
    at a fifth of its speed at 100k (docs/benchmarks.md). The accountant is told the same
    ``q``. ``rng`` is numpy's PCG64; like Opacus without ``secure_mode``, not a
    cryptographic generator.
    """

    def __init__(self, n: int, steps: int, rng: np.random.Generator) -> None:
        if n < 1 or steps < 1:
            raise ValueError(f"need rows and steps, got n={n}, steps={steps}")
        self.n, self.steps, self.rng = n, steps, rng
        self.sample_rate = 1.0 / steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            size = int(self.rng.binomial(self.n, self.sample_rate))
            yield self.rng.choice(self.n, size=size, replace=False).tolist()


def _whole_batch(batch: Any) -> Any:
    """The collate function for :class:`Rows`: its batches are already ``(x, y)`` tensors."""
    return batch


def batch_loader(table: Table, batch_size: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled ``(x, y)`` batches of ``table``; ``len()`` is ``ceil(rows / batch_size)``."""
    return DataLoader(Rows(table), batch_size=batch_size, shuffle=True, collate_fn=_whole_batch)


def poisson_loader(
    table: Table, batch_size: int, rng: np.random.Generator
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """:class:`PoissonBatches` of ``table``: as many batches as :func:`batch_loader` has,
    each row in a batch with probability ``1/len()`` (expected size about ``batch_size``)."""
    steps = math.ceil(len(table) / batch_size)
    sampler = PoissonBatches(len(table), steps, rng)
    return DataLoader(Rows(table), batch_sampler=sampler, collate_fn=_whole_batch)


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


def _quiet_opacus() -> None:
    """Silence Opacus's expected warnings (call inside ``warnings.catch_warnings()``)."""
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    # Opacus's hooks on a first layer whose input needs no gradient: expected, harmless.
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")


@dataclass
class Training:
    """A model set up for local training: its loader, and one optimizer step per batch.

    With privacy on, ``module``, ``optimizer`` and ``loader`` are Opacus's (Poisson batches,
    per-sample clipping, noise) and ``engine`` holds the accountant, which counts every step.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    engine: PrivacyEngine | None
    params: list[nn.Parameter]
    criterion: nn.Module

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """One optimizer step on the batch ``(x, y)``; its mean loss, or None if it was empty.

        Poisson sampling can draw an empty batch: the step is still taken (noise only),
        as the accountant counts it and the DP analysis assumes. Its per-sample gradients
        are set to an empty batch directly, since ExpandedWeights refuses a batch of 0.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
            self.optimizer.step()
            return None
        loss = self.criterion(self.module(x).reshape(-1), y)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def start_training(
    model: nn.Module,
    train: Table,
    training: TrainingSpec,
    privacy: PrivacySpec,
    *,
    noise_multiplier: float = 0.0,
    history: Sequence[HistoryEntry] = (),
    accountant: str | None = None,
    rng: np.random.Generator | None = None,
) -> Training:
    """Set ``model`` (trained in place) up to train on ``train``: SGD, plus DP-SGD if enabled.

    With privacy on, the accountant (``accountant``, else the spec's) starts from ``history``
    (the ledger's), Opacus's ``make_private`` wraps model and optimizer with
    ``noise_multiplier`` and the spec's clipping norm, and batches are
    :class:`PoissonBatches` drawn with ``rng`` (default: fresh OS entropy). Checking the
    budget first is the caller's job.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=training.learning_rate)
    if not privacy.enabled:
        loader = batch_loader(train, training.batch_size)
        return Training(model, optimizer, loader, None, params, nn.BCEWithLogitsLoss())
    loader = poisson_loader(train, training.batch_size, rng or np.random.default_rng())
    with warnings.catch_warnings():
        _quiet_opacus()
        engine = PrivacyEngine(accountant=accountant or privacy.accountant)
        engine.accountant.history = list(history)
        # The loader already samples Poisson batches (PoissonBatches): Opacus keeps it and
        # takes q = 1/len(loader) for the accountant, as with its own sampler.
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=GRAD_SAMPLE_MODE,
        )
        module.forbid_grad_accumulation()
    return Training(module, dp_optimizer, dp_loader, engine, params, nn.BCEWithLogitsLoss())


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

    round_seed = fresh_seed(name, server_round) if seed is None else seed
    _reseed(round_seed)
    base = copy.deepcopy(model)
    set_weights(base, global_weights)
    params = [p for p in base.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    per_epoch = len(batch_loader(train, training.batch_size))
    steps = per_epoch * training.local_epochs

    with warnings.catch_warnings():
        _quiet_opacus()
        sigma = 0.0
        if privacy.enabled:
            assert ledger is not None
            ledger.check_budget(steps, 1.0 / per_epoch)  # raises BudgetExceeded before training
            sigma = ledger.noise_multiplier
        run = start_training(
            base,
            train,
            training,
            privacy,
            noise_multiplier=sigma,
            history=ledger.history if ledger is not None else (),
            accountant=ledger.accountant if ledger is not None else None,
            rng=np.random.default_rng(round_seed),
        )
        loss_sum, seen = 0.0, 0
        for _ in range(training.local_epochs):
            for x, y in run.loader:
                loss = run.step(x, y)
                if loss is not None:
                    loss_sum += loss * len(y)
                    seen += len(y)
                if proximal_mu > 0:
                    _pull_towards(params, anchor, training.learning_rate * proximal_mu)

    new_ledger = ledger
    epsilon = 0.0
    if run.engine is not None and ledger is not None:
        new_ledger = ledger.with_round(server_round, run.engine.accountant.history)
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
    counts = score_counts(logits.numpy(), y)
    return EvalResult(n, loss, auroc, auprc, accuracy, counts)

"""Differential-privacy accounting for one hospital across a whole run.

Each hospital's guarantee is its own. Before the first round a hospital fixes one noise
multiplier σ for the *whole* run (all rounds × local epochs × steps per epoch, at Opacus's
Poisson sample rate ``q = 1/len(loader)``), and it carries one accountant history
``[(σ, q, steps), ...]`` from round to round. Recomputing σ per round, or restarting the
accountant each round, under-counts ε (the composition of rounds is not additive, and not
free either).

The history lives in a :class:`PrivacyLedger` persisted at a per-hospital URI (a PVC path or
S3). A restarted hospital resumes from its ledger, never from zero: if a ledger exists its
history is kept even when the σ/q it holds differ from what a fresh start would compute
(ε never decreases), and training continues with the ledger's σ. The ledger also records
which server rounds were trained, so a retried round is not trained (and charged) twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedrun_trainer.data import resolve_local_path

__all__ = [
    "BudgetExceeded",
    "HistoryEntry",
    "PrivacyLedger",
    "epsilon_of",
    "load_ledger",
    "new_ledger",
    "noise_multiplier_for_run",
    "open_ledger",
    "save_ledger",
    "steps_per_epoch",
]

#: One accountant history entry: (noise multiplier σ, sample rate q, number of steps).
HistoryEntry = tuple[float, float, int]
ACCOUNTANTS = ("rdp", "prv")
# Relative slack when comparing ε with the target: the same history split into rounds
# can differ from the whole-run figure in the last floating-point digits.
_EPS_SLACK = 1e-6
_ALPHA_WARNING = ".*Optimal order is the (largest|smallest) alpha.*"


class BudgetExceeded(Exception):  # noqa: N818 - the domain's name for it
    """Training this round would take the hospital over its target ε; nothing was trained."""


def _accountant(name: str) -> RDPAccountant | PRVAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"unknown accountant {name!r} (expected one of {ACCOUNTANTS})")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per local epoch: ``len(DataLoader)``, i.e. ``ceil(n / batch_size)``.

    Opacus's Poisson loader takes the same number of steps with sample rate ``1/steps``.
    """
    if n_train < 1 or batch_size < 1:
        raise ValueError(f"need n_train >= 1 and batch_size >= 1, got {n_train}, {batch_size}")
    return math.ceil(n_train / batch_size)


def noise_multiplier_for_run(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
) -> float:
    """The σ at which ``total_steps`` steps at sample rate ``q`` spend at most ``target_epsilon``.

    ``total_steps`` must cover the whole run: rounds × local epochs × steps per epoch.
    """
    if target_epsilon <= 0 or not 0 < delta < 1 or not 0 < sample_rate <= 1 or total_steps < 1:
        raise ValueError("need target_epsilon > 0, 0 < delta < 1, 0 < q <= 1, total_steps >= 1")
    _accountant(accountant)
    with warnings.catch_warnings():
        # The binary search visits tiny σ whose best RDP order is the largest one tried.
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
        )
    return float(sigma)


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε spent by an Opacus accountant history ``[(σ, q, steps), ...]`` (0.0 if empty)."""
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    acc = _accountant(accountant)
    acc.history = entries
    with warnings.catch_warnings():
        # Only ever makes the RDP bound looser (conservative), never smaller.
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class PrivacyLedger:
    """A hospital's privacy spend so far; persisted with :func:`save_ledger`.

    ``history`` is the Opacus accountant history; ``rounds_trained`` the server rounds
    already trained (a retried round is not trained again); ``epsilon`` the ε of
    ``history`` at ``delta``, kept for readers that have no accountant.
    """

    hospital: str
    accountant: str
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    epsilon: float = 0.0

    @property
    def rounds_done(self) -> int:
        return len(self.rounds_trained)

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (noisy gradient releases)."""
        return sum(n for _, _, n in self.history)

    def epsilon_after(self, steps: int, sample_rate: float | None = None) -> float:
        """ε if ``steps`` more steps were taken at the ledger's σ (and ``sample_rate``)."""
        q = self.sample_rate if sample_rate is None else sample_rate
        return epsilon_of(
            [*self.history, (self.noise_multiplier, q, steps)], self.delta, self.accountant
        )

    def check_budget(self, steps: int, sample_rate: float | None = None) -> float:
        """ε after ``steps`` more steps; raises :class:`BudgetExceeded` if over the target."""
        after = self.epsilon_after(steps, sample_rate)
        if after > self.target_epsilon * (1.0 + _EPS_SLACK):
            raise BudgetExceeded(
                f"hospital {self.hospital}: training {steps} more steps would spend "
                f"ε={after:.4f} > target ε={self.target_epsilon} (δ={self.delta}); "
                f"spent so far ε={self.epsilon:.4f} over {self.rounds_done} round(s)"
            )
        return after

    def with_round(self, server_round: int, history: Sequence[Sequence[float]]) -> PrivacyLedger:
        """A copy recording ``server_round`` as trained with the accountant's new ``history``."""
        entries = [(float(s), float(q), int(n)) for s, q, n in history]
        if sum(n for _, _, n in entries) < self.steps:
            raise ValueError("the new accountant history is shorter than the ledger's")
        return replace(
            self,
            history=entries,
            rounds_trained=sorted({*self.rounds_trained, int(server_round)}),
            epsilon=epsilon_of(entries, self.delta, self.accountant),
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["rounds_done"] = self.rounds_done
        data["history"] = [list(h) for h in self.history]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        data: dict[str, Any] = json.loads(text)
        data.pop("rounds_done", None)
        data["history"] = [(float(s), float(q), int(n)) for s, q, n in data.get("history", [])]
        data["rounds_trained"] = sorted(int(r) for r in data.get("rounds_trained", []))
        return cls(**data)


def new_ledger(
    *,
    hospital: str,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    noise_multiplier: float | None = None,
) -> PrivacyLedger:
    """A fresh ledger whose σ makes the whole run end at or under ``target_epsilon``.

    A given ``noise_multiplier`` (spec ``privacy.noiseMultiplier``) is used as is; the
    budget check in training still refuses any round that would overspend.
    """
    steps = steps_per_epoch(n_train, batch_size)
    q = 1.0 / steps
    per_round = steps * local_epochs
    sigma = (
        float(noise_multiplier)
        if noise_multiplier is not None
        else noise_multiplier_for_run(target_epsilon, delta, q, rounds * per_round, accountant)
    )
    return PrivacyLedger(
        hospital=hospital,
        accountant=accountant,
        delta=delta,
        target_epsilon=target_epsilon,
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=per_round,
    )


# --------------------------------------------------------------------------- persistence


def _s3_parts(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def load_ledger(uri: str) -> PrivacyLedger | None:
    """The ledger stored at ``uri`` (``file://``, plain path or ``s3://``); None if absent."""
    if uri.startswith("s3://"):
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = _s3_parts(uri)
        try:
            obj = boto3.client("s3").get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return PrivacyLedger.from_json(obj["Body"].read().decode("utf-8"))
    path = resolve_local_path(uri)
    if not path.exists():
        return None
    return PrivacyLedger.from_json(path.read_text(encoding="utf-8"))


def save_ledger(uri: str, ledger: PrivacyLedger) -> None:
    """Store ``ledger`` at ``uri``: atomically (temp file + rename) on disk, one PUT on S3."""
    text = ledger.to_json()
    if uri.startswith("s3://"):
        import boto3

        bucket, key = _s3_parts(uri)
        boto3.client("s3").put_object(
            Bucket=bucket, Key=key, Body=text.encode("utf-8"), ContentType="application/json"
        )
        return
    path = resolve_local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_ledger(
    uri: str,
    *,
    hospital: str,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    noise_multiplier: float | None = None,
) -> PrivacyLedger:
    """Resume the ledger at ``uri``, or start one with :func:`new_ledger` (same arguments).

    An existing ledger wins: its history, σ, q and target are kept even when a fresh start
    would compute different ones (ε never goes back). It must belong to ``hospital``.
    A new ledger is not saved here; the caller saves after each trained round.
    """
    existing = load_ledger(uri)
    if existing is not None:
        if existing.hospital != hospital:
            raise ValueError(f"ledger at {uri} belongs to {existing.hospital!r}, not {hospital!r}")
        return existing
    return new_ledger(
        hospital=hospital,
        n_train=n_train,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
    )

"""Differential-privacy accounting for one hospital across a whole run.

Each hospital's guarantee is its own. Before the first round a hospital fixes one noise
multiplier σ for the *whole* run (all rounds × local epochs × steps per epoch, at Opacus's
Poisson sample rate ``q = 1/len(loader)``), and it carries one accountant history
``[(σ, q, steps), ...]`` from round to round. Recomputing σ per round, or restarting the
accountant each round, under-counts ε (the composition of rounds is not additive, and not
free either).

Two things, kept apart:

- the **plan** (:class:`PrivacyPlan`, :func:`plan_privacy`): target ε, δ and accountant
  from the spec, and the σ, q and steps per round they imply for this hospital's row count.
  It is always computed from the spec, never read from storage, so nothing stored can
  loosen it;
- the **ledger** file (:class:`LedgerRecord`): only what was *spent* (the accountant
  history and the server rounds trained), which run (uid) and hospital it belongs to, and
  the terms it was written under. It lives at a per-hospital URI (a PVC path or S3) so a
  restarted hospital resumes from it, never from zero.

:func:`open_ledger` joins them into a :class:`PrivacyLedger` and refuses a ledger that
belongs to another hospital or another run, or was written under other terms
(:class:`LedgerRefused`): a ledger left over from a deleted run of the same name, or one
written by anyone who can write the bucket, must not steer this run's noise.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlparse

from fedrun_core.accounting import over_target
from fedrun_core.api import FederatedRunSpec
from fedrun_trainer.common.data import resolve_local_path

if TYPE_CHECKING:
    from opacus.accountants import PRVAccountant, RDPAccountant

__all__ = [
    "MAX_HISTORY",
    "MAX_LEDGER_BYTES",
    "BudgetExceeded",
    "HistoryEntry",
    "LedgerRecord",
    "LedgerRefused",
    "PrivacyLedger",
    "PrivacyPlan",
    "check_record",
    "checked_history",
    "epsilon_of",
    "load_ledger",
    "new_ledger",
    "noise_multiplier_for_run",
    "open_ledger",
    "plan_privacy",
    "save_ledger",
    "steps_per_epoch",
]

#: One accountant history entry: (noise multiplier σ, sample rate q, number of steps).
HistoryEntry = tuple[float, float, int]
ACCOUNTANTS = ("rdp", "prv")
#: Version of the ledger file format written by :func:`save_ledger`.
LEDGER_FORMAT = 2
#: Bounds on what is read back (a ledger file, a server's record): a run has one entry per
#: round at most, and a history longer than this is not one fedrun wrote.
MAX_HISTORY = 10_000
MAX_LEDGER_BYTES = 1024 * 1024
_ALPHA_WARNING = ".*Optimal order is the (largest|smallest) alpha.*"


class BudgetExceeded(Exception):  # noqa: N818 - the domain's name for it
    """Training this round would take the hospital over its target ε; nothing was trained."""


class LedgerRefused(ValueError):  # noqa: N818 - the domain's name for it
    """A stored ledger cannot be used for this run; the message says why and what to do."""


def _accountant(name: str) -> RDPAccountant | PRVAccountant:
    # Opacus (and torch under it) is imported on first use, not with this module: the
    # ServerApp reads its plan only once hospitals have joined, and waits for them sooner.
    from opacus.accountants import PRVAccountant, RDPAccountant

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


@lru_cache(maxsize=256)
def noise_multiplier_for_run(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
) -> float:
    """The σ at which ``total_steps`` steps at sample rate ``q`` spend at most ``target_epsilon``.

    ``total_steps`` must cover the whole run: rounds × local epochs × steps per epoch.
    Deterministic (Opacus's binary search), so every process that plans the same run gets
    the same σ.
    """
    if target_epsilon <= 0 or not 0 < delta < 1 or not 0 < sample_rate <= 1 or total_steps < 1:
        raise ValueError("need target_epsilon > 0, 0 < delta < 1, 0 < q <= 1, total_steps >= 1")
    _accountant(accountant)
    from opacus.accountants.utils import get_noise_multiplier

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


def checked_history(history: Sequence[Sequence[Any]], source: str) -> list[HistoryEntry]:
    """``history`` as ``[(σ, q, steps), ...]``, or ValueError naming ``source`` and the entry.

    Every entry must be three finite numbers with σ > 0, 0 < q <= 1 and a whole number of
    steps >= 0, and there may be at most :data:`MAX_HISTORY` entries: anything read from a
    file or the network passes here before an accountant sees it (Opacus loops forever on
    q = NaN).
    """
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
        raise ValueError(f"{source}: the history must be a list of [σ, q, steps]")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"{source}: {len(history)} history entries (at most {MAX_HISTORY})")
    out: list[HistoryEntry] = []
    for i, entry in enumerate(history):
        if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)) or len(entry) != 3:
            raise ValueError(f"{source}: history entry {i} is not [σ, q, steps]")
        sigma, q, steps = entry
        numbers = (sigma, q, steps)
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers):
            raise ValueError(f"{source}: history entry {i} holds a value that is not a number")
        if not all(math.isfinite(float(x)) for x in numbers):
            raise ValueError(f"{source}: history entry {i} holds a non-finite number")
        if not float(sigma) > 0:
            raise ValueError(f"{source}: history entry {i}: σ must be > 0")
        if not 0 < float(q) <= 1:
            raise ValueError(f"{source}: history entry {i}: q must be in (0, 1]")
        if float(steps) != int(steps) or int(steps) < 0:
            raise ValueError(f"{source}: history entry {i}: steps must be a whole number >= 0")
        out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_of(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε spent by an Opacus accountant history ``[(σ, q, steps), ...]`` (0.0 if empty, never
    below 0)."""
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    acc = _accountant(accountant)
    acc.history = entries
    with warnings.catch_warnings():
        # Only ever makes the RDP bound looser (conservative), never smaller.
        warnings.filterwarnings("ignore", message=_ALPHA_WARNING)
        # Never below 0, as fedrun_core.accounting.epsilon (a negative bound implies ε = 0).
        return max(float(acc.get_epsilon(delta=delta)), 0.0)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PrivacyPlan:
    """What the spec fixes for one hospital: the terms, and the noise they imply.

    ``noise_multiplier`` is the σ calibrated so that ``rounds`` rounds end at or under
    ``target_epsilon`` (or the spec's explicit ``privacy.noiseMultiplier``);
    ``sample_rate`` is Opacus's ``1/len(loader)``; ``steps_per_round`` is local epochs ×
    steps per epoch.
    """

    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int

    @property
    def cost_of_round(self) -> HistoryEntry:
        """The history entry one more round adds."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


class PlanTerms(TypedDict):
    """The spec's settings a privacy plan is made of (all but the hospital's row count)."""

    batch_size: int
    local_epochs: int
    rounds: int
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float | None


def plan_terms(spec: FederatedRunSpec) -> PlanTerms:
    """The plan's settings from a run's spec, as keywords for :func:`plan_privacy`,
    :func:`new_ledger` and :func:`open_ledger`."""
    return PlanTerms(
        batch_size=spec.training.batch_size,
        local_epochs=spec.training.local_epochs,
        rounds=spec.rounds,
        target_epsilon=spec.privacy.target_epsilon,
        delta=spec.privacy.delta,
        accountant=spec.privacy.accountant,
        noise_multiplier=spec.privacy.noise_multiplier,
    )


def plan_privacy(
    *,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    noise_multiplier: float | None = None,
) -> PrivacyPlan:
    """The plan of a hospital with ``n_train`` training rows, from the spec's settings.

    A given ``noise_multiplier`` (spec ``privacy.noiseMultiplier``) is used as is; the
    budget check before each round still refuses any round that would overspend.
    """
    steps = steps_per_epoch(n_train, batch_size)
    q = 1.0 / steps
    per_round = steps * local_epochs
    sigma = (
        float(noise_multiplier)
        if noise_multiplier is not None
        else noise_multiplier_for_run(target_epsilon, delta, q, rounds * per_round, accountant)
    )
    return PrivacyPlan(target_epsilon, delta, accountant, sigma, q, per_round)


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class LedgerRecord:
    """What a ledger file holds: whose spend it is, the terms, and what was spent.

    No σ, q or target to resume with: those always come from the spec (:class:`PrivacyPlan`).
    The terms (``target_epsilon``, ``delta``, ``accountant``) are kept only to refuse a
    ledger written under other ones.
    """

    hospital: str
    run_uid: str
    accountant: str
    delta: float
    target_epsilon: float
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    lineage: str = ""
    lineage_steps: int = 0

    @property
    def epsilon(self) -> float:
        """ε of the history under the terms it was written with."""
        return epsilon_of(self.history, self.delta, self.accountant)

    @property
    def steps(self) -> int:
        """Optimizer steps recorded (noisy gradient releases)."""
        return sum(n for _, _, n in self.history)

    @property
    def rounds_done(self) -> int:
        return len(self.rounds_trained)

    def to_json(self) -> str:
        """The file's text (``epsilon`` and ``steps`` are written for human readers only)."""
        data = {
            "format": LEDGER_FORMAT,
            "hospital": self.hospital,
            "runUid": self.run_uid,
            "accountant": self.accountant,
            "delta": self.delta,
            "targetEpsilon": self.target_epsilon,
            "history": [list(h) for h in self.history],
            "roundsTrained": list(self.rounds_trained),
            "lineage": self.lineage,
            "lineageSteps": self.lineage_steps,
            "steps": self.steps,
            "epsilon": self.epsilon,
        }
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> LedgerRecord:
        """Parse and validate a ledger file; ValueError naming ``source`` when it is unusable."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise LedgerRefused(f"{source}: not a fedrun ledger (not JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise LedgerRefused(
                f"{source}: not a fedrun ledger of format {LEDGER_FORMAT} (found "
                f"{found!r}); a ledger written by an older fedrun belongs to an earlier run"
            )
        try:
            rounds = data.get("roundsTrained", [])
            if not isinstance(rounds, list) or len(rounds) > MAX_HISTORY:
                raise ValueError("roundsTrained must be a list")
            if any(isinstance(r, bool) or not isinstance(r, int) for r in rounds):
                raise ValueError("roundsTrained must hold whole numbers")
            record = cls(
                hospital=_text(data, "hospital"),
                run_uid=_text(data, "runUid"),
                accountant=_text(data, "accountant"),
                delta=_finite(data, "delta"),
                target_epsilon=_finite(data, "targetEpsilon"),
                history=checked_history(data.get("history", []), source),
                rounds_trained=sorted(int(r) for r in rounds),
                lineage=str(data.get("lineage") or ""),
                lineage_steps=_whole(data.get("lineageSteps", 0)),
            )
            if not re.fullmatch(r"[0-9a-f]{0,64}", record.lineage) or not (
                record.lineage_steps <= record.steps
            ):
                raise ValueError("lineage must be an id and lineageSteps at most the steps")
        except (TypeError, ValueError) as err:
            raise LedgerRefused(f"{source}: not a valid fedrun ledger: {err}") from None
        return record


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("lineageSteps must be a whole number")
    return value


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _finite(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    if not math.isfinite(float(value)):
        raise ValueError(f"{key} must be finite")
    return float(value)


@dataclass(frozen=True)
class PrivacyLedger:
    """A hospital's privacy spend so far under its plan; persisted with :func:`save_ledger`.

    ``plan`` comes from the spec; ``history`` is the Opacus accountant history spent so far;
    ``rounds_trained`` the server rounds already trained in the current server ``lineage``
    (a retried round is not trained again); ``lineage_steps`` the steps spent before that
    lineage began (a server that started over without its checkpoint counts rounds from 1
    again, and those are new rounds); ``run_uid`` the run the spend belongs to.
    """

    hospital: str
    run_uid: str
    plan: PrivacyPlan
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_trained: list[int] = field(default_factory=list)
    lineage: str = ""
    lineage_steps: int = 0

    @property
    def accountant(self) -> str:
        return self.plan.accountant

    @property
    def delta(self) -> float:
        return self.plan.delta

    @property
    def target_epsilon(self) -> float:
        return self.plan.target_epsilon

    @property
    def noise_multiplier(self) -> float:
        """σ of every step this ledger's hospital takes: the plan's, never a stored one."""
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def steps_per_round(self) -> int:
        return self.plan.steps_per_round

    @property
    def epsilon(self) -> float:
        """ε of ``history`` under the plan's δ and accountant."""
        return epsilon_of(self.history, self.delta, self.accountant)

    @property
    def rounds_done(self) -> int:
        return len(self.rounds_trained)

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (noisy gradient releases)."""
        return sum(n for _, _, n in self.history)

    def epsilon_after(self, steps: int, sample_rate: float | None = None) -> float:
        """ε if ``steps`` more steps were taken at the plan's σ (and ``sample_rate``)."""
        q = self.sample_rate if sample_rate is None else sample_rate
        return epsilon_of(
            [*self.history, (self.noise_multiplier, q, steps)], self.delta, self.accountant
        )

    def check_budget(self, steps: int, sample_rate: float | None = None) -> float:
        """ε after ``steps`` more steps; raises :class:`BudgetExceeded` if over the target."""
        after = self.epsilon_after(steps, sample_rate)
        if over_target(after, self.target_epsilon):
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
        )

    @property
    def lineage_steps_spent(self) -> int:
        """Steps spent in the current server lineage."""
        return self.steps - self.lineage_steps

    def for_lineage(self, lineage: str) -> PrivacyLedger:
        """This ledger for server lineage ``lineage``: itself when it is the current one;
        else one whose rounds start afresh (all it spent stays in its history)."""
        if lineage == self.lineage:
            return self
        return replace(self, lineage=lineage, lineage_steps=self.steps, rounds_trained=[])

    def with_history(self, history: Sequence[HistoryEntry]) -> PrivacyLedger:
        """A copy that has spent ``history`` (a longer record of this hospital's steps)."""
        return replace(self, history=list(history))

    def record(self) -> LedgerRecord:
        """What :func:`save_ledger` stores: the spend, whose it is, and the terms."""
        return LedgerRecord(
            hospital=self.hospital,
            run_uid=self.run_uid,
            accountant=self.accountant,
            delta=self.delta,
            target_epsilon=self.target_epsilon,
            history=list(self.history),
            rounds_trained=list(self.rounds_trained),
            lineage=self.lineage,
            lineage_steps=self.lineage_steps,
        )

    def to_json(self) -> str:
        """The ledger file's text (see :class:`LedgerRecord`)."""
        return self.record().to_json()


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
    run_uid: str = "",
) -> PrivacyLedger:
    """A fresh ledger (nothing spent) on the plan :func:`plan_privacy` makes of these settings."""
    plan = plan_privacy(
        n_train=n_train,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
    )
    return PrivacyLedger(hospital=hospital, run_uid=run_uid, plan=plan)


# --------------------------------------------------------------------------- persistence


def _s3_parts(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _read(uri: str) -> bytes | None:
    """The stored bytes at ``uri`` (at most :data:`MAX_LEDGER_BYTES` + 1), None if absent."""
    if uri.startswith("s3://"):
        from botocore.exceptions import ClientError

        from fedrun_trainer.common.cloud import s3_client

        bucket, key = _s3_parts(uri)
        try:
            obj = s3_client(uri).get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        body: bytes = obj["Body"].read(MAX_LEDGER_BYTES + 1)
        return body
    path = resolve_local_path(uri)
    if not path.exists():
        return None
    with path.open("rb") as handle:
        return handle.read(MAX_LEDGER_BYTES + 1)


def load_ledger(uri: str) -> LedgerRecord | None:
    """The ledger stored at ``uri`` (``file://``, plain path, ``pvc://`` or ``s3://``).

    None if there is none; :class:`LedgerRefused` if what is there is not a valid ledger
    (too large, not JSON, an older format, values out of range).
    """
    raw = _read(uri)
    if raw is None:
        return None
    if len(raw) > MAX_LEDGER_BYTES:
        raise LedgerRefused(f"{uri}: larger than {MAX_LEDGER_BYTES} bytes: not a fedrun ledger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LedgerRefused(f"{uri}: not a fedrun ledger (not UTF-8 text)") from None
    return LedgerRecord.from_json(text, uri)


def save_ledger(uri: str, ledger: PrivacyLedger) -> None:
    """Store ``ledger``'s record at ``uri``: atomically (temp file, rename) on disk; S3: a PUT."""
    text = ledger.to_json()
    if uri.startswith("s3://"):
        from fedrun_trainer.common.cloud import s3_client

        bucket, key = _s3_parts(uri)
        s3_client(uri).put_object(
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


def check_record(record: LedgerRecord, ledger: PrivacyLedger, uri: str) -> None:
    """Raise :class:`LedgerRefused` unless ``record`` may be resumed by ``ledger``'s run.

    It must be this hospital's, written by this very run (same uid), under the same terms
    (target ε, δ, accountant): the spec of a running run cannot change, so other terms
    mean another run's ledger or one written by hand.
    """
    if record.hospital != ledger.hospital:
        raise LedgerRefused(
            f"ledger at {uri} belongs to hospital {record.hospital!r}, not {ledger.hospital!r}"
        )
    if record.run_uid != ledger.run_uid:
        raise LedgerRefused(
            f"ledger at {uri} was written by another run (uid {record.run_uid or 'unknown'!s}), "
            f"not this one (uid {ledger.run_uid or 'unknown'!s}): a ledger is never carried "
            "from one run to another; remove it, or give this run its own ledgerUri"
        )
    ours = (ledger.target_epsilon, ledger.delta, ledger.accountant)
    theirs = (record.target_epsilon, record.delta, record.accountant)
    if theirs != ours:
        raise LedgerRefused(
            f"ledger at {uri} was written under target ε={record.target_epsilon}, "
            f"δ={record.delta}, accountant {record.accountant}, not this run's target "
            f"ε={ledger.target_epsilon}, δ={ledger.delta}, accountant {ledger.accountant}: "
            "refused (the spec's privacy terms always apply)"
        )


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
    run_uid: str = "",
) -> PrivacyLedger:
    """This run's ledger for ``hospital``: the spec's plan, resumed from ``uri`` if one is there.

    The stored history and rounds are resumed (ε never goes back); σ, q, the target, δ and
    the accountant are always the spec's. A stored ledger of another hospital or run, or
    written under other terms, raises :class:`LedgerRefused`. A new ledger is not saved
    here; the caller saves after each trained round.
    """
    fresh = new_ledger(
        hospital=hospital,
        n_train=n_train,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise_multiplier,
        run_uid=run_uid,
    )
    stored = load_ledger(uri)
    if stored is None:
        return fresh
    check_record(stored, fresh, uri)
    return replace(
        fresh,
        history=list(stored.history),
        rounds_trained=list(stored.rounds_trained),
        lineage=stored.lineage,
        lineage_steps=stored.lineage_steps,
    )

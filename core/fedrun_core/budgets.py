"""Lifetime privacy budgets: one per hospital dataset, charged by every run on that data.

A run's ε is a promise about one run; a patient in a hospital's table is exposed by every
run that trains on it. A *PrivacyBudget* is the lifetime promise for one hospital's
dataset: a limit (ε, δ) that all runs on it together stay within.

Terms (each defined here once):

charge
    One run's entry in a budget, keyed by the run's uid: the run's name and namespace, its
    *reservation* and its accountant *history* on this dataset so far.
reservation
    The ε a run may still spend: its ``spec.privacy.targetEpsilon``, which the run's own
    stop rule (the hospital's, the server's and the operator's) already never lets it
    exceed, at the run's δ. Held while the run is ``Reserved`` (admitted, not finished);
    given back (the state becomes ``Released``) when it ends with its final history
    charged. A run that ended *unseen* (deleted, or ended while its server could not be
    read) becomes ``Unsettled`` instead: its whole reservation stays committed.
history
    Opacus' accountant history ``[(σ, q, steps), ...]`` of the run at this hospital: what
    the run has actually spent, charged round by round. It stays after release.
spent
    The lifetime ε at the budget's δ: every charge's history composed with the RDP
    accountant (:func:`composed_epsilon`): RDP adds per order across runs as it does across
    steps, so this is the same figure as one accountant that saw every step of every run.
summed
    The sum of each run's own ε at the budget's δ (:func:`summed_epsilon`): what adding
    ε's would claim, shown beside ``spent`` for comparison. Never below it here.
committed
    What the budget must hold back: the composed ε of the released charges' histories plus
    every held reservation (:func:`committed_epsilon`). A new run is admitted only if
    ``committed + its reservation ≤ limit``.

Why ``committed`` is a safe ceiling: a run never spends more than its reservation (its own
stop rule), and RDP-composed ε is subadditive, ε(A ∪ B) ≤ ε(A) + ε(B) at one δ, whenever
the conversion term ``(log(1/δ) − log α)/(α − 1) + log((α − 1)/α)`` is non-negative at every
order α the accountant uses; for Opacus' orders (up to 63) that holds for δ ≤ 0.0058, so
a budget's δ is at most :data:`MAX_BUDGET_DELTA` (1e-3), and a run's δ may not exceed its
budget's (ε at a smaller δ is the larger figure). So the final lifetime ε is at most
``committed`` at every moment, whatever the runs still do.

Everything here is pure: the operator and ``fedrun local`` read a budget, call these
functions, and write the result back (the operator through the API's optimistic
concurrency, so two runs racing for one budget are decided one after the other).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from fedrun_core import names as c
from fedrun_core.accounting import EPSILON_SLACK, collapse, epsilon
from fedrun_core.api import (
    DNS1123_LABEL,
    Condition,
    FederatedRun,
    History,
    ObjectMeta,
    Rule,
    _Spec,
    _Status,
    rules_schema,
)
from fedrun_core.states import Phase, Reason

__all__ = [
    "BUDGET_KIND",
    "MAX_BUDGET_DELTA",
    "Admitted",
    "BudgetFileError",
    "BudgetSpec",
    "BudgetStatus",
    "Charge",
    "DatasetRef",
    "PrivacyBudget",
    "Refused",
    "admit",
    "admit_run",
    "budget_yaml",
    "charge",
    "committed_epsilon",
    "composed_epsilon",
    "final_history_is_whole",
    "parse_budget",
    "release",
    "release_unseen",
    "summarize",
    "summed_epsilon",
    "withdraw",
]

BUDGET_KIND = c.BUDGET_KIND

#: The largest δ a budget may promise: subadditivity of the composed ε, on which admission
#: rests (module docstring), holds for δ ≤ 0.0058 at Opacus' orders.
MAX_BUDGET_DELTA = 1e-3

#: Charges a budget's status keeps; a budget with more runs than this on one dataset must be
#: split (a new dataset version) — the status object has to stay small.
MAX_CHARGES = 500

ChargeState = Literal["Reserved", "Released", "Unsettled"]
#: States whose whole reservation counts as committed.
HELD: tuple[ChargeState, ...] = ("Reserved", "Unsettled")


class DatasetRef(_Spec):
    """Which data a budget covers: the table's URI, a label, or both (at least one)."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            "has(self.uri) || has(self.label)",
            "a dataset names its uri, its label, or both",
            lambda d: d.uri is not None or d.label is not None,
            accepts={"uri": "s3://hospital-a-data/stroke.csv"},
            refuses={},
        ),
    )
    model_config = ConfigDict(json_schema_extra=rules_schema(RULES))

    uri: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="The table's URI (s3://, pvc://, file:), as the runs' hospitals name it.",
    )
    label: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="A name for the dataset when its URI changes between versions.",
    )


class BudgetSpec(_Spec):
    """The lifetime (ε, δ) a hospital grants to all runs on one dataset together."""

    hospital: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="The hospital whose data this is (a run's spec.hospitals[].name).",
    )
    dataset: DatasetRef = Field(description="The data this budget covers.")
    epsilon: float = Field(
        gt=0, le=1000, description="Lifetime ε: all runs on this dataset together stay within it."
    )
    delta: float = Field(
        1e-5,
        gt=0,
        le=MAX_BUDGET_DELTA,
        description=(
            "Lifetime δ (at most 0.001); a run may charge this budget only if its own δ is "
            "at most this one."
        ),
    )
    accountant: Literal["rdp"] = Field(
        "rdp", description="How histories compose: rdp (Rényi DP, as the runs' accountant)."
    )


class Charge(_Status):
    """One run's entry in a budget (see the module's terms)."""

    run: str = Field(max_length=253, description="The run's name.")
    namespace: str = Field(max_length=63, description="The run's namespace.")
    uid: str = Field(min_length=1, max_length=128, description="The run's uid: the charge's key.")
    state: ChargeState = Field(
        description=(
            "Reserved while the run may spend; then Released (Unsettled: it ended unseen "
            "and its reservation stays committed)."
        )
    )
    reserved: float = Field(ge=0, description="ε held for the run (its targetEpsilon).")
    delta: float = Field(gt=0, le=MAX_BUDGET_DELTA, description="The run's δ.")
    history: History = Field(
        default_factory=list, description="The run's accountant history here [[σ, q, steps]]."
    )
    spent: float = Field(0.0, ge=0, description="The run's own ε at the budget's δ.")
    updated: datetime | None = Field(None, description="When the charge last changed.")


class BudgetStatus(_Status):
    """A budget's charges and what they add up to."""

    spent: float = Field(0.0, ge=0, description="Lifetime ε: every run's history composed (RDP).")
    summed: float = Field(0.0, ge=0, description="The runs' ε added up, for comparison.")
    reserved: float = Field(0.0, ge=0, description="ε held for runs that have not ended.")
    committed: float = Field(0.0, ge=0, description="spent by ended runs + reserved.")
    remaining: float = Field(0.0, description="limit − committed: what a new run may reserve.")
    runs: int = Field(0, ge=0, description="Runs that charged this budget.")
    charges: list[Charge] = Field(default_factory=list, max_length=MAX_CHARGES)
    conditions: list[Condition] = Field(default_factory=list)


class PrivacyBudget(BaseModel):
    """A hospital dataset's lifetime privacy budget."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    api_version: Literal["fedrun.io/v1alpha1"] = "fedrun.io/v1alpha1"
    kind: Literal["PrivacyBudget"] = "PrivacyBudget"
    metadata: ObjectMeta
    spec: BudgetSpec
    status: BudgetStatus | None = None


# --------------------------------------------------------------------------- arithmetic


def _entries(history: Sequence[Sequence[float]]) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in history]


def composed_epsilon(histories: Iterable[Sequence[Sequence[float]]], delta: float) -> float:
    """The ε at ``delta`` of all ``histories`` together, under RDP composition.

    One accountant that saw every step of every run gives the same figure: RDP adds per
    order across runs as across steps, so this is ``epsilon`` of the histories joined.
    """
    joined = [e for h in histories for e in _entries(h)]
    return epsilon(collapse(joined), delta)


def summed_epsilon(histories: Iterable[Sequence[Sequence[float]]], delta: float) -> float:
    """Each history's own ε at ``delta``, added up: the naive lifetime figure."""
    return math.fsum(epsilon(_entries(h), delta) for h in histories)


def committed_epsilon(charges: Sequence[Charge], delta: float) -> float:
    """The ceiling on the lifetime ε whatever the unfinished runs still do: the released
    charges' histories composed, plus every reservation still held."""
    released = [ch.history for ch in charges if ch.state == "Released"]
    held = math.fsum(ch.reserved for ch in charges if ch.state in HELD)
    return composed_epsilon(released, delta) + held


def summarize(spec: BudgetSpec, charges: Sequence[Charge]) -> BudgetStatus:
    """The budget's status figures for ``charges`` (conditions left empty for the caller).

    An Unsettled charge counts as its whole reservation in ``spent`` and ``summed``."""
    histories = [ch.history for ch in charges if ch.state != "Unsettled"]
    unsettled = math.fsum(ch.reserved for ch in charges if ch.state == "Unsettled")
    committed = committed_epsilon(charges, spec.delta)
    return BudgetStatus(
        spent=composed_epsilon(histories, spec.delta) + unsettled,
        summed=summed_epsilon(histories, spec.delta) + unsettled,
        reserved=math.fsum(ch.reserved for ch in charges if ch.state == "Reserved"),
        committed=committed,
        remaining=spec.epsilon - committed,
        runs=len(charges),
        charges=list(charges),
    )


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Admitted:
    """The run holds a reservation: ``charges`` is the budget's new list (unchanged when the
    run was admitted before: admission is idempotent per uid)."""

    charges: list[Charge]
    changed: bool


@dataclass(frozen=True)
class Refused:
    """The run may not charge this budget; ``message`` says why with the figures."""

    reason: Literal["BudgetUnavailable", "BudgetMismatch"]
    message: str
    needed: float
    remaining: float


def admit(
    spec: BudgetSpec,
    charges: Sequence[Charge],
    *,
    run: str,
    namespace: str,
    uid: str,
    hospital: str,
    target_epsilon: float,
    delta: float,
    now: datetime,
) -> Admitted | Refused:
    """Reserve ``target_epsilon`` for the run ``uid`` at ``hospital``, if it fits.

    Refused when the budget is for another hospital or the run's δ exceeds the budget's;
    then a run already charged (by uid) keeps what it has, whatever its state: an operator
    that restarts, or a pass that repeats, never reserves twice. Otherwise refused when
    ``committed + target`` exceeds the limit (beyond the accountant's relative slack).
    """
    committed = committed_epsilon(charges, spec.delta)
    remaining = spec.epsilon - committed
    if hospital != spec.hospital:
        return Refused(
            "BudgetMismatch",
            f"the budget is for hospital {spec.hospital}, not {hospital}",
            target_epsilon,
            remaining,
        )
    if delta > spec.delta:
        return Refused(
            "BudgetMismatch",
            f"the run's δ={delta:g} exceeds the budget's δ={spec.delta:g}",
            target_epsilon,
            remaining,
        )
    if any(ch.uid == uid for ch in charges):
        return Admitted(list(charges), changed=False)
    if len(charges) >= MAX_CHARGES:
        return Refused(
            "BudgetUnavailable",
            f"the budget already lists {MAX_CHARGES} runs; give the dataset a new budget",
            target_epsilon,
            remaining,
        )
    if committed + target_epsilon > spec.epsilon * (1.0 + EPSILON_SLACK):
        return Refused(
            "BudgetUnavailable",
            f"the run needs ε={target_epsilon:g} but the budget has {max(remaining, 0.0):.4g} "
            f"of {spec.epsilon:g} left ({committed:.4g} spent by ended runs or held for "
            "running ones)",
            target_epsilon,
            remaining,
        )
    new = Charge(
        run=run,
        namespace=namespace,
        uid=uid,
        state="Reserved",
        reserved=target_epsilon,
        delta=delta,
        updated=now,
    )
    return Admitted([*charges, new], changed=True)


def admit_run(
    spec: BudgetSpec,
    charges: Sequence[Charge],
    run: FederatedRun,
    hospital: str,
    now: datetime,
) -> Admitted | Refused:
    """:func:`admit` for ``run`` at ``hospital``: its name, namespace, uid (``(not applied
    yet)`` for a run without one), targetEpsilon and δ."""
    return admit(
        spec,
        charges,
        run=run.name,
        namespace=run.metadata.namespace,
        uid=run.metadata.uid or "(not applied yet)",
        hospital=hospital,
        target_epsilon=run.spec.privacy.target_epsilon,
        delta=run.spec.privacy.delta,
        now=now,
    )


def charge(
    spec: BudgetSpec,
    charges: Sequence[Charge],
    uid: str,
    history: Sequence[Sequence[float]],
    now: datetime,
) -> list[Charge]:
    """Record the run ``uid``'s history so far: the reading that costs more of the one
    charged and ``history`` (idempotent; a reading that costs less, an older one or one in
    another (σ, q) form, never lowers what was charged, and two forms of one spending are
    never added up). Raises KeyError for a run that holds no charge here."""
    reading = [[sigma, q, float(n)] for sigma, q, n in collapse(_entries(history))]
    cost = epsilon(_entries(reading), spec.delta) if reading else 0.0
    out: list[Charge] = []
    found = False
    for ch in charges:
        if ch.uid != uid:
            out.append(ch)
            continue
        found = True
        if cost <= ch.spent or reading == ch.history:
            out.append(ch)
            continue
        out.append(ch.model_copy(update={"history": reading, "spent": cost, "updated": now}))
    if not found:
        raise KeyError(f"run {uid} holds no charge on this budget")
    return out


def release(charges: Sequence[Charge], uid: str, now: datetime) -> list[Charge]:
    """The run ``uid`` has ended and its final history is charged: its reservation is
    given back, its history stays.

    Idempotent; a uid without a charge leaves the list as it is.
    """
    return [
        ch.model_copy(update={"state": "Released", "updated": now})
        if ch.uid == uid and ch.state == "Reserved"
        else ch
        for ch in charges
    ]


def release_unseen(charges: Sequence[Charge], uid: str, now: datetime) -> list[Charge]:
    """The run ``uid`` ended without a final history anyone recorded (it was deleted, or it
    ended while its server could not be read): it becomes Unsettled, and its whole
    reservation stays committed for good.

    Its charged history may lag what its hospitals spent by any number of rounds (rounds can
    be quicker than the operator's look), and no run spends more than its reservation: so
    the reservation is the only bound that holds. Idempotent: only a Reserved charge changes.
    """
    return [
        ch.model_copy(update={"state": "Unsettled", "updated": now})
        if ch.uid == uid and ch.state == "Reserved"
        else ch
        for ch in charges
    ]


def final_history_is_whole(status: Mapping[str, Any]) -> bool:
    """Whether a final run's status accounts for everything its hospitals spent, so its
    charges may be released on it (else :func:`release_unseen`).

    Only a run that ended between rounds: Succeeded, or stopped for budget before a round
    (BudgetExhausted, but not ``BudgetExceeded``: there a hospital or the server
    misreported). A Failed run may have failed mid-round, after hospitals trained a round
    the server never recorded.
    """
    phase, reason = status.get("phase"), status.get("reason") or _true_reason(status)
    if phase == Phase.SUCCEEDED:
        return True
    return phase == Phase.BUDGET_EXHAUSTED and reason != Reason.BUDGET_EXCEEDED


def _true_reason(status: Mapping[str, Any]) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == status.get("phase") and cond.get("status") == "True":
            return str(cond.get("reason") or "")
    return ""


def withdraw(charges: Sequence[Charge], uid: str) -> list[Charge]:
    """Take back the admission of a run that never started (it charged nothing): its entry
    goes. A run with any history keeps its entry (what was spent stays spent)."""
    return [ch for ch in charges if ch.uid != uid or ch.history]


# --------------------------------------------------------------------------- files


class BudgetFileError(ValueError):
    """A PrivacyBudget file that cannot be used; the message names the file and the field."""


def parse_budget(text: str, source: str) -> PrivacyBudget:
    """A PrivacyBudget from YAML ``text`` (one document); ``source`` names it in errors."""
    from pydantic import ValidationError

    from fedrun_core.api import yaml_problem

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise BudgetFileError(f"{source}: {yaml_problem(err)}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise BudgetFileError(f"{source}: expected one PrivacyBudget document")
    try:
        return PrivacyBudget.model_validate(docs[0])
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise BudgetFileError(f"invalid PrivacyBudget in {source}:\n" + "\n".join(lines)) from None


def budget_yaml(budget: PrivacyBudget) -> str:
    """The budget as YAML, as `kubectl get -o yaml` would show its fields (camelCase)."""
    doc = budget.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)

"""Where a run and its hospitals stand: phases, hospital states, conditions and their reasons.

Every writer of a FederatedRun's ``.status`` uses these names: the server pod (its view,
``fedrun_trainer.server.run_state``), the operator (``fedrun_operator.status``) and the
local runner. :func:`phase_conditions` is the one function that turns a phase into the
standard conditions, so the server and the operator write the same conditions with the
same reasons for the same phase.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Final


class Phase(StrEnum):
    """Where a run stands."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BUDGET_EXHAUSTED = "BudgetExhausted"
    SUSPENDED = "Suspended"


#: A run in one of these phases never changes phase again.
FINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.BUDGET_EXHAUSTED})


class HospitalState(StrEnum):
    """Where one hospital's client stands."""

    PENDING = "Pending"
    CONNECTED = "Connected"
    TRAINING = "Training"
    DONE = "Done"
    FAILED = "Failed"
    NOT_JOINED = "NotJoined"  # the run ended before this hospital ever connected


#: A hospital's message while the server waits for it to connect.
STARTING_MESSAGE = "starting: not connected yet"
#: A NotJoined hospital's message.
NOT_JOINED_MESSAGE = "never connected before the run ended"


class ConditionStatus(StrEnum):
    """Status of a condition, as in metav1.Condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """The conditions a FederatedRun carries."""

    # One per phase but Pending, named as the phase.
    RUNNING = Phase.RUNNING.value
    SUSPENDED = Phase.SUSPENDED.value
    SUCCEEDED = Phase.SUCCEEDED.value
    FAILED = Phase.FAILED.value
    BUDGET_EXHAUSTED = Phase.BUDGET_EXHAUSTED.value
    #: The run trains without TLS and node authentication (``spec.security.insecure``).
    INSECURE = "Insecure"
    #: The server's reported (σ, q) disagree with what the spec implies.
    ACCOUNTING_MISMATCH = "AccountingMismatch"
    #: A hospital's PrivacyBudget cannot admit the run (yet): it waits, Pending.
    BUDGET_UNAVAILABLE = "BudgetUnavailable"


#: One condition per phase a run can be in but Pending, in this order, always all present.
PHASE_CONDITIONS: Final = (
    ConditionType.RUNNING,
    ConditionType.SUSPENDED,
    ConditionType.SUCCEEDED,
    ConditionType.FAILED,
    ConditionType.BUDGET_EXHAUSTED,
)


class Reason(StrEnum):
    """Why a run is in its phase (``status.reason`` and the True condition's reason) or why an
    Event was raised. Machine-readable, CamelCase, part of fedrun's contract."""

    # Pending and Running
    CREATED = "Created"
    CHILDREN_CREATED = "ChildrenCreated"
    WAITING_FOR_HOSPITALS = "WaitingForHospitals"
    TRAINING = "Training"
    RESUMED = "Resumed"
    # Succeeded
    ROUNDS_COMPLETED = "RoundsCompleted"
    # Failed
    TOO_FEW_HOSPITALS = "TooFewHospitals"
    HOSPITAL_FAILED = "HospitalFailed"
    SERVER_ERROR = "ServerError"
    INCONSISTENT_DATA = "InconsistentData"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INVALID_SPEC = "InvalidSpec"
    CHILD_CONFLICT = "ChildConflict"
    CERTIFICATE_INVALID = "CertificateInvalid"
    CHECKPOINT_INVALID = "CheckpointInvalid"
    # BudgetExhausted
    BUDGET_EXHAUSTED = "BudgetExhausted"
    BUDGET_EXCEEDED = "BudgetExceeded"
    BUDGET_WOULD_BE_EXCEEDED = "BudgetWouldBeExceeded"
    BUDGET_STOP = "BudgetStop"
    # Suspended
    SUSPENDED = "Suspended"
    # Events and non-phase conditions
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    SERVER_UNREACHABLE = "ServerUnreachable"
    SERVER_STATUS_INVALID = "ServerStatusInvalid"
    SERVER_DISAGREES_WITH_SPEC = "ServerDisagreesWithSpec"
    CHILD_RECREATED = "ChildRecreated"
    CHILD_REPLACED = "ChildReplaced"
    CHILD_REPAIRED = "ChildRepaired"
    FORBIDDEN = "Forbidden"
    EXPIRED = "Expired"
    INSECURE_TRANSPORT = "InsecureTransport"
    BUDGET_UNAVAILABLE = "BudgetUnavailable"
    BUDGET_RESERVED = "BudgetReserved"


def not_reason(ctype: str) -> str:
    """The reason of a phase condition that is False: ``Not<Type>`` (``NotSucceeded``)."""
    return f"Not{ctype}"


def condition(
    ctype: str,
    on: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
    previous: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One standard condition (metav1.Condition) of type ``ctype``, True when ``on``.

    Its ``lastTransitionTime`` is ``now`` (RFC 3339) unless ``previous`` (the conditions
    written last time) has it with the same status: a time moves only when its condition
    flips. ``observedGeneration`` is set when ``generation`` is given.
    """
    status = ConditionStatus.TRUE if on else ConditionStatus.FALSE
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = now
    if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
        since = str(old["lastTransitionTime"])
    cond: dict[str, Any] = {
        "type": str(ctype),
        "status": str(status),
        "reason": str(reason),
        "message": message,
        "lastTransitionTime": since,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def phase_conditions(
    phase: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
    previous: Iterable[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The full list of phase conditions (:data:`PHASE_CONDITIONS`) for a run in ``phase``.

    The condition named by ``phase`` is True with ``reason`` and ``message`` (Running is True
    while the phase is Running); every other one is False with reason ``Not<Type>`` and no
    message. Times as in :func:`condition`.
    """
    previous = list(previous)
    return [
        condition(
            ctype,
            ctype == phase,
            reason if ctype == phase else not_reason(ctype),
            message if ctype == phase else "",
            now,
            generation,
            previous,
        )
        for ctype in PHASE_CONDITIONS
    ]


def failed_status(status: Mapping[str, Any], reason: str, message: str, now: str) -> dict[str, Any]:
    """A copy of ``status`` moved to Failed for ``reason``: its phase, message,
    ``completionTime`` (``now``) and phase conditions, the rest (rounds, hospitals, ε) kept.

    For a writer that learns of a failure outside the round loop: the server pod when its
    SuperLink or submission fails, ``fedrun local`` when the server process dies.
    """
    generation = status.get("observedGeneration")
    return {
        **status,
        "phase": Phase.FAILED,
        "message": message,
        "completionTime": now,
        "conditions": phase_conditions(
            Phase.FAILED,
            reason,
            message,
            now,
            generation if isinstance(generation, int) else None,
        ),
    }

"""What a run's server says on ``/status``, read as untrusted input.

The operator reads each run server's ``/status`` over the network. The server runs the
run's own code next to hospital replies, so nothing it says is taken on trust: the body is
read up to :data:`MAX_REPORT_BYTES`, parsed by a strict model (:class:`ServerReport`)
that refuses wrong types, non-finite numbers, out-of-range σ and q, impossible step counts
and oversized lists, and its free text is clipped to :data:`MAX_MESSAGE_CHARS`. A body the
model refuses is a :class:`ReportError`: the reconcile treats it like an unreachable
server, so every stop rule (deadline, suspend, the budget from what was already
accounted) still applies.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from fedrun_core.schema import MAX_ROWS
from fedrun_core.states import HospitalState, Phase
from fedrun_core.times import parse_time

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_REPORT_BYTES",
    "ReportError",
    "ServerReport",
    "clip",
    "parse_report",
]

#: The most of a ``/status`` body the operator reads (a 50-hospital status is ~50 kB).
MAX_REPORT_BYTES = 1024 * 1024
#: The most characters of any message taken from a server or a pod into the run's status;
#: the CRD allows 32768 per condition message, and the status holds one per hospital.
MAX_MESSAGE_CHARS = 1024
# Bounds that no real run reaches (spec: at most 50 hospitals, 1000 rounds).
_MAX_HOSPITALS = 64
_MAX_HISTORY = 10_000
_MAX_STEPS = 10**12
_MAX_ROWS = MAX_ROWS
_MAX_METRICS = 16


class ReportError(ValueError):
    """The server's ``/status`` cannot be used; the message names the first bad field."""


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with a marker when it was cut."""
    if len(text) <= limit:
        return text
    marker = " […]"
    return text[: limit - len(marker)] + marker


def _clipped(value: Any) -> Any:
    return clip(value) if isinstance(value, str) else value


def _finite_or_none(value: Any) -> Any:
    """A metric that is not a finite number is shown as absent, not refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not math.isfinite(value):
        return None
    return value


Message = Annotated[str, BeforeValidator(_clipped)]
Name = Annotated[str, Field(min_length=1, max_length=63)]
Epsilon = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Steps = Annotated[int, Field(ge=0, le=_MAX_STEPS)]
Metric = Annotated[int | float | None, BeforeValidator(_finite_or_none)]


class _Report(BaseModel):
    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, alias_generator=to_camel, strict=True
    )


class ReportedCondition(_Report):
    """One of the server's conditions (only the True one for its phase is read)."""

    type: Annotated[str, Field(max_length=316)]
    status: str
    reason: Annotated[str, Field(max_length=1024)] = ""
    message: Message = ""


class ReportedRound(_Report):
    """The server's round counter."""

    current: Annotated[int, Field(ge=0, le=100_000)] = 0
    total: Annotated[int, Field(ge=0, le=100_000)] = 0


Count = Annotated[int, Field(ge=0, le=_MAX_ROWS)]


class ReportedColumn(_Report):
    """One column's data counts at a hospital."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    missing: Count = 0
    imputed: Count = 0
    dropped: Count = 0
    other: Count = 0


class ReportedData(_Report):
    """What a hospital's table gave (counts only)."""

    rows: Count
    used: Count
    dropped: Count
    columns: Annotated[list[ReportedColumn], Field(max_length=201)] = Field(default_factory=list)


class ReportedHospital(_Report):
    """One hospital as the server sees it."""

    name: Name
    state: HospitalState = HospitalState.PENDING
    restarts: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    epsilon: Epsilon | None = None
    message: Message | None = None
    data: ReportedData | None = None


class ReportedPrivacy(_Report):
    """One hospital's privacy record: what was spent, and at what (σ, q)."""

    name: Name
    epsilon: Epsilon = 0.0
    noise_multiplier: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    sample_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    steps: Steps = 0
    steps_per_round: Steps = 0
    num_train: Annotated[int, Field(ge=0, le=_MAX_ROWS)] = 0
    ledger_steps: Steps = 0
    history: Annotated[list[list[float]], Field(max_length=_MAX_HISTORY)] = Field(
        default_factory=list
    )

    @field_validator("history")
    @classmethod
    def _entries(cls, history: list[list[float]]) -> list[list[float]]:
        for i, entry in enumerate(history):
            if len(entry) != 3:
                raise ValueError(f"entry {i} is not [σ, q, steps]")
            sigma, q, steps = entry
            if not all(math.isfinite(x) for x in entry):
                raise ValueError(f"entry {i} holds a non-finite number")
            if not sigma > 0 or not 0 < q <= 1:
                raise ValueError(f"entry {i} needs σ > 0 and 0 < q <= 1")
            if steps != int(steps) or not 0 <= steps <= _MAX_STEPS:
                raise ValueError(f"entry {i} needs a whole number of steps")
        return history


class ReportedPrivacyBlock(_Report):
    """The server's privacy block (only the per-hospital records are read)."""

    hospitals: Annotated[list[ReportedPrivacy], Field(max_length=_MAX_HOSPITALS)] = Field(
        default_factory=list
    )


class ReportedCheckpoint(_Report):
    """Which chain of server incarnations the reported history belongs to."""

    lineage: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")]
    resumed_after_round: Annotated[int, Field(ge=0, le=100_000)] | None = None


class ServerReport(_Report):
    """The parts of a server's ``/status`` the operator reads, each bounded and typed."""

    phase: Phase = Phase.PENDING
    message: Message = ""
    conditions: Annotated[list[ReportedCondition], Field(max_length=16)] = Field(
        default_factory=list
    )
    round: ReportedRound | None = None
    start_time: Annotated[str, Field(max_length=40)] | None = None
    completion_time: Annotated[str, Field(max_length=40)] | None = None
    hospitals: Annotated[list[ReportedHospital], Field(max_length=_MAX_HOSPITALS)] = Field(
        default_factory=list
    )
    privacy: ReportedPrivacyBlock | None = None
    checkpoint: ReportedCheckpoint | None = None
    metrics: Annotated[dict[str, Metric], Field(max_length=_MAX_METRICS)] | None = None
    mlflow_run_id: Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")] | None = None

    @field_validator("start_time", "completion_time")
    @classmethod
    def _rfc3339(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parse_time(value)  # ValueError when it is not
        return value


def parse_report(body: bytes) -> dict[str, Any]:
    """The server's ``/status`` as a validated dict (camelCase, as stored); raises
    :class:`ReportError` naming the first field it refuses."""
    if len(body) > MAX_REPORT_BYTES:
        raise ReportError(f"the answer is larger than {MAX_REPORT_BYTES} bytes")
    try:
        report = ServerReport.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise ReportError(f"{where}: {clip(first['msg'], 200)}") from None
    return report.model_dump(mode="json", by_alias=True, exclude_none=True)

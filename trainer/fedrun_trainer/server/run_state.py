"""The server's view of a run, and the pure mapping from it to the resource's ``.status``.

The ServerApp mutates a :class:`RunState` as replies arrive and writes
:func:`to_status` (the FederatedRun ``.status`` schema) and :func:`to_history`
(per-round figures for reports and metrics) after every change. Nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedrun_core.accounting import collapse
from fedrun_core.schema import DataCounts
from fedrun_core.states import (
    FINAL_PHASES,
    NOT_JOINED_MESSAGE,
    HospitalState,
    Phase,
    Reason,
    phase_conditions,
)
from fedrun_core.times import now_rfc3339


@dataclass
class HospitalProgress:
    """One hospital as the server sees it."""

    name: str
    job_name: str
    state: str = HospitalState.PENDING
    node_id: int | None = None
    incarnation: str = ""
    restarts: int = 0
    message: str = ""
    # Privacy as reported by the hospital, and as the server accounts it on its own
    # from (σ, q, steps): the status shows the larger of the two.
    epsilon_reported: float = 0.0
    epsilon_accounted: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps_per_round: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds_trained: int = 0
    #: The most steps the hospital's own ledger said it holds (all server lineages): the
    #: operator tops its account up to it.
    ledger_steps: int = 0
    budget_exhausted: bool = False
    num_train: int = 0
    num_test: int = 0
    num_features: int = 0
    #: What the hospital's missing-value policies did (counts only), from its hello.
    data: DataCounts | None = None

    @property
    def epsilon(self) -> float:
        """The ε this hospital has spent: the max of its own and the server's accounting."""
        return max(self.epsilon_reported, self.epsilon_accounted)

    @property
    def active(self) -> bool:
        """Whether the hospital can still be asked to train."""
        return (
            self.state not in (HospitalState.FAILED, HospitalState.DONE)
            and not self.budget_exhausted
        )


@dataclass
class RoundRecord:
    """Figures for one round: the global model's evaluation and each hospital's ε."""

    round: int
    duration_s: float = 0.0
    hospitals_trained: list[str] = field(default_factory=list)
    train_loss: float | None = None
    evaluation: dict[str, float | None] = field(default_factory=dict)
    per_hospital_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)


@dataclass
class RunState:
    """Everything the server knows about the run; the input of :func:`to_status`."""

    run_name: str
    total_rounds: int
    target_epsilon: float | None
    delta: float | None
    hospitals: dict[str, HospitalProgress]
    phase: str = Phase.PENDING
    reason: str = Reason.CREATED
    message: str = "waiting for hospitals to connect"
    current_round: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    mlflow_run_id: str | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    observed_generation: int | None = None
    #: The table's columns (target, then features): the only names a hospital's data
    #: counts may use.
    columns: tuple[str, ...] = ()
    #: The chain of server incarnations this training belongs to (see
    #: :class:`fedrun_trainer.server.checkpoint.Checkpoint`); empty before it is known.
    lineage: str = ""
    #: The round a restarted server resumed after (from its checkpoint); None if it did not.
    resumed_after: int | None = None

    @classmethod
    def new(
        cls,
        run_name: str,
        hospital_names: list[str],
        total_rounds: int,
        target_epsilon: float | None,
        delta: float | None,
        observed_generation: int | None = None,
        columns: tuple[str, ...] = (),
    ) -> RunState:
        """A fresh run whose hospitals have not connected yet."""
        return cls(
            run_name=run_name,
            total_rounds=total_rounds,
            target_epsilon=target_epsilon,
            delta=delta,
            hospitals={
                h: HospitalProgress(name=h, job_name=f"{run_name}-{h}") for h in hospital_names
            },
            observed_generation=observed_generation,
            columns=columns,
        )

    @property
    def final(self) -> bool:
        """Whether the run has ended, one way or another."""
        return self.phase in FINAL_PHASES

    def latest_evaluation(self) -> RoundRecord | None:
        """The most recent round that has an evaluation of the global model."""
        for record in reversed(self.rounds):
            if record.evaluation:
                return record
        return None

    def finish(self, phase: str, reason: str, message: str) -> None:
        """Move to a final phase once; later calls keep the first outcome.

        A hospital that never connected (no hello answered) becomes ``NotJoined``, so a
        finished run does not show it as still ``Pending``.
        """
        if self.final:
            return
        for h in self.hospitals.values():
            if h.state == HospitalState.PENDING and not h.incarnation and h.node_id is None:
                h.state = HospitalState.NOT_JOINED
                h.message = NOT_JOINED_MESSAGE
        self.phase, self.reason, self.message = phase, reason, message
        self.completion_time = now_rfc3339()


def conditions_for(state: RunState) -> list[dict[str, Any]]:
    """The phase conditions for the run's phase (the full list, every time).

    Built by the same function as the operator's (:func:`fedrun_core.states.phase_conditions`),
    so both write the same conditions with the same reasons for the same phase. The server
    keeps no earlier conditions: every time is the phase's own (completion or start).
    """
    since = state.completion_time or state.start_time or now_rfc3339()
    return phase_conditions(
        state.phase, state.reason, state.message, since, state.observed_generation
    )


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def to_status(state: RunState) -> dict[str, Any]:
    """The FederatedRun ``.status`` for this state (camelCase keys, JSON-ready)."""
    hospitals = [state.hospitals[name] for name in sorted(state.hospitals)]
    status: dict[str, Any] = {
        "phase": state.phase,
        "conditions": conditions_for(state),
        "round": {"current": state.current_round, "total": state.total_rounds},
        "progress": f"{state.current_round}/{state.total_rounds}",
        "hospitals": [
            {
                "name": h.name,
                "jobName": h.job_name,
                "state": h.state,
                "restarts": h.restarts,
                "epsilon": _rounded(h.epsilon),
                **({"message": h.message} if h.message else {}),
                **({"data": h.data.to_status()} if h.data is not None else {}),
            }
            for h in hospitals
        ],
        "message": state.message,
    }
    if state.observed_generation is not None:
        status["observedGeneration"] = state.observed_generation
    if state.start_time:
        status["startTime"] = state.start_time
    if state.completion_time:
        status["completionTime"] = state.completion_time
    if state.target_epsilon is not None:
        spent = max((h.epsilon for h in hospitals), default=0.0)
        status["privacy"] = {
            "epsilonSpent": _rounded(spent),
            "targetEpsilon": state.target_epsilon,
            "delta": state.delta,
            "hospitals": [
                {
                    "name": h.name,
                    "epsilon": _rounded(h.epsilon),
                    # σ and q unrounded: the operator recomputes ε from them on its own.
                    "noiseMultiplier": float(h.noise_multiplier),
                    "sampleRate": float(h.sample_rate),
                    "steps": sum(s for _, _, s in h.history),
                    "stepsPerRound": h.steps_per_round,
                    # A count: the operator derives the spec's σ and q from it on its own.
                    "numTrain": h.num_train,
                    # What the hospital's ledger holds (every server lineage): the operator
                    # counts at least this many steps.
                    "ledgerSteps": h.ledger_steps,
                    "history": [[s, q, n] for s, q, n in collapse(h.history)],
                }
                for h in hospitals
            ],
        }
    latest = state.latest_evaluation()
    if latest is not None:
        status["metrics"] = {
            "round": latest.round,
            **{k: _rounded(v) for k, v in sorted(latest.evaluation.items())},
        }
    if state.mlflow_run_id:
        status["mlflowRunId"] = state.mlflow_run_id
    if state.lineage:
        status["checkpoint"] = {
            "lineage": state.lineage,
            **(
                {"resumedAfterRound": state.resumed_after}
                if state.resumed_after is not None
                else {}
            ),
        }
    return status


def to_history(state: RunState) -> dict[str, Any]:
    """Per-round figures (for the report, the PNG and ``/metrics``), JSON-ready."""
    return {
        "run": state.run_name,
        "phase": state.phase,
        "targetEpsilon": state.target_epsilon,
        "rounds": [
            {
                "round": r.round,
                "durationSeconds": round(r.duration_s, 3),
                "hospitalsTrained": r.hospitals_trained,
                "trainLoss": _rounded(r.train_loss),
                "evaluation": {k: _rounded(v) for k, v in r.evaluation.items()},
                "hospitalEvaluation": {
                    h: {k: _rounded(v) for k, v in ev.items()}
                    for h, ev in sorted(r.per_hospital_eval.items())
                },
                "epsilon": {h: _rounded(e) for h, e in sorted(r.epsilon.items())},
            }
            for r in state.rounds
        ],
    }


#: The hospital fields a checkpoint keeps (the node it was on is not: it must rejoin).
_KEPT = (
    "state",
    "incarnation",
    "restarts",
    "message",
    "epsilon_reported",
    "epsilon_accounted",
    "noise_multiplier",
    "sample_rate",
    "steps_per_round",
    "rounds_trained",
    "ledger_steps",
    "budget_exhausted",
    "num_train",
    "num_test",
    "num_features",
)


def state_to_json(state: RunState) -> dict[str, Any]:
    """What a checkpoint keeps of ``state``, JSON-ready (see :func:`restore_state`)."""
    return {
        "phase": state.phase,
        "reason": state.reason,
        "message": state.message,
        "currentRound": state.current_round,
        "startTime": state.start_time,
        "completionTime": state.completion_time,
        "mlflowRunId": state.mlflow_run_id,
        "hospitals": {
            h.name: {
                **{key: getattr(h, key) for key in _KEPT},
                "history": [[s, q, n] for s, q, n in h.history],
                "data": h.data.to_metrics() if h.data is not None else None,
            }
            for h in state.hospitals.values()
        },
        "rounds": [
            {
                "round": r.round,
                "durationS": r.duration_s,
                "hospitalsTrained": list(r.hospitals_trained),
                "trainLoss": r.train_loss,
                "evaluation": dict(r.evaluation),
                "perHospitalEval": {k: dict(v) for k, v in r.per_hospital_eval.items()},
                "epsilon": dict(r.epsilon),
            }
            for r in state.rounds
        ],
    }


def _entry(entry: Any) -> tuple[float, float, int]:
    """One accountant history entry (σ, q, steps) as a checkpoint holds it, checked."""
    sigma, q, steps = entry
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"history entry {entry!r}: steps must be a whole number")
    if not (math.isfinite(sigma) and sigma > 0 and 0 < q <= 1):
        raise ValueError(f"history entry {entry!r}: σ must be > 0 and 0 < q ≤ 1")
    return float(sigma), float(q), steps


def restore_state(fresh: RunState, saved: dict[str, Any]) -> RunState:
    """``fresh`` (the run's state as the spec makes it) with a checkpoint's state put back.

    Every hospital waits to rejoin (no node is known to a new server) unless it had
    finished (Done, Failed). Raises ValueError (or KeyError, TypeError) when ``saved`` does
    not fit the run: a hospital the spec does not have, a round past the total.
    """
    current = int(saved["currentRound"])
    if not 0 <= current <= fresh.total_rounds:
        raise ValueError(f"round {current} is outside 0..{fresh.total_rounds}")
    hospitals = dict(saved["hospitals"])
    if set(hospitals) != set(fresh.hospitals):
        raise ValueError(
            f"hospitals {sorted(hospitals)} are not the spec's {sorted(fresh.hospitals)}"
        )
    for name, kept in hospitals.items():
        h = fresh.hospitals[name]
        for key in _KEPT:
            default = getattr(h, key)
            value = kept[key]
            setattr(h, key, type(default)(value) if default is not None else value)
        h.history = [_entry(e) for e in kept["history"]]
        data = kept.get("data")
        h.data = DataCounts.from_metrics(dict(data), list(fresh.columns)) if data else None
        if h.state not in (HospitalState.DONE, HospitalState.FAILED, HospitalState.NOT_JOINED):
            h.state = HospitalState.PENDING
            h.message = "waiting for the hospital to rejoin the restarted server"
    fresh.rounds = [
        RoundRecord(
            round=int(r["round"]),
            duration_s=float(r["durationS"]),
            hospitals_trained=[str(n) for n in r["hospitalsTrained"]],
            train_loss=None if r["trainLoss"] is None else float(r["trainLoss"]),
            evaluation={
                str(k): None if v is None else float(v) for k, v in dict(r["evaluation"]).items()
            },
            per_hospital_eval={
                str(n): {str(k): float(v) for k, v in dict(ev).items()}
                for n, ev in dict(r["perHospitalEval"]).items()
            },
            epsilon={str(k): float(v) for k, v in dict(r["epsilon"]).items()},
        )
        for r in saved["rounds"]
    ]
    fresh.current_round = current
    fresh.start_time = saved.get("startTime") or None
    fresh.mlflow_run_id = saved.get("mlflowRunId") or None
    fresh.phase = str(saved["phase"])
    fresh.reason = str(saved["reason"])
    fresh.message = str(saved["message"])
    fresh.completion_time = saved.get("completionTime") or None
    return fresh

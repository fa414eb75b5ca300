"""The server and the operator write the same phase conditions for the same run.

Two writers fill a FederatedRun's ``.status``: the server pod (``run_state.to_status``,
what ``/status`` serves and ``fedrun local`` shows) and the operator
(``fedrun_operator.status.decide``, what the API server stores). Both build their phase
conditions with ``fedrun_core.states.phase_conditions``. These tests give both paths the
same run in each phase and compare what they write.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fedrun_core.accounting import epsilon
from fedrun_core.api import FederatedRun, load_run, parse_run
from fedrun_core.states import PHASE_CONDITIONS, HospitalState, Phase, Reason, phase_conditions
from fedrun_operator.server_report import parse_report
from fedrun_operator.status import HospitalObservation, Observation, decide
from fedrun_trainer.server.run_state import RunState, to_status

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def _run() -> FederatedRun:
    body = load_run(ROOT / "examples" / "federatedrun-local.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    body["metadata"]["generation"] = 2
    return parse_run(body)


def _state(run: FederatedRun, phase: str) -> RunState:
    """The server's view of `run` in `phase`, two rounds in, every hospital training."""
    names = [h.name for h in run.spec.hospitals]
    privacy = run.spec.privacy
    st = RunState.new(run.name, names, run.spec.rounds, privacy.target_epsilon, privacy.delta, 2)
    st.start_time = "2026-12-03T11:59:00Z"
    if phase == Phase.PENDING:
        return st
    st.phase, st.reason, st.message = Phase.RUNNING, Reason.TRAINING, "round 3: training"
    st.current_round = 2
    for name in names:
        h = st.hospitals[name]
        h.state, h.num_train = HospitalState.TRAINING, 1000
    outcomes = {
        Phase.SUCCEEDED: (Reason.ROUNDS_COMPLETED, "all rounds completed"),
        Phase.FAILED: (Reason.SERVER_ERROR, "server error: boom"),
        Phase.BUDGET_EXHAUSTED: (Reason.BUDGET_EXHAUSTED, "stopped before round 3"),
    }
    if phase in outcomes:
        reason, message = outcomes[Phase(phase)]
        st.finish(phase, reason, message)
    return st


def _through_the_operator(run: FederatedRun, server: dict[str, Any]) -> dict[str, Any]:
    """The status the operator writes after reading `server` as a run server's /status."""
    report = parse_report(json.dumps(server).encode())
    final = report["phase"] in (Phase.SUCCEEDED, Phase.FAILED, Phase.BUDGET_EXHAUSTED)
    jobs = {
        h.name: HospitalObservation(
            name=h.name, job_name=f"{run.name}-{h.name}", active=0 if final else 1
        )
        for h in run.spec.hospitals
    }
    observation = Observation(now=NOW, server=report, hospitals=jobs)
    return decide(run, {}, observation, epsilon).status


def _phase_conditions(status: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [
        (c["type"], c["status"], c["reason"], c["message"])
        for c in status["conditions"]
        if c["type"] in PHASE_CONDITIONS
    ]


@pytest.mark.parametrize(
    "phase", [Phase.PENDING, Phase.RUNNING, Phase.SUCCEEDED, Phase.FAILED, Phase.BUDGET_EXHAUSTED]
)
def test_server_and_operator_write_the_same_phase_conditions(phase: Phase) -> None:
    run = _run()
    server = to_status(_state(run, phase))
    operator = _through_the_operator(run, server)
    assert operator["phase"] == server["phase"] == phase
    assert _phase_conditions(operator) == _phase_conditions(server)
    # every phase condition, in one order, exactly one True unless Pending
    assert [c[0] for c in _phase_conditions(server)] == list(PHASE_CONDITIONS)
    true = [c for c in _phase_conditions(server) if c[1] == "True"]
    assert len(true) == (0 if phase == Phase.PENDING else 1)


def test_a_condition_s_time_moves_only_when_it_flips() -> None:
    first = phase_conditions(Phase.RUNNING, Reason.TRAINING, "round 1", "2026-12-03T12:00:00Z")
    later = phase_conditions(
        Phase.RUNNING, Reason.TRAINING, "round 2", "2026-12-03T12:05:00Z", previous=first
    )
    assert [c["lastTransitionTime"] for c in later] == [c["lastTransitionTime"] for c in first]
    done = phase_conditions(
        Phase.SUCCEEDED, Reason.ROUNDS_COMPLETED, "", "2026-12-03T12:09:00Z", previous=later
    )
    moved = {c["type"] for c in done if c["lastTransitionTime"] == "2026-12-03T12:09:00Z"}
    assert moved == {"Running", "Succeeded"}
    assert {c["reason"] for c in done if c["status"] == "False"} == {
        "NotRunning",
        "NotSuspended",
        "NotFailed",
        "NotBudgetExhausted",
    }

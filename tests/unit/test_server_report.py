"""The operator reads a run server's /status as untrusted input (fedrun_operator.server_report).

What the real server writes passes unchanged; wrong types, non-finite numbers, impossible σ,
q or steps, oversized lists and bodies are refused naming the field; free text is clipped.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fedrun_core.accounting import epsilon, noise_multiplier_for_run, planned_cost
from fedrun_core.api import FederatedRunStatus, load_run
from fedrun_core.schema import ColumnCounts, DataCounts
from fedrun_core.states import ConditionType
from fedrun_operator.handlers.reconcile_run import _pod_facts
from fedrun_operator.server_report import (
    MAX_MESSAGE_CHARS,
    MAX_REPORT_BYTES,
    ReportError,
    clip,
    parse_report,
)
from fedrun_operator.status import Observation, decide
from fedrun_trainer.common.privacy import noise_multiplier_for_run as opacus_noise_multiplier
from fedrun_trainer.server.run_state import RunState, to_status

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def real_status() -> dict[str, Any]:
    """What the server's run_state.to_status writes mid-run."""
    state = RunState.new("demo", ["hospital-a", "hospital-b"], 5, 1.0, 1e-5)
    state.phase, state.reason, state.start_time = "Running", "Training", "2026-11-24T12:00:00Z"
    state.current_round = 2
    a = state.hospitals["hospital-a"]
    a.state, a.num_train, a.message = "Connected", 1190, "ok"
    a.noise_multiplier, a.sample_rate, a.steps_per_round = 2.38, 1 / 19, 19
    a.history = [(2.38, 1 / 19, 19), (2.38, 1 / 19, 19)]
    a.epsilon_accounted = 0.5
    a.data = DataCounts(1500, 1488, 12, (ColumnCounts("bmi", 40, imputed=30, dropped=10),))
    return to_status(state)


def body(status: dict[str, Any]) -> bytes:
    return json.dumps(status).encode()


def test_what_the_server_writes_is_accepted_unchanged() -> None:
    status = real_status()
    parsed = parse_report(body(status))
    for key in ("phase", "round", "message", "startTime", "conditions"):
        assert (
            parsed[key]
            == {
                **status,
                "conditions": [
                    {k: c[k] for k in ("type", "status", "reason", "message")}
                    for c in status["conditions"]
                ],
            }[key]
        )
    assert parsed["hospitals"] == [
        {k: v for k, v in h.items() if k != "jobName"} for h in status["hospitals"]
    ]
    rows = {h["name"]: h for h in parsed["privacy"]["hospitals"]}
    assert rows["hospital-a"]["history"] == [[2.38, 1 / 19, 38]]
    assert rows["hospital-a"]["numTrain"] == 1190


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"used": -1}, "hospitals.0.data.used"),
        ({"rows": "1500"}, "hospitals.0.data.rows"),
        ({"columns": [{"name": "bmi", "imputed": 1.5}]}, "hospitals.0.data.columns.0.imputed"),
        ({"columns": [{"name": "x"}] * 202}, "hospitals.0.data.columns"),
    ],
)
def test_a_hospitals_data_counts_are_bounded_and_typed(change: dict[str, Any], where: str) -> None:
    status = real_status()
    assert parse_report(body(status))["hospitals"][0]["data"]["columns"][0]["imputed"] == 30
    status["hospitals"][0]["data"].update(change)
    with pytest.raises(ReportError, match=rf"^{where}:"):
        parse_report(body(status))


def _privacy_row(**fields: Any) -> bytes:
    status = real_status()
    status["privacy"]["hospitals"][0].update(fields)
    return json.dumps(status, allow_nan=True).encode()


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"sampleRate": math.nan}, "sampleRate"),
        ({"sampleRate": 1.5}, "sampleRate"),
        ({"noiseMultiplier": math.inf}, "noiseMultiplier"),
        ({"noiseMultiplier": -1.0}, "noiseMultiplier"),
        ({"noiseMultiplier": "2.38"}, "noiseMultiplier"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"steps": 1.5}, "steps"),
        ({"steps": 10**30}, "steps"),
        ({"numTrain": -1}, "numTrain"),
        ({"history": [[2.38, math.nan, 19]]}, "history"),
        ({"history": [[2.38, 0.05]]}, "history"),
        ({"history": [[0.0, 0.05, 19]]}, "history"),
        ({"history": [[2.38, 0.05, 19.5]]}, "history"),
        ({"history": "[[1, 0.1, 3]]"}, "history"),
        ({"history": [[1.0, 0.1, 1]] * 10_001}, "history"),
    ],
)
def test_bad_privacy_records_are_refused_naming_the_field(
    fields: dict[str, Any], where: str
) -> None:
    with pytest.raises(ReportError, match=where):
        parse_report(_privacy_row(**fields))


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"phase": "Exploded"}, "phase"),
        ({"round": {"current": "3", "total": 5}}, "round"),
        ({"hospitals": [{"name": "a", "state": "Training"}] * 65}, "hospitals"),
        ({"hospitals": "many"}, "hospitals"),
        ({"startTime": "yesterday"}, "startTime"),
        ({"mlflowRunId": "../../etc"}, "mlflowRunId"),
    ],
)
def test_bad_shapes_are_refused(change: dict[str, Any], where: str) -> None:
    status = {**real_status(), **change}
    with pytest.raises(ReportError, match=where):
        parse_report(body(status))


def test_not_json_and_oversized_bodies_are_refused() -> None:
    with pytest.raises(ReportError):
        parse_report(b"<html>")
    with pytest.raises(ReportError, match="larger than"):
        parse_report(b"{" + b" " * MAX_REPORT_BYTES + b"}")


def test_long_messages_are_clipped_so_the_status_fits_the_crd() -> None:
    status = real_status()
    status["message"] = "m" * 40_000
    status["hospitals"][0]["message"] = "h" * 40_000
    status["conditions"][0]["message"] = "c" * 40_000
    parsed = parse_report(body(status))
    assert len(parsed["message"]) == MAX_MESSAGE_CHARS and parsed["message"].endswith("[…]")
    assert len(parsed["hospitals"][0]["message"]) == MAX_MESSAGE_CHARS
    assert len(parsed["conditions"][0]["message"]) == MAX_MESSAGE_CHARS
    assert clip("short") == "short"


def test_non_finite_metrics_are_shown_as_absent() -> None:
    status = real_status()
    status["metrics"] = {"round": 2, "loss": math.nan, "auroc": 0.7}
    parsed = parse_report(json.dumps(status, allow_nan=True).encode())
    assert parsed["metrics"] == {"round": 2, "loss": None, "auroc": 0.7}


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("target", "delta", "q", "steps"),
    [(1.0, 1e-5, 1 / 19, 95), (3.0, 1e-5, 1 / 7, 35), (0.5, 1e-3, 1 / 150, 750)],
)
def test_the_operator_calibrates_the_hospitals_sigma(
    target: float, delta: float, q: float, steps: int
) -> None:
    """The operator (no torch) arrives at Opacus' σ for the same run."""
    ours = noise_multiplier_for_run(target, delta, q, steps)
    assert ours == pytest.approx(opacus_noise_multiplier(target, delta, q, steps), rel=1e-9)


def make_run() -> Any:
    return load_run(ROOT / "examples" / "federatedrun-local.yaml")


def _report(run: Any, sigma: float, q: float, steps: int) -> dict[str, Any]:
    rows = [
        {
            "name": h.name,
            "epsilon": 0.0,
            "noiseMultiplier": sigma,
            "sampleRate": q,
            "steps": steps,
            "stepsPerRound": 19,
            "numTrain": 1190,
            "history": [[sigma, q, steps]],
        }
        for h in run.spec.hospitals
    ]
    status = {
        "phase": "Running",
        "conditions": [{"type": "Running", "status": "True", "reason": "Training"}],
        "round": {"current": 2, "total": run.spec.rounds},
        "hospitals": [],
        "message": "training",
        "startTime": "2026-11-24T12:00:00Z",
        "privacy": {"hospitals": rows},
    }
    return parse_report(body(status))


def _decide(run: Any, report: dict[str, Any]) -> Any:
    t, p = run.spec.training, run.spec.privacy
    plan = planned_cost(
        n_train=1190,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        rounds=run.spec.rounds,
        target_epsilon=p.target_epsilon,
        delta=p.delta,
    )
    planned = {h.name: plan for h in run.spec.hospitals}
    prev = {"phase": "Running", "startTime": "2026-11-24T12:00:00Z"}
    obs = Observation(now=T0 + timedelta(seconds=5), server=report, planned=planned)
    return decide(run, prev, obs, epsilon), plan


def test_a_server_claiming_more_noise_than_the_spec_cannot_hide_spend() -> None:
    """The server reports σ = 50 (almost nothing spent) for steps taken at the plan's σ:
    the operator's figure at the plan's (σ, q) is the one enforced, and the mismatch shown."""
    run = make_run()
    decision, (sigma, q, _) = _decide(run, _report(run, 50.0, 1 / 19, 38))
    privacy = decision.status["privacy"]
    expected = epsilon([(sigma, q, 38)], run.spec.privacy.delta)
    assert privacy["epsilonSpent"] == pytest.approx(expected, abs=1e-6)
    assert expected > 5 * epsilon([(50.0, 1 / 19, 38)], run.spec.privacy.delta)
    row = privacy["hospitals"][0]
    assert row["plannedNoiseMultiplier"] == sigma and row["numTrain"] == 1190
    assert "σ=50" in row["accountingMismatch"]
    cond = next(
        c for c in decision.status["conditions"] if c["type"] == ConditionType.ACCOUNTING_MISMATCH
    )
    assert cond["status"] == "True"
    assert [e.reason for e in decision.events if e.type == "Warning"] == [
        ConditionType.ACCOUNTING_MISMATCH
    ]
    FederatedRunStatus.model_validate(decision.status)


def test_a_server_that_agrees_with_the_spec_is_not_flagged() -> None:
    run = make_run()
    t, p = run.spec.training, run.spec.privacy
    sigma, q, _ = planned_cost(
        n_train=1190,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        rounds=run.spec.rounds,
        target_epsilon=p.target_epsilon,
        delta=p.delta,
    )
    decision, _ = _decide(run, _report(run, sigma, q, 38))
    assert all(
        c["type"] != ConditionType.ACCOUNTING_MISMATCH for c in decision.status["conditions"]
    )
    assert "accountingMismatch" not in decision.status["privacy"]["hospitals"][0]
    assert decision.status["privacy"]["epsilonSpent"] == pytest.approx(
        epsilon([(sigma, q, 38)], p.delta), abs=1e-6
    )


def test_pods_of_other_owners_do_not_write_into_a_run_s_status() -> None:
    def pod(uid: str, message: str) -> dict[str, Any]:
        return {
            "metadata": {
                "labels": {"fedrun.io/hospital": "hospital-a"},
                "ownerReferences": [{"uid": uid, "controller": True, "kind": "Job"}],
            },
            "status": {
                "containerStatuses": [
                    {
                        "restartCount": 2,
                        "state": {"terminated": {"exitCode": 1, "message": message}},
                    }
                ]
            },
        }

    facts = _pod_facts([pod("job-1", "ours"), pod("elsewhere", "forged")], {"job-1"})
    assert facts == {"hospital-a": (2, "ours")}

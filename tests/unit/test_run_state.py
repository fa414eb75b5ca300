"""The server's run state and its mapping to ``.status``: valid for the models and the CRD."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedrun_core.accounting import epsilon
from fedrun_core.api import FederatedRunStatus
from fedrun_core.states import PHASE_CONDITIONS
from fedrun_render.admission import prune_nulls, to_jsonschema
from fedrun_trainer.common.privacy import epsilon_of
from fedrun_trainer.server.run_state import (
    HospitalProgress,
    RoundRecord,
    RunState,
    conditions_for,
    to_history,
    to_status,
)

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "federatedrun.yaml").read_text(encoding="utf-8"))
STATUS_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
# σ and q with more digits than any rounding would keep.
SIGMA, SAMPLE_RATE = 1.23456789012345, 1 / 13


STATUS_VALIDATOR = jsonschema.Draft202012Validator(to_jsonschema(STATUS_SCHEMA))
# jsonschema does not check "date-time" without extra packages: check the form directly.
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def crd_errors(status: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in STATUS_VALIDATOR.iter_errors(status)
    ]


def trained_state(target: float | None = 1.0) -> RunState:
    """A run two rounds into five, with privacy, evaluation and an MLflow run."""
    st = RunState.new("stroke-demo", HOSPITALS, 5, target, 1e-5 if target else None, 3)
    st.phase, st.reason, st.message = "Running", "Training", "round 3/5: training"
    st.start_time = "2026-11-24T10:00:00Z"
    st.current_round = 2
    st.mlflow_run_id = "0123abcd"
    for i, name in enumerate(HOSPITALS):
        h = st.hospitals[name]
        h.state = "Training"
        h.node_id = 100 + i
        h.noise_multiplier, h.sample_rate, h.steps_per_round = SIGMA, SAMPLE_RATE, 20
        h.history = [(SIGMA, SAMPLE_RATE, 20), (SIGMA, SAMPLE_RATE, 20)]
        h.epsilon_reported = 0.3 + 0.1 * i
        h.epsilon_accounted = 0.35
    st.rounds = [
        RoundRecord(
            round=1,
            duration_s=1.23456,
            hospitals_trained=list(HOSPITALS),
            train_loss=0.612345678,
            evaluation={"loss": 0.5, "auroc": 0.712345678, "auprc": 0.2, "accuracy": 0.9},
            per_hospital_eval={"hospital-b": {"auroc": 0.7}, "hospital-a": {"auroc": 0.72}},
            epsilon={"hospital-a": 0.35, "hospital-b": 0.4},
        ),
        RoundRecord(round=2, duration_s=2.0, hospitals_trained=HOSPITALS[:2]),
    ]
    return st


def states() -> dict[str, RunState]:
    fresh = RunState.new("stroke-demo", HOSPITALS, 5, 1.0, 1e-5)
    running = trained_state()
    no_privacy = trained_state(target=None)
    succeeded = trained_state()
    succeeded.current_round = 5
    succeeded.finish("Succeeded", "RoundsCompleted", "5 rounds completed")
    failed = trained_state()
    failed.hospitals["hospital-c"].state = "Failed"
    failed.hospitals["hospital-c"].message = "hospital-c.csv row 7: age is not a number"
    failed.finish(
        "Failed",
        "TooFewHospitals",
        "2 of 3 hospitals failed (b: bad; c: bad); the other 1 cannot reach minHospitals 2",
    )
    budget = trained_state()
    budget.finish("BudgetExhausted", "BudgetExhausted", "stopped before round 3")
    return {
        "pending": fresh,
        "running": running,
        "no-privacy": no_privacy,
        "succeeded": succeeded,
        "failed": failed,
        "budget-exhausted": budget,
    }


STATES = states()


@pytest.mark.parametrize("name", list(STATES))
def test_status_validates_against_the_status_model(name: str) -> None:
    status = to_status(STATES[name])
    model = FederatedRunStatus.model_validate(status)
    assert model.phase.value == STATES[name].phase
    assert [h.name for h in model.hospitals] == HOSPITALS


@pytest.mark.parametrize("name", list(STATES))
def test_status_validates_against_the_crd_schema(name: str) -> None:
    assert crd_errors(to_status(STATES[name])) == []


def test_crd_schema_check_can_fail() -> None:
    status = to_status(STATES["running"])
    status["phase"] = "Exploded"
    status["hospitals"][0]["state"] = "Sleeping"
    status["unknownField"] = 1
    errors = crd_errors(status)
    assert any(e.startswith("phase:") for e in errors)
    assert any(e.startswith("hospitals.0.state:") for e in errors)
    assert any("unknownField" in e for e in errors)


def test_status_with_missing_metric_validates_once_nulls_are_pruned() -> None:
    st = trained_state()
    st.rounds[0].evaluation["auroc"] = None  # a one-class test split has no AUROC
    status = to_status(st)
    assert status["metrics"]["auroc"] is None
    FederatedRunStatus.model_validate(status)
    assert crd_errors(prune_nulls(status)) == []


def test_status_reports_round_progress_and_metrics() -> None:
    status = to_status(STATES["running"])
    assert status["round"] == {"current": 2, "total": 5}
    assert status["progress"] == "2/5"
    assert status["metrics"] == {
        "round": 1,
        "accuracy": 0.9,
        "auprc": 0.2,
        "auroc": 0.7123,
        "loss": 0.5,
    }
    assert status["mlflowRunId"] == "0123abcd"
    assert status["observedGeneration"] == 3
    assert status["startTime"] == "2026-11-24T10:00:00Z"
    assert "completionTime" not in status
    assert [h["jobName"] for h in status["hospitals"]] == [f"stroke-demo-{h}" for h in HOSPITALS]


def test_fresh_run_has_pending_hospitals_and_no_metrics() -> None:
    status = to_status(STATES["pending"])
    assert status["phase"] == "Pending"
    assert status["progress"] == "0/5"
    assert {h["state"] for h in status["hospitals"]} == {"Pending"}
    assert "metrics" not in status
    assert status["privacy"]["epsilonSpent"] == 0.0


@pytest.mark.parametrize(
    ("reported", "accounted", "shown"),
    [(0.9, 0.5, 0.9), (0.5, 0.9, 0.9), (0.0, 0.0, 0.0), (0.123456, 0.1, 0.1235)],
)
def test_hospital_epsilon_is_the_max_of_reported_and_accounted(
    reported: float, accounted: float, shown: float
) -> None:
    st = RunState.new("r", ["a", "b"], 3, 1.0, 1e-5)
    st.hospitals["a"].epsilon_reported = reported
    st.hospitals["a"].epsilon_accounted = accounted
    status = to_status(st)
    assert status["hospitals"][0]["epsilon"] == shown
    assert status["privacy"]["hospitals"][0]["epsilon"] == shown
    assert status["privacy"]["epsilonSpent"] == shown


def test_privacy_block_reports_max_over_hospitals_and_steps() -> None:
    status = to_status(STATES["running"])
    privacy = status["privacy"]
    assert privacy["targetEpsilon"] == 1.0
    assert privacy["delta"] == 1e-5
    assert privacy["epsilonSpent"] == 0.5  # hospital-c reported 0.5 > accounted 0.35
    assert [p["epsilon"] for p in privacy["hospitals"]] == [0.35, 0.4, 0.5]
    assert {p["steps"] for p in privacy["hospitals"]} == {40}
    assert {p["stepsPerRound"] for p in privacy["hospitals"]} == {20}


def test_privacy_block_carries_exact_sigma_q_and_the_collapsed_history() -> None:
    # The operator recomputes ε from these figures, so they must survive JSON unrounded.
    status = json.loads(json.dumps(to_status(STATES["running"])))
    for p in status["privacy"]["hospitals"]:
        assert p["noiseMultiplier"] == SIGMA
        assert p["sampleRate"] == SAMPLE_RATE
        # Two rounds at the same (σ, q) compose into one entry of 40 steps.
        assert p["history"] == [[SIGMA, SAMPLE_RATE, 40]]


def test_published_history_gives_the_servers_epsilon() -> None:
    st = RunState.new("r", ["a"], 5, 8.0, 1e-5)
    h = st.hospitals["a"]
    # A hospital restarted with a new σ, then sampled at a new rate: three (σ, q) pairs.
    h.history = [(1.1, 0.05, 20), (1.1, 0.05, 20), (1.4, 0.05, 20), (1.4, 1 / 30, 30)]
    h.noise_multiplier, h.sample_rate, h.steps_per_round = 1.4, 1 / 30, 30
    published = json.loads(json.dumps(to_status(st)))["privacy"]["hospitals"][0]
    assert published["history"] == [[1.1, 0.05, 40], [1.4, 0.05, 20], [1.4, 1 / 30, 30]]
    assert published["steps"] == 90
    assert (published["noiseMultiplier"], published["sampleRate"]) == (1.4, 1 / 30)
    assert epsilon(published["history"], 1e-5) == pytest.approx(
        epsilon_of(h.history, 1e-5), rel=1e-9
    )
    assert crd_errors(to_status(st)) == []


def test_fresh_hospital_publishes_an_empty_history() -> None:
    published = to_status(STATES["pending"])["privacy"]["hospitals"][0]
    assert published["history"] == []
    assert published["steps"] == 0
    assert published["noiseMultiplier"] == 0.0
    assert published["sampleRate"] == 0.0


def test_status_without_privacy_has_no_privacy_block() -> None:
    assert "privacy" not in to_status(STATES["no-privacy"])


def test_hospital_message_appears_only_when_set() -> None:
    status = to_status(STATES["failed"])
    by_name = {h["name"]: h for h in status["hospitals"]}
    assert by_name["hospital-c"]["state"] == "Failed"
    assert by_name["hospital-c"]["message"] == "hospital-c.csv row 7: age is not a number"
    assert "message" not in by_name["hospital-a"]


def test_hospital_is_active_until_done_failed_or_out_of_budget() -> None:
    assert HospitalProgress("a", "r-a", state="Connected").active
    assert not HospitalProgress("a", "r-a", state="Done").active
    assert not HospitalProgress("a", "r-a", state="Failed").active
    assert not HospitalProgress("a", "r-a", state="Connected", budget_exhausted=True).active


def test_finish_keeps_the_first_outcome() -> None:
    st = trained_state()
    st.finish("BudgetExhausted", "BudgetExhausted", "first")
    first_time = st.completion_time
    assert st.final and first_time is not None
    st.finish("Failed", "ServerError", "second")
    st.finish("Succeeded", "RoundsCompleted", "third")
    assert (st.phase, st.reason, st.message) == ("BudgetExhausted", "BudgetExhausted", "first")
    assert st.completion_time == first_time
    assert to_status(st)["completionTime"] == first_time


@pytest.mark.parametrize(
    ("name", "true_type"),
    [
        ("pending", None),
        ("running", "Running"),
        ("succeeded", "Succeeded"),
        ("failed", "Failed"),
        ("budget-exhausted", "BudgetExhausted"),
    ],
)
def test_conditions_mark_exactly_the_current_phase(name: str, true_type: str | None) -> None:
    st = STATES[name]
    conditions = conditions_for(st)
    assert [c["type"] for c in conditions] == list(PHASE_CONDITIONS)
    assert [c["type"] for c in conditions if c["status"] == "True"] == (
        [true_type] if true_type else []
    )
    assert {c["status"] for c in conditions} <= {"True", "False"}
    for cond in conditions:
        if cond["status"] == "True":
            assert cond["reason"] == st.reason
            # Running, Failed and BudgetExhausted explain themselves; Succeeded needs no words.
            assert cond["message"] == st.message
        assert cond["reason"]  # metav1.Condition requires a non-empty reason


def test_conditions_of_a_final_run_date_from_completion() -> None:
    st = STATES["failed"]
    conditions = conditions_for(st)
    assert {c["lastTransitionTime"] for c in conditions} == {st.completion_time}
    assert {c["observedGeneration"] for c in conditions} == {3}
    running = conditions[0]
    assert (running["status"], running["reason"]) == ("False", "NotRunning")


@pytest.mark.parametrize("name", list(STATES))
def test_status_times_are_rfc3339_utc(name: str) -> None:
    status = to_status(STATES[name])
    times = [c["lastTransitionTime"] for c in status["conditions"]]
    times += [status[k] for k in ("startTime", "completionTime") if k in status]
    assert times
    assert all(RFC3339_UTC.match(t) for t in times), times


def test_history_lists_rounds_with_rounded_figures() -> None:
    history = to_history(STATES["running"])
    assert history["run"] == "stroke-demo"
    assert history["phase"] == "Running"
    assert history["targetEpsilon"] == 1.0
    first, second = history["rounds"]
    assert first["round"] == 1
    assert first["durationSeconds"] == 1.235
    assert first["trainLoss"] == 0.6123
    assert first["evaluation"]["auroc"] == 0.7123
    assert list(first["hospitalEvaluation"]) == ["hospital-a", "hospital-b"]
    assert first["epsilon"] == {"hospital-a": 0.35, "hospital-b": 0.4}
    assert second["hospitalsTrained"] == ["hospital-a", "hospital-b"]
    assert second["trainLoss"] is None
    assert second["evaluation"] == {}


def test_a_finished_run_names_the_hospitals_that_never_joined() -> None:
    st = RunState.new("r", ["joined", "left", "never", "failed"], 3, 1.0, 1e-5)
    joined, left, never, failed = (st.hospitals[n] for n in ("joined", "left", "never", "failed"))
    joined.state, joined.incarnation, joined.node_id = "Connected", "pod-1", 7
    left.incarnation, left.message = "pod-2", "lost connection; waiting for the hospital to rejoin"
    failed.state, failed.message = "Failed", "bad file"
    never.message = "starting: not connected yet"
    st.finish("Succeeded", "RoundsCompleted", "3 rounds completed")
    rows = {h["name"]: h for h in to_status(st)["hospitals"]}
    assert rows["never"]["state"] == "NotJoined"
    assert rows["never"]["message"] == "never connected before the run ended"
    assert rows["left"]["state"] == "Pending"  # it joined, then left: its message says so
    assert (rows["joined"]["state"], rows["failed"]["state"]) == ("Connected", "Failed")
    FederatedRunStatus.model_validate(to_status(st))

"""The operator's decisions (fedrun_operator.status.decide) on observed states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fedrun_core.accounting import epsilon
from fedrun_core.api import FederatedRun, load_run, parse_run
from fedrun_core.states import PHASE_CONDITIONS
from fedrun_operator.status import (
    SUCCEEDED_GRACE_S,
    Decision,
    Event,
    HospitalObservation,
    Observation,
    decide,
    rfc3339,
)
from fedrun_render.security import INSECURE_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def make_run(**spec: Any) -> FederatedRun:
    base = load_run(ROOT / "examples" / "federatedrun-local.yaml")
    body = base.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["metadata"]["generation"] = 1
    body["spec"].update(spec)
    return parse_run(body)


def server_status(
    run: FederatedRun, phase: str = "Running", current: int = 1, steps: int = 0, **extra: Any
) -> dict[str, Any]:
    """What a run server's /status looks like (the shape run_state.to_status writes)."""
    q = 0.1
    sigma = 4.0
    hospitals = [h.name for h in run.spec.hospitals]
    out: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": phase, "status": "True", "reason": extra.pop("reason", "Training")}
        ],
        "round": {"current": current, "total": run.spec.rounds},
        "hospitals": [{"name": h, "state": "Training", "restarts": 0} for h in hospitals],
        "message": extra.pop("message", "training"),
        "privacy": {
            "epsilonSpent": 0.0,
            "targetEpsilon": run.spec.privacy.target_epsilon,
            "delta": run.spec.privacy.delta,
            "hospitals": [
                {
                    "name": h,
                    "epsilon": 0.0,
                    "noiseMultiplier": sigma,
                    "sampleRate": q,
                    "steps": steps,
                }
                for h in hospitals
            ],
        },
    }
    out.update(extra)
    return out


def jobs(run: FederatedRun, **overrides: HospitalObservation) -> dict[str, HospitalObservation]:
    out = {
        h.name: HospitalObservation(name=h.name, job_name=f"{run.name}-{h.name}", active=1)
        for h in run.spec.hospitals
    }
    out.update(overrides)
    return out


def look(run: FederatedRun, prev: dict[str, Any], server: dict[str, Any] | None) -> Decision:
    """One reconcile at T0 with every hospital's Job active and `server` as /status."""
    return decide(run, prev, Observation(now=T0, server=server, hospitals=jobs(run)), epsilon)


def created(run: FederatedRun) -> dict[str, Any]:
    """The status the first reconcile writes (no server yet)."""
    return look(run, {}, None).status


def test_a_new_run_is_pending_with_every_condition_false_but_none_running() -> None:
    run = make_run()
    d = decide(run, {}, Observation(now=T0, hospitals=jobs(run)), epsilon)
    assert d.status["phase"] == "Pending"
    assert d.status["progress"] == f"0/{run.spec.rounds}"
    assert d.status["startTime"] == rfc3339(T0)
    assert d.status["observedGeneration"] == 1
    assert {c["type"] for c in d.status["conditions"]} == {
        "Running",
        "Suspended",
        "Succeeded",
        "Failed",
        "BudgetExhausted",
    }
    assert all(c["status"] == "False" for c in d.status["conditions"])
    assert not d.stop
    assert [e.reason for e in d.events] == ["ChildrenCreated"]


def test_server_progress_reaches_the_status_and_epsilon_is_the_operators_own() -> None:
    run = make_run()
    prev = created(run)
    srv = server_status(run, current=2, steps=20)
    d = decide(
        run,
        prev,
        Observation(now=T0 + timedelta(seconds=10), server=srv, hospitals=jobs(run)),
        epsilon,
    )
    assert d.status["phase"] == "Running"
    assert d.status["progress"] == f"2/{run.spec.rounds}"
    expected = epsilon([(4.0, 0.1, 20)], run.spec.privacy.delta)
    # The server said 0.0; the operator's own accounting is what the status shows.
    assert d.status["privacy"]["epsilonSpent"] == pytest.approx(expected, rel=1e-5)
    for row in d.status["privacy"]["hospitals"]:
        assert row["epsilonOperator"] == pytest.approx(expected, rel=1e-5)
    running = next(c for c in d.status["conditions"] if c["type"] == "Running")
    assert running["status"] == "True"
    assert running["lastTransitionTime"] == rfc3339(T0 + timedelta(seconds=10))
    # The next look with the same facts keeps the transition time.
    again = decide(
        run,
        d.status,
        Observation(now=T0 + timedelta(seconds=20), server=srv, hospitals=jobs(run)),
        epsilon,
    )
    assert again.status["conditions"] == d.status["conditions"]
    assert again.events == []


def test_the_servers_final_phase_is_captured_and_stops_the_processes() -> None:
    run = make_run(rounds=2)
    prev = created(run)
    srv = server_status(
        run,
        phase="Succeeded",
        current=2,
        steps=10,
        reason="RoundsCompleted",
        completionTime="2026-11-24T12:05:00Z",
        mlflowRunId="abc",
        metrics={"round": 2, "auroc": 0.8},
    )
    d = decide(
        run,
        prev,
        Observation(now=T0 + timedelta(minutes=5), server=srv, hospitals=jobs(run)),
        epsilon,
    )
    assert d.status["phase"] == "Succeeded"
    # The hospitals get SUCCEEDED_GRACE_S to exit 0 by themselves (their Jobs then end
    # Complete): nothing is stopped yet, and it is once the grace has passed.
    assert not d.stop
    done = datetime(2026, 11, 24, 12, 5, 0, tzinfo=UTC)
    for seconds, stopped in ((SUCCEEDED_GRACE_S - 1, False), (SUCCEEDED_GRACE_S, True)):
        look_again = Observation(now=done + timedelta(seconds=seconds))
        assert decide(run, d.status, look_again, epsilon).stop is stopped
    assert d.status["completionTime"] == "2026-11-24T12:05:00Z"
    assert d.status["mlflowRunId"] == "abc"
    assert d.status["metrics"]["auroc"] == 0.8
    assert [e.reason for e in d.events] == ["RoundsCompleted"]
    # Once final, nothing changes it, and the TTL decides when the run goes.
    later = decide(run, d.status, Observation(now=T0 + timedelta(days=1)), epsilon)
    assert later.status == d.status and later.stop and not later.delete_run


def test_ttl_after_finished_deletes_the_run() -> None:
    run = make_run(ttlSecondsAfterFinished=60)
    final = {"phase": "Succeeded", "completionTime": rfc3339(T0)}
    assert not decide(run, final, Observation(now=T0 + timedelta(seconds=59)), epsilon).delete_run
    assert decide(run, final, Observation(now=T0 + timedelta(seconds=60)), epsilon).delete_run


def test_active_deadline_fails_the_run() -> None:
    run = make_run(activeDeadlineSeconds=300)
    prev = created(run)
    srv = server_status(run, current=1, steps=10)
    d = decide(
        run,
        prev,
        Observation(now=T0 + timedelta(seconds=301), server=srv, hospitals=jobs(run)),
        epsilon,
    )
    assert d.status["phase"] == "Failed"
    failed = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert "300s" in failed["message"]
    assert d.stop


def _failed_job(run: FederatedRun, name: str) -> HospitalObservation:
    return HospitalObservation(
        name=name,
        job_name=f"{run.name}-{name}",
        failed=True,
        failed_reason="BackoffLimitExceeded",
        failed_pods=4,
        message=f"data file hospital-x.csv line 7: not a number in column age ({name})",
    )


def test_a_failed_hospital_above_min_hospitals_is_reported_and_the_run_goes_on() -> None:
    run = make_run(minHospitals=2)
    prev = created(run)
    bad = run.spec.hospitals[0].name
    obs = Observation(
        now=T0,
        server=server_status(run, steps=10),
        hospitals=jobs(run, **{bad: _failed_job(run, bad)}),
    )
    d = decide(run, prev, obs, epsilon)
    assert d.status["phase"] == "Running"
    row = next(h for h in d.status["hospitals"] if h["name"] == bad)
    assert row["state"] == "Failed" and "line 7" in row["message"] and row["restarts"] == 4
    assert [e.reason for e in d.events if e.type == "Warning"] == ["HospitalFailed"]


def test_too_few_hospitals_fails_the_run_naming_them() -> None:
    run = make_run(minHospitals=3)
    prev = created(run)
    bad = run.spec.hospitals[1].name
    obs = Observation(
        now=T0,
        server=server_status(run, steps=10),
        hospitals=jobs(run, **{bad: _failed_job(run, bad)}),
    )
    d = decide(run, prev, obs, epsilon)
    assert d.status["phase"] == "Failed"
    assert d.status["message"].startswith(f"1 of 3 hospitals failed ({bad}: ")
    assert d.status["message"].endswith("); the other 2 cannot reach minHospitals 3")
    assert d.stop


def test_epsilon_over_target_stops_the_run() -> None:
    run = make_run()
    prev = created(run)
    # Far more steps than a budget of ε=1 allows at σ=4, q=0.1.
    srv = server_status(run, current=2, steps=5000)
    d = look(run, prev, srv)
    assert d.status["phase"] == "BudgetExhausted"
    assert next(c for c in d.status["conditions"] if c["status"] == "True")["reason"] == (
        "BudgetExceeded"
    )
    assert "BudgetStop" in [e.reason for e in d.events]
    assert d.stop


def test_a_round_that_would_overspend_is_refused_before_it_starts() -> None:
    run = make_run(rounds=50)
    delta = run.spec.privacy.delta
    target = run.spec.privacy.target_epsilon
    # Find the largest number of 10-step rounds that stays within the budget.
    rounds = 1
    while epsilon([(4.0, 0.1, 10 * (rounds + 1))], delta) <= target:
        rounds += 1
    prev = created(run)
    srv = server_status(run, current=rounds, steps=10 * rounds)
    d = look(run, prev, srv)
    assert d.status["phase"] == "BudgetExhausted"
    assert d.status["privacy"]["epsilonSpent"] <= target
    reason = next(c for c in d.status["conditions"] if c["status"] == "True")["reason"]
    assert reason == "BudgetWouldBeExceeded"
    # One round fewer leaves room for the next: the run goes on.
    srv = server_status(run, current=rounds - 1, steps=10 * (rounds - 1))
    d = look(run, prev, srv)
    assert d.status["phase"] == "Running"


def test_suspend_carries_spent_privacy_over_and_resume_says_it_restarts() -> None:
    run = make_run()
    prev = created(run)
    srv = server_status(run, current=2, steps=20)
    running = look(run, prev, srv)
    suspended_run = make_run(suspend=True)
    s = decide(suspended_run, running.status, Observation(now=T0, server=srv), epsilon)
    assert s.status["phase"] == "Suspended" and s.stop
    assert "restarts training from round 0" in s.status["message"]
    carried = {c["name"]: c["history"] for c in s.status["privacy"]["carried"]}
    assert carried == {h.name: [[4.0, 0.1, 20]] for h in run.spec.hospitals}
    spent_before = s.status["privacy"]["epsilonSpent"]

    resumed = decide(run, s.status, Observation(now=T0, hospitals=jobs(run)), epsilon)
    assert resumed.status["phase"] == "Pending"
    assert [e.reason for e in resumed.events] == ["Resumed"]
    assert "resumed" in resumed.status["message"]
    # The new server starts from zero steps; the operator adds what was carried.
    fresh = server_status(run, current=1, steps=10)
    r = look(run, resumed.status, fresh)
    expected = epsilon([(4.0, 0.1, 20), (4.0, 0.1, 10)], run.spec.privacy.delta)
    assert r.status["privacy"]["epsilonSpent"] == pytest.approx(expected, rel=1e-5)
    assert r.status["privacy"]["epsilonSpent"] > spent_before


def with_lineage(status: dict[str, Any], lineage: str) -> dict[str, Any]:
    return {**status, "checkpoint": {"lineage": lineage}}


def spent(decision: Decision) -> float:
    return float(decision.status["privacy"]["epsilonSpent"])


def test_a_server_that_started_over_has_what_its_lineage_spent_carried() -> None:
    """A server whose checkpoint was lost (a new pod) reports a new lineage from zero steps:
    what the old lineage spent keeps counting, and is carried once, however often it is seen."""
    run = make_run()
    delta = run.spec.privacy.delta
    first = look(run, created(run), with_lineage(server_status(run, current=2, steps=20), "aa"))
    assert first.status["privacy"]["lineage"] == "aa"
    assert "carried" not in first.status["privacy"]
    # Restarting: the new server has not said its lineage yet; the old figures stand.
    starting = look(run, first.status, server_status(run, phase="Pending", current=0, steps=0))
    assert starting.status["privacy"]["lineage"] == "aa"
    assert spent(starting) == pytest.approx(spent(first))
    over = look(run, starting.status, with_lineage(server_status(run, current=1, steps=10), "bb"))
    again = look(run, over.status, with_lineage(server_status(run, current=1, steps=10), "bb"))
    for d in (over, again):
        carried = d.status["privacy"]["carried"]
        assert {(c["name"], c["lineage"]) for c in carried} == {
            (h.name, "aa") for h in run.spec.hospitals
        }
        assert all(c["history"] == [[4.0, 0.1, 20]] for c in carried)
        assert d.status["privacy"]["lineage"] == "bb"
        assert spent(d) == pytest.approx(epsilon([(4.0, 0.1, 30)], delta), rel=1e-5)
        assert d.histories["hospital-a"] == [(4.0, 0.1, 20), (4.0, 0.1, 10)]


def test_a_server_from_before_lineages_replaced_by_one_with_a_lineage_is_carried() -> None:
    """An upgrade mid-run: the old server named no lineage; what it spent still counts."""
    run = make_run()
    old = look(run, created(run), server_status(run, current=2, steps=20))
    assert "lineage" not in old.status["privacy"]
    new = look(run, old.status, with_lineage(server_status(run, current=1, steps=10), "bb"))
    assert {(c["name"], c["lineage"]) for c in new.status["privacy"]["carried"]} == {
        (h.name, "") for h in run.spec.hospitals
    }
    expected = epsilon([(4.0, 0.1, 30)], run.spec.privacy.delta)
    assert spent(new) == pytest.approx(expected, rel=1e-5)


def test_steps_a_hospital_ledger_holds_and_no_server_recorded_still_count() -> None:
    """A reply lost with a server that started over: the ledger says 40 steps, the servers
    recorded 20 (lineage aa) and 10 (lineage bb); the account is topped up to 40."""
    run = make_run()
    first = look(run, created(run), with_lineage(server_status(run, current=2, steps=20), "aa"))
    report = with_lineage(server_status(run, current=1, steps=10), "bb")
    for row in report["privacy"]["hospitals"]:
        row["ledgerSteps"] = 40
    after = look(run, first.status, report)
    assert spent(after) == pytest.approx(epsilon([(4.0, 0.1, 40)], run.spec.privacy.delta))
    assert sum(n for _, _, n in after.histories["hospital-a"]) == 40
    for row in report["privacy"]["hospitals"]:
        row["ledgerSteps"] = 25  # fewer than recorded: nothing is taken away
    fewer = look(run, first.status, report)
    assert sum(n for _, _, n in fewer.histories["hospital-a"]) == 30


def test_a_server_resumed_from_its_checkpoint_is_not_counted_twice() -> None:
    """Same lineage: the resumed server's history already holds what was spent before."""
    run = make_run()
    delta = run.spec.privacy.delta
    before = look(run, created(run), with_lineage(server_status(run, current=3, steps=30), "aa"))
    # Resumed from the checkpoint of round 2 (round 3's was not written yet): the round it
    # lost still counts until the server's own record has it again.
    behind = look(run, before.status, with_lineage(server_status(run, current=2, steps=20), "aa"))
    assert spent(behind) == pytest.approx(epsilon([(4.0, 0.1, 30)], delta), rel=1e-5)
    ahead = look(run, behind.status, with_lineage(server_status(run, current=4, steps=40), "aa"))
    assert "carried" not in ahead.status["privacy"]
    assert spent(ahead) == pytest.approx(epsilon([(4.0, 0.1, 40)], delta), rel=1e-5)


def test_suspend_with_a_lineage_carries_once_whether_the_resumed_server_kept_it_or_not() -> None:
    run = make_run()
    delta = run.spec.privacy.delta
    running = look(run, created(run), with_lineage(server_status(run, current=2, steps=20), "aa"))
    suspended = decide(
        make_run(suspend=True),
        running.status,
        Observation(now=T0, server=with_lineage(server_status(run, current=2, steps=20), "aa")),
        epsilon,
    )
    assert suspended.status["phase"] == "Suspended"
    resumed = decide(run, suspended.status, Observation(now=T0, hospitals=jobs(run)), epsilon)
    kept = look(run, resumed.status, with_lineage(server_status(run, current=3, steps=30), "aa"))
    assert spent(kept) == pytest.approx(epsilon([(4.0, 0.1, 30)], delta), rel=1e-5)
    lost = look(run, resumed.status, with_lineage(server_status(run, current=1, steps=10), "cc"))
    assert spent(lost) == pytest.approx(epsilon([(4.0, 0.1, 30)], delta), rel=1e-5)


def test_suspend_and_resume_say_where_training_goes_on() -> None:
    run = make_run(server={"checkpointVolume": {"size": "1Gi"}})
    running = look(run, created(run), with_lineage(server_status(run, current=2, steps=20), "aa"))
    suspended = decide(
        make_run(suspend=True, server={"checkpointVolume": {"size": "1Gi"}}),
        running.status,
        Observation(now=T0),
        epsilon,
    )
    assert (
        "goes on after the last round in its checkpoint on claim stroke-demo-checkpoint"
        in (suspended.status["message"])
    )
    resumed = decide(run, suspended.status, Observation(now=T0, hospitals=jobs(run)), epsilon)
    assert "goes on after the last round" in resumed.status["message"]


def test_epsilon_never_goes_down_when_the_server_restarts() -> None:
    run = make_run()
    prev = created(run)
    high = look(run, prev, server_status(run, steps=30)).status
    low = look(run, high, server_status(run, steps=10)).status
    assert low["privacy"]["epsilonSpent"] >= high["privacy"]["epsilonSpent"]


def test_an_unreachable_server_keeps_a_running_run_running_and_says_why() -> None:
    run = make_run()
    prev = created(run)
    running = look(run, prev, server_status(run, steps=10)).status
    d = decide(
        run,
        running,
        Observation(now=T0, server_error="connection refused", hospitals=jobs(run)),
        epsilon,
    )
    assert d.status["phase"] == "Running"
    assert "connection refused" in d.status["message"]
    assert d.status["privacy"]["epsilonSpent"] == running["privacy"]["epsilonSpent"]


def test_a_refused_spec_change_posts_a_warning() -> None:
    run = make_run()
    obs = Observation(now=T0, hospitals=jobs(run), spec_refused="spec.rounds changed")
    d = decide(run, {}, obs, epsilon)
    assert ("Warning", "SpecChangeRefused") in [(e.type, e.reason) for e in d.events]


# --------------------------------------------------------------------------- spec.security


def test_a_secure_run_has_no_insecure_condition_and_no_warning() -> None:
    for secure in (make_run(), make_run(security={}), make_run(security={"insecure": False})):
        first = look(secure, {}, None)
        later = look(secure, first.status, server_status(secure, steps=10))
        for d in (first, later):
            assert "Insecure" not in {c["type"] for c in d.status["conditions"]}
            assert "Insecure" not in {e.reason for e in d.events}


def test_an_insecure_run_carries_insecure_and_is_warned_about_once() -> None:
    run = make_run(security={"insecure": True})
    first = look(run, {}, None)
    insecure = [c for c in first.status["conditions"] if c["type"] == "Insecure"]
    assert insecure == [
        {
            "type": "Insecure",
            "status": "True",
            "reason": "InsecureTransport",
            "message": INSECURE_MESSAGE,
            "lastTransitionTime": rfc3339(T0),
            "observedGeneration": 1,
        }
    ]
    # The five standard conditions are still there, unchanged.
    assert [c["type"] for c in first.status["conditions"]] == [*PHASE_CONDITIONS, "Insecure"]
    warnings = [e for e in first.events if e.reason == "Insecure"]
    assert warnings == [Event("Warning", "Insecure", INSECURE_MESSAGE)]
    # Later reconciles keep the condition (and its time) but do not warn again.
    later = decide(
        run,
        first.status,
        Observation(
            now=T0 + timedelta(minutes=5),
            server=server_status(run, steps=10),
            hospitals=jobs(run),
        ),
        epsilon,
    )
    assert later.status["phase"] == "Running"
    kept = next(c for c in later.status["conditions"] if c["type"] == "Insecure")
    assert kept["status"] == "True" and kept["lastTransitionTime"] == rfc3339(T0)
    assert "Insecure" not in {e.reason for e in later.events}
    # A final run keeps what it had.
    done = look(run, later.status, server_status(run, "Succeeded", current=5, steps=50))
    assert "Insecure" in {c["type"] for c in done.status["conditions"]}
    assert "Insecure" not in {e.reason for e in done.events}


def test_the_insecure_warning_comes_back_when_the_condition_reappears() -> None:
    # While Pending the spec may still change: secure, then insecure again.
    insecure = make_run(security={"insecure": True})
    first = look(insecure, {}, None).status
    secure = look(make_run(), first, None)
    assert "Insecure" not in {c["type"] for c in secure.status["conditions"]}
    again = look(insecure, secure.status, None)
    assert "Insecure" in {e.reason for e in again.events}


def test_a_run_the_operator_ends_shows_who_never_joined() -> None:
    run = make_run(activeDeadlineSeconds=300)
    names = [h.name for h in run.spec.hospitals]
    srv = server_status(run, current=1, steps=10)
    srv["hospitals"][0].update(state="Pending", message="starting: not connected yet")
    srv["hospitals"][1].update(state="Pending", message="lost connection; waiting to rejoin")
    running = Observation(now=T0 + timedelta(seconds=10), server=srv, hospitals=jobs(run))
    assert decide(run, created(run), running, epsilon).status["hospitals"][0]["state"] == "Pending"
    late = Observation(now=T0 + timedelta(seconds=301), server=srv, hospitals=jobs(run))
    rows = {h["name"]: h for h in decide(run, created(run), late, epsilon).status["hospitals"]}
    assert rows[names[0]]["state"] == "NotJoined"
    assert rows[names[0]]["message"] == "never connected before the run ended"
    assert rows[names[1]]["state"] == "Pending"  # it had joined: its message says what happened
    assert rows[names[2]]["state"] == "Training"


def test_the_history_a_budget_is_charged_is_the_one_behind_the_enforced_epsilon() -> None:
    """Decision.histories: the server's history, or the spec's plan over the same steps
    when the plan costs more (a server that reports a larger σ cannot lower the charge)."""
    run = make_run()
    srv = server_status(run, current=2, steps=20)
    honest = decide(
        run, created(run), Observation(now=T0, server=srv, hospitals=jobs(run)), epsilon
    )
    assert honest.histories == {h.name: [(4.0, 0.1, 20)] for h in run.spec.hospitals}
    plan = (1.0, 0.1, 10)  # the spec implies less noise than the server says it used
    planned = {h.name: plan for h in run.spec.hospitals}
    seen = Observation(now=T0, server=srv, hospitals=jobs(run), planned=planned)
    stricter = decide(run, created(run), seen, epsilon)
    assert stricter.histories == {h.name: [(1.0, 0.1, 20)] for h in run.spec.hospitals}
    row = stricter.status["privacy"]["hospitals"][0]
    assert row["epsilonOperator"] == pytest.approx(epsilon([(1.0, 0.1, 20)], 1e-5), rel=1e-5)
    final = decide(run, stricter.status | {"phase": "Succeeded"}, seen, epsilon)
    assert final.histories == {}  # a final run is charged nothing more

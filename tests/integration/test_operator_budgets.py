"""PrivacyBudgets on a cluster: the real operator (kopf under KopfRunner) against the
emulated API, which serves the PrivacyBudget CRD as generated, answers a stale
resourceVersion with 409 as kube-apiserver does, and shows `kubectl get privacybudgets`.

Admission, refusal (Pending with BudgetUnavailable), charge round by round, release when a
run ends, a raised limit, fifty runs racing for one budget, an operator restart, and runs
deleted while an operator watches and while none does. The real control plane's
integration test (test_operator.py) runs one budgeted run too, so the RBAC proof sees the
calls.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from fedrun_core.accounting import epsilon
from fedrun_core.budgets import composed_epsilon
from fedrun_operator import metrics
from tests.integration.helpers import HOSPITALS, FakeServer, condition, run_doc
from tests.kube.cluster import EmulatedCluster
from tests.operator_runner import API, PLURAL, run_status, running_operator

BUDGETS = "privacybudgets"
BUDGET = "hospital-b-stroke"
HOSPITAL = HOSPITALS[1]


def budget_doc(limit: float) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "PrivacyBudget",
        "metadata": {"name": BUDGET},
        "spec": {
            "hospital": HOSPITAL,
            "dataset": {"uri": "s3://hospital-b-data/stroke.csv"},
            "epsilon": limit,
            "delta": 1e-5,
        },
    }


def budgeted_run(name: str) -> dict[str, Any]:
    """The example run (targetEpsilon 1.0, δ 1e-5) with hospital-b charging BUDGET."""
    doc = run_doc()
    doc["metadata"]["name"] = name
    doc["spec"]["hospitals"][1]["budgetRef"] = BUDGET
    return doc


def budget_status(cluster: EmulatedCluster) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get(API, BUDGETS, cluster.namespace, BUDGET).get("status")
    return status or {}


def charges(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    """The budget's charges by run name."""
    return {ch["run"]: ch for ch in budget_status(cluster).get("charges", [])}


def budget_state(cluster: EmulatedCluster, run: str) -> str:
    rows = run_status(cluster, run).get("budgets") or [{}]
    return str(rows[0].get("state", ""))


def wait_budget_state(cluster: EmulatedCluster, run: str, state: str) -> None:
    cluster.wait_for(lambda: budget_state(cluster, run) == state, timeout=30, what=f"{run} {state}")


def servers(cluster: EmulatedCluster) -> set[str]:
    """The run names that have a server Deployment."""
    return {
        d["metadata"]["labels"]["fedrun.io/run"]
        for d in cluster.list("apps/v1", "deployments", cluster.namespace)
    }


def steps(history: list[list[float]]) -> int:
    return sum(int(n) for _, _, n in history)


def test_two_finished_runs_charge_the_composed_epsilon_and_a_third_waits_for_budget(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    cluster.create(budget_doc(2.0))
    server.set("Running", current=1, steps=10)
    with running_operator(cluster.kubeconfig, server_url=server.url):
        cluster.create(budgeted_run("first"))
        cluster.create(budgeted_run("second"))
        for run in ("first", "second"):
            wait_budget_state(cluster, run, "Reserved")
        held = budget_status(cluster)
        assert held["reserved"] == pytest.approx(2.0)
        assert held["remaining"] == pytest.approx(0.0)

        # Nothing is left: the third run waits, and nothing of it is created.
        cluster.create(budgeted_run("third"))
        wait_budget_state(cluster, "third", "Waiting")
        waiting = run_status(cluster, "third")
        assert waiting["phase"] == "Pending"
        refused = condition(waiting, "BudgetUnavailable")
        assert refused["status"] == "True"
        assert refused["reason"] == "BudgetUnavailable"
        assert "needs ε=1 but the budget has 0 of 2 left" in refused["message"]
        assert f"{HOSPITAL}: PrivacyBudget {BUDGET}" in waiting["message"]

        # Charged as they spend: the reported history, round by round.
        cluster.wait_for(
            lambda: all(ch["history"] for ch in charges(cluster).values()),
            timeout=30,
            what="charges",
        )
        assert charges(cluster)["first"]["history"] == [[4.0, 0.1, 10.0]]

        # Both end: their reservations go back, their histories stay, composed.
        server.set("Succeeded", current=5, steps=50, reason="RoundsCompleted")
        for run in ("first", "second"):
            wait_budget_state(cluster, run, "Released")
        ended = budget_status(cluster)
        history = [[4.0, 0.1, 50.0]]
        assert [ch["state"] for ch in ended["charges"]] == ["Released", "Released"]
        assert [ch["history"] for ch in ended["charges"]] == [history, history]
        assert ended["spent"] == pytest.approx(composed_epsilon([history, history], 1e-5))
        assert ended["summed"] == pytest.approx(2 * epsilon(history, 1e-5))
        assert ended["spent"] < ended["summed"]
        assert ended["reserved"] == 0
        # 2 − 1.08 left: still not enough for the third run's 1.0 … until the limit is raised.
        assert 0 < ended["remaining"] < 1.0
        assert budget_state(cluster, "third") == "Waiting"
        assert "third" not in servers(cluster)
        if shutil.which("kubectl"):
            table = kubectl(cluster, "get", "privacybudgets")
            assert (
                table.split("\n")[0].split()
                == [
                    "NAME",
                    "HOSPITAL",
                    "LIMIT",
                    "SPENT",
                    "SUMMED",
                    "RESERVED",
                    "REMAINING",
                    "RUNS",
                    "AGE",
                ]
                or "SPENT" in table.split("\n")[0]
            )
            assert BUDGET in table

        cluster.patch(API, BUDGETS, cluster.namespace, BUDGET, {"spec": {"epsilon": 3.0}})
        wait_budget_state(cluster, "third", "Reserved")
        cluster.wait_for(lambda: "third" in servers(cluster), timeout=30, what="third's server")
        admitted = condition(run_status(cluster, "third"), "BudgetUnavailable")
        assert admitted["status"] == "False"
        assert admitted["reason"] == "BudgetReserved"
    assert budget_status(cluster)["reserved"] == pytest.approx(1.0)


def kubectl(cluster: EmulatedCluster, *args: str) -> str:
    home = str(cluster.kubeconfig.parent)
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "HOME": home}
    done = subprocess.run(
        ["kubectl", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fifty_runs_created_at_once_never_over_reserve(cluster: EmulatedCluster) -> None:
    limit, count = 10.0, 50
    lost = conflicts()
    cluster.create(budget_doc(limit))
    with running_operator(cluster.kubeconfig):
        for i in range(count):
            cluster.create(budgeted_run(f"race-{i:02d}"))
        names = [f"race-{i:02d}" for i in range(count)]
        cluster.wait_for(
            lambda: all(budget_state(cluster, n) in ("Reserved", "Waiting") for n in names),
            timeout=120,
            what="every run decided",
        )
        admitted = sorted(n for n in names if budget_state(cluster, n) == "Reserved")
        held = budget_status(cluster)
        assert len(admitted) == int(limit)  # each reserves 1.0: exactly ten fit
        assert sorted(charges(cluster)) == admitted
        assert held["reserved"] == pytest.approx(limit)
        assert held["committed"] <= limit
        cluster.wait_for(
            lambda: servers(cluster) == set(admitted), timeout=60, what="admitted servers"
        )
    # The race was real: the API server refused stale writes, and each was decided again.
    assert conflicts() > lost


def conflicts() -> float:
    """Writes the operator (in this process) lost to a concurrent writer: 409 on update."""
    total = 0.0
    for line in metrics.render().decode().splitlines():
        if line.startswith('fedrun_operator_api_requests_total{code="409",verb="update"}'):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_restart_neither_loses_nor_double_charges_and_deleted_runs_stay_spent(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    """A run deleted before it ended may have spent any part of its reservation since the
    operator last looked (rounds can be quicker than a look): it stays Unsettled, its whole
    reservation committed, whether an operator watched the deletion or not."""
    cluster.create(budget_doc(5.0))
    server.set("Running", current=1, steps=10)
    with running_operator(cluster.kubeconfig, server_url=server.url):
        cluster.create(budgeted_run("kept"))
        cluster.create(budgeted_run("watched"))
        for run in ("kept", "watched"):
            wait_budget_state(cluster, run, "Reserved")
        cluster.wait_for(
            lambda: all(ch["history"] for ch in charges(cluster).values()),
            timeout=30,
            what="charged",
        )
        cluster.delete(API, PLURAL, cluster.namespace, "watched")
        cluster.wait_for(
            lambda: charges(cluster)["watched"]["state"] == "Unsettled", timeout=30, what="settle"
        )
    assert budget_status(cluster)["committed"] == pytest.approx(2.0)

    # A second operator finds the run admitted: nothing is reserved or charged twice.
    server.set("Running", current=2, steps=20)
    with running_operator(cluster.kubeconfig, server_url=server.url):
        cluster.wait_for(
            lambda: steps(charges(cluster)["kept"]["history"]) == 20, timeout=30, what="charge"
        )
        assert len(budget_status(cluster)["charges"]) == 2
        assert budget_status(cluster)["reserved"] == pytest.approx(1.0)

    # Deleted while no operator runs: the next one's sweep settles it.
    cluster.delete(API, PLURAL, cluster.namespace, "kept")
    with running_operator(cluster.kubeconfig, server_url=server.url):
        cluster.wait_for(
            lambda: charges(cluster)["kept"]["state"] == "Unsettled", timeout=30, what="sweep"
        )
    ended = budget_status(cluster)
    assert steps(charges(cluster)["kept"]["history"]) == 20  # what was seen stays recorded
    assert ended["reserved"] == 0
    assert ended["committed"] == pytest.approx(2.0)  # both reservations, in full
    assert ended["remaining"] == pytest.approx(3.0)


def test_a_run_whose_budget_terms_change_after_admission_fails_and_stays_charged(
    cluster: EmulatedCluster,
) -> None:
    """While Pending or Suspended a run's spec may change; a run keeps the terms it
    reserved, so one whose targetEpsilon is raised after admission fails."""
    cluster.create(budget_doc(5.0))
    with running_operator(cluster.kubeconfig):
        cluster.create(budgeted_run("edited"))
        wait_budget_state(cluster, "edited", "Reserved")
        cluster.patch(
            API, PLURAL, cluster.namespace, "edited", {"spec": {"privacy": {"targetEpsilon": 4.0}}}
        )
        failed = cluster.wait_for(
            lambda: (s := run_status(cluster, "edited")).get("phase") == "Failed" and s,
            timeout=30,
            what="Failed",
        )
    assert condition(failed, "Failed")["reason"] == "InvalidSpec"
    assert "changed after the run was admitted" in failed["message"]
    assert [r["state"] for r in failed["budgets"]] == ["Unsettled"]
    held = budget_status(cluster)
    assert held["charges"][0]["state"] == "Unsettled"
    assert held["committed"] == pytest.approx(1.0)  # the admitted ε, not the 4.0 asked later


def test_a_run_refused_by_one_budget_holds_nothing_at_another(cluster: EmulatedCluster) -> None:
    roomy = budget_doc(5.0)
    roomy["metadata"]["name"] = "a-roomy"
    roomy["spec"]["hospital"] = HOSPITALS[0]
    cluster.create(roomy)
    cluster.create(budget_doc(0.5))  # hospital-b's: too small for ε = 1
    doc = budgeted_run("both")
    doc["spec"]["hospitals"][0]["budgetRef"] = "a-roomy"
    with running_operator(cluster.kubeconfig):
        cluster.create(doc)
        wait_budget_state(cluster, "both", "Waiting")
        waiting = run_status(cluster, "both")
        # Every budget is asked before any is written: the one that has room was never
        # written for a run another budget refuses (it would hold a reservation for a run
        # that cannot start, and keep it if the operator stopped between the two writes).
        roomy_status = cluster.get(API, BUDGETS, cluster.namespace, "a-roomy").get("status")
        assert not roomy_status
        assert "the run needs ε=1 but the budget has 0.5 of 0.5 left" in waiting["message"]
        assert [r["state"] for r in waiting["budgets"]] == ["Waiting", "Waiting"]


def test_a_reservation_left_by_a_stopped_pass_is_taken_back_while_the_run_waits(
    cluster: EmulatedCluster,
) -> None:
    """An operator that stopped between reserving at one budget and being refused at the
    next left a reservation for a run that cannot start: the next pass takes it back."""
    roomy = budget_doc(5.0)
    roomy["metadata"]["name"] = "a-roomy"
    roomy["spec"]["hospital"] = HOSPITALS[0]
    cluster.create(roomy)
    cluster.create(budget_doc(0.5))
    doc = budgeted_run("left")
    doc["spec"]["hospitals"][0]["budgetRef"] = "a-roomy"
    run = cluster.create(doc)
    stored = cluster.get(API, BUDGETS, cluster.namespace, "a-roomy")
    stored["status"] = {
        "charges": [
            {
                "run": "left",
                "namespace": cluster.namespace,
                "uid": run["metadata"]["uid"],
                "state": "Reserved",
                "reserved": 1.0,
                "delta": 1e-5,
            }
        ],
        "reserved": 1.0,
        "committed": 1.0,
        "remaining": 4.0,
        "runs": 1,
    }
    cluster.replace(stored, subresource="status")
    with running_operator(cluster.kubeconfig):
        wait_budget_state(cluster, "left", "Waiting")
        cluster.wait_for(
            lambda: (
                not (cluster.get(API, BUDGETS, cluster.namespace, "a-roomy")["status"]["charges"])
            ),
            timeout=30,
            what="the left reservation taken back",
        )
    assert cluster.get(API, BUDGETS, cluster.namespace, "a-roomy")["status"]["reserved"] == 0

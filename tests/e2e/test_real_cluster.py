"""A FederatedRun on a real Kubernetes control plane, as a user runs one.

`helm install` (real helm) puts the CRD and the operator in the cluster; the operator's
Pod runs on fedrun's local kubelet (tests/controlplane/node.py) and logs in with a token of
the chart's ServiceAccount, so the real authorizer applies the chart's RBAC to every call.
`kubectl apply -f` a run; the real Job and Deployment controllers create its Pods, the
real scheduler binds them to the node, and the local kubelet runs them as real Flower
processes. The run must end Succeeded within its ε; `kubectl get federatedruns` shows it;
`kubectl delete` removes every child through the real garbage collector. `make e2e` runs
this file; it writes out/e2e/federatedrun.json and out/e2e/kubectl-get-federatedruns.txt.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedrun_cli.demo_data import write_demo_hospitals
from tests.conftest import RELEASE_NS, WATCHED_NS
from tests.controlplane.cluster import ApiError, RealCluster
from tests.controlplane.node import NodeAgent
from tests.kube.patching import JSON_PATCH

from .conftest import REPO, example_run

NS = WATCHED_NS
API = "fedrun.io/v1alpha1"
RBAC = "rbac.authorization.k8s.io/v1"
PLURAL = "federatedruns"
FINAL = ("Succeeded", "Failed", "BudgetExhausted")
OUT = REPO / "out" / "e2e"
CHILD_KINDS = (
    ("v1", "configmaps"),
    ("v1", "services"),
    ("v1", "serviceaccounts"),
    ("v1", "secrets"),
    ("apps/v1", "deployments"),
    ("batch/v1", "jobs"),
    ("networking.k8s.io/v1", "networkpolicies"),
    ("v1", "pods"),
)


@pytest.fixture
def operator(chart: dict[str, Any]) -> dict[str, Any]:
    """The operator's Pod, from the session's chart (tests/conftest.py)."""
    return chart


def _pod_logs(node: NodeAgent, namespace: str) -> str:
    return node.logs(namespace)


def _run_doc(tmp_path: Path, name: str, rounds: int, seed: int) -> dict[str, Any]:
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(700, 700, 700), seed=seed)
    doc = example_run(
        rounds=rounds,
        hospitals=[{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())],
    )
    doc["metadata"] = {"name": name, "namespace": NS}
    return doc


def _apply(cluster: RealCluster, doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    cluster.kubectl("apply", "-f", str(path))


def _final(cluster: RealCluster, node: NodeAgent, name: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = cluster.get(API, PLURAL, NS, name)
        return obj if (obj.get("status") or {}).get("phase") in FINAL else None

    try:
        return cluster.wait_for(done, timeout=timeout, interval=2.0, what=f"run {name} final")
    except TimeoutError:
        status = cluster.get(API, PLURAL, NS, name).get("status")
        raise AssertionError(
            f"{json.dumps(status, indent=1)}\n{_pod_logs(node, NS)}\n{_pod_logs(node, RELEASE_NS)}"
        ) from None


def _event_reasons(cluster: RealCluster, name: str) -> list[str]:
    events = cluster.list("v1", "events", NS)
    return [str(e.get("reason")) for e in events if e["involvedObject"].get("name") == name]


def _children(cluster: RealCluster, name: str) -> list[str]:
    out = []
    for api_version, plural in CHILD_KINDS:
        for obj in cluster.list(api_version, plural, NS, label_selector=f"fedrun.io/run={name}"):
            out.append(f"{plural}/{obj['metadata']['name']}")
    return out


def test_a_run_applied_with_kubectl_succeeds_on_the_real_control_plane(
    real_cluster: RealCluster, node: NodeAgent, operator: dict[str, Any], tmp_path: Path
) -> None:
    name = "stroke-e2e"
    _apply(real_cluster, _run_doc(tmp_path, name, rounds=4, seed=11), tmp_path)
    final = _final(real_cluster, node, name, timeout=600)
    status = final["status"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "federatedrun.json").write_text(json.dumps(final, indent=2), encoding="utf-8")
    table = real_cluster.kubectl("get", "federatedruns", "-n", NS).stdout
    (OUT / "kubectl-get-federatedruns.txt").write_text(table, encoding="utf-8")

    assert status["phase"] == "Succeeded", (status.get("message"), _pod_logs(node, NS))
    assert status["round"] == {"current": 4, "total": 4}
    privacy = status["privacy"]
    assert 0 < privacy["epsilonSpent"] <= privacy["targetEpsilon"] == 1.0
    for row in privacy["hospitals"]:
        # The operator's own figure (history, and the spec's σ and q) agrees with the server's.
        assert abs(row["epsilonOperator"] - row["epsilon"]) <= 1e-3
        assert "accountingMismatch" not in row
    assert all(h["state"] == "Done" for h in status["hospitals"])
    assert status["metrics"]["auroc"] > 0.6
    assert status["completionTime"] >= status["startTime"]
    reasons = real_cluster.wait_for(
        lambda: "RoundsCompleted" in (r := _event_reasons(real_cluster, name)) and r,
        timeout=60,
        what="the RoundsCompleted event",
    )
    assert {"ChildrenCreated", "WaitingForHospitals", "RoundsCompleted"} <= set(reasons)
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "ROUND", "EPSILON"]
    assert row.split()[:3] == [name, "Succeeded", "4/4"]

    # Its Pods were made by the real controllers and bound by the real scheduler.
    pods = real_cluster.list("v1", "pods", NS, label_selector=f"fedrun.io/run={name}")
    owners = {p["metadata"]["ownerReferences"][0]["kind"] for p in pods}
    assert owners == {"Job", "ReplicaSet"}
    assert {p["spec"]["nodeName"] for p in pods} == {node.name}
    for pod in pods:
        scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert scheduled and scheduled[0]["status"] == "True"

    def complete() -> bool:
        jobs = real_cluster.list("batch/v1", "jobs", NS, label_selector=f"fedrun.io/run={name}")
        return len(jobs) == 3 and all(
            any(
                c["type"] == "Complete" and c["status"] == "True" for c in j["status"]["conditions"]
            )
            for j in jobs
        )

    try:
        real_cluster.wait_for(complete, timeout=120, interval=1.0, what="every Job Complete")
    except TimeoutError:
        jobs = real_cluster.list("batch/v1", "jobs", NS, label_selector=f"fedrun.io/run={name}")
        pods = real_cluster.list("v1", "pods", NS, label_selector=f"fedrun.io/run={name}")
        raise AssertionError(
            json.dumps([j["status"] for j in jobs], indent=1)
            + json.dumps([(p["metadata"]["name"], p["status"]) for p in pods], indent=1)
            + _pod_logs(node, NS)
        ) from None

    # After its grace the operator scales the finished run's server to zero.
    real_cluster.wait_for(
        lambda: (
            real_cluster.get("apps/v1", "deployments", NS, f"{name}-server")["spec"]["replicas"]
            == 0
        ),
        timeout=180,
        interval=2.0,
        what="the server scaled to zero",
    )

    # Deleting the run deletes every child through the real garbage collector, and the
    # node stops their processes.
    real_cluster.kubectl("delete", PLURAL, name, "-n", NS, "--wait=true")
    real_cluster.wait_for(
        lambda: not _children(real_cluster, name), timeout=120, interval=1.0, what="children gone"
    )
    real_cluster.wait_for(
        lambda: not [k for k in node.processes() if k.startswith(f"{NS}/{name}-")],
        timeout=60,
        what="processes gone",
    )


def test_a_killed_hospital_is_restarted_and_its_epsilon_never_goes_down(
    real_cluster: RealCluster, node: NodeAgent, operator: dict[str, Any], tmp_path: Path
) -> None:
    name = "stroke-restart"
    _apply(real_cluster, _run_doc(tmp_path, name, rounds=5, seed=12), tmp_path)
    seen: list[float] = []

    def training() -> bool:
        status = real_cluster.get(API, PLURAL, NS, name).get("status") or {}
        eps = [
            h
            for h in (status.get("privacy") or {}).get("hospitals", [])
            if h["name"] == "hospital-b"
        ]
        if eps:
            seen.append(float(eps[0]["epsilon"]))
        return int((status.get("round") or {}).get("current") or 0) >= 1

    real_cluster.wait_for(training, timeout=400, interval=1.0, what="round 1 done")
    pod = next(
        p["metadata"]["name"]
        for p in real_cluster.list(
            "v1", "pods", NS, label_selector=f"fedrun.io/run={name},fedrun.io/hospital=hospital-b"
        )
    )
    node.kill(NS, pod, signal.SIGKILL)

    def final() -> dict[str, Any] | None:
        obj = real_cluster.get(API, PLURAL, NS, name)
        status = obj.get("status") or {}
        eps = [
            h
            for h in (status.get("privacy") or {}).get("hospitals", [])
            if h["name"] == "hospital-b"
        ]
        if eps:
            seen.append(float(eps[0]["epsilon"]))
        return obj if status.get("phase") in FINAL else None

    obj = real_cluster.wait_for(final, timeout=600, interval=1.0, what="run final")
    status = obj["status"]
    assert status["phase"] == "Succeeded", (status.get("message"), _pod_logs(node, NS))
    assert seen == sorted(seen) and seen[-1] > 0
    restarted = real_cluster.get("v1", "pods", NS, pod)["status"]["containerStatuses"][0]
    assert restarted["restartCount"] >= 1
    row = next(h for h in status["hospitals"] if h["name"] == "hospital-b")
    assert row["restarts"] >= 1
    real_cluster.kubectl("delete", PLURAL, name, "-n", NS, "--wait=true")


def test_a_killed_server_container_resumes_from_its_checkpoint_on_the_real_control_plane(
    real_cluster: RealCluster, node: NodeAgent, operator: dict[str, Any], tmp_path: Path
) -> None:
    """The server's container is SIGKILLed mid-run (an OOM kill, a crash), and the
    operator's with it; the kubelet restarts both in their Pods. The server's state volume
    holds the checkpoint: the run goes on from the last completed round, under the same
    lineage, and ends Succeeded; the restarted operator follows it there."""
    name = "stroke-server-restart"
    rounds = 4
    _apply(real_cluster, _run_doc(tmp_path, name, rounds=rounds, seed=13), tmp_path)
    seen: list[tuple[int, float]] = []

    def observe() -> dict[str, Any]:
        obj = real_cluster.get(API, PLURAL, NS, name)
        status = obj.get("status") or {}
        privacy = status.get("privacy") or {}
        seen.append(
            (int((status.get("round") or {}).get("current") or 0), privacy.get("epsilonSpent", 0))
        )
        return obj

    def round_two_done() -> dict[str, Any] | None:
        obj = observe()
        return obj if seen[-1][0] >= 2 else None

    before = real_cluster.wait_for(round_two_done, timeout=400, interval=0.5, what="round 2")
    lineage = before["status"]["privacy"]["lineage"]
    pod = next(
        p["metadata"]["name"]
        for p in real_cluster.list(
            "v1", "pods", NS, label_selector=f"fedrun.io/run={name},fedrun.io/component=server"
        )
    )
    server_log_path = node.sandbox(NS, pod).log_path  # kept after the Pod is gone
    node.kill(NS, pod, signal.SIGKILL)
    node.kill(RELEASE_NS, operator["metadata"]["name"], signal.SIGKILL)

    def final() -> dict[str, Any] | None:
        obj = observe()
        return obj if (obj.get("status") or {}).get("phase") in FINAL else None

    obj = real_cluster.wait_for(final, timeout=600, interval=1.0, what="run final")
    status = obj["status"]
    assert status["phase"] == "Succeeded", (status.get("message"), _pod_logs(node, NS))
    assert status["round"]["current"] == rounds
    assert [r for r, _ in seen] == sorted(r for r, _ in seen)  # never back to round 0
    assert [e for _, e in seen] == sorted(e for _, e in seen)
    privacy = status["privacy"]
    assert privacy["lineage"] == lineage and "carried" not in privacy
    assert 0 < privacy["epsilonSpent"] <= 1.0
    restarted = real_cluster.get("v1", "pods", NS, pod)["status"]["containerStatuses"][0]
    assert restarted["restartCount"] >= 1
    op = real_cluster.get("v1", "pods", RELEASE_NS, operator["metadata"]["name"])
    assert op["status"]["containerStatuses"][0]["restartCount"] >= 1
    server_log = server_log_path.read_text(encoding="utf-8", errors="replace")
    assert re.search(r"checkpoint of round \d+ found", server_log), server_log[-3000:]
    real_cluster.kubectl("delete", PLURAL, name, "-n", NS, "--wait=true")


def test_suspend_and_resume_continue_from_the_checkpoint_volume(
    real_cluster: RealCluster, node: NodeAgent, operator: dict[str, Any], tmp_path: Path
) -> None:
    """With `spec.server.checkpointVolume` the operator creates the claim `<run>-checkpoint`;
    a suspend deletes the server Pod, and the resumed server finds the checkpoint on the
    claim and goes on after the round it had done: no round 0, same lineage, Succeeded."""
    name = "stroke-suspend"
    rounds = 4
    doc = _run_doc(tmp_path, name, rounds=rounds, seed=14)
    doc["spec"]["server"] = {
        "checkpointVolume": {"size": "64Mi", "storageClassName": "fedrun-e2e-manual"}
    }
    # No provisioner here: a hostPath volume bound in advance to the claim the operator makes.
    real_cluster.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{name}-checkpoint-pv"},
            "spec": {
                "capacity": {"storage": "64Mi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "fedrun-e2e-manual",
                "hostPath": {"path": str(tmp_path / "checkpoint-volume")},
                "claimRef": {"namespace": NS, "name": f"{name}-checkpoint"},
            },
        }
    )
    try:
        _apply(real_cluster, doc, tmp_path)
        seen: list[int] = []

        def at(predicate: Any) -> Any:
            def check() -> dict[str, Any] | None:
                obj = real_cluster.get(API, PLURAL, NS, name)
                status = obj.get("status") or {}
                seen.append(int((status.get("round") or {}).get("current") or 0))
                return obj if predicate(status) else None

            return check

        real_cluster.wait_for(
            at(lambda s: (s.get("round") or {}).get("current", 0) >= 2), 400, 0.5, "round 2"
        )
        real_cluster.patch(API, PLURAL, NS, name, {"spec": {"suspend": True}})
        suspended = real_cluster.wait_for(
            at(lambda s: s.get("phase") == "Suspended"), 120, 0.5, "Suspended"
        )
        done = suspended["status"]["round"]["current"]
        lineage = suspended["status"]["privacy"]["lineage"]
        claim = real_cluster.get("v1", "persistentvolumeclaims", NS, f"{name}-checkpoint")
        assert claim["metadata"]["ownerReferences"][0]["name"] == name
        real_cluster.wait_for(
            lambda: (
                not real_cluster.list(
                    "v1",
                    "pods",
                    NS,
                    label_selector=f"fedrun.io/run={name},fedrun.io/component=server",
                )
            ),
            timeout=120,
            what="the server Pod gone",
        )
        real_cluster.patch(API, PLURAL, NS, name, {"spec": {"suspend": False}})
        after = len(seen)
        final = real_cluster.wait_for(at(lambda s: s.get("phase") in FINAL), 600, 1.0, "run final")
        status = final["status"]
        assert status["phase"] == "Succeeded", (status.get("message"), _pod_logs(node, NS))
        assert status["round"]["current"] == rounds
        assert min(seen[after:]) >= done, seen  # it went on; it never went back to round 0
        assert status["privacy"]["lineage"] == lineage
        assert "carried" not in status["privacy"]
        assert 0 < status["privacy"]["epsilonSpent"] <= 1.0
        logs = "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in node.directory.glob("**/container.log")
            if name in str(p) and "server" in str(p)
        )
        # The round the suspended server had checkpointed last (it may have finished one more
        # after the status was read): the resumed server went on from there.
        found = [int(r) for r in re.findall(r"checkpoint of round (\d+) found", logs)]
        assert found and min(found) >= done, logs[-2000:]
        real_cluster.kubectl("delete", PLURAL, name, "-n", NS, "--wait=true")
    finally:
        real_cluster.delete("v1", "persistentvolumes", None, f"{name}-checkpoint-pv")


def test_the_operator_logs_in_as_its_service_account(
    real_cluster: RealCluster, operator: dict[str, Any]
) -> None:
    """The operator's Pod runs with the chart's ServiceAccount, whose RBAC denies what the
    chart does not grant (here: reading Secrets)."""
    account = operator["spec"]["serviceAccountName"]
    as_operator = real_cluster.as_token(real_cluster.token_for(account, RELEASE_NS))
    with pytest.raises(ApiError) as refused:
        as_operator.list("v1", "secrets", NS)
    assert refused.value.code == 403
    assert as_operator.list(API, PLURAL, NS) is not None


def test_a_missing_rbac_rule_is_reported_on_the_run_and_fixing_it_resumes(
    real_cluster: RealCluster, node: NodeAgent, operator: dict[str, Any], tmp_path: Path
) -> None:
    """Take the configmaps rule out of the chart's ClusterRole: the real authorizer refuses
    the operator's create, and the run says so (a Warning Event and its status message)
    instead of the refusal vanishing in a log; put it back and the retried reconcile goes on.
    """
    role = real_cluster.get(RBAC, "clusterroles", None, "fedrun-operator")
    index = next(i for i, r in enumerate(role["rules"]) if r["resources"] == ["configmaps"])
    rule = role["rules"][index]
    path = f"/rules/{index}"
    real_cluster.patch(
        RBAC,
        "clusterroles",
        None,
        "fedrun-operator",
        [{"op": "remove", "path": path}],
        content_type=JSON_PATCH,
    )
    name = "stroke-rbac"
    try:
        _apply(real_cluster, _run_doc(tmp_path, name, rounds=2, seed=13), tmp_path)
        events = real_cluster.wait_for(
            lambda: [
                e
                for e in real_cluster.list("v1", "events", NS)
                if e["involvedObject"].get("name") == name and e.get("reason") == "Forbidden"
            ],
            timeout=120,
            interval=1.0,
            what="a Forbidden event on the run",
        )
        assert events[0]["type"] == "Warning" and "configmaps" in events[0]["message"]
        status = real_cluster.wait_for(
            lambda: (
                "not allowed"
                in (s := real_cluster.get(API, PLURAL, NS, name).get("status") or {}).get(
                    "message", ""
                )
                and s
            ),
            timeout=60,
            what="the refusal in the run's status",
        )
        assert "configmaps" in status["message"]
        assert not real_cluster.exists("v1", "configmaps", NS, f"{name}-config")
    finally:
        real_cluster.patch(
            RBAC,
            "clusterroles",
            None,
            "fedrun-operator",
            [{"op": "add", "path": path, "value": rule}],
            content_type=JSON_PATCH,
        )
    real_cluster.wait_for(
        lambda: real_cluster.exists("v1", "configmaps", NS, f"{name}-config"),
        timeout=240,
        interval=2.0,
        what="the run's ConfigMap once the rule is back",
    )
    real_cluster.kubectl("delete", PLURAL, name, "-n", NS, "--wait=true")

"""Operator in the loop: FederatedRun → operator → children → local kubelet → real Flower.

The real operator (kopf) works against the emulated API server; `LocalKubelet` plays the
kubelet and the Job/Deployment controllers for the Deployment and Jobs the operator
created, running their containers' commands as local processes and writing Pod and Job
status back. Everything asserted here is read back from the API, as `kubectl` would.
`make e2e` runs this file; the final object goes to out/e2e/federatedrun.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedrun_operator.kubelet import Api, LocalKubelet
from fedrun_operator.local import free_port
from fedrun_trainer.synthetic import write_demo_hospitals
from tests.kube.cluster import EmulatedCluster
from tests.operator_runner import API, PLURAL, running_operator

from .conftest import REPO, example_run

FINAL = ("Succeeded", "Failed", "BudgetExhausted")
OUT = REPO / "out" / "e2e"


@contextmanager
def kubelet_for(cluster: EmulatedCluster, run: str, out: Path) -> Iterator[LocalKubelet]:
    """A local kubelet for `run`'s children, serving in a thread until the block ends."""
    ports = {9092: free_port(), 9100: free_port()}
    kubelet = LocalKubelet(api=Api(cluster.url), namespace="default", run=run, out=out, ports=ports)
    stop = threading.Event()
    thread = threading.Thread(target=kubelet.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield kubelet
    finally:
        stop.set()
        thread.join(timeout=120)


def _event_reasons(cluster: EmulatedCluster, name: str) -> list[str]:
    events = cluster.list("v1", "events", "default")
    return [str(e.get("reason")) for e in events if e["involvedObject"].get("name") == name]


def _kubectl_get(cluster: EmulatedCluster) -> str | None:
    """`kubectl get federatedruns` against the emulated API (None where kubectl is absent)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    done = subprocess.run(
        [kubectl, "--kubeconfig", str(cluster.kubeconfig), "get", "federatedruns"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _hospitals(tmp_path: Path, seed: int) -> list[dict[str, str]]:
    data = write_demo_hospitals(tmp_path / "data", n_per_hospital=(700, 700, 700), seed=seed)
    return [{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())]


def _epsilons(obj: dict[str, Any]) -> dict[str, float]:
    privacy = (obj.get("status") or {}).get("privacy") or {}
    return {h["name"]: float(h["epsilon"]) for h in privacy.get("hospitals", [])}


def test_a_run_applied_to_the_api_succeeds_within_its_budget(tmp_path: Path) -> None:
    doc = example_run(rounds=4, hospitals=_hospitals(tmp_path, seed=11))
    name = doc["metadata"]["name"]
    with EmulatedCluster() as cluster, kubelet_for(cluster, name, tmp_path / "k") as kubelet:
        url = f"http://127.0.0.1:{kubelet.ports[9100]}"
        with running_operator(cluster, server_url=url):
            cluster.create(doc)
            obj = cluster.wait_for(
                lambda: (
                    (o := cluster.get(API, PLURAL, "default", name)).get("status", {}).get("phase")
                    in FINAL
                    and o
                ),
                timeout=300,
                interval=1.0,
            )
            # The operator stops the server once the run is final.
            cluster.wait_for(
                lambda: (
                    cluster.get("apps/v1", "deployments", "default", f"{name}-server")["spec"][
                        "replicas"
                    ]
                    == 0
                ),
                timeout=30,
            )
            # kopf posts Events in the background: wait for the final one.
            reasons = cluster.wait_for(
                lambda: "RoundsCompleted" in (r := _event_reasons(cluster, name)) and r,
                timeout=30,
                what="the RoundsCompleted event",
            )
            table = _kubectl_get(cluster)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "federatedrun.json").write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    if table is not None:
        (OUT / "kubectl-get-federatedruns.txt").write_text(table, encoding="utf-8")
        header, row = table.splitlines()[:2]
        assert header.split()[:5] == ["NAME", "PHASE", "ROUND", "EPSILON", "AUROC"]
        assert row.split()[:3] == [name, "Succeeded", "4/4"]
    status = obj["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["progress"] == "4/4" and status["round"] == {"current": 4, "total": 4}
    target = obj["spec"]["privacy"]["targetEpsilon"]
    assert 0 < status["privacy"]["epsilonSpent"] <= target
    for row in status["privacy"]["hospitals"]:
        # The operator's own figure agrees with what the server reported.
        assert abs(row["epsilonOperator"] - row["epsilon"]) <= 1e-3 * target
    assert {h["state"] for h in status["hospitals"]} == {"Done"}
    assert status["metrics"]["auroc"] > 0.6
    assert status["completionTime"] >= status["startTime"]
    assert {"ChildrenCreated", "WaitingForHospitals", "RoundsCompleted"} <= set(reasons)


def test_a_killed_hospital_is_restarted_and_its_epsilon_never_goes_down(tmp_path: Path) -> None:
    doc = example_run(rounds=5, minHospitals=3, hospitals=_hospitals(tmp_path, seed=12))
    name = doc["metadata"]["name"]
    victim = "hospital-b"
    seen: list[float] = []

    def watch() -> dict[str, Any]:
        obj = cluster.get(API, PLURAL, "default", name)
        eps = _epsilons(obj).get(victim)
        if eps is not None:
            seen.append(eps)
        return obj

    with EmulatedCluster() as cluster, kubelet_for(cluster, name, tmp_path / "k") as kubelet:
        url = f"http://127.0.0.1:{kubelet.ports[9100]}"
        with running_operator(cluster, server_url=url):
            cluster.create(doc)
            cluster.wait_for(
                lambda: (watch().get("status") or {}).get("round", {}).get("current", 0) >= 2,
                timeout=300,
                interval=0.5,
            )
            kubelet.kill_hospital(victim)
            obj = cluster.wait_for(
                lambda: (o := watch()).get("status", {}).get("phase") in FINAL and o,
                timeout=300,
                interval=0.5,
            )
    status = obj["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["progress"] == "5/5"
    assert status["privacy"]["epsilonSpent"] <= obj["spec"]["privacy"]["targetEpsilon"]
    assert seen == sorted(seen), f"ε of {victim} went down: {seen}"
    row = next(h for h in status["hospitals"] if h["name"] == victim)
    assert row["restarts"] >= 1

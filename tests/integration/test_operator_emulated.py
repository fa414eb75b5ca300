"""The real operator (kopf under KopfRunner) against the emulated Kubernetes API: only what
a real API server will not do.

Everything else the operator's integration tests check runs on a real control plane
(test_operator.py). These stay here because they need the emulator:

- answers a real server does not give on demand: a 429 and a 503 injected into the
  operator's Job creates (the retries and their metric);
- a FederatedRun stored without the CRD's admission (`EmulatedCluster(admission=False)`):
  a spec change while Running, and a spec the models refuse. A real API server with the
  chart's CRD refuses both writes, so the operator's own defence against them (an old CRD,
  a forced write) can only be reached here.
"""

from __future__ import annotations

import json

import kmock

from fedrun_operator import metrics
from tests.integration.helpers import (
    HOSPITALS,
    NAME,
    FakeServer,
    all_children,
    children,
    condition,
    run_doc,
    wait_event,
    wait_phase,
)
from tests.kube.cluster import EmulatedCluster
from tests.operator_runner import API, PLURAL, running_operator


def test_a_spec_change_that_slips_through_is_ignored_with_a_warning(
    server: FakeServer,
) -> None:
    with (
        EmulatedCluster(admission=False) as cluster,
        running_operator(cluster.kubeconfig, server_url=server.url),
    ):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        cluster.patch(API, PLURAL, cluster.namespace, NAME, {"spec": {"rounds": 50}})
        wait_event(cluster, "Warning", "SpecChangeRefused")
        config = json.loads(
            cluster.get("v1", "configmaps", cluster.namespace, f"{NAME}-config")["data"][
                "config.json"
            ]
        )
    assert config["spec"]["rounds"] == 5


def test_throttled_and_failing_api_calls_are_retried_and_counted(
    cluster: EmulatedCluster,
) -> None:
    def retries() -> float:
        total = 0.0
        for line in metrics.render().decode().splitlines():
            if line.startswith('fedrun_operator_api_retries_total{verb="create"}'):
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = retries()
    jobs = kmock.resource("batch", "v1", "jobs")
    # The next two Job creates fail: throttled, then a server error. kmock's rule: the
    # reaction replaces the answer but the write happens, as after a lost response.
    cluster.call(lambda e: e[kmock.method.POST, jobs][0:1] << 429)
    cluster.call(lambda e: e[kmock.method.POST, jobs][1:2] << 503)
    with running_operator(cluster.kubeconfig):
        cluster.create(run_doc())
        kids = all_children(cluster)
        status = wait_phase(cluster, "Pending")
    assert len([k for k in kids if k.startswith("Job/")]) == len(HOSPITALS)
    assert status["progress"] == "0/5"
    assert retries() >= before + 2


def test_a_stored_spec_the_models_refuse_fails_the_run_naming_the_field() -> None:
    # Only without the CRD's admission (an old CRD, a forced write) can such a spec be stored.
    with (
        EmulatedCluster(admission=False) as cluster,
        running_operator(cluster.kubeconfig),
    ):
        cluster.create(run_doc(rounds=0, trainng={"model": "mlp"}))
        failed = wait_phase(cluster, "Failed")
        wait_event(cluster, "Warning", "InvalidSpec")
        created = children(cluster)
    assert condition(failed, "Failed")["reason"] == "InvalidSpec"
    assert "spec.rounds" in failed["message"]
    assert "spec.trainng: unknown field (did you mean 'training'?)" in failed["message"]
    assert created == {}  # nothing is created for a run that cannot be carried out

"""The real operator (kopf under KopfRunner) against the emulated Kubernetes API: only what
a real API server will not do.

Everything else the operator's integration tests check runs on a real control plane
(test_operator.py). These stay here because they need the emulator:

- answers a real server does not give on demand: a 429 and a 503 injected into the
  operator's Job creates (the retries and their metric), and an error answered to one
  Secret create after the write, which stops a pass half-way through a run's Secrets;
- a FederatedRun stored without the CRD's admission (`EmulatedCluster(admission=False)`):
  a spec change while Running, and a spec the models refuse. A real API server with the
  chart's CRD refuses both writes, so the operator's own defence against them (an old CRD,
  a forced write) can only be reached here;
- a network partition between the leading replica and the API server (a relay the test
  cuts), for leader election: the partitioned leader stops before a standby takes over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kmock
import yaml

from fedrun_operator import metrics
from fedrun_operator.leader import LEASE_API, LOST_EXIT_CODE
from tests.integration.helpers import (
    EXPECTED,
    HOSPITAL_SECRETS,
    HOSPITALS,
    NAME,
    SERVER_SECRET,
    FakeServer,
    all_children,
    children,
    condition,
    run_doc,
    secret_data,
    wait_event,
    wait_phase,
)
from tests.integration.replicas import KOPF_START_S, TIMINGS, OperatorProcess, Relay, poll
from tests.kube.cluster import EmulatedCluster
from tests.operator_runner import API, PLURAL, running_operator

RELEASE = "fedrun-system"  # the operator's namespace, where its replicas' Lease lives
LEASE = "fedrun-operator"


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


def test_a_partitioned_leader_stops_before_a_standby_takes_over(
    cluster: EmulatedCluster, server: FakeServer, tmp_path: Path
) -> None:
    # Two replicas, the leader reaching the API only through a relay that the test cuts: a
    # real API server cannot be partitioned from one client on demand. The leader must
    # exit (its renew deadline) before the standby takes the Lease (its lease duration).
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE}})
    url = urlsplit(cluster.url)
    relay = Relay(url.hostname or "127.0.0.1", url.port or 80)
    through_relay = tmp_path / "relay.kubeconfig"
    doc = cluster.kubeconfig_dict()
    doc["clusters"][0]["cluster"]["server"] = f"{url.scheme}://127.0.0.1:{relay.port}"
    through_relay.write_text(yaml.safe_dump(doc), encoding="utf-8")
    common = {
        "lease": LEASE,
        "operator_namespace": RELEASE,
        "namespaces": [cluster.namespace],
        "server_url": server.url,
    }
    leader = OperatorProcess("leader", through_relay, tmp_path / "leader.log", **common)
    standby = None
    try:
        poll(leader.is_leader, 30, "the first replica leads")
        standby = OperatorProcess("standby", cluster.kubeconfig, tmp_path / "standby.log", **common)
        poll(lambda: standby.is_leader() is False, 30, "the second replica waits")
        cluster.create(run_doc())
        all_children(cluster)

        def leader_works_alone() -> bool:
            assert standby.reconciles() == 0 and standby.is_leader() is False, standby.log()
            return leader.reconciles() >= 5

        poll(leader_works_alone, 30, "the leader follows the run, the standby does nothing")
        relay.cut()
        cut = time.monotonic()

        def standby_holds_the_lease() -> bool:
            lease = cluster.get(LEASE_API, "leases", RELEASE, LEASE)
            if not lease["spec"].get("holderIdentity", "").startswith("standby_"):
                return False
            # Taken over: the partitioned leader must be gone already.
            assert leader.exited() == LOST_EXIT_CODE, leader.log()
            return True

        poll(standby_holds_the_lease, TIMINGS.takeover_bound_seconds + 5, "the takeover")
        assert time.monotonic() - cut >= TIMINGS.lease_seconds - 0.5  # not before expiry
        assert "lost leadership" in leader.log()
        # The new leader reconciles: a deleted child comes back.
        cluster.delete("v1", "configmaps", cluster.namespace, f"{NAME}-config")
        poll(
            lambda: children(cluster).get(f"ConfigMap/{NAME}-config"),
            KOPF_START_S,
            "the new leader restores the ConfigMap",
        )
        assert standby.reconciles() > 0
    finally:
        relay.cut()
        for replica in (standby, leader):
            if replica is not None:
                replica.stop()


def mounted_secrets(kids: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The Secret each pod template of the run mounts, by "Kind/name" of its owner."""
    out = {}
    for key, obj in kids.items():
        if key.startswith(("Deployment/", "Job/")):
            volumes = obj["spec"]["template"]["spec"].get("volumes", [])
            (name,) = [v["secret"]["secretName"] for v in volumes if "secret" in v]
            out[key] = name
    return out


def test_a_pass_stopped_half_way_through_the_secrets_leaves_no_mixed_set(
    cluster: EmulatedCluster,
) -> None:
    """The first pass stops after writing some of the run's Secrets (its third create is
    answered with an error after the write, as when an operator dies mid-pass). The next
    pass makes a whole new set from one material under new names, and every pod mounts a
    Secret of that set: no hospital is left with a key the server does not know."""
    secrets = kmock.resource("", "v1", "secrets")
    cluster.call(lambda e: e[kmock.method.POST, secrets][2:3] << 422)
    with running_operator(cluster.kubeconfig):
        cluster.create(run_doc())
        kids = cluster.wait_for(
            lambda: (k := children(cluster)).keys() >= EXPECTED and k, timeout=30, what="kids"
        )
        status = wait_phase(cluster, "Pending")
    secret_set = status["secretSet"]
    assert secret_set  # not the first pass's (unsuffixed) set
    stored = {s["metadata"]["name"]: s for s in cluster.list("v1", "secrets", cluster.namespace)}
    server_name = f"{NAME}-server-tls-{secret_set}"
    auth = {h: f"{NAME}-{h}-auth-{secret_set}" for h in HOSPITALS}
    assert mounted_secrets(kids) == {
        f"Deployment/{NAME}-server": server_name,
        **{f"Job/{NAME}-{h}": name for h, name in auth.items()},
    }
    server = secret_data(stored[server_name])
    for hospital, name in auth.items():
        node = secret_data(stored[name])
        assert node["ca.crt"] == server["ca.crt"], hospital
        assert node["node.pub"] == server[f"{hospital}.pub"], hospital
    # What the stopped pass left is not mounted by anything: three of its four Secrets.
    left = {n for n in stored if not n.endswith(f"-{secret_set}")}
    assert left == {SERVER_SECRET, HOSPITAL_SECRETS[HOSPITALS[0]], HOSPITAL_SECRETS[HOSPITALS[1]]}

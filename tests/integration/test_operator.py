"""The real operator (kopf under KopfRunner) against a real Kubernetes control plane.

Each test gets its own namespace, bound to the chart's operator ClusterRole by a
RoleBinding exactly as the chart's `watchNamespaces` does it. The operator runs in this
process, logged in only with a token of the chart's ServiceAccount (so the real authorizer
applies the chart's RBAC to every call) and following only that namespace. The real Job
and Deployment controllers make the children's Pods, the real scheduler binds them to
fedrun's local node, and the node runs each one as a stand-in process (tests/controlplane/
node.py); a hospital fails when the test makes its stand-in crash-loop, and the real Job
controller fails its Job at its backoffLimit. A run server's status port is stood in for by
a small HTTP server whose `/status` the test sets (the shape the real server writes). The
operator's API calls are read from the real API server's audit log
(tests/controlplane/audit.py). What only the emulated API can do stays in
test_operator_emulated.py. The failover test at the end runs the operator as the chart's
replicas do instead: `fedrun operator` processes electing a leader (tests/integration/
replicas.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kopf.testing import KopfRunner

from fedrun_core import pki
from fedrun_core.accounting import epsilon
from fedrun_core.names import ANNOTATION_CONFIG_HASH
from fedrun_operator import metrics
from fedrun_operator.leader import LEASE_API
from fedrun_render.security import INSECURE_MESSAGE
from fedrun_render.workloads import config_hash
from tests.conftest import RELEASE_NS, WATCHED_NS
from tests.controlplane.audit import OPERATOR_CLIENTS, OPERATOR_USER, Call, calls, flush
from tests.controlplane.cluster import ApiError, RealCluster
from tests.controlplane.node import NodeAgent
from tests.integration.helpers import (
    EXPECTED,
    HOSPITAL_SECRETS,
    HOSPITALS,
    NAME,
    NAMESPACE_PREFIX,
    SERVER_SECRET,
    FakeServer,
    all_children,
    children,
    condition,
    events_for,
    run_doc,
    run_secrets,
    secret_data,
    wait_event,
    wait_phase,
    wait_progress,
)
from tests.integration.replicas import KOPF_START_S, TIMINGS, OperatorProcess, poll
from tests.operator_runner import API, PLURAL, run_status, running_operator

RBAC = "rbac.authorization.k8s.io/v1"
CHART_OPERATOR = "fedrun-operator"  # the session chart's operator objects and ServiceAccount
# Restarts back off 1 s, 2 s, 4 s... on the node: a crash loop reaches the Job's
# backoffLimit (3) in about 10 s, and the Job controller takes a moment more.
CRASH_LOOP_S = 60

Operator = Callable[..., AbstractContextManager[KopfRunner]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cluster(
    real_cluster: RealCluster,
    node: NodeAgent,
    chart: dict[str, Any],
    request: pytest.FixtureRequest,
) -> Iterator[RealCluster]:
    """A namespace of its own on the real control plane, followed by this test's operator
    only: the chart's RoleBinding copied into it, its Pods run as stand-ins on the node.
    The test's helpers act as the cluster's admin there; the namespace is deleted after."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))
    ns = f"{NAMESPACE_PREFIX}{slug[:40].strip('-')}-{uuid.uuid4().hex[:6]}"
    real_cluster.ensure_namespace(ns)
    node.stand_in(ns)
    # What watchNamespaces renders for each namespace (the chart's own, in WATCHED_NS).
    chart_binding = real_cluster.get(RBAC, "rolebindings", WATCHED_NS, "fedrun-operator")
    real_cluster.create(
        {
            "apiVersion": RBAC,
            "kind": "RoleBinding",
            "metadata": {
                "name": chart_binding["metadata"]["name"],
                "namespace": ns,
                "labels": chart_binding["metadata"].get("labels", {}),
            },
            "roleRef": chart_binding["roleRef"],
            "subjects": chart_binding["subjects"],
        }
    )
    try:
        yield RealCluster(real_cluster.plane, namespace=ns)
    finally:
        real_cluster.delete("v1", "namespaces", None, ns)


@pytest.fixture
def operator(real_cluster: RealCluster, cluster: RealCluster, tmp_path: Path) -> Operator:
    """`with operator(server_url=...)`: the operator in this process, logged in only as
    the chart's ServiceAccount and following only the test's namespace."""
    token = real_cluster.token_for("fedrun-operator", RELEASE_NS)
    kubeconfig = cluster.plane.kubeconfig_for(
        tmp_path / "operator.kubeconfig", token=token, namespace=cluster.namespace
    )

    def start(server_url: str = "http://127.0.0.1:9") -> AbstractContextManager[KopfRunner]:
        return running_operator(
            kubeconfig,
            server_url=server_url,
            namespaces=[cluster.namespace],
            # The chart sets it from the downward API: run servers admit its reads from there.
            FEDRUN_OPERATOR_NAMESPACE=RELEASE_NS,
        )

    return start


def operator_calls(cluster: RealCluster) -> list[Call]:
    """The operator's calls in the test's namespace so far, from the audit log (complete
    up to now: see `flush`)."""
    flush(cluster)
    return calls(cluster.plane.audit_log, OPERATOR_USER, namespace=cluster.namespace)


def secret_creates(cluster: RealCluster) -> int:
    """How many Secret creates the operator has sent (a 409 counts too)."""
    return len(
        [c for c in operator_calls(cluster) if c.verb == "create" and c.resource == "secrets"]
    )


def hospital_pod(cluster: RealCluster, hospital: str) -> str:
    """The name of the hospital's Pod (made by the Job controller, bound to the node)."""
    pods = [
        p
        for p in cluster.list(
            "v1",
            "pods",
            cluster.namespace,
            label_selector=f"fedrun.io/run={NAME},fedrun.io/hospital={hospital}",
        )
        if p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
    ]
    if len(pods) != 1:
        raise LookupError(f"{len(pods)} running pods of {hospital}")
    return str(pods[0]["metadata"]["name"])


def fail_hospital(cluster: RealCluster, node: NodeAgent, hospital: str, message: str) -> None:
    """Make the hospital's container crash-loop with `message` as its termination message
    (as a hospital that cannot read its data would); the Job controller does the rest."""

    def failed() -> bool:
        node.fail(cluster.namespace, hospital_pod(cluster, hospital), 1, message)
        return True

    cluster.wait_for(failed, timeout=30, what=f"{hospital}'s pod running on the node")


def public_der(key: Any) -> bytes:
    """A public key, or a private key's public half, as DER (for comparisons)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# --------------------------------------------------------------------------- tests


def test_create_makes_every_child_owned_and_labelled(
    cluster: RealCluster, operator: Operator
) -> None:
    ns = cluster.namespace
    with operator():
        run = cluster.create(run_doc())
        kids = all_children(cluster)
        status = wait_phase(cluster, "Pending")
    assert kids.keys() == EXPECTED
    policies = cluster.list("networking.k8s.io/v1", "networkpolicies", ns)
    assert sorted(p["metadata"]["name"] for p in policies) == [
        f"{NAME}-default-deny",
        f"{NAME}-hospitals",
        f"{NAME}-server",
    ]
    for key, obj in kids.items():
        ref = obj["metadata"]["ownerReferences"]
        assert ref == [
            {
                "apiVersion": API,
                "kind": "FederatedRun",
                "name": NAME,
                "uid": run["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], key
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "fedrun"
        assert labels["fedrun.io/run"] == NAME
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert status["progress"] == "0/5"
    assert "waiting for the server" in status["message"]
    # kopf keeps its bookkeeping in annotations, not in the user's status.
    assert "kopf" not in status


def test_a_secure_run_gets_its_secrets_before_its_pods(
    cluster: RealCluster, operator: Operator
) -> None:
    ns = cluster.namespace
    with operator():
        run = cluster.create(run_doc())
        all_children(cluster)
        status = wait_phase(cluster, "Pending")
    now = datetime.now(UTC)
    secrets = run_secrets(cluster)
    assert secrets.keys() == {SERVER_SECRET, *HOSPITAL_SECRETS.values()}
    owner = {
        "apiVersion": API,
        "kind": "FederatedRun",
        "name": NAME,
        "uid": run["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for name, obj in secrets.items():
        assert obj["metadata"]["ownerReferences"] == [owner], name
        assert obj["immutable"] is True, name
    assert "Insecure" not in {c["type"] for c in status["conditions"]}

    server = secrets[SERVER_SECRET]
    assert server["type"] == "kubernetes.io/tls"
    assert server["metadata"]["labels"]["fedrun.io/component"] == "server"
    data = secret_data(server)
    assert data.keys() == {"ca.crt", "tls.crt", "tls.key", *(f"{h}.pub" for h in HOSPITALS)}
    ca = data["ca.crt"]
    for name in (f"{NAME}-server", f"{NAME}-server.{ns}.svc", "127.0.0.1"):
        pki.verify_chain(data["tls.crt"], ca, now=now, name=name)
    pki.check_pair(data["tls.crt"], data["tls.key"])
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    # No activeDeadlineSeconds: the default lifetime, counted from the first reconcile.
    assert cert.not_valid_after_utc - now <= pki.DEFAULT_LIFETIME
    assert cert.not_valid_after_utc - now > pki.DEFAULT_LIFETIME - timedelta(minutes=5)

    ca_public = public_der(x509.load_pem_x509_certificate(ca).public_key())
    private_keys = {
        SERVER_SECRET: public_der(serialization.load_pem_private_key(data["tls.key"], None))
    }
    for hospital, name in HOSPITAL_SECRETS.items():
        obj = secrets[name]
        assert obj["type"] == "Opaque"
        assert obj["metadata"]["labels"]["fedrun.io/hospital"] == hospital
        auth = secret_data(obj)
        assert auth.keys() == {"ca.crt", "node.key", "node.pub"}, name
        assert auth["ca.crt"] == ca
        # Its own key, the one the server registers.
        assert auth["node.pub"] == data[f"{hospital}.pub"]
        key = serialization.load_ssh_private_key(auth["node.key"], None)
        public = serialization.load_ssh_public_key(auth["node.pub"])
        assert public_der(key) == public_der(public)
        private_keys[name] = public_der(key)
    # One key pair per pod, no two alike, and the CA's key is in none.
    assert len(set(private_keys.values())) == len(private_keys)
    assert ca_public not in private_keys.values()

    # Created before the pods that mount them, as the API server received the creates
    # (its audit log): the first pass's n Secrets, then the n pods' owners, the Deployment
    # and the Jobs (a later pass waits for the first to end).
    made = [c for c in operator_calls(cluster) if c.verb == "create"]
    creates = [c.resource for c in made if c.resource in ("secrets", "deployments", "jobs")]
    n = 1 + len(HOSPITALS)
    assert creates[:n] == ["secrets"] * n, creates
    assert sorted(creates[n : 2 * n]) == ["deployments"] + ["jobs"] * len(HOSPITALS), creates
    assert all(c.code == 201 for c in made if c.resource == "secrets"), made
    # A Secret is never written again, so its resourceVersion says when it was created:
    # the server's first, then the hospitals'.
    by_creation = sorted(secrets, key=lambda k: int(secrets[k]["metadata"]["resourceVersion"]))
    assert by_creation == [SERVER_SECRET, *HOSPITAL_SECRETS.values()]
    # Only created: never read, listed or watched, here or in any other namespace.
    # (Only the operator's own clients: the e2e test borrows the token to show a refusal.)
    everywhere = calls(cluster.plane.audit_log, OPERATOR_USER)
    ours = [c for c in everywhere if c.user_agent.startswith(OPERATOR_CLIENTS)]
    assert {c.verb for c in ours if c.resource == "secrets"} == {"create"}


def test_an_insecure_run_gets_no_secrets_and_is_flagged(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc(security={"insecure": True}))
        all_children(cluster)
        flagged = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and any(c["type"] == "Insecure" for c in s.get("conditions", []))
                and s
            ),
            timeout=30,
            what="condition Insecure",
        )
        wait_event(cluster, "Warning", "Insecure")
        server.set("Running", current=2, steps=20)
        later = wait_progress(cluster, "2/5")
        wait_event(cluster, "Normal", "Training")
    insecure = condition(flagged, "Insecure")
    assert insecure["status"] == "True"
    assert insecure["message"] == INSECURE_MESSAGE
    assert condition(later, "Insecure")["lastTransitionTime"] == insecure["lastTransitionTime"]
    assert events_for(cluster).count(("Warning", "Insecure")) == 1
    assert run_secrets(cluster) == {}
    assert secret_creates(cluster) == 0


def test_status_follows_the_server_to_success(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    ns = cluster.namespace
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=2, steps=20, metrics={"round": 2, "auroc": 0.7})
        running = wait_progress(cluster, "2/5")
        server.set(
            "Succeeded",
            current=5,
            steps=50,
            reason="RoundsCompleted",
            message="5 rounds completed",
            metrics={"round": 5, "auroc": 0.81},
            mlflowRunId="run-123",
            completionTime="2026-11-24T12:00:00Z",
        )
        final = wait_phase(cluster, "Succeeded")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", ns, f"{NAME}-server")["spec"]["replicas"] == 0
            ),
            timeout=30,
            what="server scaled to zero",
        )
        wait_event(cluster, "Normal", "RoundsCompleted")
    assert running["phase"] == "Running"
    expected_eps = epsilon([(4.0, 0.1, 20)], 1e-5)
    assert running["privacy"]["epsilonSpent"] == pytest.approx(expected_eps, rel=1e-4)
    assert final["progress"] == "5/5" and final["metrics"]["auroc"] == 0.81
    assert final["mlflowRunId"] == "run-123"
    assert final["completionTime"] == "2026-11-24T12:00:00Z"
    succeeded = condition(final, "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "RoundsCompleted"
    text = metrics.render().decode()
    assert f'fedrun_operator_run_round{{namespace="{ns}",run="{NAME}"}} 5.0' in text


def test_suspend_stops_everything_and_resume_restarts_with_the_budget_kept(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    ns = cluster.namespace
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=2, steps=20)
        wait_progress(cluster, "2/5")
        cluster.patch(API, PLURAL, ns, NAME, {"spec": {"suspend": True}})
        suspended = wait_phase(cluster, "Suspended")
        kids = children(cluster)
        assert kids[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 0
        assert all(kids[f"Job/{NAME}-{h}"]["spec"]["suspend"] for h in HOSPITALS)
        # The real controllers stop what ran: the Jobs' pods and the server's go.
        cluster.wait_for(
            lambda: not cluster.list("v1", "pods", ns, label_selector=f"fedrun.io/run={NAME}"),
            timeout=60,
            what="the run's pods gone",
        )
        server.status = None  # the server pod is gone
        cluster.patch(API, PLURAL, ns, NAME, {"spec": {"suspend": False}})
        wait_phase(cluster, "Pending")
        kids = children(cluster)
        assert kids[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 1
        assert not any(kids[f"Job/{NAME}-{h}"]["spec"]["suspend"] for h in HOSPITALS)
        server.set("Running", current=1, steps=10)  # the new server starts from round 0
        after = wait_phase(cluster, "Running")
        wait_event(cluster, "Normal", "Suspended")
        wait_event(cluster, "Normal", "Resumed")
    assert "restarts training from round 0" in suspended["message"]
    assert {c["name"] for c in suspended["privacy"]["carried"]} == set(HOSPITALS)
    # The status says "resumed" for one pass only (the next one says which server it waits
    # for), sooner than a test polling a real API server may look: the Event keeps it.
    resumed = [
        e["message"]
        for e in cluster.list("v1", "events", ns)
        if e["involvedObject"].get("name") == NAME and e.get("reason") == "Resumed"
    ]
    assert len(resumed) == 1 and "Suspended → Pending: resumed" in resumed[0], resumed
    spent = epsilon([(4.0, 0.1, 20), (4.0, 0.1, 10)], 1e-5)
    assert after["privacy"]["epsilonSpent"] == pytest.approx(spent, rel=1e-4)


def test_active_deadline_fails_the_run(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc(activeDeadlineSeconds=2))
        server.set("Running", current=1)
        failed = wait_phase(cluster, "Failed")
    cond = condition(failed, "Failed")
    assert cond["reason"] == "DeadlineExceeded"


def test_hospital_failures_below_and_above_min_hospitals(
    cluster: RealCluster, operator: Operator, server: FakeServer, node: NodeAgent
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc(minHospitals=2))
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        fail_hospital(
            cluster, node, "hospital-a", "hospital-a.csv line 12: 'abc' is not a number (age)"
        )
        one = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and any(h["state"] == "Failed" for h in s.get("hospitals", []))
                and s
            ),
            timeout=CRASH_LOOP_S,
            what="hospital-a Failed",
        )
        assert one["phase"] == "Running"
        row = next(h for h in one["hospitals"] if h["name"] == "hospital-a")
        assert row["state"] == "Failed" and row["restarts"] >= 1, row
        assert [h["name"] for h in one["hospitals"] if h["state"] == "Failed"] == ["hospital-a"]
        wait_event(cluster, "Warning", "HospitalFailed")
        fail_hospital(cluster, node, "hospital-b", "cannot read s3://b/data.csv: AccessDenied")
        failed = wait_phase(cluster, "Failed", timeout=CRASH_LOOP_S)
    assert "hospital-a" in failed["message"] and "hospital-b" in failed["message"]
    cond = condition(failed, "Failed")
    assert cond["reason"] == "TooFewHospitals"


def test_a_failed_hospitals_own_message_and_restarts_reach_the_run(
    cluster: RealCluster, operator: Operator, server: FakeServer, node: NodeAgent
) -> None:
    """What a hospital wrote to its termination log when it gave up, and how often it was
    restarted, are in its row of the run's status, although the real Job controller deletes
    the crash-looping Pod before it marks the Job Failed (the emulated API kept the Pod, so
    the operator used to find them there and lost them on a real cluster)."""
    with operator(server_url=server.url):
        cluster.create(run_doc(minHospitals=2))
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        fail_hospital(
            cluster, node, "hospital-a", "hospital-a.csv line 12: 'abc' is not a number (age)"
        )
        one = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and any(h["state"] == "Failed" for h in s.get("hospitals", []))
                and s
            ),
            timeout=CRASH_LOOP_S,
            what="hospital-a Failed",
        )
    row = next(h for h in one["hospitals"] if h["name"] == "hospital-a")
    assert "line 12" in row["message"] and row["restarts"] == 3, row


def test_a_status_the_operator_refuses_still_lets_every_stop_rule_run(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    """A server whose /status holds q = NaN: refused before any accountant sees it, said in
    the status and an Event, and the deadline still ends the run (it used to raise inside
    the decision, so no stop rule ran and no status was written)."""
    server.set("Running", current=1)
    assert server.status is not None
    server.status["privacy"]["hospitals"][0]["sampleRate"] = float("nan")  # JSON NaN
    server.status["message"] = "x" * 40_000
    with operator(server_url=server.url):
        cluster.create(run_doc(activeDeadlineSeconds=6))
        refused = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and "the server's status was refused" in s.get("message", "")
                and s
            ),
            timeout=30,
            what="the status refused",
        )
        wait_event(cluster, "Warning", "ServerStatusInvalid")
        failed = wait_phase(cluster, "Failed")
    assert "sampleRate" in refused["message"]
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"


def test_an_oversized_status_is_not_read_and_long_messages_are_clipped(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.raw = b"{" + b" " * (2 * 1024 * 1024) + b"}"
        big = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME)) and "larger than" in s.get("message", "") and s
            ),
            timeout=30,
            what="the oversized status refused",
        )
        server.raw = None
        server.set("Running", current=1, message="m" * 40_000)
        server.status["hospitals"][0]["message"] = "h" * 40_000  # type: ignore[index]
        clipped = wait_phase(cluster, "Running")
    assert big["phase"] == "Pending"
    assert len(clipped["message"]) <= 1024
    assert all(len(h.get("message", "")) <= 1024 for h in clipped["hospitals"])
    assert all(len(c.get("message", "")) <= 1024 for c in clipped["conditions"])


def test_an_object_the_run_does_not_own_is_never_taken_over(
    cluster: RealCluster, operator: Operator
) -> None:
    """A Service with the server's name exists already: the run fails naming it, the
    Service is left as it was, and no pod is created (the operator used to patch its
    ownerReferences onto it, redirecting it and tying its life to the run)."""
    ns = cluster.namespace
    foreign = cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{NAME}-server", "labels": {"app": "other"}},
            "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]},
        }
    )
    with operator():
        cluster.create(run_doc())
        failed = wait_phase(cluster, "Failed")
        wait_event(cluster, "Warning", "ChildConflict")
    after = cluster.get("v1", "services", ns, f"{NAME}-server")
    assert after["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert not after["metadata"].get("ownerReferences")
    assert after["spec"]["selector"] == {"app": "other"}
    assert condition(failed, "Failed")["reason"] == "ChildConflict"
    assert f"Service {NAME}-server exists and is not owned by this run" in failed["message"]
    kids = children(cluster)
    assert not any(k.startswith(("Deployment/", "Job/")) for k in kids)
    assert not cluster.list("v1", "pods", ns)


def foreign_job(name: str) -> dict[str, Any]:
    """A Job someone else made, under a name the run wants for a hospital's Job."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "x", "image": "busybox", "args": ["sleep", "1d"]}],
                }
            }
        },
    }


def test_a_job_the_run_does_not_own_is_never_replaced_or_suspended(
    cluster: RealCluster, operator: Operator
) -> None:
    ns = cluster.namespace
    foreign = cluster.create(foreign_job(f"{NAME}-hospital-b"))
    with operator():
        cluster.create(run_doc())
        failed = wait_phase(cluster, "Failed")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", ns, f"{NAME}-server")["spec"]["replicas"] == 0
            ),
            timeout=30,
            what="the run's own server stopped",
        )
    job = cluster.get("batch/v1", "jobs", ns, f"{NAME}-hospital-b")
    assert job["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert not job["spec"].get("suspend") and not job["metadata"].get("ownerReferences")
    assert f"Job {NAME}-hospital-b exists and is not owned by this run" in failed["message"]
    for h in ("hospital-a", "hospital-c"):
        assert cluster.get("batch/v1", "jobs", ns, f"{NAME}-{h}")["spec"]["suspend"]


def test_budget_stop_when_the_operators_own_accounting_says_so(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    ns = cluster.namespace
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        # The server claims ε=0 but reports steps that cost far more than ε=1.
        server.set("Running", current=3, steps=3000)
        stopped = wait_phase(cluster, "BudgetExhausted")
        cluster.wait_for(
            lambda: all(
                cluster.get("batch/v1", "jobs", ns, f"{NAME}-{h}")["spec"]["suspend"]
                for h in HOSPITALS
            ),
            timeout=30,
            what="jobs suspended",
        )
        assert cluster.get("apps/v1", "deployments", ns, f"{NAME}-server")["spec"]["replicas"] == 0
        wait_event(cluster, "Warning", "BudgetStop")
    assert stopped["privacy"]["epsilonSpent"] > 1.0


def test_drift_is_repaired(cluster: RealCluster, operator: Operator) -> None:
    ns = cluster.namespace
    with operator():
        cluster.create(run_doc())
        kids = all_children(cluster)
        uid = kids[f"ConfigMap/{NAME}-config"]["metadata"]["uid"]
        cluster.delete("v1", "configmaps", ns, f"{NAME}-config")
        cluster.delete("v1", "services", ns, f"{NAME}-server")
        cluster.patch("apps/v1", "deployments", ns, f"{NAME}-server", {"spec": {"replicas": 4}})
        repaired = cluster.wait_for(
            lambda: (
                (c := children(cluster)).keys() >= EXPECTED
                and c[f"ConfigMap/{NAME}-config"]["metadata"]["uid"] != uid
                and c[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 1
                and c
            ),
            timeout=30,
            what="drift repaired",
        )
        cluster.patch("v1", "configmaps", ns, f"{NAME}-config", {"data": {"config.json": "{}"}})
        fixed = cluster.wait_for(
            lambda: (
                (cm := cluster.get("v1", "configmaps", ns, f"{NAME}-config"))["data"]["config.json"]
                != "{}"
                and cm
            ),
            timeout=30,
            what="the ConfigMap set back",
        )
        wait_event(cluster, "Warning", "ChildRecreated")
        wait_event(cluster, "Warning", "ChildRepaired")
    assert json.loads(fixed["data"]["config.json"])["metadata"]["name"] == NAME
    assert repaired[f"Service/{NAME}-server"]["spec"]["ports"]


def test_a_deleted_server_is_recreated_on_a_secret_set_the_operator_can_vouch_for(
    cluster: RealCluster, operator: Operator
) -> None:
    """The operator cannot read Secrets. A set it made whole itself is kept when the server
    is recreated (every create answers 409); after a restart it cannot tell, so it makes a
    whole new set and moves the server and every hospital Job to it."""
    ns = cluster.namespace

    def recreated(uid: str) -> None:
        cluster.delete("apps/v1", "deployments", ns, f"{NAME}-server")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", ns, f"{NAME}-server")["metadata"]["uid"]
                != uid
            ),
            timeout=30,
            what="server Deployment recreated",
        )

    def mounts() -> dict[str, str]:
        out = {}
        for key, obj in children(cluster).items():
            if key.startswith(("Deployment/", "Job/")):
                volumes = obj["spec"]["template"]["spec"].get("volumes", [])
                out[key] = next(v["secret"]["secretName"] for v in volumes if "secret" in v)
        return out

    with operator():
        cluster.create(run_doc())
        kids = all_children(cluster)
        first = run_secrets(cluster)
        tries = secret_creates(cluster)
        recreated(kids[f"Deployment/{NAME}-server"]["metadata"]["uid"])
        wait_event(cluster, "Warning", "ChildRecreated")
        # The pass that recreated the server tried every Secret of its whole set first,
        # before the Deployment, and kept each one (409).
        retried = [c for c in operator_calls(cluster) if c.resource == "secrets"][tries:]
        assert [(c.verb, c.code) for c in retried] == [("create", 409)] * (1 + len(HOSPITALS))
        assert run_secrets(cluster) == first
        assert run_status(cluster, NAME)["secretSet"] == ""
        uid = children(cluster)[f"Deployment/{NAME}-server"]["metadata"]["uid"]
    tries = secret_creates(cluster)
    with operator():  # a new operator: it did not make the set, so it does not build on it
        recreated(uid)
        cluster.wait_for(
            lambda: run_status(cluster, NAME).get("secretSet"), timeout=30, what="a new set"
        )
        secret_set = run_status(cluster, NAME)["secretSet"]
        auth = {h: f"{HOSPITAL_SECRETS[h]}-{secret_set}" for h in HOSPITALS}
        expected = {
            f"Deployment/{NAME}-server": f"{SERVER_SECRET}-{secret_set}",
            **{f"Job/{NAME}-{h}": name for h, name in auth.items()},
        }
        cluster.wait_for(lambda: mounts() == expected, timeout=60, what="Jobs on the new set")
        made = [c for c in operator_calls(cluster) if c.resource == "secrets"][tries:]
    assert [(c.verb, c.code) for c in made] == [("create", 201)] * (1 + len(HOSPITALS))
    now = run_secrets(cluster)
    assert {k: v for k, v in now.items() if k in first} == first  # the old set, untouched
    server = secret_data(now[f"{SERVER_SECRET}-{secret_set}"])
    for hospital, name in auth.items():
        node = secret_data(now[name])
        assert node["ca.crt"] == server["ca.crt"] != secret_data(first[SERVER_SECRET])["ca.crt"]
        assert node["node.pub"] == server[f"{hospital}.pub"]


def test_hand_edited_service_account_service_and_policy_are_set_back(
    cluster: RealCluster, operator: Operator
) -> None:
    ns = cluster.namespace
    sa, job = f"{NAME}-hospital-a", f"{NAME}-hospital-b"
    with operator():
        cluster.create(run_doc())
        all_children(cluster)
        cluster.patch(
            "v1", "serviceaccounts", ns, sa, {"metadata": {"labels": {"fedrun.io/run": "other"}}}
        )
        cluster.patch("v1", "services", ns, f"{NAME}-server", {"spec": {"type": "NodePort"}})
        # Opening the server's policy to everyone is drift too.
        cluster.patch(
            "networking.k8s.io/v1",
            "networkpolicies",
            ns,
            f"{NAME}-server",
            {"spec": {"ingress": [{}]}},
        )
        # (A Job's pod template cannot be edited: the real API server refuses it, so a hand
        # edit of a Job's command is no drift that can happen; see the next test.)
        cluster.wait_for(
            lambda: (
                (c := children(cluster)).keys() >= EXPECTED
                and c[f"ServiceAccount/{sa}"]["metadata"]["labels"]["fedrun.io/run"] == NAME
                and c[f"Service/{NAME}-server"]["spec"]["type"] == "ClusterIP"
                and cluster.get("networking.k8s.io/v1", "networkpolicies", ns, f"{NAME}-server")[
                    "spec"
                ]["ingress"]
                != [{}]
                and c
            ),
            timeout=30,
            what="edits set back",
        )
        wait_event(cluster, "Warning", "ChildRepaired")
        with pytest.raises(ApiError) as refused:
            cluster.patch(
                "batch/v1",
                "jobs",
                ns,
                job,
                {"spec": {"template": {"spec": {"activeDeadlineSeconds": 5}}}},
            )
    assert refused.value.code == 422 and "field is immutable" in refused.value.message


def test_a_job_recreated_by_hand_is_not_taken_over(
    cluster: RealCluster, operator: Operator
) -> None:
    """A hospital's Job deleted and created again by hand under its name (with another
    command: the only way to change one, its pod template being immutable) is no longer the
    run's: the operator neither replaces nor suspends it, and the run fails with
    ChildConflict, stopping what it owns."""
    ns = cluster.namespace
    job = f"{NAME}-hospital-b"
    with operator():
        cluster.create(run_doc())
        kids = all_children(cluster)
        ours = kids[f"Job/{job}"]["metadata"]["uid"]

        def recreated_by_hand() -> dict[str, Any] | None:
            # The operator recreates a missing Job within a poll: whoever creates first
            # holds the name, so try again until the hand-made one does.
            current = cluster.get("batch/v1", "jobs", ns, job)
            if current["metadata"]["uid"] != ours and not current["metadata"].get(
                "ownerReferences"
            ):
                return current
            cluster.delete("batch/v1", "jobs", ns, job, propagation="Background")
            try:
                return cluster.create(foreign_job(job))
            except ApiError as err:
                if err.code != 409:
                    raise
                return None

        foreign = cluster.wait_for(recreated_by_hand, timeout=30, what="the Job made by hand")
        failed = wait_phase(cluster, "Failed")
        wait_event(cluster, "Warning", "ChildConflict")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", ns, f"{NAME}-server")["spec"]["replicas"] == 0
            ),
            timeout=30,
            what="the run's own server stopped",
        )
    after = cluster.get("batch/v1", "jobs", ns, job)
    assert after["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert not after["spec"].get("suspend") and not after["metadata"].get("ownerReferences")
    assert after["spec"]["template"]["spec"]["containers"][0]["args"] == ["sleep", "1d"]
    assert condition(failed, "Failed")["reason"] == "ChildConflict"
    assert f"Job {job} exists and is not owned by this run" in failed["message"]
    for h in ("hospital-a", "hospital-c"):
        assert cluster.get("batch/v1", "jobs", ns, f"{NAME}-{h}")["spec"]["suspend"]
    assert ("Warning", "ChildReplaced") not in events_for(cluster)


def test_a_spec_change_before_the_run_runs_replaces_its_jobs(
    cluster: RealCluster, operator: Operator
) -> None:
    """Until the run is Running its spec may change (the CRD refuses a change only while
    it runs): the ConfigMap takes the new spec, and each hospital's Job, whose pod template
    carries the config's hash and cannot be patched, is deleted and created again; the
    real garbage collector takes the old Jobs' pods with them."""
    ns = cluster.namespace
    with operator():
        cluster.create(run_doc())
        kids = all_children(cluster)
        wait_phase(cluster, "Pending")
        old = {h: kids[f"Job/{NAME}-{h}"]["metadata"]["uid"] for h in HOSPITALS}
        cluster.patch(API, PLURAL, ns, NAME, {"spec": {"rounds": 7}})
        replaced = cluster.wait_for(
            lambda: (
                (c := children(cluster)).keys() >= EXPECTED
                and all(c[f"Job/{NAME}-{h}"]["metadata"]["uid"] != old[h] for h in HOSPITALS)
                and c
            ),
            timeout=60,
            what="every hospital's Job replaced",
        )
        wait_event(cluster, "Warning", "ChildReplaced")
        status = wait_progress(cluster, "0/7")
        new_uids = {replaced[f"Job/{NAME}-{h}"]["metadata"]["uid"] for h in HOSPITALS}

        def only_new_pods() -> bool:
            pods = cluster.list(
                "v1",
                "pods",
                ns,
                label_selector=f"fedrun.io/run={NAME},fedrun.io/component=hospital",
            )
            owners = {p["metadata"]["ownerReferences"][0]["uid"] for p in pods}
            return len(pods) == len(HOSPITALS) and owners == new_uids

        cluster.wait_for(only_new_pods, timeout=60, what="the old Jobs' pods gone")
    config = replaced[f"ConfigMap/{NAME}-config"]
    assert json.loads(config["data"]["config.json"])["spec"]["rounds"] == 7
    wanted = config_hash(config["data"]["config.json"])
    for h in HOSPITALS:
        template = replaced[f"Job/{NAME}-{h}"]["spec"]["template"]
        assert template["metadata"]["annotations"][ANNOTATION_CONFIG_HASH] == wanted, h
    assert status["phase"] == "Pending"


def test_a_finished_run_is_deleted_after_its_ttl(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    ns = cluster.namespace
    with operator(server_url=server.url):
        cluster.create(run_doc(ttlSecondsAfterFinished=1))
        all_children(cluster)
        server.set("Succeeded", current=5, steps=50, reason="RoundsCompleted")
        wait_phase(cluster, "Succeeded")
        cluster.wait_for(
            lambda: not cluster.exists(API, PLURAL, ns, NAME), timeout=90, what="run deleted"
        )
    # The real garbage collector deletes its children.
    cluster.wait_for(lambda: not children(cluster), timeout=120, what="children deleted")


def test_operator_restart_mid_run_creates_no_duplicates_and_loses_nothing(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=2, steps=20)
        before = wait_progress(cluster, "2/5")
    creates_before = [c for c in operator_calls(cluster) if c.verb == "create"]
    secrets_before = run_secrets(cluster)
    with operator(server_url=server.url):
        server.set("Running", current=3, steps=30)
        after = wait_progress(cluster, "3/5")
    creates_after = [c for c in operator_calls(cluster) if c.verb == "create"]
    new = [c for c in creates_after[len(creates_before) :] if c.resource != "events"]
    assert creates_after[: len(creates_before)] == creates_before
    # Nothing was created again, not even tried: the Secrets neither (new material would
    # not match the pods'), and they are the very same objects.
    assert new == []
    assert run_secrets(cluster) == secrets_before
    assert secrets_before.keys() == {SERVER_SECRET, *HOSPITAL_SECRETS.values()}
    assert after["startTime"] == before["startTime"]
    running = condition(after, "Running")
    assert running["lastTransitionTime"] == condition(before, "Running")["lastTransitionTime"]
    assert after["privacy"]["epsilonSpent"] > before["privacy"]["epsilonSpent"]


def test_a_budgeted_run_reserves_is_charged_and_releases_on_a_real_api_server(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    """The real API server with the chart's PrivacyBudget CRD and RBAC: the run reserves
    before its children exist, is charged what it spends and gives back the rest at its
    end (the emulated API's tests cover the races and restarts: test_operator_budgets.py)."""
    ns, budget = cluster.namespace, "hospital-b-stroke"
    cluster.create(
        {
            "apiVersion": API,
            "kind": "PrivacyBudget",
            "metadata": {"name": budget},
            "spec": {
                "hospital": "hospital-b",
                "dataset": {"label": "stroke-2026"},
                "epsilon": 3.0,
                "delta": 1e-5,
            },
        }
    )
    doc = run_doc()
    doc["spec"]["hospitals"][1]["budgetRef"] = budget

    def stored() -> dict[str, Any]:
        status: dict[str, Any] = cluster.get(API, "privacybudgets", ns, budget).get("status") or {}
        return status

    with operator(server_url=server.url):
        cluster.create(doc)
        all_children(cluster)
        held = cluster.wait_for(
            lambda: stored().get("reserved") and stored(), timeout=30, what="reservation"
        )
        server.set("Running", current=2, steps=20)
        cluster.wait_for(
            lambda: stored()["charges"][0]["history"] == [[4.0, 0.1, 20.0]],
            timeout=30,
            what="charge",
        )
        server.set("Succeeded", current=5, steps=50, reason="RoundsCompleted")
        wait_phase(cluster, "Succeeded")
        ended = cluster.wait_for(
            lambda: (s := stored())["charges"][0]["state"] == "Released" and s,
            timeout=30,
            what="release",
        )
        series = f'{{budget="{budget}",hospital="hospital-b",namespace="{ns}"}}'
        cluster.wait_for(
            lambda: (
                f"fedrun_operator_budget_epsilon_limit{series} 3.0" in metrics.render().decode()
            ),
            timeout=30,
            what="the budget's gauges",
        )
    assert held["reserved"] == 1.0 and held["remaining"] == pytest.approx(2.0)
    assert ended["reserved"] == 0
    assert ended["spent"] == pytest.approx(epsilon([(4.0, 0.1, 50)], 1e-5))
    assert run_status(cluster, NAME)["budgets"] == [
        {
            "hospital": "hospital-b",
            "name": budget,
            "state": "Released",
            "reserved": 1.0,
            "delta": 1e-5,
        }
    ]
    # The budget's spec is the data owner's: the operator reads and watches budgets and
    # writes their status only, with a PUT that carries the resourceVersion it read (no
    # finalizer, no annotation: kopf patches nothing on a budget).
    on_budgets = {
        (call.verb, call.rbac_resource)
        for call in operator_calls(cluster)
        if call.resource == "privacybudgets"
    }
    assert on_budgets == {
        ("get", "privacybudgets"),
        ("list", "privacybudgets"),
        ("watch", "privacybudgets"),
        ("update", "privacybudgets/status"),
    }


def test_deleting_the_run_removes_its_children_and_metrics(
    cluster: RealCluster, operator: Operator
) -> None:
    ns = cluster.namespace
    series = f'namespace="{ns}",run="{NAME}"'
    with operator():
        cluster.create(run_doc())
        all_children(cluster)
        wait_phase(cluster, "Pending")
        assert run_secrets(cluster)
        assert series in metrics.render().decode()
        cluster.delete(API, PLURAL, ns, NAME)
        # The real garbage collector deletes every child, the Secrets too.
        cluster.wait_for(lambda: not children(cluster), timeout=60, what="children gone")
        cluster.wait_for(lambda: not run_secrets(cluster), timeout=60, what="Secrets gone")
        cluster.wait_for(
            lambda: series not in metrics.render().decode(),
            timeout=30,
            what="metrics forgotten",
        )
    # No finalizer was needed: the run was gone at once.
    assert not cluster.exists(API, PLURAL, ns, NAME)


def test_spec_changes_while_running_are_refused(
    cluster: RealCluster, operator: Operator, server: FakeServer
) -> None:
    with operator(server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        with pytest.raises(ApiError) as err:
            cluster.patch(API, PLURAL, cluster.namespace, NAME, {"spec": {"rounds": 50}})
    assert err.value.code == 422
    assert "immutable while the run is Running" in str(err.value)


# --------------------------------------------------------------------------- failover


@pytest.fixture
def leader_lease(real_cluster: RealCluster) -> Iterator[str]:
    """A Lease name of the test's own in the operator's namespace, granted exactly as the
    chart grants its replicas theirs: the chart's leader Role and RoleBinding, copied with
    this name (the session's chart operator holds the chart's own Lease)."""
    lease = f"it-failover-{uuid.uuid4().hex[:8]}"
    name = f"{CHART_OPERATOR}-leader"
    role = real_cluster.get(RBAC, "roles", RELEASE_NS, name)
    binding = real_cluster.get(RBAC, "rolebindings", RELEASE_NS, name)
    rules = [
        dict(rule, resourceNames=[lease]) if "resourceNames" in rule else rule
        for rule in role["rules"]
    ]
    meta = {"name": lease, "namespace": RELEASE_NS}
    real_cluster.create({"apiVersion": RBAC, "kind": "Role", "metadata": meta, "rules": rules})
    real_cluster.create(
        {
            "apiVersion": RBAC,
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": dict(binding["roleRef"], name=lease),
            "subjects": binding["subjects"],
        }
    )
    try:
        yield lease
    finally:
        for api_version, plural in ((LEASE_API, "leases"), (RBAC, "rolebindings"), (RBAC, "roles")):
            with contextlib.suppress(ApiError):
                real_cluster.delete(api_version, plural, RELEASE_NS, lease)


def test_of_two_replicas_one_reconciles_and_the_other_takes_over(
    real_cluster: RealCluster,
    cluster: RealCluster,
    leader_lease: str,
    server: FakeServer,
    tmp_path: Path,
) -> None:
    # Replicas as the chart runs them: `fedrun operator` processes, logged in as the chart's
    # ServiceAccount, electing a leader through a Lease in the operator's namespace.
    token = real_cluster.token_for(CHART_OPERATOR, RELEASE_NS)
    kubeconfig = cluster.plane.kubeconfig_for(
        tmp_path / "operator.kubeconfig", token=token, namespace=cluster.namespace
    )

    def replica(name: str) -> OperatorProcess:
        return OperatorProcess(
            name,
            kubeconfig,
            tmp_path / f"{name}.log",
            lease=leader_lease,
            operator_namespace=RELEASE_NS,
            namespaces=[cluster.namespace],
            server_url=server.url,
        )

    def lease() -> dict[str, Any]:
        spec: dict[str, Any] = real_cluster.get(LEASE_API, "leases", RELEASE_NS, leader_lease)[
            "spec"
        ]
        return spec

    replicas: list[OperatorProcess] = []
    try:
        a = replica("replica-a")
        replicas.append(a)
        poll(a.is_leader, 30, "replica-a leads")
        b = replica("replica-b")
        replicas.append(b)
        poll(lambda: b.is_leader() is False, 30, "replica-b waits as a standby")
        cluster.create(run_doc())
        all_children(cluster)

        def a_works_alone() -> bool:
            # Never both: the standby has not run a single reconcile.
            assert b.reconciles() == 0 and b.is_leader() is False, b.log()
            return a.reconciles() >= 5

        poll(a_works_alone, 30, "replica-a follows the run while replica-b waits")

        # A crash: SIGKILL, no release. replica-b takes the Lease once it expired, and acts.
        a.kill()
        killed = time.monotonic()
        cluster.delete("v1", "configmaps", cluster.namespace, f"{NAME}-config")
        bound = TIMINGS.takeover_bound_seconds + KOPF_START_S
        poll(
            lambda: children(cluster).get(f"ConfigMap/{NAME}-config"),
            bound,
            "replica-b restores the ConfigMap replica-a no longer can",
        )
        assert time.monotonic() - killed >= TIMINGS.lease_seconds - TIMINGS.retry_seconds
        assert b.is_leader() and b.reconciles() > 0
        held = lease()
        assert held["holderIdentity"].startswith("replica-b_")
        assert held["leaseTransitions"] == 1

        # A clean stop (SIGTERM, a rolling update): replica-b stops kopf, then releases the
        # Lease, so the next standby leads at once instead of after the lease expired.
        c = replica("replica-c")
        replicas.append(c)
        poll(lambda: c.is_leader() is False, 30, "replica-c waits as a standby")
        assert b.stop() == 0, b.log()
        stopped = time.monotonic()
        poll(c.is_leader, TIMINGS.lease_seconds, "replica-c leads after the release")
        assert time.monotonic() - stopped < TIMINGS.lease_seconds - TIMINGS.retry_seconds
        assert "released Lease" in b.log()
        assert lease()["holderIdentity"].startswith("replica-c_")
    finally:
        for process in replicas:
            process.stop()

"""The real operator (kopf under KopfRunner) against the emulated Kubernetes API.

A run server is stood in for by a small HTTP server whose `/status` the test sets (the
shape the real server writes); hospital Jobs and Pods get their status from the test, as
the Job controller and kubelet would write it. Everything is read back over the API.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedrun_operator import metrics, pki
from fedrun_operator.accounting import epsilon
from fedrun_operator.security import INSECURE_MESSAGE
from tests.kube.cluster import ApiError, EmulatedCluster
from tests.operator_runner import API, PLURAL, run_status, running_operator

REPO = Path(__file__).resolve().parents[2]
NS = "default"
NAME = "stroke-demo"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


# --------------------------------------------------------------------------- fixtures


class FakeServer:
    """Stands in for a run server's status port: serves whatever `status` holds."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None
        self.raw: bytes | None = None  # served as is instead of `status`, when set
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(fake.status).encode() if fake.status is not None else b""
                if fake.raw is not None:
                    body = fake.raw
                self.send_response(200 if fake.status is not None or fake.raw else 503)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set(self, phase: str = "Running", current: int = 1, steps: int = 10, **extra: Any) -> None:
        reason = extra.pop("reason", "Training")
        self.status = {
            "phase": phase,
            "conditions": [{"type": phase, "status": "True", "reason": reason}],
            "round": {"current": current, "total": 5},
            "message": extra.pop("message", f"round {current}"),
            "hospitals": [{"name": h, "state": "Training", "restarts": 0} for h in HOSPITALS],
            "privacy": {
                "hospitals": [
                    {
                        "name": h,
                        "epsilon": 0.0,
                        "noiseMultiplier": 4.0,
                        "sampleRate": 0.1,
                        "steps": steps,
                        "stepsPerRound": 10,
                    }
                    for h in HOSPITALS
                ]
            },
            **extra,
        }


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()


@pytest.fixture
def cluster() -> Iterator[EmulatedCluster]:
    with EmulatedCluster() as c:
        yield c


def run_doc(**spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "federatedrun-local.yaml").read_text(encoding="utf-8")
    )
    doc["spec"].update(spec)
    return copy.deepcopy(doc)


def wait_phase(cluster: EmulatedCluster, phase: str, timeout: float = 20) -> dict[str, Any]:
    return cluster.wait_for(
        lambda: (s := run_status(cluster, NAME)).get("phase") == phase and s,
        timeout=timeout,
        what=f"phase {phase}",
    )


def wait_progress(cluster: EmulatedCluster, progress: str) -> dict[str, Any]:
    """The run's status once it shows `progress` (rounds done / total)."""
    return cluster.wait_for(
        lambda: (s := run_status(cluster, NAME)).get("progress") == progress and s,
        timeout=20,
        what=f"progress {progress}",
    )


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    """The status's condition of type `ctype`."""
    return next(c for c in status["conditions"] if c["type"] == ctype)


def children(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    sel = f"fedrun.io/run={NAME}"
    out = {}
    for api_version, plural in (
        ("v1", "configmaps"),
        ("v1", "services"),
        ("v1", "serviceaccounts"),
        ("apps/v1", "deployments"),
        ("batch/v1", "jobs"),
    ):
        for obj in cluster.list(api_version, plural, NS, label_selector=sel):
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


EXPECTED = {
    f"ConfigMap/{NAME}-config",
    f"Service/{NAME}-server",
    f"Deployment/{NAME}-server",
    *(f"ServiceAccount/{NAME}-{h}" for h in HOSPITALS),
    *(f"Job/{NAME}-{h}" for h in HOSPITALS),
}


def all_children(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    return cluster.wait_for(
        lambda: (c := children(cluster)).keys() >= EXPECTED and c, timeout=20, what="children"
    )


SERVER_SECRET = f"{NAME}-server-tls"
HOSPITAL_SECRETS = {h: f"{NAME}-{h}-auth" for h in HOSPITALS}
OPERATOR = "fedrun-operator/"  # the User-Agent of the operator's own API client


def run_secrets(cluster: EmulatedCluster) -> dict[str, dict[str, Any]]:
    """The run's Secrets by name (read by the test: the operator may not read Secrets)."""
    items = cluster.list("v1", "secrets", NS, label_selector=f"fedrun.io/run={NAME}")
    return {obj["metadata"]["name"]: obj for obj in items}


def secret_data(obj: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}


def secret_creates(cluster: EmulatedCluster) -> int:
    """How many Secret creates the operator has sent (a 409 counts too)."""
    return len(
        [r for r in cluster.requests(OPERATOR) if r.verb == "create" and r.resource == "secrets"]
    )


def public_der(key: Any) -> bytes:
    """A public key, or a private key's public half, as DER (for comparisons)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def fail_job(cluster: EmulatedCluster, hospital: str, message: str) -> None:
    """What the Job controller and kubelet write when a hospital's Job gives up."""
    job = f"{NAME}-{hospital}"
    job_uid = cluster.get("batch/v1", "jobs", NS, job)["metadata"]["uid"]
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job}-x1",
                "namespace": NS,
                # The Job controller makes its pods with the Job as their controller.
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job,
                        "uid": job_uid,
                        "controller": True,
                    }
                ],
                "labels": {
                    "fedrun.io/run": NAME,
                    "fedrun.io/component": "hospital",
                    "fedrun.io/hospital": hospital,
                },
            },
            "spec": {"containers": [{"name": "hospital", "image": "x"}]},
        }
    )
    cluster.patch_status(
        "v1",
        "pods",
        NS,
        f"{job}-x1",
        {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "hospital",
                    "restartCount": 3,
                    "state": {"terminated": {"exitCode": 1, "message": message}},
                }
            ],
        },
    )
    cluster.patch_status(
        "batch/v1",
        "jobs",
        NS,
        job,
        {
            "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        },
    )


def wait_event(cluster: EmulatedCluster, kind: str, reason: str) -> None:
    """Events are posted by kopf in the background: wait for one to arrive."""
    cluster.wait_for(
        lambda: (kind, reason) in events_for(cluster), timeout=20, what=f"{kind} {reason}"
    )


def events_for(cluster: EmulatedCluster) -> list[tuple[str, str]]:
    return [
        (e.get("type", ""), e.get("reason", ""))
        for e in cluster.list("v1", "events", NS)
        if e.get("involvedObject", {}).get("name") == NAME
    ]


# --------------------------------------------------------------------------- tests


def test_create_makes_every_child_owned_and_labelled(cluster: EmulatedCluster) -> None:
    with running_operator(cluster):
        run = cluster.create(run_doc())
        kids = all_children(cluster)
        status = wait_phase(cluster, "Pending")
    assert kids.keys() == EXPECTED
    policies = cluster.list("networking.k8s.io/v1", "networkpolicies", NS)
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


def test_a_secure_run_gets_its_secrets_before_its_pods(cluster: EmulatedCluster) -> None:
    with running_operator(cluster):
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
    for name in (f"{NAME}-server", f"{NAME}-server.{NS}.svc", "127.0.0.1"):
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

    # Created before the pods that mount them (a Secret is never written again, so its
    # resourceVersion says when it was created): the server's first, then the hospitals'.
    creates = [
        r.resource
        for r in cluster.requests(OPERATOR)
        if r.verb == "create" and r.resource in ("secrets", "deployments", "jobs")
    ]
    # The first pass's creates come first (a later pass waits for it to end): n Secrets,
    # then the n pods' owners, the Deployment and the Jobs.
    n = 1 + len(HOSPITALS)
    assert creates[:n] == ["secrets"] * n, creates
    assert sorted(creates[n : 2 * n]) == ["deployments"] + ["jobs"] * len(HOSPITALS), creates
    by_creation = sorted(secrets, key=lambda k: int(secrets[k]["metadata"]["resourceVersion"]))
    assert by_creation == [SERVER_SECRET, *HOSPITAL_SECRETS.values()]
    # Only created: never read, listed or watched.
    assert {r.verb for r in cluster.requests(OPERATOR) if r.resource == "secrets"} == {"create"}


def test_an_insecure_run_gets_no_secrets_and_is_flagged(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc(security={"insecure": True}))
        all_children(cluster)
        flagged = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and any(c["type"] == "Insecure" for c in s.get("conditions", []))
                and s
            ),
            timeout=20,
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


def test_status_follows_the_server_to_success(cluster: EmulatedCluster, server: FakeServer) -> None:
    with running_operator(cluster, server_url=server.url):
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
                cluster.get("apps/v1", "deployments", NS, f"{NAME}-server")["spec"]["replicas"] == 0
            ),
            timeout=20,
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
    assert f'fedrun_operator_run_round{{namespace="{NS}",run="{NAME}"}} 5.0' in text


def test_suspend_stops_everything_and_resume_restarts_with_the_budget_kept(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=2, steps=20)
        wait_progress(cluster, "2/5")
        cluster.patch(API, PLURAL, NS, NAME, {"spec": {"suspend": True}})
        suspended = wait_phase(cluster, "Suspended")
        kids = children(cluster)
        assert kids[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 0
        assert all(kids[f"Job/{NAME}-{h}"]["spec"]["suspend"] for h in HOSPITALS)
        server.status = None  # the server pod is gone
        cluster.patch(API, PLURAL, NS, NAME, {"spec": {"suspend": False}})
        resumed = wait_phase(cluster, "Pending")
        kids = children(cluster)
        assert kids[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 1
        assert not any(kids[f"Job/{NAME}-{h}"]["spec"]["suspend"] for h in HOSPITALS)
        server.set("Running", current=1, steps=10)  # the new server starts from round 0
        after = cluster.wait_for(
            lambda: (s := run_status(cluster, NAME)).get("phase") == "Running" and s, timeout=20
        )
        wait_event(cluster, "Normal", "Suspended")
        wait_event(cluster, "Normal", "Resumed")
    assert "restarts training from round 0" in suspended["message"]
    assert {c["name"] for c in suspended["privacy"]["carried"]} == set(HOSPITALS)
    assert "resumed" in resumed["message"]
    spent = epsilon([(4.0, 0.1, 20), (4.0, 0.1, 10)], 1e-5)
    assert after["privacy"]["epsilonSpent"] == pytest.approx(spent, rel=1e-4)


def test_active_deadline_fails_the_run(cluster: EmulatedCluster, server: FakeServer) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc(activeDeadlineSeconds=2))
        server.set("Running", current=1)
        failed = wait_phase(cluster, "Failed", timeout=30)
    cond = condition(failed, "Failed")
    assert cond["reason"] == "DeadlineExceeded"


def test_hospital_failures_below_and_above_min_hospitals(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc(minHospitals=2))
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        fail_job(cluster, "hospital-a", "hospital-a.csv line 12: 'abc' is not a number (age)")
        one = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and any(h["state"] == "Failed" for h in s.get("hospitals", []))
                and s
            ),
            timeout=20,
        )
        assert one["phase"] == "Running"
        row = next(h for h in one["hospitals"] if h["name"] == "hospital-a")
        assert "line 12" in row["message"] and row["restarts"] == 3
        wait_event(cluster, "Warning", "HospitalFailed")
        fail_job(cluster, "hospital-b", "cannot read s3://b/data.csv: AccessDenied")
        failed = wait_phase(cluster, "Failed")
    assert "hospital-a" in failed["message"] and "hospital-b" in failed["message"]
    cond = condition(failed, "Failed")
    assert cond["reason"] == "TooFewHospitals"


def test_a_status_the_operator_refuses_still_lets_every_stop_rule_run(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    """A server whose /status holds q = NaN: refused before any accountant sees it, said in
    the status and an Event, and the deadline still ends the run (it used to raise inside
    the decision, so no stop rule ran and no status was written)."""
    server.set("Running", current=1)
    assert server.status is not None
    server.status["privacy"]["hospitals"][0]["sampleRate"] = float("nan")  # JSON NaN
    server.status["message"] = "x" * 40_000
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc(activeDeadlineSeconds=6))
        refused = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME))
                and "the server's status was refused" in s.get("message", "")
                and s
            ),
            timeout=20,
            what="the status refused",
        )
        wait_event(cluster, "Warning", "ServerStatusInvalid")
        failed = wait_phase(cluster, "Failed", timeout=30)
    assert "sampleRate" in refused["message"]
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"


def test_an_oversized_status_is_not_read_and_long_messages_are_clipped(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.raw = b"{" + b" " * (2 * 1024 * 1024) + b"}"
        big = cluster.wait_for(
            lambda: (
                (s := run_status(cluster, NAME)) and "larger than" in s.get("message", "") and s
            ),
            timeout=20,
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


def test_an_object_the_run_does_not_own_is_never_taken_over(cluster: EmulatedCluster) -> None:
    """A Service with the server's name exists already: the run fails naming it, the
    Service is left as it was, and no pod is created (the operator used to patch its
    ownerReferences onto it, redirecting it and tying its life to the run)."""
    foreign = cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{NAME}-server", "namespace": NS, "labels": {"app": "other"}},
            "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]},
        }
    )
    with running_operator(cluster):
        cluster.create(run_doc())
        failed = wait_phase(cluster, "Failed")
        wait_event(cluster, "Warning", "ChildConflict")
    after = cluster.get("v1", "services", NS, f"{NAME}-server")
    assert after["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert not after["metadata"].get("ownerReferences")
    assert after["spec"]["selector"] == {"app": "other"}
    assert condition(failed, "Failed")["reason"] == "ChildConflict"
    assert f"Service {NAME}-server exists and is not owned by this run" in failed["message"]
    kids = children(cluster)
    assert not any(k.startswith(("Deployment/", "Job/")) for k in kids)


def test_a_job_the_run_does_not_own_is_never_replaced_or_suspended(
    cluster: EmulatedCluster,
) -> None:
    foreign = cluster.create(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": f"{NAME}-hospital-b", "namespace": NS},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "x", "image": "busybox"}],
                    }
                }
            },
        }
    )
    with running_operator(cluster):
        cluster.create(run_doc())
        failed = wait_phase(cluster, "Failed")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", NS, f"{NAME}-server")["spec"]["replicas"] == 0
            ),
            timeout=20,
            what="the run's own server stopped",
        )
    job = cluster.get("batch/v1", "jobs", NS, f"{NAME}-hospital-b")
    assert job["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert not job["spec"].get("suspend") and not job["metadata"].get("ownerReferences")
    assert f"Job {NAME}-hospital-b exists and is not owned by this run" in failed["message"]
    for h in ("hospital-a", "hospital-c"):
        assert cluster.get("batch/v1", "jobs", NS, f"{NAME}-{h}")["spec"]["suspend"]


def test_budget_stop_when_the_operators_own_accounting_says_so(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        # The server claims ε=0 but reports steps that cost far more than ε=1.
        server.set("Running", current=3, steps=3000)
        stopped = wait_phase(cluster, "BudgetExhausted")
        cluster.wait_for(
            lambda: all(
                cluster.get("batch/v1", "jobs", NS, f"{NAME}-{h}")["spec"]["suspend"]
                for h in HOSPITALS
            ),
            timeout=20,
            what="jobs suspended",
        )
        assert cluster.get("apps/v1", "deployments", NS, f"{NAME}-server")["spec"]["replicas"] == 0
        wait_event(cluster, "Warning", "BudgetStop")
    assert stopped["privacy"]["epsilonSpent"] > 1.0


def test_drift_is_repaired(cluster: EmulatedCluster) -> None:
    with running_operator(cluster):
        cluster.create(run_doc())
        kids = all_children(cluster)
        uid = kids[f"ConfigMap/{NAME}-config"]["metadata"]["uid"]
        cluster.delete("v1", "configmaps", NS, f"{NAME}-config")
        cluster.delete("v1", "services", NS, f"{NAME}-server")
        cluster.patch("apps/v1", "deployments", NS, f"{NAME}-server", {"spec": {"replicas": 4}})
        repaired = cluster.wait_for(
            lambda: (
                (c := children(cluster)).keys() >= EXPECTED
                and c[f"ConfigMap/{NAME}-config"]["metadata"]["uid"] != uid
                and c[f"Deployment/{NAME}-server"]["spec"]["replicas"] == 1
                and c
            ),
            timeout=20,
            what="drift repaired",
        )
        cluster.patch("v1", "configmaps", NS, f"{NAME}-config", {"data": {"config.json": "{}"}})
        fixed = cluster.wait_for(
            lambda: (
                (cm := cluster.get("v1", "configmaps", NS, f"{NAME}-config"))["data"]["config.json"]
                != "{}"
                and cm
            ),
            timeout=20,
        )
        wait_event(cluster, "Warning", "ChildRecreated")
        wait_event(cluster, "Warning", "ChildRepaired")
    assert json.loads(fixed["data"]["config.json"])["metadata"]["name"] == NAME
    assert repaired[f"Service/{NAME}-server"]["spec"]["ports"]


def test_a_deleted_server_is_recreated_and_the_secrets_are_kept(cluster: EmulatedCluster) -> None:
    with running_operator(cluster):
        cluster.create(run_doc())
        kids = all_children(cluster)
        secrets = run_secrets(cluster)
        tries = secret_creates(cluster)
        uid = kids[f"Deployment/{NAME}-server"]["metadata"]["uid"]
        cluster.delete("apps/v1", "deployments", NS, f"{NAME}-server")
        cluster.wait_for(
            lambda: (
                cluster.get("apps/v1", "deployments", NS, f"{NAME}-server")["metadata"]["uid"]
                != uid
            ),
            timeout=20,
            what="server Deployment recreated",
        )
        wait_event(cluster, "Warning", "ChildRecreated")
        # The pass that recreated the server tried every Secret first, before the
        # Deployment, and kept each one that exists (409).
        assert secret_creates(cluster) == tries + 1 + len(HOSPITALS)
    assert run_secrets(cluster) == secrets


def test_hand_edited_service_account_service_and_job_are_set_back(
    cluster: EmulatedCluster,
) -> None:
    sa, job = f"{NAME}-hospital-a", f"{NAME}-hospital-b"
    with running_operator(cluster):
        cluster.create(run_doc())
        kids = all_children(cluster)
        job_uid = kids[f"Job/{job}"]["metadata"]["uid"]
        cluster.patch(
            "v1", "serviceaccounts", NS, sa, {"metadata": {"labels": {"fedrun.io/run": "other"}}}
        )
        cluster.patch("v1", "services", NS, f"{NAME}-server", {"spec": {"type": "NodePort"}})
        # Opening the server's policy to everyone is drift too.
        cluster.patch(
            "networking.k8s.io/v1",
            "networkpolicies",
            NS,
            f"{NAME}-server",
            {"spec": {"ingress": [{}]}},
        )
        # Kubernetes refuses this edit; a Job re-created by hand with another command is
        # the same drift, and only delete-and-create can set it back.
        cluster.patch(
            "batch/v1",
            "jobs",
            NS,
            job,
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "hospital", "image": "busybox", "args": ["sleep", "1d"]}
                            ]
                        }
                    }
                }
            },
        )
        cluster.wait_for(
            lambda: (
                (c := children(cluster)).keys() >= EXPECTED
                and c[f"ServiceAccount/{sa}"]["metadata"]["labels"]["fedrun.io/run"] == NAME
                and c[f"Service/{NAME}-server"]["spec"]["type"] == "ClusterIP"
                and c[f"Job/{job}"]["metadata"]["uid"] != job_uid
                and cluster.get("networking.k8s.io/v1", "networkpolicies", NS, f"{NAME}-server")[
                    "spec"
                ]["ingress"]
                != [{}]
                and c
            ),
            timeout=20,
            what="edits set back",
        )
        wait_event(cluster, "Warning", "ChildReplaced")
    args = cluster.get("batch/v1", "jobs", NS, job)["spec"]["template"]["spec"]["containers"][0]
    assert args["args"][:2] == ["fedrun", "client"]


def test_a_finished_run_is_deleted_after_its_ttl(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc(ttlSecondsAfterFinished=1))
        all_children(cluster)
        server.set("Succeeded", current=5, steps=50, reason="RoundsCompleted")
        wait_phase(cluster, "Succeeded")
        cluster.wait_for(
            lambda: not cluster.exists(API, PLURAL, NS, NAME) and not children(cluster),
            timeout=30,
            what="run and children deleted",
        )


def test_operator_restart_mid_run_creates_no_duplicates_and_loses_nothing(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=2, steps=20)
        before = wait_progress(cluster, "2/5")
    creates_before = [r for r in cluster.requests() if r.verb == "create"]
    secrets_before = run_secrets(cluster)
    tries = secret_creates(cluster)
    with running_operator(cluster, server_url=server.url):
        server.set("Running", current=3, steps=30)
        after = wait_progress(cluster, "3/5")
    creates_after = [r for r in cluster.requests() if r.verb == "create" and r.resource != "events"]
    assert len(creates_after) == len([r for r in creates_before if r.resource != "events"])
    # The Secrets were not even tried again (new material would not match the pods'), and
    # they are the very same objects.
    assert secret_creates(cluster) == tries
    assert run_secrets(cluster) == secrets_before
    assert secrets_before.keys() == {SERVER_SECRET, *HOSPITAL_SECRETS.values()}
    assert after["startTime"] == before["startTime"]
    running = condition(after, "Running")
    assert running["lastTransitionTime"] == condition(before, "Running")["lastTransitionTime"]
    assert after["privacy"]["epsilonSpent"] > before["privacy"]["epsilonSpent"]


def test_deleting_the_run_removes_its_children_and_metrics(cluster: EmulatedCluster) -> None:
    with running_operator(cluster):
        cluster.create(run_doc())
        all_children(cluster)
        wait_phase(cluster, "Pending")
        assert run_secrets(cluster)
        cluster.delete(API, PLURAL, NS, NAME)
        cluster.wait_for(lambda: not children(cluster), timeout=20, what="children gone")
        cluster.wait_for(lambda: not run_secrets(cluster), timeout=20, what="Secrets gone")
        cluster.wait_for(
            lambda: f'run="{NAME}"' not in metrics.render().decode(),
            timeout=20,
            what="metrics forgotten",
        )
    # No finalizer was needed: the run was gone at once.
    assert not cluster.exists(API, PLURAL, NS, NAME)


def test_spec_changes_while_running_are_refused(
    cluster: EmulatedCluster, server: FakeServer
) -> None:
    with running_operator(cluster, server_url=server.url):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        with pytest.raises(ApiError) as err:
            cluster.patch(API, PLURAL, NS, NAME, {"spec": {"rounds": 50}})
    assert err.value.code == 422
    assert "immutable while the run is Running" in str(err.value)


def test_a_spec_change_that_slips_through_is_ignored_with_a_warning(
    server: FakeServer,
) -> None:
    with (
        EmulatedCluster(admission=False) as cluster,
        running_operator(cluster, server_url=server.url),
    ):
        cluster.create(run_doc())
        all_children(cluster)
        server.set("Running", current=1)
        wait_phase(cluster, "Running")
        cluster.patch(API, PLURAL, NS, NAME, {"spec": {"rounds": 50}})
        wait_event(cluster, "Warning", "SpecChangeRefused")
        config = json.loads(
            cluster.get("v1", "configmaps", NS, f"{NAME}-config")["data"]["config.json"]
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
    with running_operator(cluster):
        cluster.create(run_doc())
        kids = all_children(cluster)
        status = wait_phase(cluster, "Pending")
    assert len([k for k in kids if k.startswith("Job/")]) == len(HOSPITALS)
    assert status["progress"] == "0/5"
    assert retries() >= before + 2


def test_a_stored_spec_the_models_refuse_fails_the_run_naming_the_field() -> None:
    # Only without the CRD's admission (an old CRD, a forced write) can such a spec be stored.
    with EmulatedCluster(admission=False) as cluster, running_operator(cluster):
        cluster.create(run_doc(rounds=0, trainng={"model": "mlp"}))
        failed = wait_phase(cluster, "Failed")
        wait_event(cluster, "Warning", "InvalidSpec")
        created = children(cluster)
    assert condition(failed, "Failed")["reason"] == "InvalidSpec"
    assert "spec.rounds" in failed["message"]
    assert "spec.trainng: unknown field (did you mean 'training'?)" in failed["message"]
    assert created == {}  # nothing is created for a run that cannot be carried out

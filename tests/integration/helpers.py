"""What the operator's integration tests share, on the real control plane and on the
emulated API alike: a stand-in for a run server's status port, the example run, and waits
on the run's status, children and Events. Every helper works in `cluster.namespace`."""

from __future__ import annotations

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.kube.client import KubeClient
from tests.operator_runner import run_status

REPO = Path(__file__).resolve().parents[2]
#: How the namespace of each integration test on the real control plane begins.
NAMESPACE_PREFIX = "it-"
NAME = "stroke-demo"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
EXPECTED = {
    f"ConfigMap/{NAME}-config",
    f"Service/{NAME}-server",
    f"Deployment/{NAME}-server",
    *(f"ServiceAccount/{NAME}-{h}" for h in HOSPITALS),
    *(f"Job/{NAME}-{h}" for h in HOSPITALS),
}
SERVER_SECRET = f"{NAME}-server-tls"
HOSPITAL_SECRETS = {h: f"{NAME}-{h}-auth" for h in HOSPITALS}


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


def run_doc(**spec: Any) -> dict[str, Any]:
    """The example run with top-level spec fields replaced; no namespace (the client's)."""
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "federatedrun-local.yaml").read_text(encoding="utf-8")
    )
    doc["metadata"].pop("namespace", None)
    doc["spec"].update(spec)
    return copy.deepcopy(doc)


def wait_phase(cluster: KubeClient, phase: str, timeout: float = 30) -> dict[str, Any]:
    return cluster.wait_for(
        lambda: (s := run_status(cluster, NAME)).get("phase") == phase and s,
        timeout=timeout,
        what=f"phase {phase}",
    )


def wait_progress(cluster: KubeClient, progress: str) -> dict[str, Any]:
    """The run's status once it shows `progress` (rounds done / total)."""
    return cluster.wait_for(
        lambda: (s := run_status(cluster, NAME)).get("progress") == progress and s,
        timeout=30,
        what=f"progress {progress}",
    )


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    """The status's condition of type `ctype`."""
    return next(c for c in status["conditions"] if c["type"] == ctype)


def children(cluster: KubeClient) -> dict[str, dict[str, Any]]:
    """The run's children by "Kind/name" (a real API server leaves each list item's kind
    out: it is the list's)."""
    sel = f"fedrun.io/run={NAME}"
    out = {}
    for api_version, plural, kind in (
        ("v1", "configmaps", "ConfigMap"),
        ("v1", "services", "Service"),
        ("v1", "serviceaccounts", "ServiceAccount"),
        ("apps/v1", "deployments", "Deployment"),
        ("batch/v1", "jobs", "Job"),
    ):
        for obj in cluster.list(api_version, plural, cluster.namespace, label_selector=sel):
            out[f"{kind}/{obj['metadata']['name']}"] = obj
    return out


def all_children(cluster: KubeClient) -> dict[str, dict[str, Any]]:
    return cluster.wait_for(
        lambda: (c := children(cluster)).keys() >= EXPECTED and c, timeout=30, what="children"
    )


def run_secrets(cluster: KubeClient) -> dict[str, dict[str, Any]]:
    """The run's Secrets by name (read by the test: the operator may not read Secrets)."""
    items = cluster.list("v1", "secrets", cluster.namespace, label_selector=f"fedrun.io/run={NAME}")
    return {obj["metadata"]["name"]: obj for obj in items}


def secret_data(obj: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}


def events_for(cluster: KubeClient) -> list[tuple[str, str]]:
    """(type, reason) of every Event on the run."""
    return [
        (e.get("type", ""), e.get("reason", ""))
        for e in cluster.list("v1", "events", cluster.namespace)
        if e.get("involvedObject", {}).get("name") == NAME
    ]


def wait_event(cluster: KubeClient, kind: str, reason: str) -> None:
    """Events are posted by kopf in the background: wait for one to arrive."""
    cluster.wait_for(
        lambda: (kind, reason) in events_for(cluster), timeout=30, what=f"{kind} {reason}"
    )

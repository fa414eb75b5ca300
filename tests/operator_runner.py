"""Run the real operator (kopf, in its own thread) against an API server: the emulated
one (tests/kube/) or a real control plane (tests/controlplane/)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kopf.testing import KopfRunner

from tests.kube.client import KubeClient

API = "fedrun.io/v1alpha1"
PLURAL = "federatedruns"

# The timer's period is read when fedrun_operator.main is first imported: keep it short
# for every test in this process (a cluster uses the 5 s default).
os.environ.setdefault("FEDRUN_OPERATOR_POLL_SECONDS", "0.5")
os.environ.setdefault("FEDRUN_OPERATOR_METRICS_PORT", "0")


@contextmanager
def running_operator(
    kubeconfig: Path,
    server_url: str = "http://127.0.0.1:9",
    namespaces: Sequence[str] | None = None,
    **env: str,
) -> Iterator[KopfRunner]:
    """`fedrun_operator.main` under KopfRunner, logged in through `kubeconfig`.

    `namespaces`: the namespaces it follows (`--namespace` each, as the chart's operator
    with `watchNamespaces`); None: every namespace (`--all-namespaces`). `server_url` is
    where it reads run servers' `/status` (default: a closed port); `env` sets further
    environment variables (FEDRUN_OPERATOR_NAMESPACE, ...) while it runs.
    """
    grace = "FEDRUN_OPERATOR_SUCCEEDED_GRACE_SECONDS"
    saved = {
        k: os.environ.get(k) for k in ("KUBECONFIG", "FEDRUN_OPERATOR_SERVER_URL", grace, *env)
    }
    os.environ["KUBECONFIG"] = str(kubeconfig)
    os.environ["FEDRUN_OPERATOR_SERVER_URL"] = server_url
    os.environ[grace] = "1"  # no hospital process here needs time to exit
    os.environ.update(env)
    scope = ["--all-namespaces"]
    if namespaces is not None:
        scope = [arg for ns in namespaces for arg in ("--namespace", ns)]
    try:
        with KopfRunner(
            ["run", "-m", "fedrun_operator.main", "--standalone", *scope],
            timeout=60,
        ) as runner:
            yield runner
        if runner.exception is not None:
            raise runner.exception
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_status(cluster: KubeClient, name: str, namespace: str | None = None) -> dict[str, Any]:
    """The run's `.status` as stored ({} before the operator wrote one); `namespace`
    defaults to the client's."""
    obj = cluster.get(API, PLURAL, namespace or cluster.namespace, name)
    status: dict[str, Any] = obj.get("status") or {}
    return status

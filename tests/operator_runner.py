"""Run the real operator (kopf, in its own thread) against an emulated API server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kopf.testing import KopfRunner

from tests.kube.cluster import EmulatedCluster

API = "fedrun.io/v1alpha1"
PLURAL = "federatedruns"

# The timer's period is read when fedrun_operator.main is first imported: keep it short
# for every test in this process (a cluster uses the 5 s default).
os.environ.setdefault("FEDRUN_OPERATOR_POLL_SECONDS", "0.5")
os.environ.setdefault("FEDRUN_OPERATOR_METRICS_PORT", "0")


@contextmanager
def running_operator(
    cluster: EmulatedCluster, server_url: str = "http://127.0.0.1:9", **env: str
) -> Iterator[KopfRunner]:
    """`fedrun_operator.main` under KopfRunner, logged in to `cluster` through a kubeconfig.

    `server_url` is where it reads run servers' `/status` (default: a closed port).
    """
    grace = "FEDRUN_OPERATOR_SUCCEEDED_GRACE_SECONDS"
    saved = {
        k: os.environ.get(k) for k in ("KUBECONFIG", "FEDRUN_OPERATOR_SERVER_URL", grace, *env)
    }
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    os.environ["FEDRUN_OPERATOR_SERVER_URL"] = server_url
    os.environ[grace] = "1"  # no hospital process here needs time to exit
    os.environ.update(env)
    try:
        with KopfRunner(
            ["run", "-m", "fedrun_operator.main", "--standalone", "--all-namespaces"],
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


def run_status(cluster: EmulatedCluster, name: str, namespace: str = "default") -> dict[str, Any]:
    """The run's `.status` as stored ({} before the operator wrote one)."""
    status: dict[str, Any] = cluster.get(API, PLURAL, namespace, name).get("status") or {}
    return status

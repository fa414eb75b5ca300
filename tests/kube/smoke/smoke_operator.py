"""A trivial kopf operator for the emulator's smoke test: new FederatedRuns become Pending.

Run with `kopf run -A --standalone tests/kube/smoke/smoke_operator.py` and KUBECONFIG set.
Our CRD keeps no unknown status fields (kube-apiserver prunes `status.kopf`), so kopf keeps
its state in annotations.
"""

from __future__ import annotations

from typing import Any

import kopf


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedrun.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="fedrun.io")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # kopf's default login goes through the kubernetes client, which reads KUBECONFIG once,
    # when `kubernetes.config` is first imported (importing kopf does it): a KUBECONFIG a
    # test sets later is never seen. kopf's own loader reads it at login time.
    info: kopf.ConnectionInfo | None = kopf.login_with_kubeconfig(**kwargs)
    return info


@kopf.on.create("fedrun.io", "v1alpha1", "federatedruns")
def mark_pending(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "Pending"
    patch.status["message"] = "seen by the smoke operator"
    kopf.info(body, reason="Seen", message="the smoke operator saw this run")

"""What a run's children are called, how they are labelled, who owns them, and whether the
run is secure: the names rendering, the operator and the local runner all agree on.

Pure functions of the FederatedRun; ``workloads`` and ``security`` build the objects on them.
"""

from __future__ import annotations

from typing import Any

from fedrun_core import names as c
from fedrun_core.api import FederatedRun, Hospital

__all__ = [
    "config_name",
    "hospital_auth_secret_name",
    "hospital_name",
    "labels",
    "metadata",
    "owner_reference",
    "secure",
    "selector",
    "server_address",
    "server_name",
    "server_tls_secret_name",
]


def config_name(run: FederatedRun) -> str:
    """Name of the run's ConfigMap."""
    return f"{run.name}{c.CONFIG_SUFFIX}"


def server_name(run: FederatedRun) -> str:
    """Name of the run's server Deployment and Service."""
    return f"{run.name}{c.SERVER_SUFFIX}"


def hospital_name(run: FederatedRun, hospital: Hospital | str) -> str:
    """Name of a hospital's ServiceAccount and Job: `<run>-<hospital>`."""
    name = hospital if isinstance(hospital, str) else hospital.name
    return f"{run.name}-{name}"


def _in_set(name: str, secret_set: str) -> str:
    return f"{name}-{secret_set}" if secret_set else name


def server_tls_secret_name(run: FederatedRun, secret_set: str = "") -> str:
    """Name of the server's TLS Secret: `<run>-server-tls`, or `<run>-server-tls-<set>` for
    a run whose material is the *secret set* `secret_set` (see fedrun_render.security)."""
    return _in_set(f"{server_name(run)}-tls", secret_set)


def hospital_auth_secret_name(
    run: FederatedRun, hospital: Hospital | str, secret_set: str = ""
) -> str:
    """Name of a hospital's node-key Secret: `<run>-<hospital>-auth[-<set>]`."""
    return _in_set(f"{hospital_name(run, hospital)}-auth", secret_set)


def checkpoint_claim_name(run: FederatedRun) -> str:
    """The PersistentVolumeClaim of the server's checkpoint: `<run>-checkpoint`."""
    return f"{run.name}{c.CHECKPOINT_SUFFIX}"


def server_address(run: FederatedRun) -> str:
    """Where hospitals reach the server's fleet port (a Service name inside the namespace)."""
    return f"{server_name(run)}:{c.FLEET_PORT}"


def labels(run: FederatedRun, component: str, hospital: str | None = None) -> dict[str, str]:
    """Labels of every child of `run`; per-hospital children also name their hospital."""
    out = {
        c.LABEL_PART_OF: c.PART_OF,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_RUN: run.name,
        c.LABEL_COMPONENT: component,
    }
    if hospital is not None:
        out[c.LABEL_HOSPITAL] = hospital
    return out


def selector(run: FederatedRun) -> dict[str, str]:
    """Labels that select the run's server pod."""
    return {c.LABEL_RUN: run.name, c.LABEL_COMPONENT: c.COMPONENT_SERVER}


def owner_reference(run: FederatedRun) -> dict[str, Any]:
    """The ownerReference that makes `run` the controller of a child (and deletes it with it)."""
    ref: dict[str, Any] = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": run.name,
    }
    if run.metadata.uid:
        ref["uid"] = run.metadata.uid
    ref["controller"] = True
    ref["blockOwnerDeletion"] = True
    return ref


def metadata(
    run: FederatedRun, name: str, component: str, hospital: str | None = None
) -> dict[str, Any]:
    """Metadata of a child `name` of `run`: its namespace, labels and controller owner."""
    return {
        "name": name,
        "namespace": run.namespace,
        "labels": labels(run, component, hospital),
        "ownerReferences": [owner_reference(run)],
    }


def secure(run: FederatedRun) -> bool:
    """Whether the run's pods use TLS and node authentication (the default)."""
    return not (run.spec.security is not None and run.spec.security.insecure)

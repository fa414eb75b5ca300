"""A run's security objects: its TLS and node-key Secrets, its NetworkPolicies, the Insecure flag.

Everything here is pure. `secret_manifests` turns the material `pki` made into the run's
Secrets (made once, when the run is created: the operator calls it separately from
`render.render_run`, which is re-rendered on every reconcile); `network_policies` renders the
run's NetworkPolicies; `insecure_condition` is the status condition a run with
`spec.security.insecure: true` carries.

Who holds what:

- `<run>-server-tls` (server pod only): `ca.crt`, `tls.crt`, `tls.key`, and one `<hospital>.pub`
  per hospital, exactly the run's hospitals: the server registers these keys with Flower
  (`flwr supernode register`) and no other.
- `<run>-<hospital>-auth` (that hospital's pod only): `ca.crt`, `node.key`, `node.pub`.

The CA's private key is in neither: `pki` drops it after signing, so rotation is a new run.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from fedrun_core import names as c
from fedrun_core.api import FederatedRun
from fedrun_core.pki import RunMaterial
from fedrun_core.states import ConditionType, Reason, condition
from fedrun_core.times import rfc3339
from fedrun_render.identity import (
    hospital_auth_secret_name,
    metadata,
    secure,
    server_name,
    server_tls_secret_name,
)

__all__ = [
    "DNS_PORT",
    "HTTPS_PORT",
    "INSECURE_MESSAGE",
    "KUBE_SYSTEM_NAMESPACE_LABELS",
    "NAMESPACE_NAME_LABEL",
    "OPERATOR_POD_LABELS",
    "hospital_auth_secret_name",
    "insecure_condition",
    "is_insecure",
    "mlflow_egress_ports",
    "network_policies",
    "secret_manifests",
    "server_tls_secret_name",
]

Manifest = dict[str, Any]

# Labels of the operator's pod that a run server's status port admits (with the operator's
# namespace, see `network_policies`). The chart sets exactly these on the operator pod
# whatever its values (charts/fedrun/templates/_helpers.tpl, fedrun.operator.policyLabels):
# `nameOverride` and `podLabels` change neither, so the policy keeps matching the operator.
OPERATOR_POD_LABELS: dict[str, str] = {
    c.LABEL_PART_OF: c.PART_OF,
    c.LABEL_COMPONENT: "operator",
}
# Every namespace carries this label, set by the API server to the namespace's name
# (Kubernetes >= 1.22): NetworkPolicies select a namespace by name with it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
KUBE_SYSTEM_NAMESPACE_LABELS: dict[str, str] = {NAMESPACE_NAME_LABEL: "kube-system"}
DNS_PORT = 53
HTTPS_PORT = 443

INSECURE_MESSAGE = (
    "spec.security.insecure is true: the server and hospitals talk without TLS and without "
    "SuperNode authentication, so anyone who reaches the server can read model updates and "
    "join the run. For local debugging only."
)


# --------------------------------------------------------------------------- Secrets


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def secret_manifests(
    run: FederatedRun, material: RunMaterial, secret_set: str = ""
) -> list[Manifest]:
    """The run's Secrets: `<run>-server-tls`, then `<run>-<hospital>-auth` in spec order,
    each name ending `-<secret_set>` when one is given (the operator's material sets).

    They are owned by the run (deleted with it) and immutable: material is made once per
    run, and a new run is the only rotation. Raises ValueError when `material` does not hold
    exactly one node key per hospital of `run`.
    """
    hospitals = [h.name for h in run.spec.hospitals]
    if sorted(material.nodes) != sorted(hospitals):
        raise ValueError(
            f"node keys for {sorted(material.nodes)} do not match the run's hospitals "
            f"{sorted(hospitals)}"
        )
    expiry = {c.ANNOTATION_NOT_AFTER: rfc3339(material.not_after)}
    server_data = {
        c.CA_FILE: _b64(material.ca_cert),
        c.TLS_CERT_FILE: _b64(material.server_cert),
        c.TLS_KEY_FILE: _b64(material.server_key),
    }
    for hospital in hospitals:
        server_data[c.hospital_pub_file(hospital)] = _b64(material.nodes[hospital].public_key)
    out: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                **metadata(run, server_tls_secret_name(run, secret_set), c.COMPONENT_SERVER),
                "annotations": dict(expiry),
            },
            "type": "kubernetes.io/tls",
            "immutable": True,
            "data": server_data,
        }
    ]
    for hospital in hospitals:
        node = material.nodes[hospital]
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    **metadata(
                        run,
                        hospital_auth_secret_name(run, hospital, secret_set),
                        c.COMPONENT_HOSPITAL,
                        hospital,
                    ),
                    "annotations": dict(expiry),
                },
                "type": "Opaque",
                "immutable": True,
                "data": {
                    c.CA_FILE: _b64(material.ca_cert),
                    c.NODE_KEY_FILE: _b64(node.private_key),
                    c.NODE_PUB_FILE: _b64(node.public_key),
                },
            }
        )
    return out


# --------------------------------------------------------------------------- NetworkPolicies


def _pods(run: FederatedRun, component: str) -> dict[str, Any]:
    return {"matchLabels": {c.LABEL_RUN: run.name, c.LABEL_COMPONENT: component}}


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def _dns_egress() -> dict[str, Any]:
    return {
        "to": [{"namespaceSelector": {"matchLabels": dict(KUBE_SYSTEM_NAMESPACE_LABELS)}}],
        "ports": [{"protocol": "UDP", "port": DNS_PORT}, _tcp(DNS_PORT)],
    }


def mlflow_egress_ports(run: FederatedRun) -> list[int]:
    """TCP ports the server may open to anywhere for MLflow; empty without a tracking server.

    A remote (http or https) tracking URI needs its own port (default 80 or 443) and 443 for
    the artifact store (S3). Any other URI (unset, file:, sqlite:) is local to the pod.
    """
    uri = run.spec.mlflow.tracking_uri
    if uri is None:
        return []
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return []
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = HTTPS_PORT if parts.scheme == "https" else 80
    return sorted({port, HTTPS_PORT})


def network_policies(
    run: FederatedRun, *, operator_namespace: str = c.DEFAULT_OPERATOR_NAMESPACE
) -> list[Manifest]:
    """The run's NetworkPolicies: default deny, then the server's and the hospitals' rules.

    - `<run>-default-deny`: every pod of the run, no ingress and no egress.
    - `<run>-server`: ingress to the fleet port (9092) only from this run's hospital pods
      (from anywhere when `spec.server.serviceType` is NodePort or LoadBalancer: those are
      for hospitals outside the cluster, which TLS and node authentication still gate), and
      to the status port (9100) only from pods with `OPERATOR_POD_LABELS` in the namespace
      `operator_namespace` (the operator's own); egress only to the cluster DNS and, with a
      remote MLflow tracking URI, to its port and 443.
    - `<run>-hospitals`: no ingress; egress only to this run's server pods on 9092, the
      cluster DNS, and TCP 443 anywhere (S3 data and ledgers, STS for IRSA).

    Kubernetes ORs policies that select a pod, so the default deny only matters for what the
    other two do not allow; it also covers any pod of the run a later change adds. Raises
    ValueError when `operator_namespace` is not a namespace name.
    """
    operator_namespace = c.namespace_name(operator_namespace)
    server_pods = _pods(run, c.COMPONENT_SERVER)
    hospital_pods = _pods(run, c.COMPONENT_HOSPITAL)
    fleet_from: dict[str, Any] = {"ports": [_tcp(c.FLEET_PORT)]}
    if run.spec.server.service_type == "ClusterIP":
        fleet_from = {"from": [{"podSelector": hospital_pods}], **fleet_from}
    server_egress = [_dns_egress()]
    mlflow = mlflow_egress_ports(run)
    if mlflow:
        server_egress.append({"ports": [_tcp(p) for p in mlflow]})
    deny_metadata = metadata(run, f"{run.name}-default-deny", c.COMPONENT_SERVER)
    # Run-wide: no component label (it is neither the server's nor a hospital's).
    deny_metadata["labels"].pop(c.LABEL_COMPONENT)
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": deny_metadata,
            "spec": {
                "podSelector": {"matchLabels": {c.LABEL_RUN: run.name}},
                "policyTypes": ["Ingress", "Egress"],
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(run, server_name(run), c.COMPONENT_SERVER),
            "spec": {
                "podSelector": server_pods,
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    fleet_from,
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {NAMESPACE_NAME_LABEL: operator_namespace}
                                },
                                "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
                            }
                        ],
                        "ports": [_tcp(c.STATUS_PORT)],
                    },
                ],
                "egress": server_egress,
            },
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata(run, f"{run.name}-hospitals", c.COMPONENT_HOSPITAL),
            "spec": {
                "podSelector": hospital_pods,
                "policyTypes": ["Ingress", "Egress"],
                "egress": [
                    {"to": [{"podSelector": server_pods}], "ports": [_tcp(c.FLEET_PORT)]},
                    _dns_egress(),
                    {"ports": [_tcp(HTTPS_PORT)]},
                ],
            },
        },
    ]


# --------------------------------------------------------------------------- Insecure


def is_insecure(run: FederatedRun) -> bool:
    """Whether the run asked for `spec.security.insecure: true` (no TLS, no node auth)."""
    return not secure(run)


def insecure_condition(
    run: FederatedRun,
    prev_conditions: list[dict[str, Any]],
    now: datetime,
    generation: int | None = None,
) -> dict[str, Any] | None:
    """The `Insecure=True` condition for an insecure run; None for a secure one.

    `prev_conditions` is the run's current `status.conditions`: an Insecure condition that
    is already True keeps its lastTransitionTime. Append the result to the conditions the
    status writes (and emit a Warning event with `INSECURE_MESSAGE` when it first appears).
    """
    if not is_insecure(run):
        return None
    return condition(
        ConditionType.INSECURE,
        True,
        Reason.INSECURE_TRANSPORT,
        INSECURE_MESSAGE,
        rfc3339(now),
        generation,
        prev_conditions,
    )

"""The real API server's audit log, read back as the API calls it answered (for tests).

The control plane (``plane.py``) audits, at level Metadata, every request of a
ServiceAccount outside kube-system: who, the verb, the object (resource, subresource,
namespace, name) and the answer's code, one JSON line each, written in batches at most
about a second after the answer. A test reads the operator's calls from there:

    ops = calls(plane.audit_log, OPERATOR_USER, namespace=ns)
    assert {c.verb for c in ops if c.resource == "secrets"} == {"create"}

Only resource requests count (``/api``, ``/apis`` and ``/version`` discovery carry no
object and every authenticated user may make them). A long-running request (a watch) is
audited twice (its response started, then completed): it is one call here. Calls come in
the order the server received them (``requestReceivedTimestamp``).

Because the log is written in batches, :func:`flush` waits until everything the server
answered before it is in the log: it sends a request of its own (as the namespace's
``default`` ServiceAccount, never as the operator) and waits for that line.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.controlplane.cluster import ApiError, RealCluster

__all__ = ["OPERATOR_CLIENTS", "OPERATOR_USER", "Call", "calls", "flush"]

#: The chart's operator ServiceAccount, as the API server names its user.
OPERATOR_USER = "system:serviceaccount:fedrun-system:fedrun-operator"
#: The operator's own clients, by User-Agent (kopf's and fedrun_operator.kube's): a test
#: that borrows the ServiceAccount's token sends its own ("fedrun-tests").
OPERATOR_CLIENTS = ("kopf/", "fedrun-operator/")


@dataclass(frozen=True)
class Call:
    """One request on a resource, as RBAC sees it ("" where a part does not apply)."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    api_group: str  # "" for the core group
    resource: str  # plural, e.g. "federatedruns"
    subresource: str  # e.g. "status"
    namespace: str  # "" for cluster-scoped resources and cluster-wide list/watch
    name: str  # "" for list, watch and create (unless the server knew it)
    code: int  # the answer's HTTP status
    received: datetime  # requestReceivedTimestamp
    user_agent: str

    @property
    def rbac_resource(self) -> str:
        """The name an RBAC rule uses: ``federatedruns`` or ``federatedruns/status``."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def _timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _events(audit_log: Path) -> list[dict[str, Any]]:
    try:
        text = audit_log.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line still being written
    return out


def calls(audit_log: Path, user: str, namespace: str | None = None) -> list[Call]:
    """Every resource request ``user`` made (in ``namespace`` only, when given), in the
    order the API server received them, each once."""
    seen: dict[str, Call] = {}
    for event in _events(audit_log):
        ref = event.get("objectRef")
        if ref is None or event.get("user", {}).get("username") != user:
            continue
        ns = ref.get("namespace", "")
        if namespace is not None and ns != namespace:
            continue
        call = Call(
            verb=event["verb"],
            api_group=ref.get("apiGroup", ""),
            resource=ref.get("resource", ""),
            subresource=ref.get("subresource", ""),
            namespace=ns,
            name=ref.get("name", ""),
            code=int(event.get("responseStatus", {}).get("code") or 0),
            received=_timestamp(event["requestReceivedTimestamp"]),
            user_agent=event.get("userAgent", ""),
        )
        # A watch's ResponseStarted and ResponseComplete share an auditID: the last wins.
        seen[event["auditID"]] = call
    return sorted(seen.values(), key=lambda c: c.received)


def flush(cluster: RealCluster, timeout: float = 20.0) -> None:
    """Wait until every request answered before this call is in the audit log.

    Sends one request of its own (a GET of a ConfigMap that does not exist, as the
    ``default`` ServiceAccount of ``cluster.namespace``) and waits for its line: the batch
    writer keeps the order in which answers were given.
    """
    ns = cluster.namespace
    token = cluster.wait_for(
        lambda: cluster.token_for("default", ns, seconds=600),
        timeout=timeout,
        what=f"the default ServiceAccount of {ns}",
    )
    marker = f"audit-flush-{uuid.uuid4().hex}"
    # 403: the default ServiceAccount may not read it; the request is audited all the same.
    with contextlib.suppress(ApiError):
        cluster.as_token(token).get("v1", "configmaps", ns, marker)
    log = cluster.plane.audit_log
    cluster.wait_for(
        lambda: any(
            (e.get("objectRef") or {}).get("name") == marker
            and e.get("stage") == "ResponseComplete"
            for e in _events(log)
        ),
        timeout=timeout,
        interval=0.2,
        what="the audit log to catch up",
    )

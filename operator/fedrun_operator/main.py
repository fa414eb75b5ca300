"""kopf wiring of the fedrun operator: settings, login, and which handler runs when.

Nothing here decides anything: every handler hands the run to
:class:`fedrun_operator.handlers.reconcile_run.Reconciler`, and the decisions live in
:mod:`fedrun_operator.status` and :mod:`fedrun_operator.children` (pure functions).

Run it with ``fedrun operator`` (which calls :func:`run`), or under kopf's own runner:
``kopf run -m fedrun_operator.main --standalone -A`` (what the integration tests do).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from fedrun_core import names as c
from fedrun_core.states import Reason
from fedrun_operator import metrics
from fedrun_operator.config import OperatorConfig
from fedrun_operator.handlers.reconcile_run import Outcome, Reconciler
from fedrun_operator.kube import Credentials, ForbiddenError, Kube
from fedrun_operator.server_report import clip

log = logging.getLogger("fedrun.operator")

# The timer's period is fixed when the handlers are registered (at import); everything
# else is read again when the operator starts (see `configure` and `login`).
POLL_SECONDS = OperatorConfig.from_env().poll_seconds
RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)
_MEMO_KEY = "reconciler"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Production settings: no peering (one replica, Recreate), watches that reconnect."""
    cfg = OperatorConfig.from_env()
    settings.peering.standalone = True
    # A watch that hears nothing for this long is reopened: a silently dropped stream
    # (a load balancer's idle timeout) cannot leave the operator deaf.
    settings.watching.server_timeout = cfg.watch_timeout_seconds
    settings.watching.client_timeout = cfg.watch_timeout_seconds + 60
    settings.watching.connect_timeout = 30
    # Handler progress in annotations under our own prefix: the status belongs to the
    # run's users, and the CRD's structural schema has no room for kopf's bookkeeping.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 20
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, registry=metrics.REGISTRY)


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else the kubeconfig; our client shares it."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        old = memo.get(_MEMO_KEY)
        memo[_MEMO_KEY] = Reconciler(Kube(Credentials.from_kopf(info)), OperatorConfig.from_env())
        if old is not None:
            log.info("credentials refreshed")
    return info


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close the operator's HTTP sessions on shutdown, after the reconciles in flight."""
    reconciler: Reconciler | None = memo.get(_MEMO_KEY)
    if reconciler is not None:
        await reconciler.close()


async def _reconcile(handler: str, body: kopf.Body, memo: kopf.Memo) -> Outcome:
    reconciler: Reconciler = memo[_MEMO_KEY]
    started = time.monotonic()
    try:
        outcome = await reconciler.reconcile(body)
    except ForbiddenError as err:
        metrics.RECONCILE_ERRORS.labels(handler).inc()
        kopf.event(body, type="Warning", reason=Reason.FORBIDDEN, message=clip(err.message))
        raise
    except Exception:
        metrics.RECONCILE_ERRORS.labels(handler).inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.labels(handler).observe(time.monotonic() - started)
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if outcome.created:
        log.info("created %s", ", ".join(outcome.created), extra={"run": body["metadata"]["name"]})
    return outcome


@kopf.on.create(*RESOURCE)
@kopf.on.resume(*RESOURCE)
async def on_create(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A new (or, after an operator restart, known) run: create or check its children."""
    await _reconcile("create", body, memo)


@kopf.on.update(*RESOURCE, field="spec")
async def on_update(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A spec change (suspend, or a change the CRD should have refused): act on it now."""
    await _reconcile("update", body, memo)


# The first look comes one period after the create handler's, not at the same moment.
@kopf.timer(*RESOURCE, interval=POLL_SECONDS, initial_delay=POLL_SECONDS, sharp=False)
async def follow(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Follow the run: server status, Jobs, drift, deadline, budget, TTL."""
    await _reconcile("follow", body, memo)


@kopf.on.delete(*RESOURCE, optional=True)
def on_delete(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Forget a deleted run's metrics; its children go with it (ownerReferences)."""
    reconciler: Reconciler | None = memo.get(_MEMO_KEY)
    uid = str(meta.get("uid") or meta.get("name"))
    if reconciler is not None:
        reconciler.forget(uid)
    metrics.forget_run(str(meta.get("namespace")), str(meta.get("name")))


def run(namespaces: list[str], health_port: int) -> None:
    """Run the operator until it is stopped (what ``fedrun operator`` calls)."""
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
    )

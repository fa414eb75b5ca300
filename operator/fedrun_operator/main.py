"""kopf wiring of the fedrun operator: settings, login, and which handler runs when.

Nothing here decides anything: every handler hands the run to
:class:`fedrun_operator.handlers.reconcile_run.Reconciler`, and the decisions live in
:mod:`fedrun_operator.status` and :mod:`fedrun_operator.children` (pure functions).

Run it with ``fedrun operator`` (which calls :func:`run`), or under kopf's own runner:
``kopf run -m fedrun_operator.main --standalone -A`` (what most integration tests do).
With ``FEDRUN_OPERATOR_LEASE_NAME`` set (the chart sets it), :func:`run` first wins the
leader Lease (:mod:`fedrun_operator.leader`) and only then starts kopf, so of several
replicas exactly one reconciles; kopf itself always runs standalone (no peering objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

import kopf
from aiohttp import web

from fedrun_core import names as c
from fedrun_core.states import Reason
from fedrun_operator import metrics
from fedrun_operator.config import POD_NAME_ENV, OperatorConfig
from fedrun_operator.handlers.reconcile_run import Outcome, Reconciler
from fedrun_operator.kube import Credentials, ForbiddenError, Kube
from fedrun_operator.leader import LeaseElector, Timings, identity
from fedrun_operator.server_report import clip

log = logging.getLogger("fedrun.operator")

# The timer's period is fixed when the handlers are registered (at import); everything
# else is read again when the operator starts (see `configure` and `login`).
POLL_SECONDS = OperatorConfig.from_env().poll_seconds
RESOURCE = (c.GROUP, c.VERSION, c.PLURAL)
BUDGET_RESOURCE = (c.GROUP, c.VERSION, c.BUDGET_PLURAL)
_MEMO_KEY = "reconciler"
_metrics_ports: set[int] = set()  # /metrics is served once per process, whoever starts it


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
    _serve_metrics(cfg.metrics_port)


def _serve_metrics(port: int) -> None:
    """Serve /metrics on `port` (0: not at all), once per process."""
    if port and port not in _metrics_ports:
        from prometheus_client import start_http_server

        start_http_server(port, registry=metrics.REGISTRY)
        _metrics_ports.add(port)


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
async def on_delete(body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Release what a deleted run still holds at its PrivacyBudgets and forget its metrics;
    its children go with it (ownerReferences). A run deleted while no operator watched is
    released by its budget's sweep when the next operator starts."""
    reconciler: Reconciler | None = memo.get(_MEMO_KEY)
    uid = str(meta.get("uid") or meta.get("name"))
    if reconciler is not None:
        await reconciler.settle_deleted(body)
        reconciler.forget(uid)
    metrics.forget_run(str(meta.get("namespace")), str(meta.get("name")))


# Budgets are followed with a watch-event handler only: kopf keeps no state on an object
# for those, whereas a timer or an on.delete handler would have it add a finalizer and
# annotations, and the operator may not patch budgets (their spec is the data owner's).
@kopf.on.event(*BUDGET_RESOURCE)
async def on_budget_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A PrivacyBudget was listed (the operator started), created, changed or deleted:
    its gauges, and the release of reservations whose run is gone (deleted while no
    operator watched); a deleted budget's series are dropped."""
    body = event.get("object") or {}
    if event.get("type") == "DELETED":
        meta, spec = body.get("metadata", {}), body.get("spec", {})
        metrics.forget_budget(
            str(meta.get("namespace")), str(meta.get("name")), str(spec.get("hospital"))
        )
        return
    reconciler: Reconciler | None = memo.get(_MEMO_KEY)
    if reconciler is not None:
        await reconciler.budgets.sweep(body)


def run(namespaces: list[str], health_port: int) -> None:
    """Run the operator until it is stopped (what ``fedrun operator`` calls).

    Without a Lease name in the settings it reconciles at once (one replica only). With
    one, it waits as a standby until it holds the Lease, reconciles while it holds it,
    releases it on SIGTERM or SIGINT, and exits with
    :data:`fedrun_operator.leader.LOST_EXIT_CODE` when it loses it. `/healthz` on
    `health_port` (0: off) answers 200 on a standby too: a waiting replica is healthy.
    """
    cfg = OperatorConfig.from_env()
    if not cfg.lease_name:
        metrics.LEADER.set(1)
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        )
        return
    asyncio.run(_run_elected(cfg, namespaces, health_port))


def _credentials() -> Credentials:
    """The same credentials kopf logs in with: the pod's ServiceAccount, else a kubeconfig."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise RuntimeError("no Kubernetes credentials: no ServiceAccount token, no kubeconfig")
    return Credentials.from_kopf(info)


async def _serve_health(port: int, elector: LeaseElector) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"leader": elector.is_leader, "identity": elector.holder})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Every interface, as kopf's own liveness endpoint: the kubelet probes the pod IP.
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _run_elected(cfg: OperatorConfig, namespaces: list[str], health_port: int) -> None:
    timings = Timings(cfg.lease_seconds, cfg.renew_deadline_seconds, cfg.retry_seconds)
    elector = LeaseElector(
        _credentials,
        cfg.operator_namespace,
        cfg.lease_name,
        identity(os.environ.get(POD_NAME_ENV)),
        timings,
    )
    _serve_metrics(cfg.metrics_port)
    health = await _serve_health(health_port, elector) if health_port else None
    try:
        # A standby holds nothing: SIGTERM or SIGINT just ends the wait.
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(stopped.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for task in (acquiring, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not elector.is_leader:
            log.info("stopped while standby")
            return
        # Leading: kopf handles SIGTERM from here (it stops its handlers), then the Lease is
        # released so that a standby takes over at once.
        keeping = asyncio.create_task(elector.keep())
        try:
            await kopf.operator(standalone=True, clusterwide=not namespaces, namespaces=namespaces)
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            await elector.release()
    finally:
        await elector.close()
        if health is not None:
            await health.cleanup()

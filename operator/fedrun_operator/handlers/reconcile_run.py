"""Reconcile one FederatedRun: read the world, decide (pure), write the world.

Every handler (create, resume, update, the follow-up timer) calls :func:`reconcile`. It is
idempotent: everything it needs is in the run's status and its children, so an operator
restarted mid-run picks up where the last one stopped and creates no duplicates.

1. read the children (skipped on the very first pass: nothing exists yet), the hospital
   pods' termination messages and the server's ``/status``;
2. :func:`fedrun_operator.status.decide` turns that into the new status, Events and whether
   to stop the run's processes or delete the expired run;
3. create missing children, set drifted ones back, or (when final) scale the server to zero
   and suspend Jobs still running; patch the status; post the Events.

A secure run's TLS and node-key Secrets (:func:`fedrun_render.security.secret_manifests`)
are created whenever the server Deployment is about to be created, before it and the Jobs
(their pods mount them), as one *secret set*: every Secret of the set from one new
material, all named with the set's suffix, which is recorded in ``status.secretSet``
before the first of them is created. The run's first pass takes the empty suffix. When
the server Deployment must be created again, a set this operator process made whole is
kept if every one of its Secrets still exists (each create answers 409); any other case (a
pass that stopped half-way, a Secret deleted by hand, a restarted operator that cannot tell)
makes a new set under a new random suffix, so a set is never mixed with Secrets an earlier
pass left, and the pods are rendered to mount the recorded set (Jobs whose template names
another set are replaced). The operator only creates Secrets, never reads or deletes them (least
privilege): sets no longer mounted stay until the run is deleted with them.

The operator touches only children it made: an object whose controller ownerReference is
not this run (by uid) is never patched, replaced or scaled. Finding one where a child
belongs (created by hand, or by another run's operator) fails the run with
``ChildConflict`` and a Warning Event naming the object; otherwise anyone allowed to
create a FederatedRun could have the operator delete Jobs or redirect Services that are
not theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp

from fedrun_core import names as c
from fedrun_core import pki
from fedrun_core.accounting import PlannedCost, epsilon, planned_cost
from fedrun_core.api import FederatedRun, PodDefaults, SpecError, parse_run
from fedrun_core.budgets import final_history_is_whole
from fedrun_core.states import (
    FINAL_PHASES,
    ConditionType,
    Phase,
    Reason,
    condition,
    phase_conditions,
)
from fedrun_core.times import rfc3339
from fedrun_operator import budgets, metrics
from fedrun_operator.children import Action, owned_by, plan_child
from fedrun_operator.config import OperatorConfig
from fedrun_operator.kube import ConflictError, ForbiddenError, Kube
from fedrun_operator.server_report import MAX_REPORT_BYTES, ReportError, clip, parse_report
from fedrun_operator.status import (
    Decision,
    Event,
    HospitalObservation,
    Observation,
    decide,
)
from fedrun_render import security
from fedrun_render.identity import config_name, server_name
from fedrun_render.workloads import config_hash, render_run

log = logging.getLogger("fedrun.operator")

Obj = dict[str, Any]


class SecretSetTakenError(RuntimeError):
    """A run's secret set holds Secrets this pass did not make: a new set is needed."""


@dataclass
class Outcome:
    """What one reconcile did (for the caller's Events, logs and tests)."""

    status: Obj
    events: list[Event] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    deleted: bool = False


def _clean_run(body: Mapping[str, Any]) -> Obj:
    """The parts of the stored object the API models describe."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion", c.API_VERSION),
        "kind": body.get("kind", c.KIND),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
            if meta.get(k) is not None
        },
        "spec": body.get("spec", {}),
    }


def _without_suspend(spec: Mapping[str, Any]) -> Obj:
    return {k: v for k, v in spec.items() if k != "suspend"}


def applied_pod_defaults(server: Obj | None, current: PodDefaults) -> PodDefaults:
    """The cluster's pod defaults a running federation was started with.

    Read from the server's pod template (annotation fedrun.io/pod-defaults; none there
    means it started without any), so that changing the chart's runDefaults never changes,
    and so restarts, the pods of a Running run. `current` when there is no server, or its
    record does not parse.
    """
    if server is None:
        return current
    annotations = (
        server.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    )
    recorded = annotations.get(c.ANNOTATION_POD_DEFAULTS)
    if recorded is None:
        return PodDefaults()
    try:
        return PodDefaults.model_validate_json(recorded)
    except ValueError:
        return current


def applied_run(
    run: FederatedRun, config: Obj | None, server: Obj | None
) -> tuple[FederatedRun, str]:
    """The run as it was applied to a running federation, and why if it differs.

    While a run is Running its spec is immutable (the CRD refuses changes); if a change
    slips through (an old CRD, a forced update), the run goes on with the spec in its
    ConfigMap and only ``suspend`` is taken from the new spec. The ConfigMap counts only
    if it is the one the server was started with (its hash is on the server's pod
    template): a hand-edited ConfigMap is drift, set back from the run's spec.
    """
    if config is None or server is None:
        return run, ""
    text = config.get("data", {}).get(c.CONFIG_FILE, "{}")
    annotations = (
        server.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
    )
    if annotations.get(c.ANNOTATION_CONFIG_HASH) != config_hash(text):
        return run, ""
    try:
        applied = json.loads(text).get("spec")
    except ValueError:
        return run, ""
    current = run.spec_dict()
    if not applied or _without_suspend(applied) == _without_suspend(current):
        return run, ""
    changed = sorted(
        k
        for k in set(applied) | set(current)
        if k != "suspend" and applied.get(k) != current.get(k)
    )
    body = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["spec"] = {**applied, "suspend": run.spec.suspend}
    message = (
        f"spec.{', spec.'.join(changed)} changed while the run is Running; the change is "
        "ignored (only spec.suspend may change): create a new FederatedRun instead"
    )
    return parse_run(body), message


@dataclass(frozen=True)
class ServerRead:
    """One read of a run server's ``/status``: the validated report, or why there is none."""

    report: Obj | None = None
    error: str = ""
    invalid: bool = False  # it answered, but with a body the model refused


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response body, or ReportError as soon as it passes ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ReportError(f"the answer is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ReportError(f"the answer is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_server(session: aiohttp.ClientSession, url: str, timeout_s: float) -> ServerRead:
    """GET ``url``/status within ``timeout_s`` (in all), at most MAX_REPORT_BYTES, validated."""
    try:
        async with session.get(
            url + "/status", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                return ServerRead(error=f"GET /status answered {resp.status}")
            body = await _read_capped(resp, MAX_REPORT_BYTES)
    except ReportError as err:
        return ServerRead(error=str(err), invalid=True)
    except (TimeoutError, aiohttp.ClientError, ValueError) as err:
        return ServerRead(error=clip(f"{type(err).__name__}: {err}".rstrip(": "), 300))
    try:
        return ServerRead(report=parse_report(body))
    except ReportError as err:
        return ServerRead(error=str(err), invalid=True)


def plans(run: FederatedRun, report: Obj | None) -> dict[str, PlannedCost]:
    """Per hospital, what a round costs under the spec for the rows the server reported.

    Only where the operator can reproduce the hospitals' σ: RDP runs, or any run with an
    explicit ``privacy.noiseMultiplier``. CPU-bound the first time for each row count
    (a σ search): call it off the event loop.
    """
    p, t = run.spec.privacy, run.spec.training
    if not p.enabled or (p.accountant != "rdp" and p.noise_multiplier is None):
        return {}
    out: dict[str, PlannedCost] = {}
    for entry in ((report or {}).get("privacy") or {}).get("hospitals", []):
        rows = int(entry.get("numTrain") or 0)
        if rows < 1 or entry["name"] not in {h.name for h in run.spec.hospitals}:
            continue
        try:
            out[entry["name"]] = planned_cost(
                n_train=rows,
                batch_size=t.batch_size,
                local_epochs=t.local_epochs,
                rounds=run.spec.rounds,
                target_epsilon=p.target_epsilon,
                delta=p.delta,
                noise_multiplier=p.noise_multiplier,
            )
        except ValueError:
            continue  # no σ meets the budget: the hospitals refuse to train, nothing to check
    return out


def _owner_ok(obj: Obj | None, run: FederatedRun) -> bool:
    """Whether ``obj`` (None: absent) may be touched as this run's child."""
    if obj is None:
        return True
    if run.metadata.uid:
        return owned_by(obj, run.metadata.uid)
    return any(  # a run with no uid (never stored): match the owner by name
        ref.get("controller") and ref.get("kind") == c.KIND and ref.get("name") == run.name
        for ref in obj.get("metadata", {}).get("ownerReferences", [])
    )


#: What a run's status says when the API refused the operator a call.
FORBIDDEN_HINT = (
    "the operator is not allowed to do what this run needs (check the ClusterRole and its "
    "bindings that the chart installs, docs/install.md)"
)


def conflict_text(kind: str, name: str) -> str:
    """The reason a run cannot use a child's name: another object holds it."""
    return (
        f"{kind} {name} exists and is not owned by this run: fedrun does not take over "
        "objects it did not create; delete or rename that object, or give the run another name"
    )


def _pod_facts(pods: list[Obj], job_uids: set[str]) -> dict[str, tuple[int, str]]:
    """Per hospital: container restarts over all its pods, and the latest failure message.

    Only pods of this run's own Jobs (``job_uids``) count: a pod someone else labelled as
    the run's cannot write into its status.
    """
    out: dict[str, tuple[int, str]] = {}
    ours = [p for p in pods if any(owned_by(p, uid) for uid in job_uids)]
    for pod in sorted(ours, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or ""):
        hospital = pod.get("metadata", {}).get("labels", {}).get(c.LABEL_HOSPITAL)
        if not hospital:
            continue
        restarts, message = out.get(hospital, (0, ""))
        for cs in pod.get("status", {}).get("containerStatuses", []):
            restarts += int(cs.get("restartCount") or 0)
            for state in (cs.get("lastState") or {}, cs.get("state") or {}):
                term = state.get("terminated") or {}
                if term.get("exitCode") not in (None, 0) and term.get("message"):
                    message = clip(str(term["message"]).strip())
        out[hospital] = (restarts, message)
    return out


def observe_job(
    hospital: str, name: str, job: Obj | None, pods: tuple[int, str]
) -> HospitalObservation:
    """A hospital's Job, folded into what :func:`decide` needs."""
    if job is None:
        return HospitalObservation(name=hospital, job_name=name, job_exists=False)
    st = job.get("status", {})
    conds = {
        cond.get("type"): cond for cond in st.get("conditions", []) if cond.get("status") == "True"
    }
    failed = conds.get("Failed")
    return HospitalObservation(
        name=hospital,
        job_name=name,
        active=int(st.get("active") or 0),
        succeeded=int(st.get("succeeded") or 0),
        failed_pods=int(st.get("failed") or 0),
        complete="Complete" in conds,
        failed=failed is not None,
        failed_reason=str((failed or {}).get("reason") or ""),
        failed_message=str((failed or {}).get("message") or ""),
        restarts=pods[0],
        message=pods[1],
    )


class Reconciler:
    """Reconciles runs with one API client, one HTTP session and one lock per run."""

    def __init__(self, kube: Kube, cfg: OperatorConfig) -> None:
        self.kube = kube
        self.cfg = cfg
        self._locks: dict[str, asyncio.Lock] = {}
        self._http: aiohttp.ClientSession | None = None
        self.progress: dict[str, tuple[int, float]] = {}  # uid -> (round, unix time)
        self.phases: dict[str, str] = {}  # uid -> phase, for fedrun_operator_runs
        # uid -> (the status a reconcile found, the status it wrote): see reconcile().
        self._written: dict[str, tuple[Obj, Obj]] = {}
        self.budgets = budgets.BudgetKeeper(kube)
        self._secret_sets: dict[str, str] = {}  # uid -> the secret set this process recorded
        self._complete_sets: dict[str, str] = {}  # uid -> a set this process made whole
        self._charged: dict[str, str] = {}  # uid -> what was last charged to its budgets

    async def http(self) -> aiohttp.ClientSession:
        """The session for reading run servers' /status."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def close(self) -> None:
        """Close HTTP sessions once the reconciles in flight have finished.

        A reconcile that starts afterwards (a timer that fires during shutdown) opens a
        new session rather than failing on a closed one.
        """
        for lock in list(self._locks.values()):
            async with lock:
                pass
        if self._http is not None:
            await self._http.close()
        await self.kube.close()

    def forget(self, uid: str) -> None:
        """Drop what is kept about a deleted run."""
        self._locks.pop(uid, None)
        self._written.pop(uid, None)
        self._charged.pop(uid, None)
        self._secret_sets.pop(uid, None)
        self._complete_sets.pop(uid, None)
        self.progress.pop(uid, None)
        self.phases.pop(uid, None)
        metrics.count_phases(list(self.phases.values()))

    async def reconcile(self, body: Mapping[str, Any], now: datetime | None = None) -> Outcome:
        """Bring one run's children and status in line; see the module docstring."""
        uid = str(body.get("metadata", {}).get("uid") or body["metadata"]["name"])
        lock = self._locks.setdefault(uid, asyncio.Lock())
        async with lock:
            found = dict(body.get("status") or {})
            written = self._written.get(uid)
            if written is not None and found == written[0]:
                # kopf handed this reconcile a body read before the previous one's status
                # write (an update handler and the timer fire together): start from what was
                # written, or the same transition (and its Event) would be made twice.
                body = {**body, "status": written[1]}
            try:
                outcome = await self._reconcile(body, now or datetime.now(UTC))
            except ForbiddenError as err:
                await self._report_forbidden(body, err)
                raise
            if outcome.status and outcome.status != dict(body.get("status") or {}):
                self._written[uid] = (found, outcome.status)
            return outcome

    async def _report_forbidden(self, body: Mapping[str, Any], err: ForbiddenError) -> None:
        """Say in the run's status that the operator's RBAC refused a call (it retries).

        The refusal is raised on (kopf retries the reconcile with back-off, so a fixed RBAC
        takes effect by itself); this makes it visible where users look, not only in the
        operator's log. The Warning Event is posted by the caller, from ``err``.
        """
        meta = body["metadata"]
        prev = dict(body.get("status") or {})
        if prev.get("phase") in FINAL_PHASES:
            return
        message = clip(f"{FORBIDDEN_HINT}: {err.message}")
        if prev.get("message") == message:
            return
        with contextlib.suppress(ForbiddenError):  # the status itself may be what is refused
            await self.kube.patch_status(
                c.API_VERSION,
                c.KIND,
                meta.get("namespace", c.DEFAULT_NAMESPACE),
                meta["name"],
                {"message": message},
            )

    async def _reconcile(self, body: Mapping[str, Any], now: datetime) -> Outcome:
        prev: Obj = dict(body.get("status") or {})
        meta = body["metadata"]
        ns, name = meta.get("namespace", c.DEFAULT_NAMESPACE), meta["name"]
        try:
            run = parse_run(_clean_run(body))
        except SpecError as err:
            return await self._refuse(body, prev, err, now)

        first = not prev.get("phase")
        prev_phase = prev.get("phase", "")
        final = prev_phase in FINAL_PHASES

        # 0. a run that names PrivacyBudgets holds a reservation at each before any child,
        # and keeps the terms it was admitted on.
        changed = "" if final else budgets.terms_changed(run, prev)
        if changed:
            return await self._refuse_changed_terms(body, run, prev, changed, now)
        charges_budgets = bool(budgets.refs(run))
        admitted_now = False
        if charges_budgets and not final and not budgets.admitted(prev):
            refusals = await self.budgets.reserve(run, now)
            if refusals:
                return await self._wait_for_budget(run, prev, refusals, now)
            admitted_now = first = True  # nothing of the run exists yet

        # 1. read: children, pods, server.
        secret_set = self._secret_sets.get(run.metadata.uid or name, prev.get("secretSet") or "")
        actual: dict[tuple[str, str], Obj | None] = {}
        refused = ""
        pod_defaults = self.cfg.pod_defaults
        if not first:
            config, deployment = await asyncio.gather(
                self.kube.get("v1", "ConfigMap", ns, config_name(run)),
                self.kube.get("apps/v1", "Deployment", ns, server_name(run)),
            )
            if (
                prev_phase == Phase.RUNNING
                and _owner_ok(config, run)
                and _owner_ok(deployment, run)
            ):
                run, refused = applied_run(run, config, deployment)
                pod_defaults = applied_pod_defaults(deployment, pod_defaults)
            if deployment is None and not final:
                secret_set = await self._new_secret_set(run, prev, first)
            manifests = render_run(
                run,
                operator_namespace=self.cfg.operator_namespace,
                pod_defaults=pod_defaults,
                secret_set=secret_set,
            )
            known = {
                ("ConfigMap", config_name(run)): config,
                ("Deployment", server_name(run)): deployment,
            }
            actual = await self._fetch(ns, manifests, known)
        else:
            secret_set = await self._new_secret_set(run, prev, first)
            manifests = render_run(
                run,
                operator_namespace=self.cfg.operator_namespace,
                pod_defaults=pod_defaults,
                secret_set=secret_set,
            )
        manifests_by_key = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
        conflicts = [key for key, obj in actual.items() if not _owner_ok(obj, run)]

        pods: list[Obj] = []
        if not first and not final:
            pods = await self.kube.list(
                "v1",
                "Pod",
                ns,
                f"{c.LABEL_RUN}={name},{c.LABEL_COMPONENT}={c.COMPONENT_HOSPITAL}",
            )
        job_uids = {
            str(obj["metadata"].get("uid"))
            for (kind, _), obj in actual.items()
            if kind == "Job" and obj is not None and (kind, _) not in conflicts
        }
        facts = _pod_facts(pods, job_uids)
        hospitals = {}
        for h in run.spec.hospitals:
            job_name = f"{run.name}-{h.name}"
            job = actual.get(("Job", job_name))
            hospitals[h.name] = observe_job(
                h.name,
                job_name,
                job if ("Job", job_name) not in conflicts else None,
                facts.get(h.name, (0, "")),
            )
        read = ServerRead()
        # A run being suspended is read once more: what its server spent is carried over.
        if not first and not final and not (run.spec.suspend and prev_phase == Phase.SUSPENDED):
            url = self.cfg.status_url(server_name(run), ns)
            read = await read_server(await self.http(), url, self.cfg.server_timeout_seconds)
        planned = await asyncio.to_thread(plans, run, read.report) if read.report else {}

        # 2. decide.
        obs = Observation(
            now=now,
            server=read.report,
            server_error=read.error,
            server_invalid=read.invalid,
            hospitals=hospitals,
            spec_refused=refused,
            planned=planned,
            conflicts=[conflict_text(kind, child) for kind, child in conflicts],
        )
        decision = decide(
            run, prev, obs, epsilon, succeeded_grace_s=self.cfg.succeeded_grace_seconds
        )
        outcome = Outcome(status=decision.status, events=list(decision.events))
        if charges_budgets:
            await self._settle_budgets(run, decision, prev, obs, first, now, admitted_now, outcome)

        # 3. write.
        if decision.delete_run:
            await self.kube.delete(c.API_VERSION, c.KIND, ns, name)
            outcome.deleted = True
            outcome.events.append(
                Event("Normal", Reason.EXPIRED, "ttlSecondsAfterFinished passed; deleting the run")
            )
            return outcome
        phase = decision.status.get("phase", "")
        if phase in FINAL_PHASES:
            if decision.stop:  # a Succeeded run's processes first get time to end
                await self._stop(ns, run, actual, first)
        else:
            found = await self._apply(
                ns, run, manifests_by_key, actual, first, outcome, now, secret_set
            )
            if found:
                # Someone else's object holds a child's name: the run fails, and what it
                # did create is stopped.
                obs = replace(obs, conflicts=[conflict_text(k, n) for k, n in found])
                decision = decide(
                    run, prev, obs, epsilon, succeeded_grace_s=self.cfg.succeeded_grace_seconds
                )
                outcome.status = decision.status
                outcome.events += decision.events
                known = {key: None for key in found}
                await self._stop(ns, run, await self._fetch(ns, manifests, known), False)
        if decision.status != prev:
            if first:
                decision.status.setdefault("startTime", rfc3339(now))
            await self.kube.patch_status(c.API_VERSION, c.KIND, ns, name, decision.status)
        self._observe(run, decision.status, now)
        return outcome

    async def _wait_for_budget(
        self, run: FederatedRun, prev: Obj, refusals: list[budgets.Refusal], now: datetime
    ) -> Outcome:
        """Some budget cannot admit the run: it stays Pending with ``BudgetUnavailable`` and
        nothing of it is created; the follow-up timer asks again (a raised limit, an ended
        run's release or a new budget admits it)."""
        generation = run.metadata.generation
        message = clip(
            "waiting for privacy budget: " + "; ".join(refusal.text for refusal in refusals)
        )
        previous = prev.get("conditions", [])
        stamp = rfc3339(now)
        status: Obj = {
            "phase": Phase.PENDING,
            "message": message,
            "observedGeneration": generation,
            "conditions": [
                *phase_conditions(
                    Phase.PENDING, Reason.BUDGET_UNAVAILABLE, message, stamp, generation, previous
                ),
                condition(
                    ConditionType.BUDGET_UNAVAILABLE,
                    True,
                    refusals[0].refused.reason,
                    message,
                    stamp,
                    generation,
                    previous,
                ),
            ],
            "round": {"current": 0, "total": run.spec.rounds},
            "progress": f"0/{run.spec.rounds}",
            "budgets": budgets.budget_rows(run, "Waiting"),
        }
        status = {k: v for k, v in status.items() if v is not None}
        outcome = Outcome(status=status)
        if status != prev:
            await self.kube.patch_status(
                c.API_VERSION, c.KIND, run.metadata.namespace, run.name, status
            )
        was_waiting = any(
            x.get("type") == ConditionType.BUDGET_UNAVAILABLE and x.get("status") == "True"
            for x in previous
        )
        if not was_waiting:
            outcome.events.append(Event("Warning", Reason.BUDGET_UNAVAILABLE, message))
        self._observe(run, status, now)
        return outcome

    async def _settle_budgets(
        self,
        run: FederatedRun,
        decision: Decision,
        prev: Obj,
        obs: Observation,
        first: bool,
        now: datetime,
        admitted_now: bool,
        outcome: Outcome,
    ) -> None:
        """Charge the run's budgets what it has spent (only when that changed), release them
        once it is final, and say so in ``status`` (``budgets``, ``BudgetUnavailable=False``).

        A final run is released on its final history only when this pass read it from the
        server and the run ended between rounds
        (:func:`fedrun_core.budgets.final_history_is_whole`); otherwise (it failed, possibly
        mid-round; the server could not be read; the release is retried on a later pass)
        it ended unseen, and stays Unsettled. One that ended on its first pass created
        nothing: its reservations are withdrawn.
        """
        uid = run.metadata.uid or run.name
        status = decision.status
        final = status.get("phase") in FINAL_PHASES
        if final and budgets.released(status):
            return  # released on an earlier pass
        spent = {name: [list(e) for e in h] for name, h in decision.histories.items()}
        end: budgets.End = None
        if final:
            whole = obs.server is not None and final_history_is_whole(status)
            end = "withdrawn" if first else "seen" if whole else "unseen"
        key = json.dumps([spent, end], sort_keys=True)
        if self._charged.get(uid) != key and (spent or end):
            if not await self.budgets.settle(run, spent, now, end):
                return  # tried again on the next pass; the status keeps the rows it had
            self._charged[uid] = key
        state = "Reserved" if not final else "Unsettled" if end == "unseen" else "Released"
        status["budgets"] = budgets.budget_rows(run, state)
        names = ", ".join(sorted(set(budgets.refs(run).values())))
        message = {
            "Reserved": f"reserved ε={run.spec.privacy.target_epsilon:g} at PrivacyBudget {names}",
            "Released": f"released the unspent part of the reservation at PrivacyBudget {names}",
            "Unsettled": (
                f"the run ended without a final history from its server: its whole reservation "
                f"stays spent at PrivacyBudget {names}"
            ),
        }[state]
        held = condition(
            ConditionType.BUDGET_UNAVAILABLE,
            False,
            Reason.BUDGET_RESERVED,
            message,
            rfc3339(now),
            run.metadata.generation,
            prev.get("conditions", []),
        )
        status["conditions"] = [
            *(x for x in status.get("conditions", []) if x.get("type") != held["type"]),
            held,
        ]
        if admitted_now:
            outcome.events.append(Event("Normal", Reason.BUDGET_RESERVED, message))

    async def _refuse_changed_terms(
        self, body: Mapping[str, Any], run: FederatedRun, prev: Obj, why: str, now: datetime
    ) -> Outcome:
        """The run's spec names budget terms other than those it was admitted on: it fails
        (InvalidSpec), and the budgets it was admitted at keep what it may have spent
        (Unsettled: the run may have trained, and its server is not read here)."""
        names = budgets.recorded(prev)
        if names and not await self.budgets.settle(run, {}, now, "unseen", names=names):
            raise RuntimeError(f"cannot settle the PrivacyBudgets of run {run.name}; retrying")
        rows = [{**r, "state": "Unsettled"} for r in prev.get("budgets") or []]
        return await self._refuse(body, prev, SpecError([why]), now, {"budgets": rows})

    async def settle_deleted(self, body: Mapping[str, Any]) -> None:
        """A deleted run: what it still holds at its budgets. A run that waited takes back
        any half-made reservation; one that was admitted and had not been released ended
        unseen (Unsettled: its history may lag what it spent)."""
        status = dict(body.get("status") or {})
        if not status.get("budgets") or budgets.released(status):
            return
        try:
            run = parse_run(_clean_run(body))
        except SpecError:
            return
        uid = run.metadata.uid or run.name
        async with self._locks.setdefault(uid, asyncio.Lock()):
            names = budgets.recorded(status)
            if not budgets.admitted(status):
                await self.budgets.settle(run, {}, datetime.now(UTC), "withdrawn", names=names)
                return
            await self.budgets.settle(run, {}, datetime.now(UTC), "unseen", names=names)

    async def _fetch(
        self, ns: str, manifests: list[Obj], known: dict[tuple[str, str], Obj | None]
    ) -> dict[tuple[str, str], Obj | None]:
        """Each rendered child as it is now (None: absent); ``known`` ones are not read again."""
        keys = [(m["kind"], m["metadata"]["name"]) for m in manifests]
        fetched = await asyncio.gather(
            *(
                _done(known[key])
                if key in known
                else self.kube.get(m["apiVersion"], m["kind"], ns, m["metadata"]["name"])
                for key, m in zip(keys, manifests, strict=True)
            )
        )
        return dict(zip(keys, fetched, strict=True))

    async def _apply(
        self,
        ns: str,
        run: FederatedRun,
        manifests: dict[tuple[str, str], Obj],
        actual: dict[tuple[str, str], Obj | None],
        first: bool,
        outcome: Outcome,
        now: datetime,
        secret_set: str,
    ) -> list[tuple[str, str]]:
        """Create what is missing and set drifted children back (in render order).

        When the server Deployment is about to be created (the first pass, or it is
        missing), a secure run's Secrets are created first, with the other early children.
        Returns the children whose name another object holds (nothing is done to those;
        when an early child is among them, no pod is created).
        """
        conflicts: list[tuple[str, str]] = []

        async def one(key: tuple[str, str], desired: Obj) -> None:
            current = actual.get(key)
            if first:
                try:
                    await self.kube.create(desired)
                    outcome.created.append(f"{key[0]}/{key[1]}")
                    return
                except ConflictError:
                    current = await self.kube.get(
                        desired["apiVersion"], desired["kind"], ns, desired["metadata"]["name"]
                    )
            if not _owner_ok(current, run):
                conflicts.append(key)
                return
            plan = plan_child(desired, current)
            if plan.action == Action.NONE:
                return
            if plan.action == Action.CREATE:
                try:
                    await self.kube.create(desired)
                except ConflictError:
                    return  # created meanwhile by a concurrent pass; the next pass checks it
                outcome.created.append(f"{key[0]}/{key[1]}")
                if not first:
                    outcome.events.append(
                        Event("Warning", Reason.CHILD_RECREATED, f"{key[0]} {key[1]} was missing")
                    )
                return
            what = f"{key[0]} {key[1]} ({', '.join(plan.drift)})"
            if plan.action == Action.REPLACE:
                await self.kube.delete(desired["apiVersion"], desired["kind"], ns, key[1])
                outcome.events.append(Event("Warning", Reason.CHILD_REPLACED, f"{what} drifted"))
            else:
                assert plan.patch is not None
                await self.kube.patch(
                    desired["apiVersion"], desired["kind"], ns, key[1], plan.patch
                )
                outcome.events.append(Event("Warning", Reason.CHILD_REPAIRED, f"{what} set back"))
            outcome.repaired.append(f"{key[0]}/{key[1]}")

        # ConfigMap, Service, ServiceAccounts and Secrets first: the pods mount and use them.
        early = [k for k in manifests if k[0] not in ("Deployment", "Job")]
        late = [k for k in manifests if k[0] in ("Deployment", "Job")]
        server_missing = first or actual.get(("Deployment", server_name(run))) is None
        secrets = (
            [self._create_secrets(ns, run, now, outcome, secret_set)]
            if server_missing and not security.is_insecure(run)
            else []
        )
        await asyncio.gather(*secrets, *(one(k, manifests[k]) for k in early))
        if conflicts:
            return conflicts
        await asyncio.gather(*(one(k, manifests[k]) for k in late))
        return conflicts

    async def _new_secret_set(self, run: FederatedRun, prev: Obj, first: bool) -> str:
        """Name the material set the Secrets about to be created belong to, and record it in
        the run's status before any of them exists (see the module docstring).

        A set this process made whole itself is kept (its Secrets are checked again by
        :meth:`_create_secrets`). Otherwise the run's very first pass takes the empty set
        (names without a suffix); any later one, or a first pass repeated after a failure,
        a new random suffix, so a set is always made whole from one material and never
        mixed with Secrets left by an earlier pass. An insecure run has no Secrets: its set
        stays as it is.
        """
        uid = run.metadata.uid or run.name
        current = self._secret_sets.get(uid, prev.get("secretSet") or "")
        if security.is_insecure(run):
            return current
        if uid in self._complete_sets:  # a whole set this process made: build on it
            return self._complete_sets[uid]
        earlier = not first or "secretSet" in prev or uid in self._secret_sets
        new = secrets.token_hex(3) if earlier else ""
        await self.kube.patch_status(
            c.API_VERSION, c.KIND, run.metadata.namespace, run.name, {"secretSet": new}
        )
        self._secret_sets[uid] = new
        return new

    async def _create_secrets(
        self, ns: str, run: FederatedRun, now: datetime, outcome: Outcome, secret_set: str
    ) -> None:
        """Create the run's Secrets of the set ``secret_set``: the server's, then each
        hospital's, all from one new material.

        Every create answered 201 makes the set whole. Every one answered 409 for a set
        this process made whole before means it is intact and kept. Anything else means the
        set holds Secrets of material this pass did not make (an earlier pass stopped
        half-way, a deleted run of the same name not yet collected, a Secret deleted by
        hand, or this pass's own create retried after a lost answer: the operator may not
        read Secrets, so it cannot tell which): the set is abandoned with
        :class:`SecretSetTakenError`, and the next pass makes a new one under new names.
        """
        uid = run.metadata.uid or run.name
        material = pki.generate(
            run.name,
            ns,
            [h.name for h in run.spec.hospitals],
            now=now,
            valid_for=pki.lifetime(run.spec.active_deadline_seconds),
        )
        made: list[str] = []
        kept: list[str] = []
        for secret in security.secret_manifests(run, material, secret_set):
            name = secret["metadata"]["name"]
            try:
                await self.kube.create(secret)
            except ConflictError:
                kept.append(name)
                continue
            made.append(name)
            outcome.created.append(f"Secret/{name}")
        whole_before = self._complete_sets.get(uid) == secret_set
        if not kept or (whole_before and not made):
            self._complete_sets[uid] = secret_set
            return
        self._complete_sets.pop(uid, None)
        raise SecretSetTakenError(
            f"run {run.name}: Secrets {', '.join(kept)} existed and "
            f"{', '.join(made) or 'none'} were made now; they may hold other material, so the "
            "next pass makes a new set"
        )

    async def _stop(
        self, ns: str, run: FederatedRun, actual: dict[tuple[str, str], Obj | None], first: bool
    ) -> None:
        """A final run: its server to zero replicas, its Jobs still running suspended (only
        children this run owns are touched)."""
        if first:
            return
        server = server_name(run)
        dep = actual.get(("Deployment", server))
        if dep is not None and _owner_ok(dep, run) and dep.get("spec", {}).get("replicas") != 0:
            await self.kube.patch("apps/v1", "Deployment", ns, server, {"spec": {"replicas": 0}})
        for (kind, name), obj in actual.items():
            if kind != "Job" or obj is None or not _owner_ok(obj, run):
                continue
            st = obj.get("status", {})
            done = any(
                cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed")
                for cond in st.get("conditions", [])
            )
            if not done and not obj.get("spec", {}).get("suspend"):
                await self.kube.patch("batch/v1", "Job", ns, name, {"spec": {"suspend": True}})

    async def _refuse(
        self,
        body: Mapping[str, Any],
        prev: Obj,
        err: SpecError,
        now: datetime,
        extra: Obj | None = None,
    ) -> Outcome:
        """A stored spec the models refuse (the CRD should have): fail the run, say why
        (``extra``: more of the status, written with it)."""
        meta = body["metadata"]
        message = f"invalid spec: {err}"
        generation = meta.get("generation")
        status: Obj = {
            "phase": Phase.FAILED,
            "message": message,
            "observedGeneration": generation,
            "conditions": phase_conditions(
                Phase.FAILED,
                Reason.INVALID_SPEC,
                message,
                rfc3339(now),
                generation,
                prev.get("conditions", []),
            ),
            "completionTime": rfc3339(now),
        }
        status = {k: v for k, v in status.items() if v is not None} | (extra or {})
        outcome = Outcome(status=status)
        if prev.get("phase") in FINAL_PHASES:
            return outcome
        await self.kube.patch_status(
            c.API_VERSION, c.KIND, meta.get("namespace", c.DEFAULT_NAMESPACE), meta["name"], status
        )
        outcome.events.append(Event("Warning", Reason.INVALID_SPEC, message))
        return outcome

    def _observe(self, run: FederatedRun, status: Obj, now: datetime) -> None:
        uid = run.metadata.uid or run.name
        current = int((status.get("round") or {}).get("current") or 0)
        last = self.progress.get(uid)
        if last is None or last[0] != current:
            self.progress[uid] = (current, now.timestamp())
        metrics.observe_run(
            run.namespace,
            run.name,
            run.spec_dict(),
            status,
            self.progress[uid][1],
        )
        self.phases[uid] = str(status.get("phase") or Phase.PENDING)
        metrics.count_phases(list(self.phases.values()))


async def _done(value: Obj | None) -> Obj | None:
    return value

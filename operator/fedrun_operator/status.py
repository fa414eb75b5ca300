"""From what the operator observed to the FederatedRun's ``.status``: pure functions.

:func:`decide` takes the run, its previous status, the server's ``/status`` (if it could be
read) and the hospital Jobs' state, and returns the new status, the Events to post and
what to do (stop the run's processes, delete an expired run). It reads no clock and does
no I/O: ``now`` comes in with the observation. Keys are camelCase, as stored.

Privacy: the operator computes every hospital's ε itself with its own RDP accountant
(:mod:`fedrun_core.accounting`), twice: from the (σ, q, steps) history the server
reports, and from the σ and q the *spec* implies for the hospital's row count (the plan,
``Observation.planned``) over the steps reported. It enforces the largest of these, the
server's own figure and the previous status (ε never goes down), flags a server whose
(σ, q) disagree with the plan (condition ``AccountingMismatch``), and ends the run
``BudgetExhausted`` before another round could take enough hospitals over
``targetEpsilon`` that fewer than ``minHospitals`` could go on.

What that protects against, and what not: the operator's figure does not depend on the σ,
q or ε the server reports, nor on the server's arithmetic, so a server that under-reports
them (a bug, or a tampered image) cannot hide spend. It still depends on the server's count
of steps and rows, and on the hospitals really training at the plan's σ: the operator
observes no gradient, so a server that under-counts steps, or a hospital whose own code
adds less noise, is outside what it can check (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fedrun_core.accounting import PlannedCost, over_target
from fedrun_core.api import FederatedRun
from fedrun_core.states import (
    FINAL_PHASES,
    NOT_JOINED_MESSAGE,
    STARTING_MESSAGE,
    ConditionStatus,
    ConditionType,
    HospitalState,
    Phase,
    Reason,
    condition,
    phase_conditions,
)
from fedrun_core.times import parse_time, rfc3339
from fedrun_operator.server_report import clip
from fedrun_render import security
from fedrun_render.identity import checkpoint_claim_name

Obj = dict[str, Any]

# Relative difference in σ or q that counts as a disagreement (the two calibrations agree
# to about 1e-12; a real mismatch is a different σ or another row count).
_PLAN_TOLERANCE = 1e-6


Accountant = Callable[[Sequence[tuple[float, float, int]], float], float]


@dataclass(frozen=True)
class HospitalObservation:
    """One hospital's Job (and its pods) as the API shows it."""

    name: str
    job_name: str
    job_exists: bool = True
    active: int = 0
    succeeded: int = 0
    failed_pods: int = 0
    complete: bool = False
    failed: bool = False
    failed_reason: str = ""
    failed_message: str = ""  # the Job's Failed condition's message
    restarts: int = 0
    message: str = ""  # the latest failed container's termination message, from its Pod


@dataclass(frozen=True)
class Observation:
    """Everything :func:`decide` looks at besides the run itself."""

    now: datetime
    server: Obj | None = None  # validated by fedrun_operator.server_report
    server_error: str = ""
    server_invalid: bool = False  # the server answered, with a /status the model refused
    hospitals: dict[str, HospitalObservation] = field(default_factory=dict)
    spec_refused: str = ""
    # Per hospital, what one round costs under the spec for the rows it reported.
    planned: dict[str, PlannedCost] = field(default_factory=dict)
    # Children whose name an object not owned by this run holds (each a sentence).
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the run."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    """The outcome of one reconcile."""

    status: Obj
    events: list[Event] = field(default_factory=list)
    stop: bool = False  # final or suspended: server to zero replicas, active Jobs suspended
    delete_run: bool = False  # ttlSecondsAfterFinished has passed
    #: Per hospital, the accountant history behind the ε the operator enforces (what the
    #: run's PrivacyBudgets are charged); empty for a run already final.
    histories: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- privacy


def _history(entry: Obj) -> list[tuple[float, float, int]]:
    """The accountant history the server reported for one hospital."""
    if entry.get("history"):
        return [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
    sigma, q, steps = entry.get("noiseMultiplier"), entry.get("sampleRate"), entry.get("steps")
    if sigma and q and steps:
        return [(float(sigma), float(q), int(steps))]
    return []


def _carried(
    entries: list[Obj], skip_lineage: str = ""
) -> dict[str, list[tuple[float, float, int]]]:
    """Histories spent by earlier server incarnations, per hospital, all lineages together
    but ``skip_lineage`` (the current server's, which its own history already holds)."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    for entry in entries:
        if skip_lineage and entry.get("lineage") == skip_lineage:
            continue
        history = [(float(s), float(q), int(n)) for s, q, n in entry["history"]]
        out[entry["name"]] = out.get(entry["name"], []) + history
    return out


def _steps(history: list[tuple[float, float, int]]) -> int:
    return sum(n for _, _, n in history)


def _carry_lineage(entries: list[Obj], lineage: str, rows: dict[str, Obj]) -> list[Obj]:
    """``entries`` with each hospital's history of ``lineage`` (from the status ``rows``)
    carried: added, or replacing a shorter record of the same lineage (never both)."""
    out = [dict(e) for e in entries]
    for name, row in sorted(rows.items()):
        history = _history({"history": row.get("history")})
        if not history:
            continue
        same = next((e for e in out if e["name"] == name and e.get("lineage") == lineage), None)
        if same is None:
            out.append({"name": name, "lineage": lineage, "history": [list(h) for h in history]})
        elif _steps(history) > _steps(_history({"history": same["history"]})):
            same["history"] = [list(h) for h in history]
    return out


def _own_histories(
    run: FederatedRun, prev: Obj, server: Obj | None
) -> tuple[str, list[Obj], dict[str, list[tuple[float, float, int]]]]:
    """The current lineage, the carried entries, and each hospital's history in the
    current server incarnation.

    A server names the chain of incarnations its history belongs to (``checkpoint.lineage``):
    one resumed from its checkpoint keeps its lineage and reports the whole history again;
    one that started over (its checkpoint lost with its pod) has a new lineage, and what the
    previous lineage spent is carried, so it keeps counting. While the server says no
    lineage (it is starting, or unreachable) the previous figures stand.
    """
    block = prev.get("privacy") or {}
    prev_lineage = str(block.get("lineage") or "")
    prev_rows = {h["name"]: h for h in block.get("hospitals", [])}
    server_lineage = str(((server or {}).get("checkpoint") or {}).get("lineage") or "")
    reported = {h["name"]: h for h in ((server or {}).get("privacy") or {}).get("hospitals", [])}
    entries = list(block.get("carried", []))
    if server_lineage and server_lineage != prev_lineage:
        # (An empty previous lineage: a server from before lineages, or an upgrade mid-run.)
        entries = _carry_lineage(entries, prev_lineage, prev_rows)
    lineage = server_lineage or prev_lineage
    own: dict[str, list[tuple[float, float, int]]] = {}
    for h in run.spec.hospitals:
        mine = _history(reported.get(h.name, {}))
        before = _history({"history": prev_rows.get(h.name, {}).get("history")})
        if not server_lineage and prev_lineage:
            mine = before
        elif server_lineage and server_lineage == prev_lineage and _steps(before) > _steps(mine):
            mine = before  # a server resumed from an older checkpoint: the round it lost counts
        own[h.name] = mine
    return lineage, entries, own


@dataclass(frozen=True)
class PrivacyView:
    """The privacy block, and per hospital: ε spent, ε after one more round, disagreements."""

    block: Obj | None
    spent: dict[str, float] = field(default_factory=dict)
    after_next: dict[str, float] = field(default_factory=dict)
    mismatches: dict[str, str] = field(default_factory=dict)
    histories: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)


def _differs(value: float, expected: float) -> bool:
    return abs(value - expected) > _PLAN_TOLERANCE * max(abs(expected), 1e-12)


def _mismatch(
    history: list[tuple[float, float, int]], per_round: int, plan: PlannedCost, rows: int
) -> str:
    """Why the reported history does not fit the plan; empty when it does."""
    sigma, q, steps = plan
    for s_, q_, _ in history:
        if _differs(s_, sigma) or _differs(q_, q):
            return (
                f"the server reports σ={s_:.6g}, q={q_:.6g}; for {rows} training rows the "
                f"spec implies σ={sigma:.6g}, q={q:.6g}"
            )
    if per_round and per_round != steps:
        return (
            f"the server reports {per_round} steps per round; for {rows} training rows the "
            f"spec implies {steps}"
        )
    return ""


def privacy_status(
    run: FederatedRun,
    prev: Obj,
    server: Obj | None,
    epsilon: Accountant,
    planned: dict[str, PlannedCost] | None = None,
) -> PrivacyView:
    """The privacy block and what the stop rules need (see the module docstring).

    Each hospital's ε is the largest of: what the server reports; the operator's figure
    from the server's (σ, q, steps) plus anything carried over from before a resume; the
    operator's figure at the plan's (σ, q) over the same number of steps; and what the
    previous status showed (ε never goes down). ε after one more round is likewise the
    larger of the two projections.

    The operator's accountant is RDP. For a run that uses the PRV accountant (tighter than
    RDP), the operator's figure is shown (``epsilonOperator``) but not enforced: the hospitals
    calibrate σ so that the run ends at the target under PRV, and RDP would stop it early.
    """
    p = run.spec.privacy
    if not p.enabled:
        return PrivacyView(None)
    planned = planned or {}
    lineage, entries, own_histories = _own_histories(run, prev, server)
    carried = _carried(entries, skip_lineage=lineage)
    reported = {h["name"]: h for h in ((server or {}).get("privacy") or {}).get("hospitals", [])}
    previous = {h["name"]: h for h in (prev.get("privacy") or {}).get("hospitals", [])}
    view = PrivacyView(None)
    rows: list[Obj] = []
    rdp = p.accountant == "rdp"
    for h in run.spec.hospitals:
        entry = reported.get(h.name, {})
        own_history = own_histories[h.name]
        history = carried.get(h.name, []) + own_history
        plan = planned.get(h.name)
        # The hospital's ledger may hold steps no server recorded (a reply lost with a
        # server that started over): the account is topped up to what the ledger holds.
        deficit = int(entry.get("ledgerSteps") or 0) - _steps(history)
        if deficit > 0 and (plan is not None or history):
            sigma, q = (plan[0], plan[1]) if plan is not None else history[-1][:2]
            history = [*history, (sigma, q, deficit)]
        steps = sum(n for _, _, n in history)
        own = epsilon(history, p.delta) if history else 0.0
        charged = history
        if plan is not None and steps:
            by_plan = epsilon([(plan[0], plan[1], steps)], p.delta)
            if by_plan > own:
                own, charged = by_plan, [(plan[0], plan[1], steps)]
        if charged:
            view.histories[h.name] = charged
        enforced = own if rdp else 0.0
        eps = max(enforced, float(entry.get("epsilon") or 0.0))
        eps = max(eps, float(previous.get(h.name, {}).get("epsilon") or 0.0))
        view.spent[h.name] = eps
        if rdp:
            projections: list[float] = []
            if history:
                sigma, q, _ = history[-1]
                per_round = int(entry.get("stepsPerRound") or _steps_per_round(run, history))
                projections.append(epsilon([*history, (sigma, q, per_round)], p.delta))
            if plan is not None:
                projections.append(epsilon([*history, plan], p.delta))
                projections.append(epsilon([(plan[0], plan[1], steps + plan[2])], p.delta))
            if projections:
                view.after_next[h.name] = max(projections)
        row: Obj = {"name": h.name, "epsilon": round(eps, 6), "epsilonOperator": round(own, 6)}
        for key in (
            "noiseMultiplier",
            "sampleRate",
            "steps",
            "stepsPerRound",
            "numTrain",
            "ledgerSteps",
        ):
            if entry.get(key) is not None:
                row[key] = entry[key]
        if own_history:
            row["history"] = [list(e) for e in own_history]  # this server lineage's own
        if history:
            row["steps"] = steps
        if plan is not None:
            row["plannedNoiseMultiplier"], row["plannedSampleRate"] = plan[0], plan[1]
            why = _mismatch(
                history, int(entry.get("stepsPerRound") or 0), plan, int(entry.get("numTrain") or 0)
            )
            if why:
                view.mismatches[h.name] = why
                row["accountingMismatch"] = why
        rows.append(row)
    block: Obj = {
        "epsilonSpent": round(max(view.spent.values(), default=0.0), 6),
        "targetEpsilon": p.target_epsilon,
        "delta": p.delta,
        "hospitals": rows,
    }
    if lineage:
        block["lineage"] = lineage
    if entries:
        block["carried"] = entries
    return PrivacyView(block, view.spent, view.after_next, view.mismatches, view.histories)


def _steps_per_round(run: FederatedRun, history: list[tuple[float, float, int]]) -> int:
    """Steps one more round would take: 1/q steps per local epoch (Opacus' Poisson sampling)."""
    _, q, _ = history[-1]
    return max(1, round(1.0 / q)) * run.spec.training.local_epochs


# --------------------------------------------------------------------------- hospitals


def hospital_rows(
    run: FederatedRun, server: Obj | None, obs: Observation, prev: Obj | None = None
) -> list[Obj]:
    """Per-hospital state: the server's view, corrected by what the Jobs say.

    A hospital's restarts never go down, and the last termination message its container
    wrote is kept in ``lastFailure``: the Job controller deletes a crash-looping Pod when
    the Job reaches its backoffLimit, before it marks the Job Failed, so by then only the
    status remembers why the hospital failed.
    """
    reported = {h["name"]: h for h in (server or {}).get("hospitals", [])}
    before = {h["name"]: h for h in (prev or {}).get("hospitals", [])}
    rows: list[Obj] = []
    for h in run.spec.hospitals:
        job = obs.hospitals.get(h.name)
        row: Obj = {
            "name": h.name,
            "jobName": job.job_name if job else f"{run.name}-{h.name}",
            "state": HospitalState.PENDING,
            "restarts": 0,
        }
        src = reported.get(h.name, {})
        for key in ("state", "restarts", "epsilon", "message", "data"):
            if src.get(key) is not None:
                row[key] = src[key]
        if isinstance(row.get("message"), str):
            row["message"] = clip(row["message"])
        old = before.get(h.name, {})
        last_failure = str(old.get("lastFailure") or "")
        if job is not None:
            row["restarts"] = max(
                int(row.get("restarts") or 0),
                int(old.get("restarts") or 0),
                job.restarts,
                job.failed_pods,
            )
            last_failure = clip(job.message) if job.message else last_failure
            if job.failed:
                row["state"] = HospitalState.FAILED
                row["message"] = clip(
                    last_failure
                    or job.failed_message
                    or f"Job {job.job_name} failed ({job.failed_reason or 'no reason given'})"
                )
            elif job.complete and row["state"] != HospitalState.FAILED:
                row["state"] = HospitalState.DONE
        if last_failure:
            row["lastFailure"] = last_failure
        rows.append(row)
    return rows


def _never_joined(rows: list[Obj]) -> None:
    """In a run that ended, a hospital still Pending with nothing said about it (or only
    that it was starting) never connected: it is shown as NotJoined, as the server does."""
    for row in rows:
        if row["state"] == HospitalState.PENDING and row.get("message") in (
            None,
            "",
            STARTING_MESSAGE,
        ):
            row["state"] = HospitalState.NOT_JOINED
            row["message"] = NOT_JOINED_MESSAGE


# --------------------------------------------------------------------------- conditions


def conditions(
    prev: Obj, phase: str, reason: str, message: str, now: datetime, generation: int | None
) -> list[Obj]:
    """The phase conditions (:func:`fedrun_core.states.phase_conditions`) after ``prev``."""
    return phase_conditions(
        phase, reason, message, rfc3339(now), generation, prev.get("conditions", [])
    )


# --------------------------------------------------------------------------- decide


def _deadline(start: str, seconds: int) -> datetime:
    began = parse_time(start)
    assert began is not None
    return began + timedelta(seconds=seconds)


def _carry_over(privacy: Obj, prev: Obj, server: Obj | None) -> list[Obj]:
    """Histories to carry into the next server incarnation: earlier ones plus this one's."""
    carried = _carried((prev.get("privacy") or {}).get("carried", []))
    source = server if server is not None else prev  # the server may be gone already
    reported = {h["name"]: h for h in ((source or {}).get("privacy") or {}).get("hospitals", [])}
    out: list[Obj] = []
    for row in privacy["hospitals"]:
        name = row["name"]
        history = carried.get(name, []) + _history(reported.get(name, {}))
        if history:
            out.append({"name": name, "history": [list(h) for h in history]})
    return out


def _server_reason(server: Obj) -> str:
    for cond in server.get("conditions", []):
        if cond.get("status") == ConditionStatus.TRUE and cond.get("type") == server.get("phase"):
            return str(cond.get("reason") or server.get("phase"))
    return str(server.get("phase") or Phase.PENDING)


#: Seconds a Succeeded run's processes get to end by themselves before the server is scaled
#: to zero and unfinished Jobs are suspended: the hospitals exit 0 once the server said the
#: run is over, and their Jobs then end Complete rather than cut short.
SUCCEEDED_GRACE_S = 60.0


def decide(
    run: FederatedRun,
    prev: Obj,
    obs: Observation,
    epsilon: Accountant,
    *,
    succeeded_grace_s: float = SUCCEEDED_GRACE_S,
) -> Decision:
    """The new status of `run`, the Events to post, and what to stop or delete.

    A Failed or BudgetExhausted (or Suspended) run is stopped at once; a Succeeded one only
    ``succeeded_grace_s`` after its completionTime (see :data:`SUCCEEDED_GRACE_S`).

    An insecure run (`spec.security.insecure: true`) also carries `Insecure=True`, and gets
    a Warning Event the first time the condition appears.
    """

    spec = run.spec
    now = obs.now
    prev_phase = prev.get("phase") or ""
    generation = run.metadata.generation
    events: list[Event] = []

    # A final run stays final; only its expiry is left to decide.
    if prev_phase in FINAL_PHASES:
        done_at = parse_time(prev.get("completionTime"))
        ttl = spec.ttl_seconds_after_finished
        expired = (
            ttl is not None and done_at is not None and now >= done_at + timedelta(seconds=ttl)
        )
        stop = prev_phase != Phase.SUCCEEDED or (
            done_at is None or now >= done_at + timedelta(seconds=succeeded_grace_s)
        )
        return Decision(status=dict(prev), stop=stop, delete_run=expired)

    server = obs.server
    pv = privacy_status(run, prev, server, epsilon, obs.planned)
    privacy, spent, after_next = pv.block, pv.spent, pv.after_next
    hospitals = hospital_rows(run, server, obs, prev)
    rnd = (server or {}).get("round") or prev.get("round") or {"current": 0, "total": spec.rounds}
    rnd = {"current": min(int(rnd.get("current", 0)), spec.rounds), "total": spec.rounds}

    phase: str = Phase.PENDING
    reason: str = Reason.CHILDREN_CREATED
    message = "waiting for the server to start"
    if server is not None:
        phase = str(server.get("phase") or Phase.PENDING)
        reason = _server_reason(server)
        message = str(server.get("message") or "")
    elif obs.server_invalid:
        phase = Phase.RUNNING if prev_phase == Phase.RUNNING else Phase.PENDING
        reason = Reason.SERVER_STATUS_INVALID
        message = f"the server's status was refused: {obs.server_error}"
    elif obs.server_error and prev_phase == Phase.RUNNING:
        phase, reason = Phase.RUNNING, Reason.SERVER_UNREACHABLE
        message = f"cannot read the server's status: {obs.server_error}"
    elif obs.server_error:
        message = f"waiting for the server: {obs.server_error}"
    message = clip(message)
    if server is None and prev_phase == Phase.SUSPENDED and not spec.suspend:
        reason = Reason.RESUMED
        message = (
            "resumed: the server goes on after the last round in its checkpoint on claim "
            f"{checkpoint_claim_name(run)}"
            if _keeps_checkpoint(run)
            else "resumed: the server restarts training from round 0; ε spent so far still counts"
        )

    start = prev.get("startTime") or (server or {}).get("startTime") or rfc3339(now)

    # The operator's own stop rules, strongest first.
    failed = [h for h in hospitals if h["state"] == HospitalState.FAILED]
    target = spec.privacy.target_epsilon
    if obs.conflicts:
        phase, reason = Phase.FAILED, Reason.CHILD_CONFLICT
        message = clip("; ".join(obs.conflicts))
    elif spec.suspend:
        phase, reason = Phase.SUSPENDED, Reason.SUSPENDED
        message = (
            f"suspended at round {rnd['current']}/{spec.rounds}; on resume the server goes on "
            "after the last round in its checkpoint on claim "
            f"{checkpoint_claim_name(run)}"
            if _keeps_checkpoint(run)
            else f"suspended at round {rnd['current']}/{spec.rounds}; on resume the server "
            "restarts training from round 0 (its checkpoint is on the server pod's own volume, "
            "which goes with the pod) and the ε already spent keeps counting against the budget"
        )
    elif spec.active_deadline_seconds is not None and now >= _deadline(
        start, spec.active_deadline_seconds
    ):
        phase, reason = Phase.FAILED, Reason.DEADLINE_EXCEEDED
        message = (
            f"activeDeadlineSeconds ({spec.active_deadline_seconds}s) passed at round "
            f"{rnd['current']}/{spec.rounds}"
        )
    elif spec.privacy.enabled and any(over_target(e, target) for e in spent.values()):
        names = sorted(n for n, e in spent.items() if over_target(e, target))
        phase, reason = Phase.BUDGET_EXHAUSTED, Reason.BUDGET_EXCEEDED
        message = (
            f"ε of {', '.join(names)} is over targetEpsilon {target}: the operator stopped the run"
        )
    elif len(spec.hospitals) - len(failed) < spec.min_hospitals and phase not in FINAL_PHASES:
        phase, reason = Phase.FAILED, Reason.TOO_FEW_HOSPITALS
        failures = "; ".join(f"{h['name']}: {h.get('message', 'failed')}" for h in failed)
        message = (
            f"{len(failed)} of {len(spec.hospitals)} hospitals failed ({failures}); the other "
            f"{len(spec.hospitals) - len(failed)} cannot reach minHospitals {spec.min_hospitals}"
        )
    elif (
        spec.privacy.enabled
        and phase not in FINAL_PHASES
        and rnd["current"] < spec.rounds
        and after_next
    ):
        able = [
            h["name"]
            for h in hospitals
            if h["state"] != HospitalState.FAILED
            and not over_target(after_next.get(h["name"], 0.0), target)
        ]
        if len(able) < spec.min_hospitals:
            phase, reason = Phase.BUDGET_EXHAUSTED, Reason.BUDGET_WOULD_BE_EXCEEDED
            message = (
                f"stopped after round {rnd['current']}: another round would take all but "
                f"{len(able)} hospitals over targetEpsilon {target} (minHospitals is "
                f"{spec.min_hospitals})"
            )
    if obs.spec_refused and phase not in FINAL_PHASES:
        events.append(Event("Warning", Reason.SPEC_CHANGE_REFUSED, obs.spec_refused))

    message = clip(message)
    if obs.server_invalid and prev.get("message") != message:
        events.append(Event("Warning", Reason.SERVER_STATUS_INVALID, message))
    conds = conditions(prev, phase, reason, message, now, generation)
    insecure = security.insecure_condition(run, prev.get("conditions", []), now, generation)
    if insecure is not None:
        conds.append(insecure)
        if not _is_true(prev, ConditionType.INSECURE):
            events.append(Event("Warning", ConditionType.INSECURE, security.INSECURE_MESSAGE))
    if pv.mismatches:
        text = clip(
            "; ".join(f"{name}: {why}" for name, why in sorted(pv.mismatches.items()))
            + ". The operator enforces the larger ε."
        )
        conds.append(_mismatch_condition(prev, text, now, generation))
        if not _is_true(prev, ConditionType.ACCOUNTING_MISMATCH):
            events.append(Event("Warning", ConditionType.ACCOUNTING_MISMATCH, text))
    if phase in FINAL_PHASES:
        _never_joined(hospitals)
    status: Obj = {
        "phase": phase,
        "conditions": conds,
        "observedGeneration": generation,
        "startTime": start,
        "round": rnd,
        "progress": f"{rnd['current']}/{spec.rounds}",
        "hospitals": hospitals,
        "message": message,
    }
    if privacy is not None:
        if phase == Phase.SUSPENDED and prev_phase != Phase.SUSPENDED and "lineage" not in privacy:
            # A server that names no lineage: what it spent is carried at the suspend (with
            # a lineage, the resumed server's new or same lineage decides, see above).
            privacy["carried"] = _carry_over(privacy, prev, server)
        status["privacy"] = privacy
    metrics_block = (server or {}).get("metrics") or prev.get("metrics")
    if metrics_block:
        status["metrics"] = metrics_block
    mlflow_id = (server or {}).get("mlflowRunId") or prev.get("mlflowRunId")
    if mlflow_id:
        status["mlflowRunId"] = mlflow_id
    if phase in FINAL_PHASES:
        status["completionTime"] = (server or {}).get("completionTime") or rfc3339(now)
    if generation is None:
        del status["observedGeneration"]

    events += _events(prev, status, reason)
    stop = (phase in FINAL_PHASES and (phase != Phase.SUCCEEDED or succeeded_grace_s <= 0)) or (
        phase == Phase.SUSPENDED
    )
    return Decision(status=status, events=events, stop=stop, histories=pv.histories)


def _keeps_checkpoint(run: FederatedRun) -> bool:
    """Whether the run's checkpoint outlives its server Pod (spec.server.checkpointVolume)."""
    return run.spec.server is not None and run.spec.server.checkpoint_volume is not None


def _mismatch_condition(prev: Obj, message: str, now: datetime, generation: int | None) -> Obj:
    """``AccountingMismatch=True``; its time is kept while it stays True."""
    return condition(
        ConditionType.ACCOUNTING_MISMATCH,
        True,
        Reason.SERVER_DISAGREES_WITH_SPEC,
        message,
        rfc3339(now),
        generation,
        prev.get("conditions", []),
    )


def _is_true(prev: Obj, ctype: str) -> bool:
    """Whether the previous status has the condition `ctype` with status True."""
    return any(
        x.get("type") == ctype and x.get("status") == ConditionStatus.TRUE
        for x in prev.get("conditions", [])
    )


def _events(prev: Obj, status: Obj, reason: str) -> list[Event]:
    """Events for a phase change and for each hospital that newly failed."""
    out: list[Event] = []
    phase, old = status["phase"], prev.get("phase")
    if phase != old:
        kind = "Warning" if phase in (Phase.FAILED, Phase.BUDGET_EXHAUSTED) else "Normal"
        text = f"{old or 'New'} → {phase}: {status['message']}".rstrip(": ")
        out.append(Event(kind, reason, text))
    before = {h["name"]: h.get("state") for h in prev.get("hospitals", [])}
    for h in status["hospitals"]:
        if h["state"] == HospitalState.FAILED and before.get(h["name"]) != HospitalState.FAILED:
            out.append(
                Event(
                    "Warning",
                    Reason.HOSPITAL_FAILED,
                    f"hospital {h['name']} failed: {h.get('message', '')}".rstrip(": "),
                )
            )
    if status["phase"] == Phase.BUDGET_EXHAUSTED and old != Phase.BUDGET_EXHAUSTED:
        out.append(Event("Warning", Reason.BUDGET_STOP, status["message"]))
    return out

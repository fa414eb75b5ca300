"""The operator's Prometheus metrics (served on ``--metrics-port`` at ``/metrics``).

Two kinds:

- how the operator itself is doing: reconcile durations and errors, API requests and
  retries, runs by phase;
- one series per FederatedRun (labels ``namespace``, ``run``) mirroring its status, so the
  chart's alerts (run failed, budget would stop a run early, too few hospitals, round
  stalled, operator not reconciling) need only the operator as a scrape target, whatever
  network policy surrounds the run servers.

The per-run ``namespace`` label is the run's namespace, not the operator's: a scrape must
keep it (the chart's ServiceMonitor sets ``honorLabels: true``), or Prometheus renames it
``exported_namespace``. Names follow Prometheus' conventions (``promtool check metrics``):
only counters end in ``_total``.

Every metric lives in :data:`REGISTRY`; the chart's checks list it to prove that each
metric its alerts and dashboard query is one the operator exports.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fedrun_core.accounting import epsilon
from fedrun_core.states import HospitalState, Phase
from fedrun_core.times import parse_time

PHASES = tuple(Phase)

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_SECONDS = Histogram(
    "fedrun_operator_reconcile_duration_seconds",
    "Wall time of one reconcile of a FederatedRun, by handler.",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "fedrun_operator_reconcile_errors_total",
    "Reconciles that raised, by handler (kopf retries them).",
    ["handler"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "fedrun_operator_api_requests_total",
    "Requests the operator sent to the Kubernetes API, by verb and HTTP status code.",
    ["verb", "code"],
    registry=REGISTRY,
)
API_RETRIES = Counter(
    "fedrun_operator_api_retries_total",
    "Kubernetes API requests retried after a throttle, a 5xx or a connection error.",
    ["verb"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "fedrun_operator_leader",
    "1 while this operator process reconciles (it holds the leader Lease, or runs without "
    "leader election), 0 while it waits as a standby.",
    registry=REGISTRY,
)
RUNS = Gauge(
    "fedrun_operator_runs",
    "FederatedRuns this operator follows, by phase.",
    ["phase"],
    registry=REGISTRY,
)
LAST_RECONCILE = Gauge(
    "fedrun_operator_last_reconcile_timestamp_seconds",
    "Unix time at which this operator last finished reconciling a run (the chart's "
    "FedrunOperatorNotReconciling alert watches it advance).",
    registry=REGISTRY,
)

_RUN_LABELS = ["namespace", "run"]
RUN_PHASE = Gauge(
    "fedrun_operator_run_phase",
    "1 for the run's current phase, 0 for the others.",
    [*_RUN_LABELS, "phase"],
    registry=REGISTRY,
)
RUN_ROUND = Gauge(
    "fedrun_operator_run_round",
    "Last completed round of the run.",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_ROUNDS_PLANNED = Gauge(
    "fedrun_operator_run_rounds_planned",
    "Rounds the run asks for (spec.rounds).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_EPSILON_SPENT = Gauge(
    "fedrun_operator_run_epsilon_spent",
    "ε spent by the run (max over hospitals, the larger of the server's and the operator's).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_EPSILON_PROJECTED = Gauge(
    "fedrun_operator_run_epsilon_projected",
    "ε the run would have spent after its last planned round, at the (σ, q, steps per "
    "round) of its rounds so far (RDP runs that have taken a DP-SGD step; the max over "
    "hospitals). Above the target, the budget stops the run before its rounds are done.",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_EPSILON_TARGET = Gauge(
    "fedrun_operator_run_epsilon_target",
    "The run's privacy budget (spec.privacy.targetEpsilon).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_HOSPITALS_ACTIVE = Gauge(
    "fedrun_operator_run_hospitals_active",
    "Hospitals of the run that have not failed.",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_MIN_HOSPITALS = Gauge(
    "fedrun_operator_run_min_hospitals",
    "Fewest hospitals a round may proceed with (spec.minHospitals).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_LAST_PROGRESS = Gauge(
    "fedrun_operator_run_last_progress_timestamp_seconds",
    "Unix time at which the run last completed a round (or started).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_ROUND_TIMEOUT = Gauge(
    "fedrun_operator_run_round_timeout_seconds",
    "The run's spec.roundTimeoutSeconds (the round-stalled alert compares against it).",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_COMPLETION = Gauge(
    "fedrun_operator_run_completion_timestamp_seconds",
    "Unix time at which the run reached a final phase (status.completionTime); absent before.",
    _RUN_LABELS,
    registry=REGISTRY,
)
RUN_AUROC = Gauge(
    "fedrun_operator_run_auroc",
    "AUROC of the run's latest evaluated global model.",
    _RUN_LABELS,
    registry=REGISTRY,
)

_PER_RUN: tuple[Gauge, ...] = (
    RUN_ROUND,
    RUN_ROUNDS_PLANNED,
    RUN_EPSILON_SPENT,
    RUN_EPSILON_PROJECTED,
    RUN_EPSILON_TARGET,
    RUN_HOSPITALS_ACTIVE,
    RUN_MIN_HOSPITALS,
    RUN_LAST_PROGRESS,
    RUN_ROUND_TIMEOUT,
    RUN_COMPLETION,
    RUN_AUROC,
)


_BUDGET_LABELS = ["namespace", "budget", "hospital"]
BUDGET_EPSILON_LIMIT = Gauge(
    "fedrun_operator_budget_epsilon_limit",
    "A PrivacyBudget's lifetime ε (spec.epsilon).",
    _BUDGET_LABELS,
    registry=REGISTRY,
)
BUDGET_EPSILON_SPENT = Gauge(
    "fedrun_operator_budget_epsilon_spent",
    "A PrivacyBudget's lifetime ε spent: every run's accountant history composed (RDP).",
    _BUDGET_LABELS,
    registry=REGISTRY,
)
BUDGET_EPSILON_COMMITTED = Gauge(
    "fedrun_operator_budget_epsilon_committed",
    "A PrivacyBudget's ε committed: spent by ended runs plus the reservations of running ones.",
    _BUDGET_LABELS,
    registry=REGISTRY,
)


def observe_budget(
    namespace: str, name: str, hospital: str, limit: float, spent: float, committed: float
) -> None:
    """Set one PrivacyBudget's series (called whenever the operator reads or writes it)."""
    labels = (namespace, name, hospital)
    BUDGET_EPSILON_LIMIT.labels(*labels).set(limit)
    BUDGET_EPSILON_SPENT.labels(*labels).set(spent)
    BUDGET_EPSILON_COMMITTED.labels(*labels).set(committed)


def forget_budget(namespace: str, name: str, hospital: str) -> None:
    """Drop a deleted PrivacyBudget's series."""
    for gauge in (BUDGET_EPSILON_LIMIT, BUDGET_EPSILON_SPENT, BUDGET_EPSILON_COMMITTED):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name, hospital)


def observe_run(
    namespace: str,
    run: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    last_progress: float | None,
) -> None:
    """Set the run's series from its spec and (camelCase) status, as the operator wrote it.

    Also marks the operator as having reconciled just now
    (``fedrun_operator_last_reconcile_timestamp_seconds``).
    """
    phase = status.get("phase") or Phase.PENDING
    for p in PHASES:
        RUN_PHASE.labels(namespace, run, p).set(1.0 if p == phase else 0.0)
    rnd = status.get("round") or {}
    RUN_ROUND.labels(namespace, run).set(float(rnd.get("current") or 0))
    RUN_ROUNDS_PLANNED.labels(namespace, run).set(float(spec.get("rounds") or 0))
    privacy = status.get("privacy") or {}
    RUN_EPSILON_SPENT.labels(namespace, run).set(float(privacy.get("epsilonSpent") or 0.0))
    target = (spec.get("privacy") or {}).get("targetEpsilon")
    if target is not None:
        RUN_EPSILON_TARGET.labels(namespace, run).set(float(target))
    _set_or_remove(RUN_EPSILON_PROJECTED, projected_epsilon(spec, status), namespace, run)
    done = parse_time(status.get("completionTime"))
    _set_or_remove(RUN_COMPLETION, done.timestamp() if done else None, namespace, run)
    hospitals = status.get("hospitals") or []
    active = sum(1 for h in hospitals if h.get("state") != HospitalState.FAILED)
    RUN_HOSPITALS_ACTIVE.labels(namespace, run).set(float(active))
    RUN_MIN_HOSPITALS.labels(namespace, run).set(float(spec.get("minHospitals") or 0))
    if last_progress is not None:
        RUN_LAST_PROGRESS.labels(namespace, run).set(last_progress)
    RUN_ROUND_TIMEOUT.labels(namespace, run).set(float(spec.get("roundTimeoutSeconds") or 0))
    auroc = (status.get("metrics") or {}).get("auroc")
    if auroc is not None:
        RUN_AUROC.labels(namespace, run).set(float(auroc))
    LAST_RECONCILE.set(time.time())


def projected_epsilon(spec: dict[str, Any], status: dict[str, Any]) -> float | None:
    """ε the run would have spent after its last planned round, or None when unknown.

    Per hospital: its accountant history (what earlier server incarnations spent, then
    this one's), extended by the rounds still to come at the history's last (σ, q) and the
    steps per round it reported; and the same steps at the (σ, q) the spec implies, when
    the operator derived them. The run's figure is the largest, and never below what it
    has spent. A run calibrated to its budget ends at (just under) its target; one whose
    hospitals spend faster than planned projects above it, rounds before the budget stops
    it. None for runs without privacy, under the PRV accountant (its ε is tighter than
    RDP's, which would project over the target for healthy runs), or before any step.
    """
    privacy_spec = spec.get("privacy") or {}
    if not privacy_spec.get("enabled") or privacy_spec.get("accountant", "rdp") != "rdp":
        return None
    privacy = status.get("privacy") or {}
    delta = privacy.get("delta") or privacy_spec.get("delta")
    if not delta:
        return None
    remaining = max(
        0, int(spec.get("rounds") or 0) - int((status.get("round") or {}).get("current") or 0)
    )
    carried: dict[str, list[tuple[float, float, int]]] = {}
    for entry in privacy.get("carried") or []:  # one per hospital and earlier lineage
        name = str(entry.get("name"))
        carried[name] = carried.get(name, []) + [_entry(e) for e in entry.get("history") or []]
    local_epochs = int((spec.get("training") or {}).get("localEpochs") or 1)
    best: float | None = None
    for h in privacy.get("hospitals") or []:
        history = carried.get(str(h.get("name")), []) + [_entry(e) for e in h.get("history") or []]
        if not history or not history[-1][1] > 0:
            continue
        sigma, q, _ = history[-1]
        per_round = int(h.get("stepsPerRound") or 0) or max(1, round(1.0 / q)) * local_epochs
        try:
            figures = [epsilon([*history, (sigma, q, per_round * remaining)], float(delta))]
            plan_sigma, plan_q = h.get("plannedNoiseMultiplier"), h.get("plannedSampleRate")
            if plan_sigma and plan_q:
                steps = sum(n for _, _, n in history) + per_round * remaining
                figures.append(epsilon([(float(plan_sigma), float(plan_q), steps)], float(delta)))
        except ValueError:  # a figure the accountant refuses: no projection, no crash
            continue
        figure = max([*figures, float(h.get("epsilon") or 0.0)])
        best = figure if best is None else max(best, figure)
    return best


def _entry(entry: list[float]) -> tuple[float, float, int]:
    sigma, q, steps = entry
    return float(sigma), float(q), int(steps)


def _set_or_remove(gauge: Gauge, value: float | None, *labels: str) -> None:
    if value is None:
        _remove(gauge, *labels)
    else:
        gauge.labels(*labels).set(value)


def forget_run(namespace: str, run: str) -> None:
    """Drop every series of a deleted run."""
    for p in PHASES:
        _remove(RUN_PHASE, namespace, run, p)
    for gauge in _PER_RUN:
        _remove(gauge, namespace, run)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def count_phases(phases: list[str]) -> None:
    """Set ``fedrun_operator_runs`` from the phases of every run followed."""
    for p in PHASES:
        RUNS.labels(p).set(float(sum(1 for x in phases if x == p)))


def exported_names() -> set[str]:
    """Every sample name the operator can export (``_total``, ``_bucket`` … included)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
            names.add(family.name + "_created")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return names


def render() -> bytes:
    """The Prometheus text exposition of :data:`REGISTRY`."""
    return generate_latest(REGISTRY)

"""The operator's Prometheus metrics (served on ``--metrics-port`` at ``/metrics``).

Two kinds:

- how the operator itself is doing: reconcile durations and errors, API requests and
  retries, runs by phase;
- one series per FederatedRun (labels ``namespace``, ``run``) mirroring its status, so the
  chart's alerts (budget at 90 %, run failed, too few hospitals, round stalled) need only
  the operator as a scrape target, whatever network policy surrounds the run servers.

Every metric lives in :data:`REGISTRY`; the chart's checks list it to prove that each
metric its alerts and dashboard query is one the operator exports.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fedrun_core.states import HospitalState, Phase

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
RUNS = Gauge(
    "fedrun_operator_runs",
    "FederatedRuns this operator follows, by phase.",
    ["phase"],
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
RUN_ROUNDS_TOTAL = Gauge(
    "fedrun_operator_run_rounds_total",
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
RUN_AUROC = Gauge(
    "fedrun_operator_run_auroc",
    "AUROC of the run's latest evaluated global model.",
    _RUN_LABELS,
    registry=REGISTRY,
)

_PER_RUN: tuple[Gauge, ...] = (
    RUN_ROUND,
    RUN_ROUNDS_TOTAL,
    RUN_EPSILON_SPENT,
    RUN_EPSILON_TARGET,
    RUN_HOSPITALS_ACTIVE,
    RUN_MIN_HOSPITALS,
    RUN_LAST_PROGRESS,
    RUN_ROUND_TIMEOUT,
    RUN_AUROC,
)


def observe_run(
    namespace: str,
    run: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    last_progress: float | None,
) -> None:
    """Set the run's series from its spec and (camelCase) status."""
    phase = status.get("phase") or Phase.PENDING
    for p in PHASES:
        RUN_PHASE.labels(namespace, run, p).set(1.0 if p == phase else 0.0)
    rnd = status.get("round") or {}
    RUN_ROUND.labels(namespace, run).set(float(rnd.get("current") or 0))
    RUN_ROUNDS_TOTAL.labels(namespace, run).set(float(spec.get("rounds") or 0))
    privacy = status.get("privacy") or {}
    RUN_EPSILON_SPENT.labels(namespace, run).set(float(privacy.get("epsilonSpent") or 0.0))
    target = (spec.get("privacy") or {}).get("targetEpsilon")
    if target is not None:
        RUN_EPSILON_TARGET.labels(namespace, run).set(float(target))
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

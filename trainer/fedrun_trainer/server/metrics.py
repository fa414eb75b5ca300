"""The server's ``/metrics``: Prometheus text rendered from the published status and history.

Rendering from the files (rather than from counters updated in place) keeps one source
of truth: what ``/status`` says and what Prometheus scrapes cannot disagree.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fedrun_core.states import HospitalState, Phase

PHASES = tuple(Phase)
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def metric_families(status: dict[str, Any], history: dict[str, Any]) -> list[Metric]:
    """Every server metric for one run (pure: the same inputs give the same families)."""
    run = str(history.get("run", ""))
    out: list[Metric] = []

    phase = GaugeMetricFamily(
        "fedrun_run_phase", "1 for the run's current phase.", labels=["run", "phase"]
    )
    for p in PHASES:
        phase.add_metric([run, p], 1.0 if status.get("phase") == p else 0.0)
    out.append(phase)

    rnd = status.get("round") or {}
    cur = GaugeMetricFamily("fedrun_round_current", "Last completed round.", labels=["run"])
    cur.add_metric([run], float(rnd.get("current", 0)))
    planned = GaugeMetricFamily(
        "fedrun_rounds_planned", "Rounds requested (spec.rounds).", labels=["run"]
    )
    planned.add_metric([run], float(rnd.get("total", 0)))
    out += [cur, planned]

    privacy = status.get("privacy") or {}
    if privacy:
        spent = GaugeMetricFamily(
            "fedrun_epsilon_spent", "ε spent by each hospital.", labels=["run", "hospital"]
        )
        for h in privacy.get("hospitals", []):
            spent.add_metric([run, h["name"]], float(h.get("epsilon") or 0.0))
        target = GaugeMetricFamily("fedrun_epsilon_target", "The run's target ε.", labels=["run"])
        target.add_metric([run], float(privacy.get("targetEpsilon") or 0.0))
        out += [spent, target]

    metrics = status.get("metrics") or {}
    for key, name, help_text in (
        ("auroc", "auroc", "AUROC (mean of the hospitals' own, weighted by test rows)"),
        ("pooledAuroc", "pooled_auroc", "AUROC of all hospitals' test rows together"),
        ("auprc", "auprc", "AUPRC (mean of the hospitals' own, weighted by test rows)"),
        ("loss", "loss", "test loss"),
        ("accuracy", "accuracy", "accuracy"),
    ):
        if metrics.get(key) is not None:
            g = GaugeMetricFamily(
                f"fedrun_{name}", f"Latest global-model {help_text}.", labels=["run"]
            )
            g.add_metric([run], float(metrics[key]))
            out.append(g)

    hospitals = status.get("hospitals", [])
    connected = GaugeMetricFamily(
        "fedrun_hospitals_connected", "Hospitals connected or training.", labels=["run"]
    )
    connected.add_metric(
        [run],
        float(
            sum(
                1
                for h in hospitals
                if h.get("state") in (HospitalState.CONNECTED, HospitalState.TRAINING)
            )
        ),
    )
    failed = GaugeMetricFamily("fedrun_hospitals_failed", "Hospitals that failed.", labels=["run"])
    failed.add_metric(
        [run], float(sum(1 for h in hospitals if h.get("state") == HospitalState.FAILED))
    )
    out += [connected, failed]

    durations = [float(r.get("durationSeconds", 0.0)) for r in history.get("rounds", [])]
    hist = HistogramMetricFamily(
        "fedrun_round_duration_seconds", "Wall time of each round.", labels=["run"]
    )
    buckets = [(str(b), float(sum(1 for d in durations if d <= b))) for b in ROUND_BUCKETS]
    buckets.append(("+Inf", float(len(durations))))
    hist.add_metric([run], buckets, sum_value=sum(durations))
    out.append(hist)
    return out


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:  # type: ignore[override]
        return self.families


def render_metrics(status: dict[str, Any], history: dict[str, Any]) -> bytes:
    """Prometheus text exposition of :func:`metric_families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(metric_families(status, history)))
    return generate_latest(registry)

"""The operator's per-run series (fedrun_operator.metrics) from the status it really writes.

Statuses come from the operator's own decision (fedrun_operator.status.decide) on a run
server's report, so the series are what a scrape of a running operator shows; the chart's
alerts (tests/chart/rules_test.yaml) are written against these.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedrun_core.accounting import epsilon, noise_multiplier_for_run
from fedrun_core.api import FederatedRun, load_run, parse_run
from fedrun_operator import metrics
from fedrun_operator.status import HospitalObservation, Observation, decide

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
ROWS = 3000  # training rows of every hospital
BATCH = 64
PER_ROUND = math.ceil(ROWS / BATCH)  # one local epoch: the steps of one round
Q = 1.0 / PER_ROUND


def make_run(namespace: str = "research", **spec: Any) -> FederatedRun:
    """examples/federatedrun.yaml: 20 rounds, targetEpsilon 1, δ 1e-5, RDP, 3 hospitals."""
    body = load_run(ROOT / "examples" / "federatedrun.yaml").model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    body["metadata"]["namespace"] = namespace
    body["spec"]["training"]["batchSize"] = BATCH
    body["spec"].update(spec)
    return parse_run(body)


def calibrated_sigma(run: FederatedRun) -> float:
    """The σ hospitals derive so that all rounds end at the target (what Opacus does)."""
    p = run.spec.privacy
    return noise_multiplier_for_run(p.target_epsilon, p.delta, Q, run.spec.rounds * PER_ROUND)


def operator_status(run: FederatedRun, current: int, sigma: float) -> dict[str, Any]:
    """The status the operator writes after a run server reported `current` rounds at σ."""
    steps = current * PER_ROUND
    eps = epsilon([(sigma, Q, steps)], run.spec.privacy.delta)
    names = [h.name for h in run.spec.hospitals]
    server = {
        "phase": "Running",
        "conditions": [{"type": "Running", "status": "True", "reason": "Training"}],
        "round": {"current": current, "total": run.spec.rounds},
        "hospitals": [{"name": h, "state": "Training", "restarts": 0} for h in names],
        "privacy": {
            "epsilonSpent": eps,
            "targetEpsilon": run.spec.privacy.target_epsilon,
            "delta": run.spec.privacy.delta,
            "hospitals": [
                {
                    "name": h,
                    "epsilon": eps,
                    "noiseMultiplier": sigma,
                    "sampleRate": Q,
                    "steps": steps,
                    "stepsPerRound": PER_ROUND,
                    "numTrain": ROWS,
                    "history": [[sigma, Q, steps]],
                }
                for h in names
            ],
        },
    }
    jobs = {h: HospitalObservation(name=h, job_name=f"{run.name}-{h}", active=1) for h in names}
    obs = Observation(now=T0, server=server, hospitals=jobs)
    status: dict[str, Any] = decide(run, {"phase": "Running"}, obs, epsilon).status
    return status


@pytest.fixture
def observed() -> Iterator[list[tuple[str, str]]]:
    """Runs observed by a test; their series are dropped afterwards (REGISTRY is global)."""
    runs: list[tuple[str, str]] = []
    yield runs
    for namespace, name in runs:
        metrics.forget_run(namespace, name)


def sample(name: str, **labels: str) -> float | None:
    """The value of one sample in the operator's exposition, or None."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def observe(observed: list[tuple[str, str]], run: FederatedRun, status: dict[str, Any]) -> None:
    metrics.observe_run(run.namespace, run.name, run.spec_dict(), status, T0.timestamp())
    observed.append((run.namespace, run.name))


def test_a_calibrated_run_near_its_end_projects_within_its_target(
    observed: list[tuple[str, str]],
) -> None:
    run = make_run()
    status = operator_status(run, 19, calibrated_sigma(run))
    assert status["phase"] == "Running"
    observe(observed, run, status)
    labels = {"namespace": "research", "run": "stroke"}
    spent = sample("fedrun_operator_run_epsilon_spent", **labels)
    projected = sample("fedrun_operator_run_epsilon_projected", **labels)
    assert spent is not None and projected is not None
    # 19 of 20 rounds: most of the budget is spent (a "90 % spent" rule would fire) ...
    assert spent > 0.9 * run.spec.privacy.target_epsilon
    # ... yet the run ends within it: the projection is the whole run's ε.
    assert spent < projected <= run.spec.privacy.target_epsilon
    assert projected == pytest.approx(
        epsilon([(calibrated_sigma(run), Q, 20 * PER_ROUND)], run.spec.privacy.delta)
    )


def test_a_run_spending_faster_than_planned_projects_over_its_target_early(
    observed: list[tuple[str, str]],
) -> None:
    run = make_run(namespace="cardiology")
    status = operator_status(run, 3, 0.8 * calibrated_sigma(run))
    assert status["phase"] == "Running"  # the budget has not stopped it yet
    observe(observed, run, status)
    labels = {"namespace": "cardiology", "run": "stroke"}
    spent = sample("fedrun_operator_run_epsilon_spent", **labels)
    projected = sample("fedrun_operator_run_epsilon_projected", **labels)
    assert spent is not None and projected is not None
    assert spent < 0.5 * run.spec.privacy.target_epsilon
    assert projected > run.spec.privacy.target_epsilon


def test_no_projection_without_privacy_under_prv_or_before_a_step() -> None:
    rdp = make_run()
    prv = make_run(privacy={**rdp.spec_dict()["privacy"], "accountant": "prv"})
    status = operator_status(rdp, 3, calibrated_sigma(rdp))
    assert metrics.projected_epsilon(rdp.spec_dict(), status) is not None
    assert metrics.projected_epsilon(prv.spec_dict(), status) is None
    off = {**rdp.spec_dict(), "privacy": {**rdp.spec_dict()["privacy"], "enabled": False}}
    assert metrics.projected_epsilon(off, status) is None
    assert metrics.projected_epsilon(rdp.spec_dict(), {"phase": "Pending"}) is None


def test_completion_time_is_exported_only_once_final(observed: list[tuple[str, str]]) -> None:
    run = make_run()
    status = operator_status(run, 3, calibrated_sigma(run))
    observe(observed, run, status)
    labels = {"namespace": "research", "run": "stroke"}
    assert sample("fedrun_operator_run_completion_timestamp_seconds", **labels) is None
    failed = {**status, "phase": "Failed", "completionTime": "2026-11-24T12:30:00Z"}
    observe(observed, run, failed)
    done = sample("fedrun_operator_run_completion_timestamp_seconds", **labels)
    assert done == datetime(2026, 11, 24, 12, 30, tzinfo=UTC).timestamp()
    assert sample("fedrun_operator_run_phase", phase="Failed", **labels) == 1.0


def test_observing_a_run_marks_the_last_reconcile(observed: list[tuple[str, str]]) -> None:
    metrics.LAST_RECONCILE.set(0)
    run = make_run()
    observe(observed, run, operator_status(run, 1, calibrated_sigma(run)))
    last = sample("fedrun_operator_last_reconcile_timestamp_seconds")
    assert last is not None and last > T0.timestamp()

"""The server's /metrics: valid Prometheus text with the run's figures, from status + history."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedrun_trainer.server.metrics import PHASES, ROUND_BUCKETS, render_metrics
from fedrun_trainer.server.run_state import RoundRecord, RunState, to_history, to_status

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
DURATIONS = [0.8, 3.0, 12.0]


def sample_state(target: float | None = 1.0, auroc: float | None = 0.8123) -> RunState:
    st = RunState.new("stroke-demo", HOSPITALS, 5, target, 1e-5 if target else None)
    st.phase, st.reason = "Running", "Training"
    st.start_time = "2026-11-24T10:00:00Z"
    st.current_round = 3
    states = {"hospital-a": "Training", "hospital-b": "Connected", "hospital-c": "Failed"}
    for i, name in enumerate(HOSPITALS):
        h = st.hospitals[name]
        h.state = states[name]
        h.epsilon_accounted = 0.25 * (i + 1)
        h.noise_multiplier = 1.5
        h.history = [(1.5, 0.05, 20)] * 3
    st.rounds = [
        RoundRecord(round=i + 1, duration_s=d, evaluation={"loss": 0.4, "accuracy": 0.95})
        for i, d in enumerate(DURATIONS)
    ]
    st.rounds[-1].evaluation["auroc"] = auroc
    if auroc is not None:
        st.rounds[-1].evaluation["pooledAuroc"] = auroc - 0.01
    return st


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}; the parser refuses malformed text."""
    out = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode("utf-8"))}


def value(
    got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    key = (name, tuple(sorted({"run": "stroke-demo", **labels}.items())))
    assert key in got, f"{name}{labels} missing; have {sorted({k[0] for k in got})}"
    return got[key]


@pytest.fixture(scope="module")
def text() -> bytes:
    st = sample_state()
    return render_metrics(to_status(st), to_history(st))


def test_metrics_parse_with_expected_families_and_types(text: bytes) -> None:
    fams = families(text)
    expected = {
        "fedrun_run_phase": "gauge",
        "fedrun_round_current": "gauge",
        "fedrun_rounds_planned": "gauge",
        "fedrun_epsilon_spent": "gauge",
        "fedrun_epsilon_target": "gauge",
        "fedrun_auroc": "gauge",
        "fedrun_pooled_auroc": "gauge",
        "fedrun_loss": "gauge",
        "fedrun_accuracy": "gauge",
        "fedrun_hospitals_connected": "gauge",
        "fedrun_hospitals_failed": "gauge",
        "fedrun_round_duration_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert name in fams, name
        assert fams[name].type == kind
    # Prometheus' convention (promtool check metrics): only counters end in _total.
    assert [n for n, f in fams.items() if n.endswith("_total") and f.type != "counter"] == []


def test_phase_is_one_hot(text: bytes) -> None:
    got = samples(text)
    assert {p: value(got, "fedrun_run_phase", phase=p) for p in PHASES} == {
        p: (1.0 if p == "Running" else 0.0) for p in PHASES
    }


def test_round_epsilon_and_model_figures(text: bytes) -> None:
    got = samples(text)
    assert value(got, "fedrun_round_current") == 3.0
    assert value(got, "fedrun_rounds_planned") == 5.0
    assert value(got, "fedrun_epsilon_target") == 1.0
    assert {h: value(got, "fedrun_epsilon_spent", hospital=h) for h in HOSPITALS} == {
        "hospital-a": 0.25,
        "hospital-b": 0.5,
        "hospital-c": 0.75,
    }
    assert value(got, "fedrun_auroc") == pytest.approx(0.8123)
    assert value(got, "fedrun_pooled_auroc") == pytest.approx(0.8023)
    assert value(got, "fedrun_loss") == pytest.approx(0.4)
    assert value(got, "fedrun_accuracy") == pytest.approx(0.95)
    assert value(got, "fedrun_hospitals_connected") == 2.0  # Training + Connected
    assert value(got, "fedrun_hospitals_failed") == 1.0


def test_round_duration_histogram_is_cumulative(text: bytes) -> None:
    got = samples(text)
    name = "fedrun_round_duration_seconds"
    bounds = [*(str(float(b)) for b in ROUND_BUCKETS), "+Inf"]
    counts = [value(got, f"{name}_bucket", le=b) for b in bounds]
    assert counts == sorted(counts)  # cumulative: never decreasing
    by_bound = dict(zip(bounds, counts, strict=True))
    assert by_bound["1.0"] == 1.0  # 0.8
    assert by_bound["2.5"] == 1.0
    assert by_bound["5.0"] == 2.0  # 0.8, 3.0
    assert by_bound["10.0"] == 2.0
    assert by_bound["20.0"] == 3.0  # and 12.0
    assert by_bound["+Inf"] == 3.0
    assert value(got, f"{name}_count") == 3.0
    assert value(got, f"{name}_sum") == pytest.approx(sum(DURATIONS))


def test_without_privacy_or_auroc_those_metrics_are_absent() -> None:
    st = sample_state(target=None, auroc=None)
    fams = families(render_metrics(to_status(st), to_history(st)))
    assert "fedrun_epsilon_spent" not in fams
    assert "fedrun_epsilon_target" not in fams
    assert "fedrun_auroc" not in fams
    assert "fedrun_loss" in fams


def test_empty_status_renders_before_the_run_writes_anything() -> None:
    got = samples(render_metrics({}, {}))
    assert got[("fedrun_round_current", (("run", ""),))] == 0.0
    assert got[("fedrun_round_duration_seconds_count", (("run", ""),))] == 0.0
    assert all(v == 0.0 for (n, _), v in got.items() if n == "fedrun_run_phase")

"""FedProx and FedAdam, and the MLP, through real Flower processes."""

from __future__ import annotations

import pytest

from fedrun_cli.demo_data import write_demo_hospitals

from .conftest import example_run


@pytest.mark.parametrize(
    ("strategy", "training"),
    [
        (
            {"name": "FedProx", "proximalMu": 0.1},
            {"model": "mlp", "hiddenSizes": [16, 8], "learningRate": 0.5},
        ),
        ({"name": "FedAdam", "serverLearningRate": 0.05}, {"model": "logistic"}),
    ],
    ids=["fedprox-mlp", "fedadam-logistic"],
)
def test_strategy_runs_end_to_end_within_budget(tmp_path, cluster_factory, strategy, training):
    data = write_demo_hospitals(tmp_path / "data", seed=12)  # the demo's sizes
    doc = example_run(
        rounds=4,
        strategy=strategy,
        hospitals=[{"name": n, "dataUri": p.as_uri()} for n, p in sorted(data.items())],
    )
    doc["spec"]["training"].update(training)
    cluster = cluster_factory(doc)
    cluster.start()
    status = cluster.wait(timeout_s=400)

    assert status["phase"] == "Succeeded", status.get("message")
    assert status["round"]["current"] == 4
    assert status["privacy"]["epsilonSpent"] <= 1.0
    # The model learned: better than chance, and better than after the first round (an
    # MLP's random start can score below 0.5).
    history = cluster.history() or {}
    first = history["rounds"][0]["evaluation"]["auroc"]
    assert status["metrics"]["auroc"] > max(0.6, first)

"""FedProx and FedAdam, and the MLP, through real Flower processes."""

from __future__ import annotations

import pytest

from fedrun_cli.demo_data import write_demo_hospitals

from .conftest import example_run

EPSILON = 3.0


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
    # ε = 3, not the example's 1: the learning bar below must hold for every draw of the DP
    # noise. At ε = 1 the MLP's final AUROC fell under 0.6 in about 1 run in 10 (70 runs of
    # these rounds in one process); at ε = 3 the lowest of 40 was 0.66.
    doc["spec"]["privacy"]["targetEpsilon"] = EPSILON
    cluster = cluster_factory(doc)
    cluster.start()
    status = cluster.wait(timeout_s=400)

    assert status["phase"] == "Succeeded", status.get("message")
    assert status["round"]["current"] == 4
    assert 0 < status["privacy"]["epsilonSpent"] <= EPSILON
    # The model learned: better than chance, and not worse than after the first round (an
    # MLP's random start can score below 0.5). A logistic model can reach ~0.80 in round 1,
    # after which DP noise moves the final figure by a few thousandths either way (a
    # fresh-clone run saw 0.7978 after 0.7989): 0.02 below round 1 is a model that got worse.
    history = cluster.history() or {}
    first = history["rounds"][0]["evaluation"]["auroc"]
    assert status["metrics"]["auroc"] > 0.6
    assert status["metrics"]["auroc"] > first - 0.02

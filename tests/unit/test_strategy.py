"""Server aggregation maths."""

from __future__ import annotations

import numpy as np
import pytest

from fedrun_trainer.server.strategy import FedAdam, aggregate_fedavg


def w(*values: float) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float32), np.array([values[0]], dtype=np.float32)]


def test_fedavg_weights_by_examples() -> None:
    out = aggregate_fedavg([(w(1.0, 2.0), 1), (w(4.0, 8.0), 3)])
    assert out[0].tolist() == pytest.approx([3.25, 6.5])
    assert out[1].tolist() == pytest.approx([3.25])
    assert out[0].dtype == np.float32


def test_fedavg_ignores_empty_replies_and_checks_shapes() -> None:
    assert aggregate_fedavg([(w(1.0, 1.0), 2), (w(9.0, 9.0), 0)])[0].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="no results"):
        aggregate_fedavg([(w(1.0, 1.0), 0)])
    with pytest.raises(ValueError, match="shape"):
        aggregate_fedavg([(w(1.0, 1.0), 1), (w(1.0, 1.0, 1.0), 1)])


def test_fedadam_follows_reddi() -> None:
    opt = FedAdam(learning_rate=0.1)
    g = [np.zeros(2, dtype=np.float32)]
    first = opt.step(g, [np.array([1.0, -2.0], dtype=np.float32)])
    # m = 0.1Δ, v = 0.01Δ², so the first step is lr·sign(Δ).
    assert first[0].tolist() == pytest.approx([0.1, -0.1], rel=1e-6)
    second = opt.step(first, first)  # no client movement: momentum keeps going
    assert second[0][0] > first[0][0] and second[0][1] < first[0][1]
    with pytest.raises(ValueError, match="learning_rate"):
        FedAdam(learning_rate=0.0)

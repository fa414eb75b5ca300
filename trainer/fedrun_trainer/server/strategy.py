"""Server-side aggregation maths, free of Flower: FedAvg, FedAdam, metric averaging.

FedProx needs nothing here: it is FedAvg on the server plus a proximal term on the
hospitals (see :func:`fedrun_trainer.hospital.train.train_round`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FedAdam", "aggregate_fedavg"]

Array = npt.NDArray[np.float32]
Weights = list[Array]


def aggregate_fedavg(results: Sequence[tuple[Sequence[npt.NDArray[Any]], int]]) -> Weights:
    """Average weight lists, each weighted by its number of training examples.

    Replies with ``n == 0`` (a hospital that skipped the round) carry no weight.
    Raises ``ValueError`` when nothing can be averaged or the shapes disagree.
    """
    kept = [(w, n) for w, n in results if n > 0]
    if not kept:
        raise ValueError("no results with training examples to aggregate")
    if any(n < 0 for _, n in results):
        raise ValueError("negative number of examples")
    total = float(sum(n for _, n in kept))
    first = kept[0][0]
    for weights, _ in kept:
        if len(weights) != len(first) or any(
            np.shape(a) != np.shape(b) for a, b in zip(weights, first, strict=True)
        ):
            raise ValueError("weight lists differ in length or shape")
    out: Weights = []
    for i in range(len(first)):
        acc = np.zeros(np.shape(first[i]), dtype=np.float64)
        for weights, n in kept:
            acc += np.asarray(weights[i], dtype=np.float64) * (n / total)
        out.append(acc.astype(np.float32))
    return out


@dataclass
class FedAdam:
    """Adaptive server optimiser of Reddi et al. 2021 ("Adaptive Federated Optimization").

    The averaged client update ``Δ = aggregated − global`` is treated as a pseudo-gradient:
    ``m ← β1·m + (1−β1)·Δ``, ``v ← β2·v + (1−β2)·Δ²``, ``global ← global + lr·m/(√v + τ)``
    (no bias correction, as in the paper). Stateful: use one instance for the whole run.
    """

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-9
    m: list[npt.NDArray[np.float64]] = field(default_factory=list)
    v: list[npt.NDArray[np.float64]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")

    def step(
        self, global_weights: Sequence[npt.NDArray[Any]], aggregated: Sequence[npt.NDArray[Any]]
    ) -> Weights:
        """New global weights from the current ones and this round's FedAvg aggregate."""
        if len(global_weights) != len(aggregated):
            raise ValueError("global and aggregated weights differ in length")
        deltas = [
            np.asarray(a, dtype=np.float64) - np.asarray(g, dtype=np.float64)
            for g, a in zip(global_weights, aggregated, strict=True)
        ]
        if not self.m:
            self.m = [np.zeros_like(d) for d in deltas]
            self.v = [np.zeros_like(d) for d in deltas]
        out: Weights = []
        for i, (g, d) in enumerate(zip(global_weights, deltas, strict=True)):
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * d
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * d * d
            new = np.asarray(g, dtype=np.float64) + self.learning_rate * self.m[i] / (
                np.sqrt(self.v[i]) + self.tau
            )
            out.append(new.astype(np.float32))
        return out

    def state_arrays(self) -> dict[str, list[npt.NDArray[np.float64]]]:
        """The moments, for a checkpoint (empty before the first step)."""
        return {"m": list(self.m), "v": list(self.v)} if self.m else {}

    def load_arrays(self, arrays: dict[str, list[npt.NDArray[Any]]]) -> None:
        """Take back moments :meth:`state_arrays` gave; ValueError when they do not pair up."""
        m, v = arrays.get("m", []), arrays.get("v", [])
        if len(m) != len(v) or any(np.shape(a) != np.shape(b) for a, b in zip(m, v, strict=True)):
            raise ValueError("FedAdam's moments m and v do not pair up")
        self.m = [np.asarray(a, dtype=np.float64) for a in m]
        self.v = [np.asarray(a, dtype=np.float64) for a in v]

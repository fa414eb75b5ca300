"""The models hospitals train: logistic regression or a small MLP, one logit output.

Only ``nn.Linear`` and ``nn.ReLU`` are used, so Opacus computes per-sample gradients in any
of its modes (the hospital uses torch's ExpandedWeights: ``hospital.train.GRAD_SAMPLE_MODE``).
Weights travel as a list of numpy arrays in ``state_dict`` order, which is the same for every
process that builds the same model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedrun_core.api import TrainingSpec

__all__ = ["build_model", "get_weights", "set_weights"]

Weights = list[npt.NDArray[np.float32]]


def build_model(spec: TrainingSpec, n_features: int, seed: int = 0) -> nn.Module:
    """Build the model for ``n_features`` inputs, initialised deterministically from ``seed``.

    Logistic regression starts at zero (the problem is convex; zero is a neutral start);
    an MLP gets PyTorch's default initialisation drawn from a private generator, so the
    global random state is left untouched and every process builds the same start.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if spec.model == "logistic":
        model: nn.Module = nn.Sequential(nn.Linear(n_features, 1))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model
    if spec.model == "mlp":
        sizes = list(spec.hidden_sizes or [])
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"an mlp needs positive hidden sizes, got {sizes}")
        layers: list[nn.Module] = []
        width = n_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for size in sizes:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model {spec.model!r} (expected logistic or mlp)")


def get_weights(model: nn.Module) -> Weights:
    """Copies of the model's tensors as float32 numpy arrays, in ``state_dict`` order."""
    return [
        t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()
    ]


def set_weights(model: nn.Module, weights: Sequence[npt.NDArray[np.floating]]) -> None:
    """Load ``weights`` (as from :func:`get_weights`) into ``model``; shapes must match."""
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(f"expected {len(state)} weight arrays, got {len(weights)}")
    new_state = {}
    for (name, current), array in zip(state.items(), weights, strict=True):
        if tuple(current.shape) != tuple(np.shape(array)):
            raise ValueError(
                f"weight {name!r}: expected shape {tuple(current.shape)}, got {np.shape(array)}"
            )
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(new_state)

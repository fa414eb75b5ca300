"""Part 2, the cost of DP-SGD: one Opacus optimizer step against the same step without DP.

Both sides run the same model on the same stroke-shaped data (synthetic rows through the
stroke preset's preprocessing) with batch 64 and plain SGD, and each step includes fetching
its batch, as in a training round. The DP side is the model, optimizer and loader after
``PrivacyEngine.make_private`` (noise multiplier 1.0, clipping norm 1.0, Poisson sampling),
so it pays for per-sample gradients, clipping, noise and the Poisson loader.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_core.api import DataSpec, TrainingSpec
from fedrun_trainer.common.data import Table, prepare
from fedrun_trainer.common.model import build_model
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["TARGET_RATIO", "StepPlan", "measure_dp_step", "time_steps"]

#: The target: a DP step costs at most this many times a plain step.
TARGET_RATIO = 2.0
BATCH_SIZE = 64
LEARNING_RATE = 0.1
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
#: Rows of training data: about one demo hospital's 70 % training split.
N_ROWS = 1190
MODELS = (TrainingSpec(model="logistic"), TrainingSpec(model="mlp", hidden_sizes=[32, 16]))

Step = Callable[[], None]


@dataclass(frozen=True)
class StepPlan:
    """How many steps to time: ``warmup`` untimed, then ``repeats`` runs of ``steps``."""

    steps: int
    warmup: int
    repeats: int


FULL = StepPlan(steps=40, warmup=20, repeats=15)
QUICK = StepPlan(steps=5, warmup=2, repeats=3)


def _data(seed: int = 0) -> Table:
    frame = synthetic_stroke(N_ROWS, seed)
    return prepare(frame, DataSpec(preset="stroke"), "synthetic stroke rows")


def _batches(loader: DataLoader[tuple[torch.Tensor, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches, epoch after epoch, forever."""
    while True:
        yield from loader


def _stepper(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
) -> Step:
    """One training step per call: next batch, forward, BCE loss, backward, SGD step."""
    criterion = nn.BCEWithLogitsLoss()
    batches = _batches(loader)

    def step() -> None:
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        logits = module(x).reshape(-1)
        # Poisson sampling can draw an empty batch: a noise-only step, as in train_round.
        loss = criterion(logits, y) if len(y) else logits.sum() * 0.0
        loss.backward()
        optimizer.step()

    return step


def _plain(spec: TrainingSpec, data: Table) -> Step:
    model = build_model(spec, data.x.shape[1])
    model.train()
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    return _stepper(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), loader)


def _private(spec: TrainingSpec, data: Table) -> tuple[Step, float]:
    """The DP step, and how long ``make_private`` took (ms; paid once per round)."""
    model = build_model(spec, data.x.shape[1])
    model.train()
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    started = time.perf_counter()
    module, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=True,
    )
    setup_ms = (time.perf_counter() - started) * 1e3
    return _stepper(module, optimizer, loader), setup_ms


def _block_ms(step: Step, n: int) -> float:
    """Milliseconds per step over ``n`` consecutive steps."""
    started = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - started) * 1e3 / n


def time_steps(steps: Sequence[Step], plan: StepPlan) -> list[list[float]]:
    """Milliseconds per step of each step function, one sample per block of ``plan.steps``.

    After ``plan.warmup`` untimed steps each, the functions are timed in alternating
    blocks, ``plan.repeats`` times, so a change in the machine's load hits all of them alike.
    """
    for step in steps:
        for _ in range(plan.warmup):
            step()
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(plan.repeats):
        for step, out in zip(steps, samples, strict=True):
            out.append(_block_ms(step, plan.steps))
    return samples


def _row(spec: TrainingSpec, data: Table, plan: StepPlan) -> list[str]:
    dp_step, setup_ms = _private(spec, data)
    plain, dp = time_steps([_plain(spec, data), dp_step], plan)
    ratio = statistics.median(dp) / statistics.median(plain)
    name = spec.model if spec.model == "logistic" else f"mlp {list(spec.hidden_sizes or [])}"
    return [
        name,
        fmt(statistics.median(plain), 3),
        fmt(statistics.median(dp), 3),
        f"{ratio:.2f}×",
        "yes" if ratio <= TARGET_RATIO else "**no**",
        f"{min(dp) / min(plain):.2f}×",
        fmt(setup_ms, 1),
    ]


def measure_dp_step(settings: BenchSettings) -> PartResult:
    """Time plain and DP steps for each model; the section for the report."""
    plan = QUICK if settings.quick else FULL
    data = _data()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        rows = [_row(spec, data, plan) for spec in MODELS]
    headers = [
        "Model",
        "Plain SGD (ms/step)",
        "DP-SGD (ms/step)",
        f"Ratio of medians (target ≤ {TARGET_RATIO:.0f}×)",
        "Met",
        "Ratio of fastest blocks",
        "`make_private` (ms, once per round)",
    ]
    body = "\n".join(
        [
            table(headers, rows),
            "",
            f"How to reproduce: `{settings.reproduce('dp')}`",
            "",
            f"- Data: {N_ROWS} synthetic rows, {data.x.shape[1]} features after the stroke "
            f"preset's encoding; batch {BATCH_SIZE}, SGD lr {LEARNING_RATE}.",
            f"- DP: Opacus `make_private`, noise multiplier {NOISE_MULTIPLIER}, max grad norm "
            f"{MAX_GRAD_NORM}, Poisson sampling.",
            f"- Timing (`time.perf_counter`): {plan.warmup} warm-up steps each, then "
            f"{plan.repeats} blocks of {plan.steps} steps, plain and DP blocks alternating so "
            "that load changes hit both; each figure is the median block. The fastest blocks' "
            "ratio is the least disturbed by other work on the machine. torch uses "
            f"{torch.get_num_threads()} threads.",
        ]
    )
    return PartResult("DP-SGD step cost: Opacus against the same step without DP", body)

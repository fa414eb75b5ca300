"""Part 2, the cost of DP-SGD: one Opacus optimizer step against the same step without DP.

Every variant runs the same model on the same stroke-shaped data (synthetic rows through
the stroke preset's preprocessing) with batch 64 and plain SGD, and each step includes
fetching its batch, as in a training round. fedrun's own steps come from
``fedrun_trainer.hospital.train.start_training``, exactly as a hospital trains. The other
rows are what was tried: Opacus's other per-sample gradient modes, and the per-row loader
(``TensorDataset`` + default collate) fedrun used before. DP is noise multiplier 1.0,
clipping norm 1.0, Poisson sampling. torch runs one intra-op thread, as in a hospital's
warm executor.
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
from fedrun_core.api import DataSpec, PrivacySpec, TrainingSpec
from fedrun_trainer.common.data import Table, prepare
from fedrun_trainer.common.model import build_model
from fedrun_trainer.hospital.train import GRAD_SAMPLE_MODE, batch_loader, start_training
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["TARGET_RATIO", "StepPlan", "measure_dp_step", "time_steps"]

#: The target: a DP step costs at most this many times a plain step.
TARGET_RATIO = 2.0
BATCH_SIZE = 64
LEARNING_RATE = 0.1
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
THREADS = 1
#: Rows of training data: about one demo hospital's 70 % training split.
N_ROWS = 1190
MODELS = (
    TrainingSpec(model="logistic", batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE),
    TrainingSpec(
        model="mlp", hidden_sizes=[32, 16], batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE
    ),
)
PRIVACY = PrivacySpec(enabled=True, max_grad_norm=MAX_GRAD_NORM)

Step = Callable[[], None]
Loader = DataLoader[tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class StepPlan:
    """How many steps to time: ``warmup`` untimed, then ``repeats`` runs of ``steps``."""

    steps: int
    warmup: int
    repeats: int


FULL = StepPlan(steps=40, warmup=20, repeats=15)
QUICK = StepPlan(steps=5, warmup=2, repeats=3)


@dataclass(frozen=True)
class Variant:
    """One way to take a training step: a row of the table."""

    name: str
    private: bool
    mode: str | None  # Opacus grad_sample_mode; None: fedrun's own (start_training)
    per_row_loader: bool


FEDRUN_PLAIN = Variant("fedrun, no DP (batched loader)", False, None, False)
FEDRUN_DP = Variant(f"fedrun, DP-SGD ({GRAD_SAMPLE_MODE}, batched loader)", True, None, False)
VARIANTS = (
    FEDRUN_PLAIN,
    FEDRUN_DP,
    Variant("no DP, per-row loader (before)", False, "-", True),
    Variant("DP-SGD hooks, per-row loader (before)", True, "hooks", True),
    Variant("DP-SGD hooks, batched loader", True, "hooks", False),
    Variant("DP-SGD functorch, batched loader", True, "functorch", False),
    Variant("DP-SGD ghost clipping, batched loader", True, "ghost", False),
)


def _data(seed: int = 0) -> Table:
    frame = synthetic_stroke(N_ROWS, seed)
    return prepare(frame, DataSpec(preset="stroke"), "synthetic stroke rows")


def _batches(loader: Loader) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches, epoch after epoch, forever."""
    while True:
        yield from loader


def _fedrun(spec: TrainingSpec, data: Table, private: bool) -> Step:
    """fedrun's own step, as ``train_round`` takes it."""
    run = start_training(
        build_model(spec, data.x.shape[1]),
        data,
        spec,
        PRIVACY if private else PrivacySpec(enabled=False),
        noise_multiplier=NOISE_MULTIPLIER,
    )
    batches = _batches(run.loader)

    def step() -> None:
        run.step(*next(batches))

    return step


def _opacus(spec: TrainingSpec, data: Table, variant: Variant) -> Step:
    """A step the way Opacus's docs write it, with ``variant``'s mode and loader."""
    model = build_model(spec, data.x.shape[1])
    model.train()
    loader: Loader
    if variant.per_row_loader:
        dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    else:
        loader = batch_loader(data, BATCH_SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    module: nn.Module = model
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.BCEWithLogitsLoss()
    if variant.private:
        engine = PrivacyEngine(accountant="rdp")
        common = {
            "module": model,
            "optimizer": optimizer,
            "data_loader": loader,
            "noise_multiplier": NOISE_MULTIPLIER,
            "max_grad_norm": MAX_GRAD_NORM,
            "poisson_sampling": True,
            "grad_sample_mode": variant.mode,
        }
        if variant.mode == "ghost":
            module, optimizer, criterion, loader = engine.make_private(
                criterion=nn.BCEWithLogitsLoss(), **common
            )
        else:
            module, optimizer, loader = engine.make_private(**common)
    batches = _batches(loader)

    def step() -> None:
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:  # a noise-only step; rare at these sizes
            return
        loss = criterion(module(x).reshape(-1), y)
        loss.backward()  # type: ignore[no-untyped-call]  # ghost: Opacus's loss wrapper
        optimizer.step()

    return step


def _step(spec: TrainingSpec, data: Table, variant: Variant) -> Step:
    if variant.mode is None:
        return _fedrun(spec, data, variant.private)
    return _opacus(spec, data, variant)


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


def _model_name(spec: TrainingSpec) -> str:
    return spec.model if spec.model == "logistic" else f"mlp {list(spec.hidden_sizes or [])}"


def _rows(spec: TrainingSpec, data: Table, plan: StepPlan) -> tuple[list[list[str]], float]:
    """The table rows for one model, and fedrun's DP/plain ratio of medians."""
    samples = time_steps([_step(spec, data, v) for v in VARIANTS], plan)
    median = {v: statistics.median(s) for v, s in zip(VARIANTS, samples, strict=True)}
    fastest = {v: min(s) for v, s in zip(VARIANTS, samples, strict=True)}
    base = median[FEDRUN_PLAIN]
    rows = [
        [
            _model_name(spec),
            f"**{v.name}**" if v.mode is None else v.name,
            fmt(median[v], 3),
            f"{median[v] / base:.2f}×",
            f"{fastest[v] / fastest[FEDRUN_PLAIN]:.2f}×",
        ]
        for v in VARIANTS
    ]
    return rows, median[FEDRUN_DP] / base


#: Batch sizes for the second table: Opacus's work per step is mostly fixed, so the ratio
#: falls as the batch grows.
BATCH_SIZES = (16, 64, 256)


def _by_batch(spec: TrainingSpec, data: Table, plan: StepPlan) -> list[str]:
    """fedrun's plain and DP step at each of ``BATCH_SIZES``: 'plain / DP ms (ratio)'."""
    cells = [_model_name(spec)]
    for size in BATCH_SIZES:
        sized = spec.model_copy(update={"batch_size": size})
        plain, dp = time_steps([_fedrun(sized, data, False), _fedrun(sized, data, True)], plan)
        p, d = statistics.median(plain), statistics.median(dp)
        cells.append(f"{p:.3f} / {d:.3f} ({d / p:.2f}×)")
    return cells


def measure_dp_step(settings: BenchSettings) -> PartResult:
    """Time plain and DP steps for each model; the section for the report."""
    plan = QUICK if settings.quick else FULL
    data = _data()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            results = [_rows(spec, data, plan) for spec in MODELS]
            by_batch = [_by_batch(spec, data, plan) for spec in MODELS]
    finally:
        torch.set_num_threads(threads)
    rows = [row for model_rows, _ in results for row in model_rows]
    verdicts = [
        f"{_model_name(spec)} {ratio:.2f}× ({'met' if ratio <= TARGET_RATIO else '**not met**'})"
        for spec, (_, ratio) in zip(MODELS, results, strict=True)
    ]
    headers = [
        "Model",
        "Step",
        "ms/step (median block)",
        "× fedrun's plain step (medians)",
        "× (fastest blocks)",
    ]
    body = "\n".join(
        [
            f"fedrun's DP step against its plain step (target ≤ {TARGET_RATIO:.0f}×): "
            + "; ".join(verdicts)
            + ".",
            "",
            table(headers, rows),
            "",
            "fedrun's steps by batch size, plain / DP-SGD in ms per step (ratio):",
            "",
            table(["Model", *(f"batch {b}" for b in BATCH_SIZES)], by_batch),
            "",
            f"How to reproduce: `{settings.reproduce('dp')}`",
            "",
            f"- Data: {N_ROWS} synthetic rows, {data.x.shape[1]} features after the stroke "
            f"preset's encoding; batch {BATCH_SIZE}, SGD lr {LEARNING_RATE}.",
            f"- DP: Opacus `make_private`, noise multiplier {NOISE_MULTIPLIER}, max grad norm "
            f"{MAX_GRAD_NORM}, Poisson sampling. Bold rows are fedrun's own steps "
            "(`start_training`, as `train_round` runs them); the others were tried.",
            "- Batched loader: `Rows.__getitems__` fetches a batch with one indexing "
            "operation; the per-row loader fetches each row and stacks them (default "
            "collate), which was more of the step than the model was.",
            f"- Timing (`time.perf_counter`): {plan.warmup} warm-up steps each, then "
            f"{plan.repeats} blocks of {plan.steps} steps, the variants' blocks alternating "
            "so that load changes hit all of them; each figure is the median block. The "
            "fastest blocks' ratio is the least disturbed by other work on the machine. "
            f"torch uses {THREADS} thread, as in a hospital's warm executor.",
        ]
    )
    return PartResult("DP-SGD step cost: Opacus against the same step without DP", body)

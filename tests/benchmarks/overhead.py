"""Part 1, round overhead: ``fedrun local`` (warm and stock isolation) against the floor.

Both runs are the example FederatedRun on synthetic hospitals. A round's time is the
server's ``durationSeconds`` (train request out, every reply in, FedAvg done); the
overhead is fedrun's median seconds per round minus the compute floor's
(:mod:`benchmarks.floor`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from fedrun_core.api import FederatedRun, load_run
from tests.benchmarks.floor import FloorResult, compute_floor
from tests.benchmarks.localrun import (
    LocalRun,
    derive_run,
    example_doc,
    fedrun_local,
    shell,
    synthetic_data,
    write_run,
)
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["ISOLATIONS", "TARGET_OVERHEAD_S", "measure_overhead"]

#: The target: fedrun adds at most this many seconds per round to the compute floor.
TARGET_OVERHEAD_S = 3.0
#: The values of FEDRUN_ISOLATION compared, and what each means.
ISOLATIONS = {
    "warm": "fedrun's warm executor (the default): one pre-imported process forks a child per task",
    "subprocess": "stock Flower: a new `flwr-clientapp` process per message",
}
_HEADERS = [
    "FEDRUN_ISOLATION",
    "Phase",
    "Wall time (s)",
    "Outside rounds (s): start / join + final eval / stop",
    "Rounds",
    "Median s/round",
    "Mean s/round",
    f"Overhead s/round (median − floor; target ≤ {TARGET_OVERHEAD_S:.0f})",
    "Met",
]


@dataclass(frozen=True)
class _Measured:
    run: FederatedRun
    runs: dict[str, LocalRun]
    floor: FloorResult
    commands: list[str]


def _run_file(settings: BenchSettings, work: Path) -> tuple[Path, str]:
    """The example itself, or (``--quick``) a copy with fewer rounds; and a note on it."""
    if settings.rounds is None:
        return settings.example, ""
    doc = derive_run(example_doc(settings.example), {"rounds": settings.rounds})
    path = write_run(doc, work / "run.yaml")
    return path, f"`{shell([str(path)])}` is `{shell([str(settings.example)])}` with " + (
        f"`rounds: {settings.rounds}`."
    )


def _measure(settings: BenchSettings) -> tuple[_Measured, str]:
    work = settings.work / "overhead"
    data = work / "data"
    commands = [synthetic_data(data)]
    run_file, note = _run_file(settings, work)
    runs = {
        iso: fedrun_local(run_file, work / iso, data, env={"FEDRUN_ISOLATION": iso})
        for iso in ISOLATIONS
    }
    commands += [r.command for r in runs.values()]
    run = load_run(run_file)
    return _Measured(run, runs, compute_floor(run, data), commands), note


def _run_row(iso: str, run: LocalRun, floor: FloorResult) -> list[str]:
    rounds = run.round_seconds
    if not rounds:
        return [f"`{iso}`", run.phase, fmt(run.wall_s, 1), "-", "0", "-", "-", "-", "-"]
    median = statistics.median(rounds)
    overhead = median - floor.median_s
    return [
        f"`{iso}`",
        run.phase,
        fmt(run.wall_s, 1),
        _outside(run),
        str(len(rounds)),
        fmt(median, 2),
        fmt(statistics.fmean(rounds), 2),
        fmt(overhead, 2),
        "yes" if overhead <= TARGET_OVERHEAD_S else "**no**",
    ]


def _outside(run: LocalRun) -> str:
    total = fmt(run.wall_s - sum(run.round_seconds), 1)
    phases = run.phases_s
    if phases is None:
        return total
    return f"{total}: " + " / ".join(fmt(p, 0) for p in phases)


def _floor_row(floor: FloorResult) -> list[str]:
    return [
        "compute floor (one warm process, no Flower)",
        "-",
        fmt(sum(floor.round_s) + floor.final_eval_s, 1),
        fmt(floor.final_eval_s, 1),
        str(len(floor.round_s)),
        fmt(floor.median_s, 2),
        fmt(floor.mean_s, 2),
        "0",
        "-",
    ]


def _notes(m: _Measured) -> list[str]:
    failures = [
        f"- `{iso}` did not succeed: {run.describe_failure()}"
        for iso, run in m.runs.items()
        if not run.succeeded
    ]
    isolations = [f"- `{iso}`: {text}." for iso, text in ISOLATIONS.items()]
    return [
        *failures,
        *isolations,
        "- Wall time is the whole `fedrun local` command. Seconds per round are the server's "
        "`durationSeconds` (`history.json`). The rest (outside rounds) splits into: start, "
        "from the command until the run starts (`status.startTime`); join + final eval, "
        "waiting for hospitals to connect plus the final evaluation; stop, from "
        "`status.completionTime` until every process is stopped and the report written "
        "(timestamps to the second).",
        "- The floor runs the same spec on the same files in this process: each hospital "
        "evaluates the incoming model (from round 2), opens its ledger, trains one round "
        "(`train_round`) and saves the ledger; then FedAvg (`aggregate_fedavg`). An untimed "
        f'warm-up round ({m.floor.warmup_s:.1f} s) comes first; its "outside rounds" is the '
        "final evaluation.",
    ]


def _title(run: FederatedRun) -> str:
    spec = run.spec
    privacy = f"DP-SGD ε={spec.privacy.target_epsilon}" if spec.privacy.enabled else "no DP"
    return (
        f"Round overhead: {len(spec.hospitals)} hospitals, {spec.rounds} rounds, "
        f"{spec.training.model}, {privacy}, synthetic data"
    )


def measure_overhead(settings: BenchSettings) -> PartResult:
    """Run both isolations and the floor; the section for the report."""
    m, run_note = _measure(settings)
    rows = [_run_row(iso, run, m.floor) for iso, run in m.runs.items()]
    rows.append(_floor_row(m.floor))
    body = [
        table(_HEADERS, rows),
        "",
        f"How to reproduce: `{settings.reproduce('overhead')}`, which runs",
        *[f"  - `{command}`" for command in m.commands],
        "",
        *([f"- {run_note}"] if run_note else []),
        *_notes(m),
    ]
    return PartResult(_title(m.run), "\n".join(body))

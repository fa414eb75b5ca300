"""``python -m tests.benchmarks.run``: measure, then write the markdown report.

Parts: ``start`` (the server's start and stop), ``overhead`` (round overhead of
``fedrun local`` against the compute floor), ``dp`` (Opacus step time against plain SGD),
``auroc`` (quality on the real stroke data; skipped, with the reason in the report, when
the data is absent), ``messy`` (the real data with injected export defects under
declared policies, against the same rows clean), ``operator`` (the operator under load),
``scale`` (how cost grows with hospitals, rows and model size), ``recovery`` (the server
killed mid-run: time to recover, the checkpoint's cost per round). ``--only PART`` runs one
part and replaces only its section of an existing report; ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.benchmarks.env import Provenance, load_average, machine, now_utc, versions
from tests.benchmarks.localrun import REPO
from tests.benchmarks.report import PART_ORDER, Section, document, merge
from tests.benchmarks.settings import DEFAULT_STROKE_CSV, BenchSettings, PartResult

__all__ = ["main"]

Part = Callable[[BenchSettings], PartResult]
DEFAULT_OUT = Path("docs/benchmarks.md")
QUICK_OUT = Path("out/bench/benchmarks-quick.md")


def _parts() -> dict[str, Part]:
    """The parts by key (imported lazily: torch loads only when a part runs)."""
    from tests.benchmarks.auroc import measure_auroc
    from tests.benchmarks.dpstep import measure_dp_step
    from tests.benchmarks.messy import measure_messy
    from tests.benchmarks.operator_scale import measure_operator
    from tests.benchmarks.overhead import measure_overhead
    from tests.benchmarks.recovery import measure_recovery
    from tests.benchmarks.scaling import measure_scaling
    from tests.benchmarks.startstop import measure_start_stop

    return {
        "start": measure_start_stop,
        "overhead": measure_overhead,
        "recovery": measure_recovery,
        "dp": measure_dp_step,
        "auroc": measure_auroc,
        "messy": measure_messy,
        "operator": measure_operator,
        "scale": measure_scaling,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"report file (default {DEFAULT_OUT}; with --quick {QUICK_OUT})",
    )
    p.add_argument("--only", choices=PART_ORDER, default=None, help="run one part only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 rounds, a few optimizer steps (not a measurement)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("out/bench"),
        help="data, run outputs and logs (default out/bench)",
    )
    p.add_argument(
        "--stroke-csv",
        type=Path,
        default=DEFAULT_STROKE_CSV,
        help="the Kaggle stroke CSV for the auroc part",
    )
    return p


def _invocation(args: argparse.Namespace, out: Path) -> str:
    """The benchmark command as typed at the repository root, without ``--only``."""
    python = (
        os.path.relpath(sys.executable, REPO)
        if Path(sys.executable).is_relative_to(REPO)
        else sys.executable
    )
    argv = [python, "-m", "tests.benchmarks.run", "--out", str(out)]
    if args.quick:
        argv.append("--quick")
    if args.stroke_csv != DEFAULT_STROKE_CSV:
        argv += ["--stroke-csv", str(args.stroke_csv)]
    return shlex.join(argv)


def _run_part(key: str, part: Part, settings: BenchSettings) -> tuple[PartResult, bool]:
    """The part's result; a crash becomes a section saying so (and ``False``)."""
    try:
        return part(settings), True
    except Exception as err:
        trace = traceback.format_exc(limit=5)
        body = f"The part failed: `{type(err).__name__}: {err}`\n\n```\n{trace}```"
        return PartResult(f"{key}: FAILED", body), False


def _measure(key: str, part: Part, settings: BenchSettings) -> tuple[Section, bool]:
    """Run one part and wrap its result with where, when and how it was measured."""
    started, load_before = now_utc(), load_average()
    t0 = time.perf_counter()
    result, ok = _run_part(key, part, settings)
    provenance = Provenance(
        command=settings.reproduce(key),
        started=started,
        machine=machine(),
        versions=versions(),
        load_before=load_before,
        load_after=load_average(),
        duration_s=time.perf_counter() - t0,
    )
    title = result.title + (" (QUICK smoke test, not a measurement)" if settings.quick else "")
    body = "\n".join([f"## {title}", "", *provenance.markdown(), "", result.body])
    return Section(key, body), ok


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts and write the report; 0 when every part ran, else 1."""
    args = build_parser().parse_args(argv)
    out: Path = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    os.chdir(REPO)  # relative paths (--out, --work, the example's data) mean the repo root
    settings = BenchSettings(
        quick=args.quick,
        work=args.work.resolve(),
        invocation=_invocation(args, out),
        stroke_csv=args.stroke_csv.resolve(),
    )
    keys = [args.only] if args.only else list(PART_ORDER)
    parts = _parts()
    sections, all_ok = [], True
    for key in keys:
        print(f"benchmarks: {key} ...", file=sys.stderr, flush=True)
        section, ok = _measure(key, parts[key], settings)
        sections.append(section)
        all_ok = all_ok and ok
    text = document(sections, args.quick)
    if args.only and out.exists():
        text = merge(out.read_text(encoding="utf-8"), sections, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"benchmarks: wrote {out}", file=sys.stderr)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Part 6, how cost grows with the work: hospitals per run, rows per hospital, model size.

1. Hospitals: the example FederatedRun (logistic, DP-SGD, TLS and node keys) with 3, 6,
   12 and 24 synthetic hospitals under ``fedrun local``, every hospital required
   (``minHospitals`` = all). Per run: seconds per round against the compute floor of the
   same hospitals (:mod:`benchmarks.floor`), the bytes the fleet proxy forwarded per
   hospital and round (its log line at stop), and the peak memory of the server's pod and
   of a hospital's (:mod:`benchmarks.podmemory`).
2. Rows: one hospital's training throughput (rows per second over one epoch, fedrun's own
   step from ``start_training``) at 10k, 100k and 1M rows, logistic and MLP, with and
   without DP, and how fast the stroke preset prepares those rows; the update a hospital
   sends for each model (its parameters as float32).
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from fedrun_cli.demo_data import synthetic_stroke
from fedrun_core.api import DataSpec, FederatedRun, PrivacySpec, TrainingSpec, load_run
from fedrun_trainer.common.data import Table, prepare
from fedrun_trainer.common.model import build_model
from fedrun_trainer.hospital.train import start_training
from tests.benchmarks.floor import compute_floor
from tests.benchmarks.localrun import (
    REPO,
    LocalRun,
    derive_run,
    example_doc,
    fedrun_local,
    write_run,
)
from tests.benchmarks.podmemory import PodMemorySampler
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["measure_scaling"]

HOSPITALS = (3, 6, 12, 24)
QUICK_HOSPITALS = (3, 6)
ROUNDS = 3
ROWS_PER_HOSPITAL = 1000
ROWS = (10_000, 100_000, 1_000_000)
QUICK_ROWS = (10_000,)
#: synthetic_stroke draws unique patient ids below 73000: larger tables are built in chunks.
_CHUNK = 50_000
MODELS = (TrainingSpec(model="logistic"), TrainingSpec(model="mlp", hidden_sizes=[32, 16]))
#: Memory a run needs before it is started (a hospital pod peaks near 720 MiB here, the
#: server's near 700 MiB): a run that would push the machine into swap or the OOM killer
#: is skipped and the report says so.
_MIB_PER_HOSPITAL = 800
_MIB_BESIDE = 1536
_TRAFFIC = re.compile(r"fleet proxy forwarded (\d+) requests, (\d+) bytes in, (\d+) bytes out")


@dataclass(frozen=True)
class _HospitalsRow:
    n: int
    run: LocalRun
    floor_s: float
    server_mib: float
    hospital_mib: list[float]
    server_rss_mib: float
    hospital_rss_mib: float
    total_mib: float
    traffic: tuple[int, int, int] | None  # requests, bytes in, bytes out


def _write_hospitals(data: Path, n: int) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    names = [f"hospital-{i:02d}" for i in range(1, n + 1)]
    for i, name in enumerate(names):
        path = data / f"{name}.csv"
        if not path.exists():
            synthetic_stroke(ROWS_PER_HOSPITAL, 1000 + i).to_csv(path, index=False)
    return names


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _traffic(run: LocalRun) -> tuple[int, int, int] | None:
    log = run.out / "logs"
    for path in sorted(log.glob("*-server.log")):
        found = _TRAFFIC.findall(path.read_text(encoding="utf-8", errors="replace"))
        if found:
            requests, bytes_in, bytes_out = found[-1]
            return int(requests), int(bytes_in), int(bytes_out)
    return None


def _hospitals_run(settings: BenchSettings, n: int) -> tuple[_HospitalsRow, FederatedRun]:
    work = settings.work / "scale" / f"hospitals-{n}"
    data = settings.work / "scale" / "data"
    names = _write_hospitals(data, n)
    doc = derive_run(
        example_doc(settings.example),
        {
            "rounds": ROUNDS,
            "minHospitals": n,
            "roundTimeoutSeconds": 900,
            "hospitals": [
                {"name": name, "dataUri": (data / f"{name}.csv").resolve().as_uri()}
                for name in names
            ],
        },
    )
    doc["metadata"]["name"] = f"scale-{n}"
    run_file = write_run(doc, work / "run.yaml")
    sampler = PodMemorySampler()
    try:
        result = fedrun_local(run_file, work / "out", data, on_start=sampler.start, timeout_s=1800)
    finally:
        sampler.stop()
    run = load_run(run_file)
    floor = compute_floor(run, data) if result.round_seconds else None
    row = _HospitalsRow(
        n=n,
        run=result,
        floor_s=floor.median_s if floor else float("nan"),
        server_mib=max(sampler.peaks("server"), default=float("nan")),
        hospital_mib=sampler.peaks("hospital"),
        server_rss_mib=max(sampler.process_peaks("server"), default=float("nan")),
        hospital_rss_mib=max(sampler.process_peaks("hospital"), default=float("nan")),
        total_mib=sampler.peak_total_mib,
        traffic=_traffic(result),
    )
    return row, run


def _hospitals_table(rows: list[_HospitalsRow]) -> str:
    headers = [
        "Hospitals",
        "Phase",
        "Wall (s)",
        "Start / join + final eval / stop (s)",
        "Median s/round",
        "Floor s/round",
        "Overhead s/round",
        "Overhead per hospital (s)",
        "Fleet requests per hospital-round",
        "KiB in / out per hospital-round",
        "Server pod peak PSS / largest process RSS (MiB)",
        "Hospital pod peak PSS / largest process RSS, max over hospitals (MiB)",
        "All pods peak PSS (MiB)",
    ]
    out = []
    for r in rows:
        rounds = r.run.round_seconds
        median = statistics.median(rounds) if rounds else float("nan")
        overhead = median - r.floor_s
        phases = r.run.phases_s
        per = r.n * max(len(rounds), 1)
        traffic = r.traffic
        out.append(
            [
                str(r.n),
                r.run.phase,
                fmt(r.run.wall_s, 1),
                " / ".join(fmt(p, 0) for p in phases) if phases else "-",
                fmt(median, 2),
                fmt(r.floor_s, 2),
                fmt(overhead, 2),
                fmt(overhead / r.n, 3),
                fmt(traffic[0] / per, 0) if traffic else "-",
                f"{traffic[1] / per / 1024:.1f} / {traffic[2] / per / 1024:.1f}"
                if traffic
                else "-",
                f"{fmt(r.server_mib, 0)} / {fmt(r.server_rss_mib, 0)}",
                f"{fmt(max(r.hospital_mib, default=float('nan')), 0)} / "
                f"{fmt(r.hospital_rss_mib, 0)}",
                fmt(r.total_mib, 0),
            ]
        )
    return table(headers, out)


def _rows_table(sizes: tuple[int, ...]) -> tuple[str, list[str]]:
    """Throughput table and the update-size lines."""
    headers = [
        "Rows",
        "Prepare (rows/s)",
        *(
            f"{_name(m)} {'DP-SGD' if dp else 'plain'} (rows/s)"
            for m in MODELS
            for dp in (False, True)
        ),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for n in sizes:
            frame = pd.concat(
                [
                    synthetic_stroke(min(_CHUNK, n - s), 2000 + s // _CHUNK)
                    for s in range(0, n, _CHUNK)
                ],
                ignore_index=True,
            )
            started = time.perf_counter()
            data = prepare(frame, DataSpec(preset="stroke"), "synthetic stroke rows")
            prepare_rate = n / (time.perf_counter() - started)
            del frame
            cells = [f"{n:,}", f"{prepare_rate:,.0f}"]
            for spec in MODELS:
                for dp in (False, True):
                    cells.append(f"{_epoch_rate(spec, data, dp):,.0f}")
            out.append(cells)
    finally:
        torch.set_num_threads(threads)
    updates = []
    for spec in MODELS:
        params = sum(p.numel() for p in build_model(spec, 22).parameters())
        updates.append(f"{_name(spec)}: {params} parameters, {params * 4:,} bytes as float32")
    return table(headers, out), updates


def _name(spec: TrainingSpec) -> str:
    return spec.model if spec.model == "logistic" else f"mlp {list(spec.hidden_sizes or [])}"


def _epoch_rate(spec: TrainingSpec, data: Table, dp: bool) -> float:
    """Rows per second over one epoch of fedrun's own training step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        run = start_training(
            build_model(spec, data.x.shape[1]),
            data,
            spec,
            PrivacySpec(enabled=dp),
            noise_multiplier=1.0,
        )
        started = time.perf_counter()
        for x, y in run.loader:
            run.step(x, y)
    return len(data) / (time.perf_counter() - started)


def measure_scaling(settings: BenchSettings) -> PartResult:
    """Both measurements; the section for the report."""
    # Rows first: in-process, on a quiet machine (a run's stopping pods are not).
    rows_table, updates = _rows_table(QUICK_ROWS if settings.quick else ROWS)
    counts = QUICK_HOSPITALS if settings.quick else HOSPITALS
    measured = []
    skipped = []
    for n in counts:
        needed, available = n * _MIB_PER_HOSPITAL + _MIB_BESIDE, _available_mib()
        if available < needed:
            skipped.append(
                f"- {n} hospitals skipped: {needed:,} MiB needed, {available:,.0f} MiB available."
            )
            continue
        measured.append(_hospitals_run(settings, n))
    rows = [r for r, _ in measured]
    failures = skipped + [
        f"- {r.n} hospitals did not succeed: {r.run.phase}, "
        f"{r.run.status.get('message') or 'no message'} (`{r.run.out.relative_to(REPO)}`)"
        for r in rows
        if not r.run.succeeded
    ]
    example = load_run(settings.example).spec
    body = [
        f"### Hospitals: {ROUNDS} rounds, {example.training.model}, "
        f"DP-SGD ε={example.privacy.target_epsilon}, {ROWS_PER_HOSPITAL} synthetic rows each",
        "",
        _hospitals_table(rows),
        "",
        *failures,
        "- Each run is the example spec with the hospitals replaced, every one required "
        "(`minHospitals` = all), under `fedrun local` on this machine: every hospital's "
        "SuperNode, warm executor and forked tasks share the same 2 cores with the server.",
        "- Floor: the same hospitals' rounds in one process without Flower (as in the "
        "overhead section). Overhead per hospital is the overhead divided by the hospitals.",
        "- Fleet traffic: the server's fleet proxy counts every forwarded request's body "
        "(in) and answer (out), before TLS, over the whole run (joining, polls, heartbeats, "
        "the model down and the update up, the final evaluation), divided by hospitals × "
        "rounds.",
        "- Memory, sampled every 0.25 s: a pod's proportional set size (PSS) summed over its "
        "processes, where a page shared by several processes (a forked task and its warm "
        "parent, or one library mapped by every pod) is split among them; and the resident "
        "set size (RSS) of the pod's largest process, its warm executor.",
        "",
        "### Rows: one hospital's training throughput, one epoch, batch 64, one torch thread",
        "",
        rows_table,
        "",
        "- Prepare: the stroke preset's preprocessing of a pandas frame (validation, "
        "encoding, scaling) in rows per second. The frames are synthetic stroke rows.",
        "- Training: one epoch of fedrun's own step (`start_training`; DP-SGD: Opacus, "
        "noise multiplier 1.0, Poisson sampling) in rows per second.",
        "- The update a hospital sends per round: " + "; ".join(updates) + ".",
        "",
        f"How to reproduce: `{settings.reproduce('scale')}`",
    ]
    return PartResult("How cost grows: hospitals, rows and model size", "\n".join(body))

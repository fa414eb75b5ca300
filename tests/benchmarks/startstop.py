"""Part ``start``: how long the server pod takes to wait for hospitals, and to stop.

The server is started as ``fedrun local`` starts it (the local runner's own rendering, TLS
material and process), with no hospital: a cluster runs hospitals on other nodes, and on
one 2-core machine they would take the cores the start is measured on. Times are taken by
polling ``/status`` every 20 ms:

- **to /status**: the server process's Python start and imports, until it serves;
- **to waiting for hospitals**: the SuperLink started, the keys registered, the run
  submitted and the ServerApp waiting (``status.startTime`` set, reason
  ``WaitingForHospitals``), from the server process's launch;
- **stop**: from SIGTERM to the pod's process group, sent while the server waits for
  hospitals (a pod deleted or evicted mid-run), until every process of it is gone. The
  stop at the end of a run is in the ``overhead`` part.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

from fedrun_core.api import load_run
from fedrun_local.runner import LocalCluster, override_data
from tests.benchmarks.localrun import EXAMPLE, display_path, synthetic_data
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["TARGET_START_S", "TARGET_STOP_S", "measure_start_stop"]

TARGET_START_S = 5.0
TARGET_STOP_S = 2.0
POLL_S = 0.02
REPEATS = 3


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _one(data_dir: Path, out: Path) -> tuple[float, float, float]:
    """(to /status, to waiting for hospitals, stop) in seconds for one server start."""
    run = override_data(load_run(EXAMPLE), data_dir)
    cluster = LocalCluster.create(run, out)
    server = cluster.server
    assert server is not None
    launched = time.monotonic()
    server.start()
    assert server.proc is not None
    serving = waiting = None
    deadline = launched + 120
    while waiting is None and time.monotonic() < deadline:
        status = cluster.status()
        now = time.monotonic()
        if status is not None and serving is None:
            serving = now - launched
        if status is not None and status.get("startTime"):
            waiting = now - launched
        if not server.running:
            break
        time.sleep(POLL_S)
    pgid = server.proc.pid
    stopping = time.monotonic()
    os.killpg(pgid, signal.SIGTERM)
    while _group_alive(pgid) and time.monotonic() - stopping < 60:
        server.proc.poll()  # reap the leader so the group can empty
        time.sleep(POLL_S)
    stopped = time.monotonic() - stopping
    server.stop()  # SIGKILL whatever is left (nothing, when it stopped in time)
    if serving is None or waiting is None:
        raise RuntimeError(
            f"the server did not reach waiting for hospitals (log: {server.log_path})"
        )
    return serving, waiting, stopped


def measure_start_stop(settings: BenchSettings) -> PartResult:
    """Start and stop the demo's server ``REPEATS`` times; the section for the report."""
    work = settings.work / "start"
    data_dir = work / "data"
    synthetic_data(data_dir)
    results = [_one(data_dir, work / f"run-{i}") for i in range(1 if settings.quick else REPEATS)]
    serving, waiting, stopped = (statistics.median(r[i] for r in results) for i in range(3))
    rows = [
        [f"run {i + 1}", fmt(s, 2), fmt(w, 2), fmt(x, 2)] for i, (s, w, x) in enumerate(results)
    ]
    rows.append(["**median**", fmt(serving, 2), fmt(waiting, 2), fmt(stopped, 2)])
    met_start = "yes" if waiting <= TARGET_START_S else "**no**"
    met_stop = "yes" if stopped <= TARGET_STOP_S else "**no**"
    body = [
        table(
            [
                "",
                "to /status (s)",
                f"to waiting for hospitals (s; target ≤ {TARGET_START_S:.0f})",
                f"stop (s; target ≤ {TARGET_STOP_S:.0f})",
            ],
            rows,
        ),
        "",
        f"Targets: start {met_start}, stop {met_stop}.",
        "",
        f"How to reproduce: `{settings.reproduce('start')}`",
        "",
        f"- The demo spec (`{display_path(EXAMPLE)}`, 3 hospitals, TLS and node keys on) on "
        f"synthetic data (`{display_path(data_dir)}`); the server only, as the local runner "
        "starts it (rendering and the run's PKI happen before the clock starts, in about "
        "0.4 s). Polled every 20 ms.",
        "- To waiting for hospitals: the server's imports and status port, then the SuperLink "
        "and the warm executor starting side by side, the keys registered and the run "
        "submitted in-process, the ServerApp forked and waiting.",
        "- Stop: SIGTERM to the pod's process group while the server waits for hospitals "
        "(as a container runtime stops a container of a deleted or evicted pod) until every "
        "process in it has exited; the stop after a finished run is the last figure of the "
        'overhead part\'s "outside rounds" column.',
    ]
    return PartResult(
        "Server start and stop: the demo spec, no hospitals, one machine", "\n".join(body)
    )

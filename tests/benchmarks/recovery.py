"""Part ``recovery``: what the checkpoint costs per round, and how long a lost server takes
to come back.

The demo spec (3 hospitals, 5 rounds, DP, TLS, node keys) runs under the local runner on
synthetic data. Once with a SIGKILL to the server's process group while round 4 trains
(mid-round), once right after round 3 is done (between rounds); the runner restarts the
server as a Deployment would. Times are taken by polling ``/status`` every 0.2 s:

- **serving again**: from the kill until the new server answers ``/status`` (its
  status comes from the checkpoint at once);
- **training again**: until the server says it trains the next round (the hospitals have
  rejoined);
- **next round done**: until the round after the last completed one is finished: the
  recovery time of docs/reliability.md.

The checkpoint's size and write time per round are the server's own log lines.
"""

from __future__ import annotations

import re
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from fedrun_core.api import load_run
from fedrun_local.runner import LocalCluster, override_data
from tests.benchmarks.localrun import EXAMPLE, display_path, synthetic_data
from tests.benchmarks.report import fmt, table
from tests.benchmarks.settings import BenchSettings, PartResult

__all__ = ["measure_recovery"]

POLL_S = 0.2
_WRITTEN = re.compile(r"checkpoint of round (\d+) written \((\d+) bytes, ([0-9.]+) s\)")


def _run(data_dir: Path, out: Path, kill_when: str) -> dict[str, Any]:
    """One run with one server kill; the timings and the checkpoint lines of its log."""
    run = override_data(load_run(EXAMPLE), data_dir)
    cluster = LocalCluster.create(run, out)
    marks: dict[str, float] = {}
    killed_round: list[int] = []

    def on_status(status: dict[str, Any]) -> None:
        now = time.monotonic()
        current = int(status["round"]["current"])
        message = str(status.get("message", ""))
        if not killed_round:
            if kill_when in message:
                killed_round.append(current)
                marks["kill"] = now
                assert cluster.server is not None
                cluster.server.kill(signal.SIGKILL)
            return
        marks.setdefault("serving", now)
        if f"round {killed_round[0] + 1}/" in message and "training" in message:
            marks.setdefault("training", now)
        if current > killed_round[0]:
            marks.setdefault("next_round", now)

    try:
        cluster.start()
        status = cluster.wait(timeout_s=900, on_status=on_status, poll_s=POLL_S)
    finally:
        cluster.stop()
    assert cluster.server is not None
    log = cluster.server.log_path.read_text(encoding="utf-8", errors="replace")
    writes = [(int(r), int(b), float(s)) for r, b, s in _WRITTEN.findall(log)]
    if status.get("phase") != "Succeeded" or "next_round" not in marks:
        raise RuntimeError(f"the run did not recover: {status.get('message')} (log: {out})")
    kill = marks["kill"]
    return {
        "killed_after": killed_round[0],
        "serving": marks["serving"] - kill,
        "training": marks.get("training", marks["next_round"]) - kill,
        "next_round": marks["next_round"] - kill,
        "writes": writes,
        "rounds": status["round"]["current"],
        "epsilon": (status.get("privacy") or {}).get("epsilonSpent"),
    }


def measure_recovery(settings: BenchSettings) -> PartResult:
    """Kill the demo's server mid-round and between rounds; the section for the report."""
    work = settings.work / "recovery"
    data_dir = work / "data"
    synthetic_data(data_dir)
    cases = [("mid-round (round 4 training)", "round 4/5: training")]
    if not settings.quick:
        cases.append(("between rounds (round 3 done)", "round 3/5 done"))
    results = [
        (label, _run(data_dir, work / f"run-{i}", when)) for i, (label, when) in enumerate(cases)
    ]
    rows = [
        [
            label,
            str(r["killed_after"]),
            fmt(r["serving"], 1),
            fmt(r["training"], 1),
            fmt(r["next_round"], 1),
            f"{r['rounds']}/5",
            fmt(r["epsilon"], 4),
        ]
        for label, r in results
    ]
    writes = [w for _, r in results for w in r["writes"]]
    sizes = [b for _, b, _ in writes]
    seconds = [s for _, _, s in writes]
    body = [
        table(
            [
                "server SIGKILLed",
                "rounds done before",
                "serving again (s)",
                "training again (s)",
                "next round done (s)",
                "rounds at the end",
                "ε spent (target 1.0)",
            ],
            rows,
        ),
        "",
        table(
            ["checkpoint", "writes", "size (bytes)", "median write (s)", "max write (s)"],
            [
                [
                    "per round",
                    str(len(writes)),
                    f"{min(sizes)}–{max(sizes)}" if sizes else "—",
                    fmt(statistics.median(seconds), 4) if seconds else "—",
                    fmt(max(seconds), 4) if seconds else "—",
                ]
            ],
        ),
        "",
        f"How to reproduce: `{settings.reproduce('recovery')}`",
        "",
        f"- The demo spec (`{display_path(EXAMPLE)}`) on synthetic data "
        f"(`{display_path(data_dir)}`), 3 hospitals on this machine; SIGKILL to the server's "
        "process group (SuperLink, executor, ServerApp), which the local runner restarts "
        "after its 1 s back-off. Times from the kill, polled every 0.2 s.",
        "- Serving again: the new server's `/status` (shown from the checkpoint). Training "
        "again: the hospitals noticed the loss, waited for the new fleet port, rejoined on "
        "their keys, and the next round was sent. Next round done: the recovery time.",
        "- Checkpoint: the ServerApp's log lines `checkpoint of round N written (B bytes, S s)`"
        " over both runs (write, flush, rename, directory flush).",
    ]
    return PartResult(
        "Recovery: the server killed mid-run, the checkpoint's cost per round", "\n".join(body)
    )

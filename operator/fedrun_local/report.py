"""What ``fedrun local`` shows and writes: a live progress line, the outputs, a final table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fedrun_core.api import FederatedRun
from fedrun_render.identity import server_name


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def progress_line(status: dict[str, Any]) -> str:
    """One line for a status: phase, round, AUROC, ε against the target, message."""
    rnd = status.get("round") or {}
    privacy = status.get("privacy") or {}
    metrics = status.get("metrics") or {}
    eps = (
        f"ε {_fmt(privacy.get('epsilonSpent'))}/{privacy.get('targetEpsilon')}"
        if privacy
        else "ε off"
    )
    return (
        f"{status.get('phase', '?'):<15} round {rnd.get('current', 0)}/{rnd.get('total', '?')}"
        f"  AUROC {_fmt(metrics.get('auroc'))}  {eps}  {status.get('message', '')}"
    )


class ProgressView:
    """A live bar (rich) at a terminal; plain lines when asked or when not a TTY."""

    def __init__(self, run: FederatedRun, enabled: bool = True) -> None:
        self.run = run
        self.live = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self._last_line = ""
        self._progress: Any = None
        self._task: Any = None

    def start(self) -> None:
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(
            self.run.metadata.name, total=self.run.spec.rounds, detail="starting"
        )
        self._progress.start()

    def update(self, status: dict[str, Any]) -> None:
        line = progress_line(status)
        if self._progress is not None:
            rnd = status.get("round") or {}
            detail = line.split("  ", 1)[1] if "  " in line else line
            self._progress.update(self._task, completed=rnd.get("current", 0), detail=detail)
        elif line != self._last_line:
            sys.stderr.write(line + "\n")
        self._last_line = line

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def write_outputs(out: Path, status: dict[str, Any], history: dict[str, Any]) -> Path:
    """Write ``status.json``, ``history.json`` and ``report.png``; returns the status path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "status.json"
    path.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "history.json").write_text(
        json.dumps(history, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    if history.get("rounds"):
        from fedrun_local.plot import plot_report

        plot_report(history, status, out / "report.png")
    return path


def data_counts_rows(status: dict[str, Any]) -> list[list[str]]:
    """One row per hospital that reported its data: rows read, used, dropped, and per
    column what was missing and what its policy did (counts only)."""
    rows: list[list[str]] = []
    for h in status.get("hospitals", []):
        data = h.get("data")
        if not isinstance(data, dict):
            continue
        notes = []
        for column in data.get("columns", []):
            done = [f"{column[k]} {k}" for k in ("imputed", "dropped", "other") if column.get(k)]
            missing = f"{column.get('missing', 0)} missing" if column.get("missing") else ""
            notes.append(f"{column['name']}: " + ", ".join(filter(None, [missing, *done])))
        rows.append(
            [
                h["name"],
                str(data.get("rows")),
                str(data.get("used")),
                str(data.get("dropped")),
                "; ".join(notes) or "-",
            ]
        )
    return rows


def data_table(status: dict[str, Any]) -> Any:
    """The hospitals' data counts as a rich table, or None when no hospital reported any."""
    from rich.table import Table

    rows = data_counts_rows(status)
    if not rows:
        return None
    table = Table(title="data: rows read, used and dropped; per column, what was done")
    for col in ("hospital", "rows", "used", "dropped", "columns"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


def print_summary(
    run: FederatedRun,
    status: dict[str, Any],
    history: dict[str, Any],
    out: Path,
    elapsed_s: float,
    status_path: Path,
) -> None:
    """The final table: one row per hospital, then the run's figures and where outputs are."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    privacy = status.get("privacy") or {}
    per_eps = {h["name"]: h.get("epsilon") for h in privacy.get("hospitals", [])}
    last_eval: dict[str, dict[str, Any]] = {}
    for rnd in history.get("rounds", []):
        for name, ev in (rnd.get("hospitalEvaluation") or {}).items():
            last_eval[name] = ev
    table = Table(title=f"FederatedRun {run.metadata.name}: {status.get('phase')}")
    for col in ("hospital", "state", "restarts", "ε spent", "AUROC (own test)", "message"):
        table.add_column(col)
    for h in status.get("hospitals", []):
        name = h["name"]
        table.add_row(
            name,
            str(h.get("state")),
            str(h.get("restarts", 0)),
            _fmt(per_eps.get(name)),
            _fmt((last_eval.get(name) or {}).get("auroc")),
            str(h.get("message") or ""),
        )
    console.print(table)
    data = data_table(status)
    if data is not None:
        console.print(data)
    metrics = status.get("metrics") or {}
    rnd = status.get("round") or {}
    console.print(
        f"phase {status.get('phase')}  rounds {rnd.get('current', 0)}/{rnd.get('total')}  "
        f"AUROC {_fmt(metrics.get('auroc'))} (mean of the hospitals'; pooled "
        f"{_fmt(metrics.get('pooledAuroc'))})  AUPRC {_fmt(metrics.get('auprc'))}  "
        f"loss {_fmt(metrics.get('loss'))}  "
        + (
            f"ε {_fmt(privacy.get('epsilonSpent'))} of {privacy.get('targetEpsilon')} "
            f"(δ={privacy.get('delta')})  "
            if privacy
            else "DP off  "
        )
        + f"wall {elapsed_s:.0f}s"
    )
    if status.get("message"):
        console.print(f"message: {status['message']}")
    console.print(f"status: {status_path}   report: {out / 'report.png'}   logs: {out / 'logs'}")
    store = out / "pods" / server_name(run) / "state" / "mlflow.db"
    if store.exists():
        console.print(
            f"MLflow store: sqlite:///{store.resolve()} (run {status.get('mlflowRunId')}); "
            "browse it with `mlflow ui --backend-store-uri <that URI>` where the full "
            "mlflow package is installed"
        )

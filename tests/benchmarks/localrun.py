"""Drive the real ``fedrun`` command line: demo data and ``fedrun local`` runs.

Every run goes through the same executable a user types, so what is timed here is what a
user waits for. Commands are recorded relative to the repository root, as a reader would
type them there.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

__all__ = [
    "EXAMPLE",
    "REPO",
    "LocalRun",
    "derive_run",
    "display_path",
    "fedrun_local",
    "quiet_env",
    "shell",
    "synthetic_data",
    "write_run",
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "federatedrun-local.yaml"
#: The final global model in ``fedrun local``'s output (the server pod's state directory).
_SERVER_MODEL = "pods/*-server/state/model.npz"
_QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def _bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def display_path(path: Path | str) -> str:
    """A path as a reader at the repository root would type it (``../shared/...`` too)."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(REPO.parent):
        return os.path.relpath(path, REPO)
    return str(path)


def _display(arg: str) -> str:
    return display_path(arg) if Path(arg).is_absolute() else arg


def shell(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` (with ``env`` assignments in front) as one shell line."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join([*prefix, shlex.join(_display(a) for a in argv)])


def quiet_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without telemetry or update checks, plus ``extra``."""
    env = dict(os.environ)
    env.update(_QUIET)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def synthetic_data(out_dir: Path) -> str:
    """Write the synthetic demo hospitals with ``fedrun demo-data``; returns the command."""
    argv = [str(_bin("fedrun")), "demo-data", str(out_dir)]
    subprocess.run(argv, env=quiet_env(), cwd=REPO, check=True, capture_output=True)
    return shell(argv)


def example_doc(example: Path = EXAMPLE) -> dict[str, Any]:
    """The example FederatedRun as a plain dict."""
    doc: dict[str, Any] = yaml.safe_load(example.read_text(encoding="utf-8"))
    return doc


def derive_run(doc: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``doc`` with dotted ``spec`` paths set (``{"privacy.enabled": False}``)."""
    out = copy.deepcopy(dict(doc))
    for dotted, value in changes.items():
        node = out["spec"]
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def write_run(doc: Mapping[str, Any], path: Path) -> Path:
    """Write a FederatedRun dict as YAML; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False), encoding="utf-8")
    return path


@dataclass(frozen=True)
class LocalRun:
    """The outcome of one ``fedrun local`` run."""

    command: str
    out: Path
    wall_s: float
    status: dict[str, Any]
    history: dict[str, Any]
    launched_at: float = 0.0  # epoch seconds when the command started

    def _since_launch(self, field: str) -> float | None:
        """Seconds from launch to a status timestamp (RFC 3339, second precision)."""
        stamp = self.status.get(field)
        if not stamp or not self.launched_at:
            return None
        when = datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return when.timestamp() - self.launched_at

    @property
    def phases_s(self) -> tuple[float, float, float] | None:
        """Seconds before the run started, inside it but outside rounds, and after it ended.

        "Before" is the server starting and the run being submitted; "inside" is waiting
        for hospitals to join plus the final evaluation; "after" is stopping every
        process and writing the report. Timestamps have one-second precision.
        """
        start, end = self._since_launch("startTime"), self._since_launch("completionTime")
        if start is None or end is None:
            return None
        return start, end - start - sum(self.round_seconds), self.wall_s - end

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", "unknown"))

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def round_seconds(self) -> list[float]:
        """Each round's duration as the server measured it (``durationSeconds``)."""
        return [float(r["durationSeconds"]) for r in self.history.get("rounds", [])]

    @property
    def epsilon_spent(self) -> float | None:
        spent = (self.status.get("privacy") or {}).get("epsilonSpent")
        return None if spent is None else float(spent)

    @property
    def metrics(self) -> dict[str, Any]:
        """``status.metrics``: the final global model, example-weighted over hospitals."""
        metrics: dict[str, Any] = self.status.get("metrics") or {}
        return metrics

    def final_weights(self) -> list[npt.NDArray[np.float32]] | None:
        """The final global model the server saved (``model.npz``), if there is one."""
        found = sorted(self.out.glob(_SERVER_MODEL))
        if not found:
            return None
        path = found[0]
        with np.load(path) as npz:
            return [npz[f"arr_{i}"].astype(np.float32) for i in range(len(npz.files))]

    def describe_failure(self) -> str:
        """The run's phase and message, and the last lines of its output."""
        log = self.out.parent / f"{self.out.name}.log"
        tail = ""
        if log.exists():
            tail = " / ".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:])
        return f"phase {self.phase}: {self.status.get('message', '')} {tail}".strip()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data


def _wait_or_interrupt(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for ``proc``; past the timeout, SIGINT it so it stops its own pods first."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fedrun_local(
    run_file: Path,
    out: Path,
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 900.0,
    on_start: Callable[[int], None] | None = None,
) -> LocalRun:
    """Run ``fedrun local RUN_FILE --out OUT --data-dir DATA_DIR --no-progress`` and time it.

    ``env`` holds extra variables (shown in the recorded command). Output goes to
    ``OUT.log`` beside ``OUT``. ``on_start`` is called with the command's pid once it runs.
    """
    argv = [
        str(_bin("fedrun")),
        "local",
        str(run_file),
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--no-progress",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    launched_at, started = time.time(), time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, env=quiet_env(env), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
        )
        if on_start is not None:
            on_start(proc.pid)
        _wait_or_interrupt(proc, timeout_s)
    wall = time.perf_counter() - started
    return LocalRun(
        command=shell(argv, env),
        out=out,
        wall_s=wall,
        status=_read_json(out / "status.json"),
        history=_read_json(out / "history.json"),
        launched_at=launched_at,
    )

"""How fedrun starts Flower's processes: environment, connection file, termination."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

# Flower phones home and checks for updates unless told not to; pods have no business
# doing either. The task poll interval is how often an idle executor asks for work
# (1 s by default): 0.1 s takes most of a second off every message.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    "PYTHONUNBUFFERED": "1",
}


def environment(flwr_home: Path) -> dict[str, str]:
    """The current environment plus fedrun's Flower settings and a private FLWR_HOME."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower's executables sit beside this interpreter (a venv that was not activated).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def executable(name: str) -> str:
    """A Flower command from this interpreter's bin directory, else whatever PATH has."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def supernode_command() -> list[str]:
    """How a hospital starts Flower's SuperNode: ``flower-supernode`` through fedrun's
    wrapper (``python -m fedrun_trainer.supernode``: a shorter idle poll and heartbeat)."""
    return [sys.executable, "-m", "fedrun_trainer.supernode"]


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None = None) -> Path:
    """Write the ``flwr`` CLI's connection file naming the local SuperLink ``local``.

    With ``root_certificates`` (the run's CA) the CLI speaks TLS and verifies the
    SuperLink against it; without, it connects insecurely.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    transport = (
        "insecure = true\n"
        if root_certificates is None
        else f'root-certificates = "{root_certificates.resolve()}"\n'
    )
    path.write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{address}"\n{transport}',
        encoding="utf-8",
    )
    return path


def free_port() -> int:
    """A loopback TCP port that is free now (for a process's private listener)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_secret(path: Path) -> Path:
    """A fresh random secret, readable by this user only (SuperNode <-> executor auth)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path


def terminate_all(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM every process at once, then wait for each (SIGKILL after ``grace_s``).

    Flower's processes each take up to a second or two to shut down: one after the other,
    a pod's stop was their sum.
    """
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        terminate(proc, grace_s)


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


#: First wait (seconds) before asking again for a message object that is not there yet;
#: Flower's own is 1 s, doubling up to 10 s.
OBJECT_PULL_BACKOFF_S = 0.05


def shorten_object_pull_backoff(backoff_s: float = OBJECT_PULL_BACKOFF_S) -> None:
    """Make this process's Flower retry a missing message object after ``backoff_s``.

    A SuperNode hands a message to its executor before it has fetched the message's
    objects, so the ClientApp's first request for them usually finds nothing and Flower
    waits a full second before the next (``PULL_INITIAL_BACKOFF``, bound as a keyword
    default of ``pull_objects`` and ``pull_and_inflate_object_from_tree``): a second of
    every round at every hospital. This sets those defaults; the doubling, the 10 s cap and
    the tries and time limits stay Flower's. Call it in the process (or the parent of the
    forked processes) that pulls. Raises ``RuntimeError`` if Flower's functions changed.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults:
            raise RuntimeError(f"flwr's {fn.__name__} no longer takes initial_backoff")
        defaults["initial_backoff"] = backoff_s

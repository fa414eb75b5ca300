"""``fedrun client``: the hospital pod's main process, a wrapper around Flower's SuperNode.

A SuperNode never exits by itself after a run, and exits 0 on errors that matter, so the
wrapper decides the pod's fate:

- exit 0 when the server's final ``shutdown`` message arrived (the run is over);
- exit 1 with the hospital's error (bad data names the file and row) when it failed;
- exit 3 when the server has been unreachable for longer than ``--server-lost-timeout``;
- the SuperNode's own status if it dies first.

The message is also written to ``--termination-log`` (Kubernetes' termination message),
so ``kubectl describe`` and the operator show it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedrun_trainer import flwr_env
from fedrun_trainer.hospital import DONE_MARKER, FAILED_MARKER
from fedrun_trainer.settings import RunSettings

log = logging.getLogger("fedrun.client")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_SERVER_LOST = 3
FAILED_ACK_GRACE_S = 30.0


@dataclass(frozen=True)
class ClientOptions:
    """Command-line options of ``fedrun client``."""

    config: str
    hospital: str
    server: str
    state_dir: Path
    server_lost_timeout_s: float = 300.0
    termination_log: Path | None = None
    isolation: str = "warm"  # "warm" (fork from a pre-imported executor) or "subprocess"


def free_port() -> int:
    """A loopback port that is free now (the SuperNode's private runtime API uses it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _finish(opts: ClientOptions, code: int, message: str) -> int:
    (log.info if code == 0 else log.error)("%s", message)
    if opts.termination_log is not None:
        with contextlib.suppress(OSError):
            opts.termination_log.write_text(message + "\n", encoding="utf-8")
    return code


def node_config(opts: ClientOptions, incarnation: str) -> str:
    """The ``--node-config`` string that tells the ClientApp who and where it is."""
    values = {
        "hospital": opts.hospital,
        "fedrun-config": str(Path(opts.config).resolve()),
        "state-dir": str(opts.state_dir.resolve()),
        "incarnation": incarnation,
    }
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def run_client(opts: ClientOptions) -> int:
    """Run the SuperNode until the run ends for this hospital; returns the exit status."""
    settings = RunSettings.load(opts.config)
    settings.hospital(opts.hospital)  # refuses a hospital the run does not have
    state_dir = opts.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    for marker in (DONE_MARKER, FAILED_MARKER):
        (state_dir / marker).unlink(missing_ok=True)
    incarnation = f"{time.time_ns()}-{os.getpid()}"

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    env = flwr_env.environment(state_dir / "flwr-home")
    runtime_port = free_port()
    argv = [
        flwr_env.executable("flower-supernode"),
        "--insecure",
        "--superlink",
        opts.server,
        "--node-config",
        node_config(opts, incarnation),
        "--port",
        str(runtime_port),
        "--max-wait-time",
        # Longer than the wrapper's own limit: the wrapper, not Flower, reports a lost server.
        str(int(opts.server_lost_timeout_s) + 30),
    ]
    executor: subprocess.Popen[bytes] | None = None
    if opts.isolation == "warm":
        secret = flwr_env.write_secret(state_dir / "superexec.secret")
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    supernode = subprocess.Popen(argv, env=env)
    if opts.isolation == "warm":
        executor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedrun_trainer.warm_executor",
                "--runtime-api-address",
                f"127.0.0.1:{runtime_port}",
                "--insecure",
                "--parent-pid",
                str(supernode.pid),
                "--superexec-auth-secret-file",
                str(secret),
            ],
            env=env,
        )
    log.info("hospital %s joining %s (%s isolation)", opts.hospital, opts.server, opts.isolation)
    last_seen = time.monotonic()
    last_probe = 0.0
    try:
        while not stop.is_set():
            done = state_dir / DONE_MARKER
            failed = state_dir / FAILED_MARKER
            if failed.exists() and (
                done.exists() or time.time() - failed.stat().st_mtime > FAILED_ACK_GRACE_S
            ):
                # Exit once the server acknowledged the failure (its shutdown message), so
                # the reason reached the run's status before this SuperNode goes away.
                message = json.loads(failed.read_text(encoding="utf-8")).get("message", "")
                return _finish(opts, EXIT_FAILED, f"hospital {opts.hospital} failed: {message}")
            if failed.exists():
                stop.wait(0.2)
                continue
            if done.exists():
                return _finish(opts, EXIT_DONE, f"hospital {opts.hospital}: run finished")
            if executor is not None and executor.poll() is not None:
                return _finish(
                    opts,
                    EXIT_FAILED,
                    f"hospital {opts.hospital}: the warm executor exited with "
                    f"status {executor.returncode}",
                )
            if supernode.poll() is not None:
                if supernode.returncode != 0 and not reachable(opts.server):
                    return _finish(
                        opts,
                        EXIT_SERVER_LOST,
                        f"hospital {opts.hospital}: server {opts.server} unreachable; "
                        f"Flower SuperNode gave up (status {supernode.returncode})",
                    )
                return _finish(
                    opts,
                    supernode.returncode or EXIT_FAILED,
                    f"hospital {opts.hospital}: Flower SuperNode exited with "
                    f"status {supernode.returncode}",
                )
            now = time.monotonic()
            if now - last_probe >= 5.0:
                last_probe = now
                if reachable(opts.server):
                    last_seen = now
                elif now - last_seen > opts.server_lost_timeout_s:
                    return _finish(
                        opts,
                        EXIT_SERVER_LOST,
                        f"hospital {opts.hospital}: server {opts.server} unreachable "
                        f"for more than {opts.server_lost_timeout_s:.0f}s",
                    )
            stop.wait(0.2)
        return _finish(opts, 143, f"hospital {opts.hospital}: terminated")
    finally:
        flwr_env.terminate(supernode)
        if executor is not None:
            flwr_env.terminate(executor)

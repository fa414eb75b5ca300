"""``fedrun client``: the hospital pod's main process, a wrapper around Flower's SuperNode.

A SuperNode never exits by itself after a run, and exits 0 on errors that matter, so the
wrapper decides the pod's fate:

- exit 0 when the server's final ``shutdown`` message arrived (the run is over);
- exit 1 with the hospital's error (bad data names the file and row) when it failed;
- exit 3 when the server has been unreachable for longer than ``--server-lost-timeout``;
- the SuperNode's own status if it dies first.

The message is also written to ``--termination-log`` (Kubernetes' termination message),
so ``kubectl describe`` and the operator show it. A hospital's failure message is the one
its ClientApp sent the server, which holds no value from the data (see
:mod:`fedrun_trainer.hospital.handlers`); it is written there as soon as the failure is seen, so
that a pod killed while it waits for the server's acknowledgement does not fall back to
the tail of its log (``FallbackToLogsOnError``), where the ClientApp logged the value.
"""

from __future__ import annotations

import collections
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

from fedrun_core import names as c
from fedrun_trainer.common import flwr_env
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.hospital.handlers import DONE_MARKER, FAILED_MARKER

log = logging.getLogger("fedrun.client")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_SERVER_LOST = 3
FAILED_ACK_GRACE_S = 30.0
# Written into the state dir at the first start: a container that finds it was restarted.
STARTED_MARKER = "supernode.started"
# Flower keeps a node online for 2 heartbeat intervals (2 x 10 s with fedrun's SuperNode,
# fedrun_trainer.supernode) after its last heartbeat and refuses to activate it again before;
# a restarted hospital retries that long, and more.
REJOIN_WAIT_S = 60.0
REJOIN_RETRY_S = 5.0
#: How many times a hospital joins a restarted server again before it gives up, and the
#: pause before each (times the rejoins so far).
MAX_REJOINS = 20
REJOIN_BACKOFF_S = 0.5


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
    tls_dir: Path | None = None  # the mounted <run>-<hospital>-auth Secret; None: insecure


_NOT_ACTIVATED = "Failed to activate SuperNode"  # Flower's refusal of a node key (A4)

# What Flower prints when it refuses to connect, and what it means for a fedrun hospital.
_FLOWER_REFUSALS = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's TLS certificate does not verify against this run's CA (ca.crt of the "
        "<run>-<hospital>-auth Secret): expired, made for another name, or the server "
        "belongs to another run",
    ),
    (
        _NOT_ACTIVATED,
        "the server does not know this hospital's node key (node.key belongs to another run, "
        "or the server did not register it)",
    ),
    (
        "must be registered",
        "the server requires node authentication and this hospital has no node key",
    ),
)


def check_material(tls_dir: Path) -> None:
    """Raise ValueError unless ``tls_dir`` holds a CA certificate and a loadable node key."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for name in (c.CA_FILE, c.NODE_KEY_FILE):
        if not (tls_dir / name).is_file():
            raise ValueError(
                f"{tls_dir / name} is missing: mount the hospital's <run>-<hospital>-auth "
                "Secret there (the operator makes it when the run is created)"
            )
    try:
        x509.load_pem_x509_certificates((tls_dir / c.CA_FILE).read_bytes())
    except ValueError as err:
        raise ValueError(f"{tls_dir / c.CA_FILE} is not a PEM certificate: {err}") from None
    try:
        key = serialization.load_ssh_private_key(
            (tls_dir / c.NODE_KEY_FILE).read_bytes(), password=None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(
            f"{tls_dir / 'node.key'} is not an unencrypted OpenSSH private key: {err}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{tls_dir / 'node.key'} is a {type(key).__name__}, not an ECDSA (NIST curve) "
            "key: Flower accepts only those as node keys"
        )


def explain_flower_exit(lines: list[str]) -> str:
    """The line of a SuperNode's output that says why it gave up, with what it means.

    Empty when the output names no known refusal.
    """
    for needle, meaning in _FLOWER_REFUSALS:
        for line in reversed(lines):
            if needle in line:
                return f"{line.strip()[-300:]} ({meaning})"
    return ""


class OutputTail:
    """Copies a process's output to ours, keeping its last lines for the exit message."""

    def __init__(self, proc: subprocess.Popen[bytes], keep: int = 200) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._proc = proc
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.buffer.flush()
            self.lines.append(raw.decode("utf-8", errors="replace"))

    def join(self, timeout_s: float = 5.0) -> list[str]:
        """Wait for the output to end (the process exited); the lines kept."""
        self._thread.join(timeout_s)
        return list(self.lines)


def reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _write_termination_log(opts: ClientOptions, message: str) -> None:
    if opts.termination_log is not None:
        with contextlib.suppress(OSError):
            opts.termination_log.write_text(message + "\n", encoding="utf-8")


def _finish(opts: ClientOptions, code: int, message: str) -> int:
    (log.info if code == 0 else log.error)("%s", message)
    _write_termination_log(opts, message)
    return code


def _failure_message(opts: ClientOptions, failed: Path) -> str:
    """The pod's message for the hospital's ``failed.json`` (the message the server got)."""
    message = json.loads(failed.read_text(encoding="utf-8")).get("message", "")
    return f"hospital {opts.hospital} failed: {message}"


def node_config(opts: ClientOptions, incarnation: str) -> str:
    """The ``--node-config`` string that tells the ClientApp who and where it is."""
    values = {
        "hospital": opts.hospital,
        "fedrun-config": str(Path(opts.config).resolve()),
        "state-dir": str(opts.state_dir.resolve()),
        "incarnation": incarnation,
    }
    return " ".join(f'{k}="{v}"' for k, v in values.items())


@dataclass
class _Flower:
    """One start of the hospital's Flower processes."""

    supernode: subprocess.Popen[bytes]
    output: OutputTail
    executor: subprocess.Popen[bytes] | None

    def stop(self) -> None:
        started = time.monotonic()
        procs = [self.supernode] + ([] if self.executor is None else [self.executor])
        flwr_env.terminate_all(procs)
        log.debug("Flower's processes stopped in %.2fs", time.monotonic() - started)


def _start_flower(
    opts: ClientOptions,
    env: dict[str, str],
    state_dir: Path,
    transport: list[str],
    incarnation: str,
) -> _Flower:
    """Start the SuperNode (and, with warm isolation, its executor)."""
    runtime_port = flwr_env.free_port()
    argv = [
        *flwr_env.supernode_command(),
        *transport,
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
    secret = None
    if opts.isolation == "warm":
        secret = flwr_env.write_secret(state_dir / "superexec.secret")
        argv += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    supernode = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if secret is None:
        return _Flower(supernode, OutputTail(supernode), None)
    executor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedrun_trainer.warm_executor",
            # The parent reads the data and calibrates σ once, for every forked task.
            "--fedrun-preload",
            str(Path(opts.config).resolve()),
            opts.hospital,
            str(state_dir),
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
    return _Flower(supernode, OutputTail(supernode), executor)


def _wait_for_server(opts: ClientOptions, stop: threading.Event) -> int | None:
    """Wait until the server's fleet port accepts connections; None then, else the exit
    status (after :func:`_finish`) when it did not within the server-lost timeout or the
    wrapper was told to stop."""
    waited = time.monotonic()
    while not reachable(opts.server, timeout_s=1.0):
        if time.monotonic() - waited > opts.server_lost_timeout_s:
            return _finish(
                opts,
                EXIT_SERVER_LOST,
                f"hospital {opts.hospital}: server {opts.server} not reachable within "
                f"{opts.server_lost_timeout_s:.0f}s",
            )
        if stop.wait(0.3):
            return _finish(opts, 143, f"hospital {opts.hospital}: terminated")
    return None


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

    if opts.tls_dir is not None:
        try:
            check_material(opts.tls_dir)
        except ValueError as err:
            return _finish(opts, EXIT_CONFIG, f"hospital {opts.hospital}: {err}")
        transport = [
            "--root-certificates",
            str(opts.tls_dir / c.CA_FILE),
            "--auth-supernode-private-key",
            str(opts.tls_dir / c.NODE_KEY_FILE),
        ]
    else:
        transport = ["--insecure"]

    # Wait for the server's fleet port before starting Flower: it opens once the server has
    # registered the hospitals' keys, and a SuperNode that finds it closed backs off for
    # seconds at a time.
    code = _wait_for_server(opts, stop)
    if code is not None:
        return code

    env = flwr_env.environment(state_dir / "flwr-home")
    # A restarted container (same pod, same state dir) rejoins with the same node key, which
    # the server still holds online until the old SuperNode's heartbeats have lapsed.
    restarted = (state_dir / STARTED_MARKER).exists()
    (state_dir / STARTED_MARKER).touch()
    first_start = time.monotonic()
    flower = _start_flower(opts, env, state_dir, transport, incarnation)
    log.info("hospital %s joining %s (%s isolation)", opts.hospital, opts.server, opts.isolation)
    last_seen = time.monotonic()
    last_probe = 0.0
    failure_written = False
    rejoins = 0
    try:
        while not stop.is_set():
            done = state_dir / DONE_MARKER
            failed = state_dir / FAILED_MARKER
            if failed.exists() and (
                done.exists() or time.time() - failed.stat().st_mtime > FAILED_ACK_GRACE_S
            ):
                # Exit once the server acknowledged the failure (its shutdown message), so
                # the reason reached the run's status before this SuperNode goes away.
                return _finish(opts, EXIT_FAILED, _failure_message(opts, failed))
            if failed.exists():
                if not failure_written:
                    _write_termination_log(opts, _failure_message(opts, failed))
                    failure_written = True
                stop.wait(0.2)
                continue
            if done.exists():
                return _finish(opts, EXIT_DONE, f"hospital {opts.hospital}: run finished")
            supernode = flower.supernode
            if supernode.poll() is not None and supernode.returncode == 0 and rejoins < MAX_REJOINS:
                # Flower's SuperNode leaves with status 0 when the server no longer knows
                # its node (a restarted server): the run is not over for this hospital
                # (no marker says so), so it joins the new server on the same key.
                rejoins += 1
                tail = " | ".join(line.strip() for line in flower.output.join()[-3:])
                log.warning(
                    "hospital %s: the SuperNode left before the run ended (the server "
                    "restarted?); rejoining (%d of at most %d); its last words: %s",
                    opts.hospital,
                    rejoins,
                    MAX_REJOINS,
                    tail,
                )
                flower.stop()
                if stop.wait(REJOIN_BACKOFF_S * rejoins):
                    break
                code = _wait_for_server(opts, stop)
                if code is not None:
                    return code
                flower = _start_flower(opts, env, state_dir, transport, incarnation)
                last_seen = time.monotonic()
                continue
            if supernode.poll() is not None:
                lines = flower.output.join()
                if (
                    restarted
                    and supernode.returncode
                    and any(_NOT_ACTIVATED in line for line in lines)
                    and time.monotonic() - first_start < REJOIN_WAIT_S
                ):
                    log.info(
                        "hospital %s: the server still holds this hospital's previous "
                        "SuperNode online; trying again in %.0fs",
                        opts.hospital,
                        REJOIN_RETRY_S,
                    )
                    flower.stop()
                    if stop.wait(REJOIN_RETRY_S):
                        break
                    flower = _start_flower(opts, env, state_dir, transport, incarnation)
                    continue
                why = explain_flower_exit(lines) if supernode.returncode else ""
                if why and restarted and any(_NOT_ACTIVATED in line for line in lines):
                    why += (
                        f"; this container was restarted and retried for {REJOIN_WAIT_S:.0f}s, "
                        "so the server may also still hold its previous SuperNode online"
                    )
                if why:
                    return _finish(
                        opts,
                        EXIT_FAILED,
                        f"hospital {opts.hospital}: Flower SuperNode refused by or refusing "
                        f"server {opts.server}: {why}",
                    )
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
            # Checked after the SuperNode: the executor follows its parent SuperNode out,
            # and the SuperNode's own exit says more.
            executor = flower.executor
            if executor is not None and executor.poll() is not None:
                return _finish(
                    opts,
                    EXIT_FAILED,
                    f"hospital {opts.hospital}: the warm executor exited with "
                    f"status {executor.returncode}",
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
        flower.stop()

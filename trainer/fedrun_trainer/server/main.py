"""``fedrun server``: the server pod's main process.

It starts Flower's SuperLink, submits the run to it (the ServerApp in
:mod:`fedrun_trainer.server.federation` does the rounds), follows the run with a deadline, and
serves ``/status`` (the FederatedRun ``.status`` as JSON), ``/metrics`` (Prometheus) and
``/healthz`` on its own port. After the run it stops the SuperLink but keeps serving the
final status until it is terminated: a Deployment's pod must not exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from fedrun_core import names as c
from fedrun_core.states import FINAL_PHASES, Phase, Reason, failed_status
from fedrun_core.times import now_rfc3339
from fedrun_trainer.common import files
from fedrun_trainer.common.settings import RunSettings
from fedrun_trainer.server.checkpoint import CheckpointInvalid
from fedrun_trainer.server.control import ControlClient, ControlError, build_fab
from fedrun_trainer.server.federation import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    NODES_FILE,
    STATUS_FILE,
    Aggregator,
    load_checkpoint,
    new_run_state,
    write_registered_nodes,
)
from fedrun_trainer.server.fleet_proxy import DEFAULT_MAX_BODY_BYTES
from fedrun_trainer.server.metrics import render_metrics
from fedrun_trainer.server.run_state import RunState, to_status
from fedrun_trainer.server.superlink import (
    FlowerServer,
    MaterialError,
    ServerTls,
    check_material,
    utc_now,
)

log = logging.getLogger("fedrun.server")

FLOWER_CHECK_S = 5.0  # how often a running run's Flower state is checked (crash detection)
FINAL_CHECK_S = 0.1  # how often, once the status is final, until Flower says the run ended
FINAL_GRACE_S = 60.0  # how long the ServerApp may take to exit after its final status


@dataclass(frozen=True)
class ServerOptions:
    """Command-line options of ``fedrun server``."""

    config: str
    state_dir: Path
    checkpoint_dir: Path | None = None  # None: <state_dir>/checkpoint
    fleet_port: int = c.FLEET_PORT
    status_port: int = c.STATUS_PORT
    host: str = "0.0.0.0"
    tls_dir: Path | None = None  # the mounted <run>-server-tls Secret; None: insecure
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES  # the fleet proxy's cap on one body


class StatusServer:
    """The HTTP side: ``/status``, ``/metrics``, ``/healthz`` from the state directory."""

    def __init__(self, state_dir: Path, host: str, port: int) -> None:
        self.state_dir = state_dir
        state_dir_ref = state_dir

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == c.HEALTH_PATH:
                    self._send(200, "text/plain", b"ok\n")
                elif path == "/status":
                    status = files.read_json(state_dir_ref / STATUS_FILE) or {}
                    self._send(200, "application/json", json.dumps(status).encode())
                elif path == "/history":
                    history = files.read_json(state_dir_ref / HISTORY_FILE) or {}
                    self._send(200, "application/json", json.dumps(history).encode())
                elif path == "/metrics":
                    body = render_metrics(
                        files.read_json(state_dir_ref / STATUS_FILE) or {},
                        files.read_json(state_dir_ref / HISTORY_FILE) or {},
                    )
                    self._send(200, "text/plain; version=0.0.4", body)
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would drown the run's own log

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()


def _publish_failure(state_dir: Path, reason: str, message: str) -> None:
    """Mark the run Failed unless the ServerApp already wrote a final phase."""
    status: dict[str, Any] = files.read_json(state_dir / STATUS_FILE) or {}
    if status.get("phase") in FINAL_PHASES:
        return
    failed = failed_status(status, reason, message, now_rfc3339())
    files.write_json_atomic(state_dir / STATUS_FILE, failed)
    log.error("run failed: %s", message)


def app_fab() -> tuple[bytes, str]:
    """The FAB of fedrun's code-free Flower App (one pyproject.toml) and its sha256."""
    source = resources.files("fedrun_trainer").joinpath("flower_app/pyproject.toml")
    return build_fab(source.read_bytes())


def checkpoint_dir_of(opts: ServerOptions) -> Path:
    """Where this server keeps its checkpoint: ``--checkpoint-dir``, else in its state dir."""
    return (opts.checkpoint_dir or opts.state_dir / CHECKPOINT_DIR).resolve()


def _initial_state(settings: RunSettings, checkpoint_dir: Path) -> RunState:
    """What ``/status`` shows until the ServerApp runs: the run as its checkpoint left it
    (rounds and ε so far) when there is one, so a restart never shows the run back at
    round 0; a fresh run otherwise (the ServerApp reports a checkpoint it refuses)."""
    state = new_run_state(settings)
    try:
        load_checkpoint(settings, checkpoint_dir, state, Aggregator(settings))
    except CheckpointInvalid:
        return new_run_state(settings)
    if state.resumed_after is None:
        return new_run_state(settings)  # the ServerApp mints the lineage
    if not state.final:
        state.message = (
            f"restarting: resuming after round {state.resumed_after}/{state.total_rounds}"
        )
    return state


def run_server(opts: ServerOptions) -> int:
    """Run the server until terminated; returns the process exit status."""
    settings = RunSettings.load(opts.config)
    state_dir = opts.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATUS_FILE, HISTORY_FILE, NODES_FILE):
        (state_dir / stale).unlink(missing_ok=True)
    checkpoint_dir = checkpoint_dir_of(opts)
    files.write_json_atomic(
        state_dir / STATUS_FILE, to_status(_initial_state(settings, checkpoint_dir))
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    http = StatusServer(state_dir, opts.host, opts.status_port)
    http.start()
    log.info("status on :%d (/status, /metrics, /healthz)", opts.status_port)

    tls = None if opts.tls_dir is None else ServerTls(opts.tls_dir)
    try:
        if tls is not None:
            check_material(tls, settings.hospital_names, utc_now())
    except MaterialError as err:
        # Flower would start with these files and only its clients would fail: refuse here.
        _publish_failure(state_dir, Reason.CERTIFICATE_INVALID, str(err))
        code = 1
    else:
        flower = FlowerServer(
            state_dir, opts.host, opts.fleet_port, tls, proxy_max_body_bytes=opts.max_request_bytes
        )
        try:
            code = _start_and_follow(settings, opts, state_dir, flower, stop)
        finally:
            flower.stop()
    log.info("run over; serving the final status until terminated")
    stop.wait()
    http.stop()
    return code


def _start_and_follow(
    settings: RunSettings,
    opts: ServerOptions,
    state_dir: Path,
    flower: FlowerServer,
    stop: threading.Event,
) -> int:
    flower.start()
    # Built while the SuperLink starts (importing Flower's builder takes a second or two).
    fab = app_fab()
    if not flower.wait_ready(60):
        why = flower.failure() or "it did not answer /health within 60 s"
        _publish_failure(
            state_dir, Reason.SERVER_ERROR, f"the Flower SuperLink did not start: {why}"
        )
        return 1
    control = flower.control()
    try:
        write_registered_nodes(state_dir, flower.register(control, settings.hospital_names))
        flower.serve_fleet()
        return _submit_and_follow(settings, opts, state_dir, fab, flower, control, stop)
    except (ControlError, OSError) as err:
        _publish_failure(state_dir, Reason.SERVER_ERROR, str(err))
        return 1
    finally:
        control.close()


def run_deadline_s(settings: RunSettings) -> float:
    """How long the server lets one run take: joining plus every round, with slack."""
    budget = (settings.rounds + 3) * settings.round_timeout_s
    active = settings.run.spec.active_deadline_seconds
    return float(min(budget, active)) if active else budget


def _submit_and_follow(
    settings: RunSettings,
    opts: ServerOptions,
    state_dir: Path,
    fab: tuple[bytes, str],
    flower: FlowerServer,
    control: ControlClient,
    stop: threading.Event,
) -> int:
    config = {
        "fedrun-config": str(Path(opts.config).resolve()),
        "state-dir": str(state_dir),
        "checkpoint-dir": str(checkpoint_dir_of(opts)),
    }
    run_id = control.start_run(*fab, config)
    log.info("submitted Flower run %s", run_id)
    deadline = time.monotonic() + run_deadline_s(settings)
    next_check = time.monotonic() + FLOWER_CHECK_S
    final_since: float | None = None
    while not stop.is_set():
        status = files.read_json(state_dir / STATUS_FILE) or {}
        final = status.get("phase") in FINAL_PHASES
        if final and final_since is None:
            final_since, next_check = time.monotonic(), time.monotonic()
        if final_since is not None and time.monotonic() - final_since > FINAL_GRACE_S:
            log.warning("the ServerApp has not exited %ss after its final status", FINAL_GRACE_S)
            return 0 if status["phase"] == Phase.SUCCEEDED else 1
        failure = flower.failure()
        if failure:
            _publish_failure(state_dir, Reason.SERVER_ERROR, failure)
            return 1
        if time.monotonic() >= deadline:
            with contextlib.suppress(ControlError):
                control.stop_run(run_id)
            _publish_failure(
                state_dir,
                Reason.DEADLINE_EXCEEDED,
                f"the run did not finish within {run_deadline_s(settings):.0f}s",
            )
            return 1
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + (FINAL_CHECK_S if final else FLOWER_CHECK_S)
            if _flower_finished(control, run_id):
                status = files.read_json(state_dir / STATUS_FILE) or {}
                if status.get("phase") in FINAL_PHASES:
                    return 0 if status["phase"] == Phase.SUCCEEDED else 1
                # The ServerApp process is gone without a final status: it crashed.
                _publish_failure(
                    state_dir,
                    Reason.SERVER_ERROR,
                    "the ServerApp ended before the run finished (see the server log)",
                )
                return 1
        stop.wait(FINAL_CHECK_S if final else 0.5)
    return 143


def _flower_finished(control: ControlClient, run_id: int) -> bool:
    """Whether Flower says the run is over; a failed question counts as not yet."""
    try:
        status = control.run_status(run_id)
    except ControlError as err:
        log.warning("could not ask the SuperLink about run %s: %s", run_id, err)
        return False
    return status is not None and status.finished


def main_server(opts: ServerOptions) -> int:
    """CLI entry: logs to stderr, returns the exit status."""
    code = run_server(opts)
    sys.stderr.flush()
    return code

"""``fedrun server`` refuses TLS material that does not fit, and says so in the run's status.

The real command, as the server pod runs it, with its ``<run>-server-tls`` Secret mounted from
material the operator's ``pki`` made. Flower itself would start with an expired certificate or
another run's key and only its clients would fail (docs/security.md, T6); fedrun must instead
publish phase Failed with reason CertificateInvalid on ``/status``, keep serving ``/status``,
never open the fleet port, and exit when terminated.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fedrun_core import pki
from fedrun_core.api import FederatedRun, parse_run
from fedrun_render import security
from fedrun_render.workloads import config_json
from fedrun_trainer.common import flwr_env

from .conftest import example_run, wait_for

START_S = 180.0  # a cold Python start-up with torch on a busy 2-core machine
EXIT_S = 60.0


def _mount_server_secret(run: FederatedRun, material: pki.RunMaterial, directory: Path) -> Path:
    """Write the run's <run>-server-tls Secret as a volume mount would: one file per key."""
    secret = security.secret_manifests(run, material)[0]
    assert secret["metadata"]["name"] == security.server_tls_secret_name(run)
    directory.mkdir(parents=True)
    for name, value in secret["data"].items():
        (directory / name).write_bytes(base64.b64decode(value))
    return directory


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    status_port: int
    fleet_port: int
    state_dir: Path
    log: Path

    def status(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.status_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except OSError:
            return None

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[pki.RunMaterial], Server]]:
    """Run `fedrun server --tls-dir` for the demo run with the given material."""
    run = parse_run(example_run())
    config = tmp_path / "config.json"
    config.write_text(config_json(run), encoding="utf-8")
    started: list[Server] = []

    def start(material: pki.RunMaterial) -> Server:
        tls_dir = _mount_server_secret(run, material, tmp_path / "server-tls")
        state_dir = tmp_path / "state"
        log = tmp_path / "server.log"
        fleet_port = status_port = flwr_env.free_port()
        while status_port == fleet_port:
            status_port = flwr_env.free_port()
        fedrun = str(Path(sys.executable).parent / "fedrun")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    fedrun,
                    "--log-format",
                    "text",
                    "server",
                    "--config",
                    str(config),
                    "--state-dir",
                    str(state_dir),
                    "--fleet-port",
                    str(fleet_port),
                    "--status-port",
                    str(status_port),
                    "--host",
                    "127.0.0.1",
                    "--tls-dir",
                    str(tls_dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Server(proc, status_port, fleet_port, state_dir, log)
        started.append(server)
        return server

    yield start
    for server in started:
        flwr_env.terminate(server.proc, grace_s=EXIT_S)


def _expect_refused(server: Server, cause: str) -> None:
    def failed() -> dict[str, Any] | None:
        assert server.proc.poll() is None, f"fedrun server exited early:\n{server.output()}"
        status = server.status()
        return status if status and status.get("phase") == "Failed" else None

    status = wait_for("phase Failed on /status", failed, START_S)
    assert cause in status["message"], status["message"]
    assert str(server.state_dir.parent / "server-tls") in status["message"]
    (condition,) = (c for c in status["conditions"] if c["type"] == "Failed")
    assert condition["status"] == "True"
    assert condition["reason"] == "CertificateInvalid"
    assert cause in condition["message"]
    assert all(c["status"] == "False" for c in status["conditions"] if c["type"] != "Failed")

    # Nothing listens on the fleet port, and no Flower process was started at all.
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.fleet_port), timeout=5),
    ):
        pass
    assert not (server.state_dir / "flwr-home").exists()
    assert cause in server.output()

    # The pod keeps serving its final status until Kubernetes terminates it.
    assert server.proc.poll() is None
    assert server.status() == status
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fedrun server ignored SIGTERM:\n{server.output()}") from None
    assert code == 1, server.output()


def _now() -> datetime:
    return datetime.now(UTC)


def test_an_expired_server_certificate_fails_the_run(
    start_server: Callable[[pki.RunMaterial], Server],
) -> None:
    run = parse_run(example_run())
    hospitals = [h.name for h in run.spec.hospitals]
    expired = pki.generate(
        run.name,
        run.namespace,
        hospitals,
        now=_now() - timedelta(days=2),
        valid_for=timedelta(days=1),
    )
    _expect_refused(start_server(expired), "expired")


def test_a_tls_key_from_another_run_fails_the_run(
    start_server: Callable[[pki.RunMaterial], Server],
) -> None:
    run = parse_run(example_run())
    hospitals = [h.name for h in run.spec.hospitals]
    ours = pki.generate(run.name, run.namespace, hospitals, now=_now())
    theirs = pki.generate(run.name, run.namespace, hospitals, now=_now())
    mixed = pki.RunMaterial(
        ca_cert=ours.ca_cert,
        server_cert=ours.server_cert,
        server_key=theirs.server_key,
        nodes=ours.nodes,
        not_after=ours.not_after,
    )
    _expect_refused(start_server(mixed), "does not belong")

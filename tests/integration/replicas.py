"""Operator replicas as real processes, for the failover tests: `fedrun operator` exactly as
the chart's pods run it (leader election on), each with its own /metrics and /healthz, and
a loopback TCP relay that can cut one replica off the API server (a network partition).

Which replica acts is read from each process's own /metrics: ``fedrun_operator_leader``
(1 while it holds the Lease) and ``fedrun_operator_reconcile_duration_seconds_count`` (how
many reconciles it ran), so the tests see per process who did what.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from fedrun_operator.leader import Timings

T = TypeVar("T")

#: Short Lease timings for tests (a cluster uses 15 s, 10 s, 2 s): the bound on a takeover
#: after the leader died is `TIMINGS.takeover_bound_seconds` (5 s) plus kopf's start.
TIMINGS = Timings(lease_seconds=4, renew_deadline_seconds=2.5, retry_seconds=0.5)
#: What a new leader needs after it took the Lease: start kopf, list the runs, reconcile.
#: Generous: two cores shared with the API server and the other replicas.
KOPF_START_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """`condition()` once it is truthy; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.1f}s (last: {value!r})")
        time.sleep(interval)  # the poll's period, not a stand-in for the condition


class OperatorProcess:
    """One replica: `python -m fedrun_cli operator` with leader election on the Lease
    `lease` in `operator_namespace`, following `namespaces`, logged in through
    `kubeconfig`. Its output goes to `log_path`. Stop it with :meth:`stop` (SIGTERM, as the
    kubelet does) or :meth:`kill` (SIGKILL: a crash, a lost node)."""

    def __init__(
        self,
        name: str,
        kubeconfig: Path,
        log_path: Path,
        *,
        lease: str,
        operator_namespace: str,
        namespaces: Sequence[str],
        server_url: str = "http://127.0.0.1:9",
        timings: Timings = TIMINGS,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(kubeconfig),
            FEDRUN_OPERATOR_NAMESPACE=operator_namespace,
            FEDRUN_OPERATOR_LEASE_NAME=lease,
            FEDRUN_OPERATOR_POD_NAME=name,
            FEDRUN_OPERATOR_LEASE_SECONDS=str(timings.lease_seconds),
            FEDRUN_OPERATOR_RENEW_DEADLINE_SECONDS=str(timings.renew_deadline_seconds),
            FEDRUN_OPERATOR_RETRY_SECONDS=str(timings.retry_seconds),
            FEDRUN_OPERATOR_SUCCEEDED_GRACE_SECONDS="1",
        )
        args = [sys.executable, "-m", "fedrun_cli", "--log-format", "text", "operator"]
        for ns in namespaces:
            args += ["--namespace", ns]
        args += [
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            "--poll-seconds",
            "0.5",
            "--server-url",
            server_url,
        ]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def metrics(self) -> dict[str, float] | None:
        """Its /metrics as {series: value} (labels summed away), None while unreachable."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name = series.split("{", 1)[0]
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def is_leader(self) -> bool | None:
        """Whether it holds the Lease, by its own metric; None while it does not answer."""
        found = self.metrics()
        return None if found is None else found.get("fedrun_operator_leader") == 1.0

    def reconciles(self) -> float:
        """Reconciles it has run so far (0 when it does not answer)."""
        found = self.metrics() or {}
        return found.get("fedrun_operator_reconcile_duration_seconds_count", 0.0)

    def exited(self) -> int | None:
        """Its exit status, None while it runs."""
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL: no clean-up, the Lease stays held until it expires."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as the kubelet stops a pod; SIGKILL after `timeout`. Its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        """What it printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class Relay:
    """A loopback TCP relay to `host:port`; :meth:`cut` drops every link and refuses new
    ones, as a network partition between one client and the API server."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = threading.Event()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Partition: close the listener and every link through it."""
        self._cut.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

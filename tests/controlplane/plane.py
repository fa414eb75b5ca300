"""A real Kubernetes control plane on loopback, for tests (the way controller-runtime's envtest
runs one): etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
``../shared/kube``, each on free 127.0.0.1 ports with its own certificates, data directory
and log, stopped by process id.

    plane = ControlPlane.start(tmp / "kube")
    ... kubectl --kubeconfig plane.kubeconfig get ns ...
    plane.stop()

There is no kubelet and no container runtime: ``tests.controlplane.node.NodeAgent`` plays
the node. ``python -m tests.controlplane up DIR`` / ``down DIR`` does the same for a
developer (``make cluster-up`` / ``make cluster-down``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.certs import ClientCert, Pki, make_pki

__all__ = ["ControlPlane", "UnavailableError", "binaries", "shared_kube"]

REPO = Path(__file__).resolve().parents[2]
VERSION = "v1.36.2"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# What the API server audits: requests of ServiceAccounts outside kube-system (the
# operator's among them), once each, with who, verb, resource and the answer's code.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""


class UnavailableError(RuntimeError):
    """The control plane cannot run here; the message says why (tests skip with it)."""


def shared_kube() -> Path:
    """``../shared/kube`` beside the repository (``FEDRUN_SHARED_KUBE`` overrides it)."""
    return Path(os.environ.get("FEDRUN_SHARED_KUBE") or REPO.parent / "shared" / "kube")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedrun" / "kube"


def binaries(source: Path | None = None) -> Path:
    """The unpacked control-plane binaries, in a cache folder keyed by their checksums.

    Runs the folder's own ``install.sh`` (idempotent, checks every sha256). Raises
    :class:`UnavailableError` when the folder is absent or the install fails.
    """
    source = source or shared_kube()
    sums = source / "SHA256SUMS"
    if not (source / "install.sh").is_file() or not sums.is_file():
        raise UnavailableError(
            f"no Kubernetes control plane at {source} (../shared/kube is absent)"
        )
    digest = hashlib.sha256(sums.read_bytes()).hexdigest()[:16]
    dest = _cache_root() / digest
    done = subprocess.run(
        ["bash", str(source / "install.sh"), str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise UnavailableError(
            f"{source}/install.sh failed: {(done.stderr or done.stdout).strip()}"
        )
    return dest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kubeconfig(url: str, ca: Path, user: dict[str, str], namespace: str = "default") -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fedrun-test", "cluster": {"server": url, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [
            {
                "name": "fedrun-test",
                "context": {"cluster": "fedrun-test", "user": "user", "namespace": namespace},
            }
        ],
        "current-context": "fedrun-test",
    }
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class ControlPlane:
    """A running control plane; :meth:`start` it, :meth:`stop` it (or use ``with``)."""

    directory: Path
    pki: Pki
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- where things are --------------------------------------------------------------
    @property
    def url(self) -> str:
        """The API server's URL."""
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        """An admin kubeconfig (``system:masters``)."""
        return self.directory / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON line per request of a ServiceAccount
        outside kube-system (who, which verb on which resource, the answer's code)."""
        return self.directory / "logs" / "audit.log"

    def log(self, component: str) -> Path:
        """The component's log file."""
        return self.directory / "logs" / f"{component}.log"

    def ssl_context(self, client: ClientCert | None = None) -> ssl.SSLContext:
        """TLS to the API server: its CA, and ``client``'s certificate (default: admin)."""
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        cert = client or self.pki.admin
        context.load_cert_chain(str(cert.cert), str(cert.key))
        return context

    def kubeconfig_for(
        self, path: Path, *, token: str | None = None, namespace: str = "default"
    ) -> Path:
        """Write a kubeconfig at ``path`` that logs in with ``token`` (default: admin cert)."""
        user = (
            {"token": token}
            if token is not None
            else {
                "client-certificate": str(self.pki.admin.cert),
                "client-key": str(self.pki.admin.key),
            }
        )
        path.write_text(_kubeconfig(self.url, self.pki.ca, user, namespace), encoding="utf-8")
        path.chmod(0o600)
        return path

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def start(
        cls, directory: Path, *, bin_dir: Path | None = None, timeout_s: float = 120.0
    ) -> ControlPlane:
        """Start all four components in ``directory`` and wait until each is ready.

        Raises :class:`UnavailableError` when the binaries are absent, RuntimeError (with the
        tail of the failing component's log) when one does not come up.
        """
        bin_dir = bin_dir or binaries()
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "logs").mkdir(exist_ok=True)
        pki = make_pki(directory / "pki")
        ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "kube-apiserver": free_port(),
            "kube-controller-manager": free_port(),
            "kube-scheduler": free_port(),
        }
        plane = cls(directory=directory, pki=pki, ports=ports)
        plane.kubeconfig_for(plane.kubeconfig)
        audit_policy = directory / "audit-policy.yaml"
        audit_policy.write_text(AUDIT_POLICY, encoding="utf-8")
        deadline = time.monotonic() + timeout_s
        try:
            etcd_url = f"http://127.0.0.1:{ports['etcd']}"
            plane._spawn(
                "etcd",
                [
                    str(bin_dir / "etcd"),
                    "-data-dir",
                    str(directory / "etcd"),
                    "-listen-client-urls",
                    etcd_url,
                    "-advertise-client-urls",
                    etcd_url,
                    "-listen-peer-urls",
                    f"http://127.0.0.1:{ports['etcd-peer']}",
                    "-unsafe-no-fsync",
                    "-log-level",
                    "warn",
                ],
            )
            plane._wait("etcd", deadline, lambda: _http_ok(f"{etcd_url}/health", None))
            api = ports["kube-apiserver"]
            plane._spawn(
                "kube-apiserver",
                [
                    str(bin_dir / "kube-apiserver"),
                    f"--etcd-servers={etcd_url}",
                    f"--secure-port={api}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--tls-cert-file={pki.serving_cert}",
                    f"--tls-private-key-file={pki.serving_key}",
                    f"--client-ca-file={pki.ca}",
                    f"--service-account-key-file={pki.sa_pub}",
                    f"--service-account-signing-key-file={pki.sa_key}",
                    f"--service-account-issuer=https://127.0.0.1:{api}",
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    f"--cert-dir={directory / 'apiserver-certs'}",
                    "--profiling=false",
                    "--event-ttl=1h",
                    f"--audit-policy-file={audit_policy}",
                    f"--audit-log-path={plane.audit_log}",
                    "--audit-log-format=json",
                    "--audit-log-mode=batch",
                    "--audit-log-batch-max-wait=1s",
                ],
            )
            context = plane.ssl_context()
            plane._wait(
                "kube-apiserver",
                deadline,
                lambda: _http_ok(f"{plane.url}/readyz", context),
            )
            common = [
                f"--kubeconfig={plane.kubeconfig}",
                f"--authentication-kubeconfig={plane.kubeconfig}",
                f"--authorization-kubeconfig={plane.kubeconfig}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--profiling=false",
            ]
            plane._spawn(
                "kube-controller-manager",
                [
                    str(bin_dir / "kube-controller-manager"),
                    *common,
                    f"--secure-port={ports['kube-controller-manager']}",
                    f"--cert-dir={directory / 'controller-manager-certs'}",
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--root-ca-file={pki.ca}",
                    "--use-service-account-credentials=true",
                    "--controllers=*",
                ],
            )
            plane._spawn(
                "kube-scheduler",
                [
                    str(bin_dir / "kube-scheduler"),
                    *common,
                    f"--secure-port={ports['kube-scheduler']}",
                    f"--cert-dir={directory / 'scheduler-certs'}",
                ],
            )
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE  # their own self-signed serving certs
            for name in ("kube-controller-manager", "kube-scheduler"):
                port = ports[name]
                plane._wait(
                    name,
                    deadline,
                    lambda p=port: _http_ok(f"https://127.0.0.1:{p}/healthz", unverified),
                )
            plane._save()
        except BaseException:
            plane.stop()
            raise
        return plane

    def _spawn(self, name: str, argv: list[str]) -> None:
        with self.log(name).open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.directory,
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self._save()

    def _wait(self, name: str, deadline: float, ready: Any) -> None:
        while not ready():
            proc = self._procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}:\n{_tail(self.log(name))}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready in time:\n{_tail(self.log(name))}")
            time.sleep(0.2)

    def _save(self) -> None:
        state = {"pids": self.pids, "ports": self.ports, "url": self.url}
        (self.directory / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")

    def running(self) -> dict[str, bool]:
        """Which components are still alive."""
        return {name: _alive(pid) for name, pid in self.pids.items()}

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every component (the API server's clients first), then SIGKILL."""
        stop_pids(self.pids, grace_s)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.pids.clear()
        self._save()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_pids(pids: dict[str, int], grace_s: float = 10.0) -> None:
    """Stop the named processes' groups: scheduler and controllers first, etcd last."""
    # Anything else (the node agent) first, then the control plane's clients before etcd.
    order = sorted(
        pids,
        key=lambda n: COMPONENTS.index(n) if n in COMPONENTS else len(COMPONENTS),
        reverse=True,
    )
    for name in order:
        pid = pids[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie is not alive; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"

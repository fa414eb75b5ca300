"""The Flower processes of the server pod, secure by default.

With the run's TLS material (the mounted ``<run>-server-tls`` Secret, see
``fedrun_render.security``) the server pod runs:

1. ``flower-superlink`` on **127.0.0.1** and a private port, with TLS, SuperNode
   authentication (``--enable-supernode-auth``) and ``--isolation process`` plus a fresh
   executor secret, so nothing outside the pod reaches its Control or Runtime API;
2. a SuperExec, started here with that secret: the only executor that can take the
   ServerApp's task token (the SuperLink's own would ignore the secret). It is fedrun's
   warm executor (:mod:`fedrun_trainer.warm_executor`, role ``server``), which imports the
   ServerApp's modules while the SuperLink starts and forks the ServerApp from there;
3. the fleet-only proxy (:mod:`fedrun_trainer.server.fleet_proxy`) on the pod's fleet port,
   presenting the run's server certificate and forwarding only ``POST /v1/fleet/<rpc>``
   and ``GET /health`` to the SuperLink;

and registers exactly the run's hospital keys (``<hospital>.pub``) through the loopback
Control API (:mod:`fedrun_trainer.server.control`, in this process). Before any of
that, :func:`check_material` refuses files that do not fit (expired, from another run,
key and certificate mixed up, a hospital key missing): Flower itself would start with
them and only its clients would fail (docs/security.md, T6).

Without material (``spec.security.insecure: true``) it runs the stock insecure SuperLink on
the fleet port, as Flower's own quickstarts do.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fedrun_core import names as c
from fedrun_trainer.common import flwr_env
from fedrun_trainer.server.control import ControlClient, ControlError
from fedrun_trainer.server.fleet_proxy import (
    DEFAULT_MAX_BODY_BYTES,
    ProxyConfig,
    ProxyThread,
    server_context,
    upstream_context,
)

log = logging.getLogger("fedrun.server")

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerTls:
    """The files of a mounted ``<run>-server-tls`` Secret."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / c.CA_FILE

    @property
    def cert(self) -> Path:
        return self.directory / c.TLS_CERT_FILE

    @property
    def key(self) -> Path:
        return self.directory / c.TLS_KEY_FILE

    def public_key(self, hospital: str) -> Path:
        """The hospital's OpenSSH public node key, as the server registers it."""
        return self.directory / c.hospital_pub_file(hospital)


class MaterialError(ValueError):
    """The server's TLS material cannot be used; the message names the file and the fix."""


def check_material(tls: ServerTls, hospitals: Sequence[str], now: datetime) -> None:
    """Raise :class:`MaterialError` unless ``tls`` holds a usable set for these hospitals.

    Every file must exist; the key must belong to the certificate; the certificate must be
    issued by the CA, valid now, and cover 127.0.0.1 (the SuperLink's own tools and the
    proxy dial it there). Each hospital needs its public key, a parseable OpenSSH line.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedrun_core.pki import CertificateError, check_pair, verify_chain

    needed = [tls.ca, tls.cert, tls.key, *(tls.public_key(h) for h in hospitals)]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise MaterialError(
            f"{tls.directory} lacks {', '.join(missing)}: mount the run's <run>-server-tls "
            "Secret there (the operator makes it when the run is created)"
        )
    try:
        check_pair(tls.cert.read_bytes(), tls.key.read_bytes())
        verify_chain(tls.cert.read_bytes(), tls.ca.read_bytes(), now=now, name=LOOPBACK)
    except CertificateError as err:
        raise MaterialError(f"{tls.directory}: {err}") from None
    for hospital in hospitals:
        path = tls.public_key(hospital)
        try:
            key = serialization.load_ssh_public_key(path.read_bytes().strip())
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise MaterialError(
                f"{path} is not an OpenSSH public key ({err}): the node key of hospital "
                f"{hospital} comes from the run's Secret, made by the operator"
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            # Flower registers only NIST EC keys (`flwr supernode register`).
            raise MaterialError(
                f"{path} is a {type(key).__name__}, not an ECDSA (NIST curve) key: Flower "
                f"accepts only those as node keys; hospital {hospital}'s key comes from the "
                "run's Secret, made by the operator"
            )


def _https_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass
class FlowerServer:
    """Starts, watches and stops the server pod's Flower processes (see the module doc).

    ``address`` is where the ``flwr`` CLI reaches the SuperLink (the connection named
    ``local`` in ``env``'s FLWR_HOME); ``fleet_port`` is where hospitals connect.
    ``proxy_max_body_bytes`` is the fleet proxy's cap on one request body (secure runs only):
    Flower sends each array in chunks of at most 5 MiB, so the default fits every model
    unless ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` is raised past it.
    """

    state_dir: Path
    host: str
    fleet_port: int
    tls: ServerTls | None
    proxy_max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxy: ProxyThread | None = None
    _internal_port: int = 0

    def start(self) -> None:
        """Start the Flower processes; returns at once, see :meth:`wait_ready`."""
        home = self.state_dir / "flwr-home"
        self.env = flwr_env.environment(home)
        if self.tls is None:
            self.address = f"{LOOPBACK}:{self.fleet_port}"
            flwr_env.write_connection(home, self.address)
            self.processes["superlink"] = subprocess.Popen(
                [
                    flwr_env.executable("flower-superlink"),
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    self.host,
                    "--port",
                    str(self.fleet_port),
                ],
                env=self.env,
            )
            return
        tls = self.tls
        internal = flwr_env.free_port()
        self.address = f"{LOOPBACK}:{internal}"
        flwr_env.write_connection(home, self.address, root_certificates=tls.ca)
        secret = flwr_env.write_secret(self.state_dir / "superexec.secret")
        self.processes["superlink"] = subprocess.Popen(
            [
                flwr_env.executable("flower-superlink"),
                "--ssl-certfile",
                str(tls.cert),
                "--ssl-keyfile",
                str(tls.key),
                "--ssl-ca-certfile",
                str(tls.ca),
                "--enable-supernode-auth",
                "--isolation",
                "process",
                "--superexec-auth-secret-file",
                str(secret),
                "--disable-runtime-dependency-installation",
                "--host",
                LOOPBACK,
                "--port",
                str(internal),
            ],
            env=self.env,
        )
        # fedrun's warm executor in place of `flower-superexec`: it imports the ServerApp's
        # modules while the SuperLink starts and forks the ServerApp from there.
        self.processes["executor"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedrun_trainer.warm_executor",
                "--fedrun-role",
                "server",
                "--runtime-api-address",
                self.address,
                "--root-certificates",
                str(tls.ca),
                "--superexec-auth-secret-file",
                str(secret),
                "--parent-pid",
                str(self.processes["superlink"].pid),
            ],
            env=self.env,
        )
        self._internal_port = internal

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the SuperLink answers ``/health`` (through TLS when secure) in time."""
        context = None if self.tls is None else upstream_context(str(self.tls.ca))
        scheme = "http" if self.tls is None else "https"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.failure():
                return False
            if _https_ok(f"{scheme}://{self.address}/health", context):
                return True
            time.sleep(0.2)
        return False

    def control(self) -> ControlClient:
        """A Control API client for this SuperLink (after :meth:`start`); close it after use."""
        return ControlClient(self.address, None if self.tls is None else self.tls.ca)

    def register(self, control: ControlClient, hospitals: Sequence[str]) -> dict[str, int]:
        """Register each hospital's public key; returns node ids. Raises ControlError.

        Only with TLS (node authentication is off without it).
        """
        if self.tls is None:
            return {}
        nodes: dict[str, int] = {}
        for hospital in hospitals:
            try:
                nodes[hospital] = control.register_node(self.tls.public_key(hospital).read_bytes())
            except ControlError as err:
                raise ControlError(
                    f"could not register hospital {hospital}'s node key: {err}"
                ) from None
        log.info("registered node keys: %s", ", ".join(f"{h}={n}" for h, n in nodes.items()))
        return nodes

    def serve_fleet(self) -> None:
        """Open the fleet port to hospitals: the proxy (secure), after :meth:`register`.

        Hospitals that connect earlier find the port closed and retry, instead of being
        refused as unknown nodes (which costs a hospital Job one of its restarts).
        Insecure: the SuperLink already listens on the fleet port.
        """
        if self.tls is None:
            return
        tls = self.tls
        self.proxy = ProxyThread(
            ProxyConfig(
                listen_host=self.host,
                listen_port=self.fleet_port,
                upstream_host=LOOPBACK,
                upstream_port=self._internal_port,
                server_ssl=server_context(str(tls.cert), str(tls.key)),
                upstream_ssl=upstream_context(str(tls.ca)),
                max_body_bytes=self.proxy_max_body_bytes,
            )
        )
        self.proxy.start()

    def failure(self) -> str:
        """Which Flower process has exited, and how; empty while all run."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                what = "SuperLink" if name == "superlink" else "ServerApp executor"
                return f"the Flower {what} exited with status {proc.returncode}"
        return ""

    def stop(self) -> None:
        """Stop the proxy, then every process (all signalled at once, executor first)."""
        if self.proxy is not None:
            self.proxy.stop()
        flwr_env.terminate_all(list(reversed(self.processes.values())))


def utc_now() -> datetime:
    """The clock the material is checked against."""
    return datetime.now(UTC)

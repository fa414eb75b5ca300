"""Flower 1.41 TLS, SuperNode authentication and API isolation, with real processes.

One federation for the module: a SuperLink on loopback with TLS, ``--enable-supernode-auth``
and an executor secret (``--isolation process --superexec-auth-secret-file``); the
fleet-only proxy (``python -m fedrun_trainer.server.fleet_proxy``) in front of it, as a hospital
would reach it; one hospital whose key is registered, connected through the proxy. Then
rogues try: no key, an unregistered key, another run's key, the wrong CA, a server
certificate that expired or names another host, and plain HTTPS calls to the Control and
Runtime APIs through the fleet port. Every certificate and key is made here with
``cryptography``. See docs/security.md for what each case shows.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="flwr is not installed: no Flower processes to test")

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrun_trainer.common import flwr_env
from fedrun_trainer.server.fleet_proxy import (
    ProxyConfig,
    ProxyThread,
    server_context,
    upstream_context,
)

from .conftest import wait_for

STARTUP_S = 60.0
EXIT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- a per-run PKI, as the operator will make it -------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _make_ca(path: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_cert(path, cert)
    return key, cert


def _make_server_cert(
    directory: Path,
    name: str,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    dns: list[str],
    ips: list[str],
    expired: bool = False,
) -> tuple[Path, Path]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP384R1())
    not_after = (
        _now() - datetime.timedelta(hours=1) if expired else _now() + (datetime.timedelta(days=30))
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=2))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A Flower node key pair: OpenSSH private key, OpenSSH public key (NIST P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = directory / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


# --- the federation --------------------------------------------------------------------


@dataclass
class Federation:
    pki: Path
    work: Path
    env: dict[str, str]
    superlink_port: int
    fleet_port: int
    hospital_node_id: int
    hospital: subprocess.Popen[bytes]
    secret: bytes

    def supernode(
        self, name: str, *args: str, fleet_port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """A SuperNode dialling the fleet port (or another); output in work/<name>.log."""
        log = (self.work / f"{name}.log").open("wb")
        return subprocess.Popen(
            [
                flwr_env.executable("flower-supernode"),
                "--superlink",
                f"127.0.0.1:{fleet_port or self.fleet_port}",
                "--port",
                str(_free_port()),
                "--max-retries",
                "1",
                "--max-wait-time",
                "10",
                *args,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def flwr(self, *args: str, connection: str = "local") -> dict[str, Any]:
        """The ``flwr`` CLI against a named connection, JSON out."""
        out = subprocess.run(
            [flwr_env.executable("flwr"), *args, connection, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            parsed: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            parsed = {"success": False, "error-message": out.stderr + out.stdout}
        parsed["returncode"] = out.returncode
        return parsed

    def nodes(self) -> dict[int, str]:
        """Node id -> status, from the Control API on loopback (what `flwr supernode ls`
        shows; asked directly, since a CLI process per check would cost seconds of CPU)."""
        from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

        with httpx.Client(verify=_trust(self.pki), timeout=10) as client:
            reply = client.post(
                f"https://127.0.0.1:{self.superlink_port}/v1/control/list-nodes",
                content=ListNodesRequest().SerializeToString(),
                headers={"Content-Type": "application/protobuf"},
            )
        reply.raise_for_status()
        listed = ListNodesResponse.FromString(reply.content)
        return {int(node.node_id): str(node.status) for node in listed.nodes_info}


def _connection_file(home: Path, ca: Path, superlink_port: int, fleet_port: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        f'[superlink.local]\naddress = "127.0.0.1:{superlink_port}"\n'
        f'root-certificates = "{ca}"\n\n'
        # What a hospital pod could try: the same CLI, aimed at the fleet port.
        f'[superlink.fleet]\naddress = "127.0.0.1:{fleet_port}"\n'
        f'root-certificates = "{ca}"\n',
        encoding="utf-8",
    )


def _trust(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.crt"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    flwr_env.terminate(proc, grace_s=10)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    work = tmp_path_factory.mktemp("flower-security")
    pki = work / "pki"
    pki.mkdir()
    ca = _make_ca(pki / "ca.crt", "fedrun run demo CA")
    _make_ca(pki / "other-ca.crt", "somebody else's CA")
    server_crt, server_key = _make_server_cert(
        pki, "server", ca, ["demo-server", "demo-server.ns.svc"], ["127.0.0.1"]
    )
    _make_server_cert(pki, "expired", ca, ["demo-server"], ["127.0.0.1"], expired=True)
    _make_server_cert(pki, "elsewhere", ca, ["other-server"], ["10.0.0.9"])
    _make_node_key(pki, "hospital-a")
    _make_node_key(pki, "unregistered")
    _make_node_key(pki, "other-run-hospital-a")
    secret = os.urandom(32)
    (work / "superexec.secret").write_bytes(secret)

    superlink_port, fleet_port = _free_port(), _free_port()
    env = flwr_env.environment(work / "flwr-home")
    _connection_file(work / "flwr-home", pki / "ca.crt", superlink_port, fleet_port)
    started: list[subprocess.Popen[bytes]] = []
    try:
        superlink = subprocess.Popen(
            [
                flwr_env.executable("flower-superlink"),
                "--ssl-certfile",
                str(server_crt),
                "--ssl-keyfile",
                str(server_key),
                "--ssl-ca-certfile",
                str(pki / "ca.crt"),
                "--enable-supernode-auth",
                "--isolation",
                "process",
                "--superexec-auth-secret-file",
                str(work / "superexec.secret"),
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(superlink_port),
            ],
            env=env,
            stdout=(work / "superlink.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(superlink)
        proxy = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedrun_trainer.server.fleet_proxy",
                "--listen",
                f"127.0.0.1:{fleet_port}",
                "--upstream",
                f"127.0.0.1:{superlink_port}",
                "--certfile",
                str(server_crt),
                "--keyfile",
                str(server_key),
                "--ca-certfile",
                str(pki / "ca.crt"),
            ],
            env=env,
            stdout=(work / "proxy.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(proxy)
        # The ServerApp's executor: started by us (in process isolation the SuperLink
        # starts none), authenticated with the run's secret.
        executor = subprocess.Popen(
            [
                flwr_env.executable("flower-superexec"),
                "--runtime-api-address",
                f"127.0.0.1:{superlink_port}",
                "--root-certificates",
                str(pki / "ca.crt"),
                "--superexec-auth-secret-file",
                str(work / "superexec.secret"),
            ],
            env=env,
            stdout=(work / "superexec.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(executor)
        client = httpx.Client(verify=_trust(pki), timeout=5)

        def healthy(port: int, proc: subprocess.Popen[bytes]) -> bool:
            assert proc.poll() is None, f"exited with {proc.returncode}"
            try:
                return client.get(f"https://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the SuperLink", lambda: healthy(superlink_port, superlink), STARTUP_S)
        wait_for("the proxy", lambda: healthy(fleet_port, proxy), STARTUP_S)

        fed = Federation(pki, work, env, superlink_port, fleet_port, 0, superlink, secret)
        registered = fed.flwr("supernode", "register", str(pki / "hospital-a.pub"))
        assert registered["success"], registered
        fed.hospital_node_id = int(registered["node-id"])
        fed.hospital = fed.supernode(
            "hospital-a",
            "--root-certificates",
            str(pki / "ca.crt"),
            "--auth-supernode-private-key",
            str(pki / "hospital-a"),
        )
        started.append(fed.hospital)
        wait_for(
            "hospital-a online",
            lambda: fed.nodes().get(fed.hospital_node_id) == "online",
            STARTUP_S,
        )
        yield fed
    finally:
        for proc in reversed(started):
            _stop(proc)


@dataclass(frozen=True)
class Attempt:
    """A SuperNode that tried to join: how it ended and what it said."""

    returncode: int
    log: str


# name -> (key or None, root certificates, extra flags, certificate the fleet port shows)
ROGUES: dict[str, tuple[str | None, str | None, tuple[str, ...], str]] = {
    "no-key": (None, "ca.crt", (), "server"),
    "unregistered-key": ("unregistered", "ca.crt", (), "server"),
    "other-runs-key": ("other-run-hospital-a", "ca.crt", (), "server"),
    "other-ca": ("hospital-a", "other-ca.crt", (), "server"),
    "no-tls": ("hospital-a", None, ("--insecure",), "server"),
    # The right key and CA, but the fleet port presents an expired certificate, or one
    # issued by the run's CA for another host.
    "expired-cert": ("hospital-a", "ca.crt", (), "expired"),
    "cert-for-another-host": ("hospital-a", "ca.crt", (), "elsewhere"),
}


@pytest.fixture(scope="module")
def attempts(federation: Federation) -> dict[str, Attempt]:
    """Every rogue at once (they are independent; in sequence they would take a minute)."""
    pki = federation.pki
    proxies: dict[str, ProxyThread] = {}
    for cert in ("expired", "elsewhere"):
        proxies[cert] = ProxyThread(
            ProxyConfig(
                listen_host="127.0.0.1",
                listen_port=0,
                upstream_host="127.0.0.1",
                upstream_port=federation.superlink_port,
                server_ssl=server_context(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key")),
                upstream_ssl=upstream_context(str(pki / "ca.crt")),
            )
        )
        proxies[cert].start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (key, roots, flags, cert) in ROGUES.items():
            args = list(flags)
            if roots is not None:
                args += ["--root-certificates", str(pki / roots)]
            if key is not None:
                args += ["--auth-supernode-private-key", str(pki / key)]
            port = federation.fleet_port if cert == "server" else proxies[cert].port
            procs[name] = federation.supernode(name, *args, fleet_port=port)
        deadline = time.monotonic() + EXIT_S
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} was not refused within {EXIT_S:.0f} s") from None
    finally:
        for proc in procs.values():
            _stop(proc)
        for proxy in proxies.values():
            proxy.stop()
    return {name: Attempt(proc.returncode, federation.log(name)) for name, proc in procs.items()}


def _assert_run_unaffected(fed: Federation) -> None:
    assert fed.hospital.poll() is None, fed.log("hospital-a")
    assert fed.nodes() == {fed.hospital_node_id: "online"}


def test_registered_hospital_joins_through_the_fleet_proxy(federation: Federation) -> None:
    _assert_run_unaffected(federation)
    assert f"SuperNode ID: {federation.hospital_node_id}" in federation.log("hospital-a")


@pytest.mark.parametrize(
    ("rogue", "messages"),
    [
        ("no-key", ["All SuperNodes must be registered"]),
        ("unregistered-key", ["Failed to activate SuperNode"]),
        ("other-runs-key", ["Failed to activate SuperNode"]),
        (
            "other-ca",
            ["CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate"],
        ),
        ("no-tls", ["requires a secure TLS connection"]),
        ("expired-cert", ["CERTIFICATE_VERIFY_FAILED", "certificate has expired"]),
        (
            "cert-for-another-host",
            [
                "CERTIFICATE_VERIFY_FAILED",
                "IP address mismatch, certificate is not valid for '127.0.0.1'",
            ],
        ),
    ],
)
def test_rogue_supernode_cannot_join_and_says_why(
    federation: Federation, attempts: dict[str, Attempt], rogue: str, messages: list[str]
) -> None:
    attempt = attempts[rogue]
    assert attempt.returncode != 0, attempt.log
    for message in messages:
        assert message in attempt.log
    _assert_run_unaffected(federation)


CONTROL_AND_RUNTIME = [
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/list-runs",
    "/v1/control/register-node",
    "/v1/control/list-nodes",
    "/v1/runtime/acquire-task",
    "/v1/runtime/pull-messages",
]


@pytest.mark.parametrize("path", CONTROL_AND_RUNTIME)
def test_fleet_port_does_not_serve_control_or_runtime(federation: Federation, path: str) -> None:
    with httpx.Client(verify=_trust(federation.pki), timeout=10) as client:
        reply = client.post(
            f"https://127.0.0.1:{federation.fleet_port}{path}",
            content=b"",
            headers={"Content-Type": "application/protobuf"},
        )
    assert reply.status_code == 404


def test_superlink_itself_serves_control_to_anyone_who_reaches_it(
    federation: Federation,
) -> None:
    # Why the proxy exists: on the SuperLink's own port the same request is answered.
    with httpx.Client(verify=_trust(federation.pki), timeout=10) as client:
        reply = client.post(
            f"https://127.0.0.1:{federation.superlink_port}/v1/control/list-runs",
            content=b"",
            headers={"Content-Type": "application/protobuf"},
        )
    assert reply.status_code == 200


PING_APP = {
    "pyproject.toml": """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ping"
version = "0.1.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedrun"

[tool.flwr.app.components]
serverapp = "ping:server_app"
clientapp = "ping:client_app"

[tool.flwr.app.config]
out = ""
""",
    "ping.py": """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    question = RecordDict({"q": ConfigRecord({"x": 41})})
    messages = [Message(question, dst_node_id=n, message_type="query.ping") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=60))
    answers = {r.metadata.src_node_id: r.content["a"]["y"] for r in replies if r.has_content()}
    Path(str(context.run_config["out"])).write_text(json.dumps(answers))


@client_app.query("ping")
def _ping(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"a": ConfigRecord({"y": msg.content["q"]["x"] + 1})}), reply_to=msg)
""",
}


def _ping_app(work: Path) -> Path:
    app = work / "ping-app"
    app.mkdir(exist_ok=True)
    for name, text in PING_APP.items():
        (app / name).write_text(text.lstrip(), encoding="utf-8")
    return app


def test_hospital_cli_cannot_start_stop_or_list_runs_nor_register_keys_via_fleet_port(
    federation: Federation,
) -> None:
    calls = {
        "register-node": ("supernode", "register", str(federation.pki / "unregistered.pub")),
        "list-runs": ("ls",),
        "stop-run": ("stop", "1"),
        "start-run": ("run", str(_ping_app(federation.work))),
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {
            path: pool.submit(federation.flwr, *args, connection="fleet")
            for path, args in calls.items()
        }
        answers = {path: future.result() for path, future in futures.items()}
    # flwr reports failure in its JSON (its exit status is 0 either way).
    for path, answer in answers.items():
        assert answer.get("success") is False, answer
        assert f"/v1/control/{path}" in answer["error-message"], answer
        assert "404 Not Found" in answer["error-message"], answer
    _assert_run_unaffected(federation)


def test_run_completes_through_the_proxy_after_the_rogues(
    federation: Federation, attempts: dict[str, Attempt]
) -> None:
    # A ServerApp, run by the authenticated executor, asks the hospital a question
    # through the fleet proxy; the hospital's ClientApp answers. The rogues came first.
    assert attempts, "the rogues must have run"
    app = _ping_app(federation.work)
    out = federation.work / "ping.json"
    submitted = federation.flwr("run", str(app), "--run-config", f"out='{out}'")
    assert submitted.get("success"), submitted
    wait_for("the ping run's answer", lambda: out.exists() and out.stat().st_size > 0, STARTUP_S)
    assert json.loads(out.read_text()) == {str(federation.hospital_node_id): 42}
    _assert_run_unaffected(federation)


def test_runtime_task_tokens_need_the_executor_secret(federation: Federation) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.auth.superexec import (
        create_superexec_auth_metadata,
        derive_auth_secret,
    )

    request = AcquireTaskRequest()
    body = request.SerializeToString(deterministic=True)
    url = f"https://127.0.0.1:{federation.superlink_port}/v1/runtime/acquire-task"
    headers = {"Content-Type": "application/protobuf"}
    with httpx.Client(verify=_trust(federation.pki), timeout=10) as client:
        anonymous = client.post(url, content=body, headers=headers)
        forged = create_superexec_auth_metadata(
            auth_secret=derive_auth_secret(os.urandom(32)),
            method="/flwr.proto.Runtime/AcquireTask",
            request=request,
        )
        wrong_secret = client.post(url, content=body, headers={**headers, **forged})
        signed = create_superexec_auth_metadata(
            auth_secret=derive_auth_secret(federation.secret),
            method="/flwr.proto.Runtime/AcquireTask",
            request=request,
        )
        right_secret = client.post(url, content=body, headers={**headers, **signed})
    assert anonymous.status_code == 401
    assert wrong_secret.status_code == 401
    # With the run's secret the same call is served (no task is pending: empty reply).
    assert right_secret.status_code == 200

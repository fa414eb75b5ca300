"""A real secure run keeps rogues out: TLS, SuperNode authentication and the fleet-only proxy.

One run for the module, started by the local runner exactly as rendered (`fedrun server
--tls-dir`, `fedrun client --tls-dir`, the run's Secrets made fresh by `pki.generate`). Its
second hospital is held back, so the run sits in phase Running, waiting for hospitals, with
hospital-a joined, for as long as the attack takes, however slow the machine (round timing
decides nothing). Meanwhile, all at once:

- rogue SuperNodes dial the fleet port with no key, an unregistered key, another run's key,
  and another run's whole auth directory (its CA and key);
- the real `fedrun client`, posing as hospital-a with another run's node key, and posing as
  a hospital whose ca.crt is another run's CA;
- Control and Runtime calls through the fleet port (raw HTTPS, and the `flwr` CLI aimed at
  it), and plain HTTP to it;
- an unsigned Runtime call on the SuperLink's own loopback port.

Then hospital-b starts and the run must finish as if nothing happened, with the SuperLink
knowing exactly the run's two nodes. docs/security.md says what each refusal means.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="flwr is not installed: no Flower processes to test")

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrun_cli.demo_data import write_demo_hospitals
from fedrun_core import names as c
from fedrun_core import pki
from fedrun_core.api import FederatedRun, parse_run
from fedrun_local.runner import LocalCluster, Pod
from fedrun_render.identity import server_name
from fedrun_render.security import server_tls_secret_name
from fedrun_trainer.common import flwr_env

from .conftest import example_run, wait_for

pytestmark = pytest.mark.slow  # conftest marks every test here e2e too

JOINED = "hospital-a"  # started with the server, online while the rogues try
HELD = "hospital-b"  # started only after the rogues: until then the run waits for it
HOSPITALS = (JOINED, HELD)
ROUNDS = 2
STARTUP_S = 120.0  # generous: the machine may be busy with other test runs
ATTACK_S = 150.0  # every rogue must have been refused by then
RUN_S = 300.0  # the run's rounds, once hospital-b joined


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _node_key(directory: Path) -> Path:
    """A Flower node key nobody registered: P-384, OpenSSH format (and its .pub beside it)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_private(
        directory / "node.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    (directory / "node.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private


# --- the run ---------------------------------------------------------------------------


@dataclass
class SecureRun:
    """The module's run, held at its join stage with hospital-a online."""

    cluster: LocalCluster
    run: FederatedRun
    work: Path  # the rogues' files, logs and FLWR_HOME
    env: dict[str, str]  # Flower environment whose FLWR_HOME names `fleet` and `loopback`
    fleet_port: int
    superlink_port: int
    ca: Path  # the run's CA, as mounted in the server pod
    registered: dict[str, int]  # hospital -> node id, from the server's log

    @property
    def server_log(self) -> str:
        assert self.cluster.server is not None
        return self.cluster.server.log_path.read_text(encoding="utf-8", errors="replace")

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def nodes(self) -> dict[int, str]:
        """Node id -> status, from the SuperLink's Control API on loopback (one HTTPS call;
        what `flwr supernode ls` shows)."""
        from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

        with httpx.Client(verify=self.trust(), timeout=10) as client:
            reply = client.post(
                f"https://127.0.0.1:{self.superlink_port}/v1/control/list-nodes",
                content=ListNodesRequest().SerializeToString(),
                headers={"Content-Type": "application/protobuf"},
            )
        reply.raise_for_status()
        listed = ListNodesResponse.FromString(reply.content)
        return {int(n.node_id): str(n.status) for n in listed.nodes_info}

    def flwr(self, *args: str, connection: str) -> dict[str, Any]:
        """``flwr ARGS CONNECTION --format json``; its JSON (flwr exits 0 on failure)."""
        out = subprocess.run(
            [flwr_env.executable("flwr"), *args, connection, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=ATTACK_S,
            check=False,
        )
        try:
            parsed: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            parsed = {"success": None, "unparsed": out.stdout + out.stderr}
        return parsed


def _status(cluster: LocalCluster) -> dict[str, Any]:
    return cluster.status() or {}


def _hospital_state(status: dict[str, Any], name: str) -> str:
    return next((h["state"] for h in status.get("hospitals", []) if h["name"] == name), "")


def _start_server_and(cluster: LocalCluster, hospital: str) -> None:
    """LocalCluster.start, but for one hospital: the server, then ``hospital`` alone."""
    server = cluster.server
    assert server is not None
    server.start()

    def serving() -> bool:
        assert server.running, f"the server exited: {server.termination_message()}"
        return cluster.status() is not None

    wait_for("the server's /status", serving, STARTUP_S)
    cluster.hospitals[hospital].start()


def _registered_nodes(log: str) -> dict[str, int] | None:
    """Hospital -> node id, as `fedrun server` logs its registrations; None before then."""
    line = next((ln for ln in log.splitlines() if "registered node keys:" in ln), None)
    if line is None:
        return None
    return {name: int(node) for name, node in re.findall(r"(hospital-[a-z])=(\d+)", line)}


def _connections(home: Path, ca: Path, fleet_port: int, superlink_port: int) -> None:
    """`fleet`: what a hospital pod could aim the flwr CLI at; `loopback`: the server's own."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "127.0.0.1:{superlink_port}"\n'
        f'root-certificates = "{ca}"\n\n'
        f'[superlink.fleet]\naddress = "127.0.0.1:{fleet_port}"\n'
        f'root-certificates = "{ca}"\n',
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRun]:
    work = tmp_path_factory.mktemp("secure-run")
    data = write_demo_hospitals(work / "data", n_per_hospital=(300, 300, 300), seed=21)
    doc = example_run(
        rounds=ROUNDS,
        minHospitals=2,
        # The run waits this long for its second hospital: longer than the attack.
        roundTimeoutSeconds=300,
        hospitals=[{"name": h, "dataUri": data[h].as_uri()} for h in HOSPITALS],
    )
    with pytest.MonkeyPatch.context() as mp:
        # As conftest's _flower_quiet, for the whole module.
        for name, value in flwr_env.QUIET_ENV.items():
            mp.setenv(name, value)
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        run = parse_run(doc)
        cluster = LocalCluster.create(run, work / "out")
        try:
            fleet_port = cluster.ports[c.FLEET_PORT]
            ca = cluster.out / "secrets" / server_tls_secret_name(run) / "ca.crt"
            assert ca.is_file(), "the local runner did not materialise the server's Secret"
            assert cluster.server is not None
            _start_server_and(cluster, JOINED)
            server_log = cluster.server.log_path

            def registered() -> dict[str, int] | None:
                assert cluster.server is not None
                assert cluster.server.running, cluster.server.termination_message()
                return _registered_nodes(server_log.read_text(encoding="utf-8", errors="replace"))

            nodes = wait_for("the server to register the node keys", registered, STARTUP_S)
            connection = cluster.out / "pods" / server_name(run) / "state" / "flwr-home"
            written = tomllib.loads((connection / "config.toml").read_text(encoding="utf-8"))
            superlink = str(written["superlink"]["local"]["address"])
            host, _, port = superlink.rpartition(":")
            assert host == "127.0.0.1", f"the server's tools reach the SuperLink at {superlink}"
            env = flwr_env.environment(work / "flwr-home")
            _connections(work / "flwr-home", ca, fleet_port, int(port))
            secure = SecureRun(cluster, run, work, env, fleet_port, int(port), ca, nodes)

            def joined() -> bool:
                status = _status(cluster)
                return (
                    status.get("phase") == "Running"
                    and _hospital_state(status, JOINED) == "Connected"
                    and secure.nodes().get(nodes[JOINED]) == "online"
                )

            wait_for(f"{JOINED} to join the run", joined, STARTUP_S)
            yield secure
        finally:
            cluster.stop()
            if os.environ.get("FEDRUN_KEEP_E2E") is None:  # as conftest's cluster_factory
                shutil.rmtree(cluster.out / "pods", ignore_errors=True)


# --- the attack ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """A process that tried to join: its exit status and what it said."""

    returncode: int | None
    log: str
    termination: str = ""


@dataclass
class Attack:
    """Everything the rogues got, and the run as seen just before and just after."""

    supernodes: dict[str, Attempt] = field(default_factory=dict)
    clients: dict[str, Attempt] = field(default_factory=dict)
    fleet_https: dict[str, httpx.Response] = field(default_factory=dict)
    fleet_health: httpx.Response | None = None
    fleet_plain_http: Exception | None = None  # what a plain-HTTP client got instead of an answer
    flwr_via_fleet: dict[str, dict[str, Any]] = field(default_factory=dict)
    loopback_acquire_task: httpx.Response | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    nodes_after: dict[int, str] = field(default_factory=dict)
    supernode_ls_after: dict[str, Any] = field(default_factory=dict)


CONTROL_AND_RUNTIME = [
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/register-node",
    "/v1/runtime/acquire-task",
]


def _other_run(work: Path) -> dict[str, Path]:
    """Key material of another run, as its hospital pods would have it; and a fresh key."""
    other = pki.generate("other-run", "default", list(HOSPITALS), now=datetime.now(UTC))
    auth = work / "other-run-auth"  # another run's <run>-hospital-a-auth, whole
    _write_private(auth / "ca.crt", other.ca_cert)
    _write_private(auth / "node.key", other.nodes[JOINED].private_key)
    return {
        "other_auth": auth,
        "other_key": auth / "node.key",
        "other_ca": auth / "ca.crt",
        "unregistered_key": _node_key(work / "unregistered"),
    }


def _supernode(secure: SecureRun, name: str, *args: str) -> Attempt:
    """A bare Flower SuperNode dialling the run's fleet port; waits for it to give up."""
    log_path = secure.work / "rogues" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                flwr_env.executable("flower-supernode"),
                "--superlink",
                f"127.0.0.1:{secure.fleet_port}",
                "--port",
                str(flwr_env.free_port()),
                "--max-retries",
                "1",
                "--max-wait-time",
                "10",
                *args,
            ],
            env=flwr_env.environment(secure.work / "rogues" / f"{name}-home"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        code: int | None = proc.wait(timeout=ATTACK_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        flwr_env.terminate(proc)
    return Attempt(code, log_path.read_text(encoding="utf-8", errors="replace"))


def _fedrun_client(secure: SecureRun, name: str, hospital: str, tls_dir: Path) -> Attempt:
    """The real `fedrun client`, from the hospital pod's own argv, with other files."""
    template: Pod = secure.cluster.hospitals[hospital]
    pod_dir = secure.work / "rogues" / name
    argv = list(template.argv)
    replaced = {
        "--state-dir": str(pod_dir / "state"),
        "--termination-log": str(pod_dir / "termination-log"),
        "--tls-dir": str(tls_dir),
    }
    for flag, value in replaced.items():
        assert flag in argv, f"{flag} is not in the hospital pod's argv {argv}"
        argv[argv.index(flag) + 1] = value
    env = dict(template.env, HOME=str(pod_dir / "home"))
    log_path = pod_dir / "log"
    pod_dir.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        code: int | None = proc.wait(timeout=ATTACK_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        flwr_env.terminate(proc)
    termination = pod_dir / "termination-log"
    return Attempt(
        code,
        log_path.read_text(encoding="utf-8", errors="replace"),
        termination.read_text(encoding="utf-8") if termination.exists() else "",
    )


def _https_posts(secure: SecureRun, attack: Attack) -> None:
    with httpx.Client(verify=secure.trust(), timeout=30) as client:
        for path in CONTROL_AND_RUNTIME:
            attack.fleet_https[path] = client.post(
                f"https://127.0.0.1:{secure.fleet_port}{path}",
                content=b"",
                headers={"Content-Type": "application/protobuf"},
            )
        # The same client, the same TLS: the one thing besides Fleet calls that passes.
        attack.fleet_health = client.get(f"https://127.0.0.1:{secure.fleet_port}/health")
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        attack.loopback_acquire_task = client.post(
            f"https://127.0.0.1:{secure.superlink_port}/v1/runtime/acquire-task",
            content=AcquireTaskRequest().SerializeToString(deterministic=True),
            headers={"Content-Type": "application/protobuf"},
        )
    try:
        with httpx.Client(timeout=30) as plain:
            answer = plain.post(
                f"http://127.0.0.1:{secure.fleet_port}/v1/control/list-runs",
                content=b"",
                headers={"Content-Type": "application/protobuf"},
            )
        attack.fleet_https["plain-http"] = answer
    except httpx.TransportError as err:
        attack.fleet_plain_http = err


@pytest.fixture(scope="module")
def attack(secure_run: SecureRun) -> Attack:
    """Every rogue at once, while the run waits for hospital-b with hospital-a online."""
    secure = secure_run
    files = _other_run(secure.work)
    this_ca = str(secure.ca)
    result = Attack(before=_status(secure.cluster))
    supernodes: dict[str, tuple[str, ...]] = {
        "no-key": ("--root-certificates", this_ca),
        "unregistered-key": (
            "--root-certificates",
            this_ca,
            "--auth-supernode-private-key",
            str(files["unregistered_key"]),
        ),
        "other-runs-key": (
            "--root-certificates",
            this_ca,
            "--auth-supernode-private-key",
            str(files["other_key"]),
        ),
        "other-runs-ca-and-key": (
            "--root-certificates",
            str(files["other_ca"]),
            "--auth-supernode-private-key",
            str(files["other_key"]),
        ),
    }
    # A hospital's auth directory with this run's CA but another run's node key.
    mixed = secure.work / "mixed-auth"
    _write_private(mixed / "ca.crt", secure.ca.read_bytes())
    _write_private(mixed / "node.key", files["other_key"].read_bytes())
    clients = {
        "client-other-runs-key": (JOINED, mixed),
        "client-other-runs-ca": (HELD, files["other_auth"]),
    }
    with ThreadPoolExecutor(max_workers=12) as pool:
        node_futures = {n: pool.submit(_supernode, secure, n, *a) for n, a in supernodes.items()}
        client_futures = {
            n: pool.submit(_fedrun_client, secure, n, h, d) for n, (h, d) in clients.items()
        }
        flwr_futures: dict[str, Future[dict[str, Any]]] = {
            "list-runs": pool.submit(secure.flwr, "ls", connection="fleet"),
            "register-node": pool.submit(
                secure.flwr,
                "supernode",
                "register",
                str(files["unregistered_key"].with_name("node.pub")),
                connection="fleet",
            ),
        }
        https = pool.submit(_https_posts, secure, result)
        https.result()
        result.flwr_via_fleet = {k: f.result() for k, f in flwr_futures.items()}
        result.supernodes = {k: f.result() for k, f in node_futures.items()}
        result.clients = {k: f.result() for k, f in client_futures.items()}
    result.after = _status(secure.cluster)
    result.nodes_after = secure.nodes()
    result.supernode_ls_after = secure.flwr("supernode", "ls", connection="loopback")
    return result


@dataclass(frozen=True)
class Finish:
    final: dict[str, Any]
    nodes_with_both: dict[int, str]


@pytest.fixture(scope="module")
def finish(secure_run: SecureRun, attack: Attack) -> Finish:
    """After the attack: hospital-b joins, the run goes on to its end."""
    secure = secure_run
    assert attack.after, "the attack must have run first"
    secure.cluster.hospitals[HELD].start()
    wanted = {secure.registered[h] for h in HOSPITALS}

    def both_online() -> dict[int, str] | None:
        nodes = secure.nodes()
        return nodes if {n for n, s in nodes.items() if s == "online"} >= wanted else None

    # While the rounds run, the SuperLink has both nodes online (and nothing else).
    nodes = wait_for(f"{HELD} online beside {JOINED}", both_online, STARTUP_S)
    final = secure.cluster.wait(timeout_s=RUN_S)
    return Finish(final, nodes)


# --- 1. rogue SuperNodes and hospitals are refused -------------------------------------


def test_run_was_running_with_its_hospital_online_throughout_the_attack(
    secure_run: SecureRun, attack: Attack
) -> None:
    for seen in (attack.before, attack.after):
        assert seen.get("phase") == "Running", seen
        assert _hospital_state(seen, JOINED) == "Connected", seen
        assert seen["round"]["current"] == 0, seen  # still waiting for hospital-b
    assert secure_run.cluster.hospitals[JOINED].running
    assert attack.nodes_after[secure_run.registered[JOINED]] == "online"


@pytest.mark.parametrize(
    ("rogue", "messages"),
    [
        ("no-key", ["All SuperNodes must be registered"]),
        ("unregistered-key", ["Failed to activate SuperNode"]),
        ("other-runs-key", ["Failed to activate SuperNode"]),
        (
            "other-runs-ca-and-key",
            ["CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate"],
        ),
    ],
)
def test_rogue_supernode_is_refused(attack: Attack, rogue: str, messages: list[str]) -> None:
    attempt = attack.supernodes[rogue]
    assert attempt.returncode is not None, f"{rogue} was not refused within {ATTACK_S:.0f} s"
    assert attempt.returncode != 0, attempt.log[-3000:]
    for message in messages:
        assert message in attempt.log, attempt.log[-3000:]
    assert "SuperNode ID:" not in attempt.log


@pytest.mark.parametrize(
    ("client", "messages"),
    [
        (
            "client-other-runs-key",
            ["Failed to activate SuperNode", "does not know this hospital's node key"],
        ),
        (
            "client-other-runs-ca",
            ["CERTIFICATE_VERIFY_FAILED", "does not verify against this run's CA"],
        ),
    ],
)
def test_fedrun_client_with_foreign_material_exits_1_and_says_why(
    attack: Attack, client: str, messages: list[str]
) -> None:
    attempt = attack.clients[client]
    assert attempt.returncode is not None, f"{client} still running after {ATTACK_S:.0f} s"
    assert attempt.returncode == 1, (attempt.termination, attempt.log[-3000:])
    assert "refused by or refusing server" in attempt.termination, attempt.termination
    for message in messages:
        assert message in attempt.termination, attempt.termination


# --- 2. the fleet port serves Fleet only -----------------------------------------------


@pytest.mark.parametrize("path", CONTROL_AND_RUNTIME)
def test_fleet_port_answers_control_and_runtime_with_404_before_flower(
    secure_run: SecureRun, attack: Attack, path: str
) -> None:
    answer = attack.fleet_https[path]
    assert answer.status_code == 404
    # The proxy's own plain-text answer; Flower's (FastAPI's) 404 would be JSON.
    assert answer.headers["content-type"] == "text/plain"
    assert answer.content == b"404 Not Found\n"
    assert f"refused POST {path} HTTP/1.1" in secure_run.server_log


def test_fleet_port_serves_health_over_the_runs_tls(attack: Attack) -> None:
    # The control for the 404s: the same client reaches the SuperLink through the proxy.
    assert attack.fleet_health is not None
    assert attack.fleet_health.status_code == 200


@pytest.mark.parametrize("call", ["list-runs", "register-node"])
def test_flwr_cli_aimed_at_the_fleet_port_fails(attack: Attack, call: str) -> None:
    answer = attack.flwr_via_fleet[call]
    assert answer.get("success") is False, answer
    assert f"/v1/control/{call}" in answer["error-message"], answer
    assert "404 Not Found" in answer["error-message"], answer


def test_plain_http_to_the_fleet_port_gets_nothing(attack: Attack) -> None:
    assert "plain-http" not in attack.fleet_https, attack.fleet_https.get("plain-http")
    # Cut off at once (the TLS handshake fails), not left hanging until the client gives up.
    assert isinstance(attack.fleet_plain_http, httpx.TransportError)
    assert not isinstance(attack.fleet_plain_http, httpx.TimeoutException)


# --- 3. the Runtime API needs the executor's secret, even on loopback ------------------


def test_loopback_runtime_refuses_an_unsigned_executor(attack: Attack) -> None:
    answer = attack.loopback_acquire_task
    assert answer is not None
    assert answer.status_code == 401, answer.text
    # Flower's RUNTIME_AUTHENTICATION_FAILED (flwr/supercore/error/base.py).
    assert answer.json() == {"code": 1008, "detail": "Authentication failed."}


# --- 4. the rogues left no trace; the run finishes ------------------------------------


def test_superlink_knows_exactly_the_runs_nodes_after_the_attack(
    secure_run: SecureRun, attack: Attack
) -> None:
    ids = secure_run.registered
    assert set(ids) == set(HOSPITALS)
    assert attack.nodes_after == {ids[JOINED]: "online", ids[HELD]: "registered"}
    listed = attack.supernode_ls_after
    assert listed.get("success") is True, listed
    assert {int(n["node-id"]): n["status"] for n in listed["nodes"]} == attack.nodes_after


def test_run_succeeds_with_exactly_its_hospitals(secure_run: SecureRun, finish: Finish) -> None:
    final = finish.final
    assert final["phase"] == "Succeeded", final.get("message")
    assert final["round"] == {"current": ROUNDS, "total": ROUNDS}
    assert [(h["name"], h["state"], h["restarts"]) for h in final["hospitals"]] == [
        (JOINED, "Done", 0),
        (HELD, "Done", 0),
    ]
    ids = secure_run.registered
    assert finish.nodes_with_both == {ids[JOINED]: "online", ids[HELD]: "online"}
    assert all(pod.exit_code == 0 for pod in secure_run.cluster.hospitals.values())

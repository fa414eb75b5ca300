"""The hospital wrapper's TLS side: its check of the mounted Secret and its reading of Flower.

``check_material`` refuses a ``<run>-<hospital>-auth`` mount that Flower could not use, naming
the file; ``explain_flower_exit`` turns the line a refused SuperNode prints (docs/security.md,
facts T2-T4, A3, A4) into the pod's termination message. The last tests run ``run_client``
with a stand-in for ``flower-supernode`` that prints what Flower prints and exits.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrun_core import names, pki
from fedrun_core.api import parse_run
from fedrun_render import security
from fedrun_trainer.common import flwr_env
from fedrun_trainer.hospital import main as client
from fedrun_trainer.hospital.handlers import DONE_MARKER
from fedrun_trainer.hospital.main import ClientOptions, OutputTail, explain_flower_exit, run_client

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HOSPITALS = ["hospital-a", "hospital-b"]
RUN = {
    "apiVersion": "fedrun.io/v1alpha1",
    "kind": "FederatedRun",
    "metadata": {"name": "demo", "namespace": "clinic"},
    "spec": {
        "rounds": 3,
        "minHospitals": 2,
        "data": {"preset": "stroke"},
        "hospitals": [{"name": h, "dataUri": f"file:///data/{h}.csv"} for h in HOSPITALS],
    },
}

# What Flower 1.41 prints when it gives up (supercore/exit/exit.py: the first line carries the
# coloured level, the rest of the message follows on its own lines).
ERROR = "\x1b[91mERROR \x1b[0m:      "
INFO = "\x1b[92mINFO \x1b[0m:      "


def flower_exit(code: int, *message: str) -> list[str]:
    return [
        f"{INFO}Starting Flower SuperNode\n",
        f"{ERROR}Exit Code: {code}\n",
        *(f"{m}\n" for m in message),
        "The SuperNode could not establish a connection to the SuperLink.\n",
        "\n",
        f"For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/{code}.html>\n",
    ]


CONNECT = "Failed to initialize the connection to the SuperLink."
WRONG_CA = (  # T2
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
    "certificate (_ssl.c:1006)"
)
EXPIRED = (  # T3
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired "
    "(_ssl.c:1006)"
)
OTHER_NAME = (  # T4
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, "
    "certificate is not valid for '127.0.0.1'. (_ssl.c:1006)"
)
NO_KEY = (  # A3
    "[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via "
    "the CLI."
)
UNKNOWN_KEY = "[code: 2004] Failed to activate SuperNode."  # A4


@pytest.fixture(scope="module")
def material() -> pki.RunMaterial:
    return pki.generate("demo", "clinic", HOSPITALS, now=NOW)


def mount(material: pki.RunMaterial, hospital: str, directory: Path) -> Path:
    """Write the hospital's <run>-<hospital>-auth Secret as a volume mount would."""
    run = parse_run(RUN)
    (secret,) = (
        s
        for s in security.secret_manifests(run, material)
        if s["metadata"]["name"] == security.hospital_auth_secret_name(run, hospital)
    )
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in secret["data"].items():
        (directory / name).write_bytes(base64.b64decode(value))
    return directory


@pytest.fixture
def auth(tmp_path: Path, material: pki.RunMaterial) -> Path:
    return mount(material, "hospital-a", tmp_path / "auth")


def refused(directory: Path) -> str:
    """The refusal's message; every one names a file in ``directory``."""
    with pytest.raises(ValueError, match=re.escape(str(directory))) as err:
        client.check_material(directory)
    return str(err.value)


# --------------------------------------------------------------------------- check_material


def test_the_hospital_s_secret_passes(auth: Path) -> None:
    assert {p.name for p in auth.iterdir()} == {
        names.CA_FILE,
        names.NODE_KEY_FILE,
        names.NODE_PUB_FILE,
    }
    client.check_material(auth)


@pytest.mark.parametrize("name", ["ca.crt", "node.key"])
def test_a_missing_file_is_named_with_the_secret_to_mount(auth: Path, name: str) -> None:
    (auth / name).unlink()
    message = refused(auth)
    assert str(auth / name) in message
    assert "is missing" in message
    assert "<run>-<hospital>-auth Secret" in message


def test_node_pub_is_not_needed(auth: Path) -> None:
    (auth / "node.pub").unlink()  # the SuperNode derives its public key from node.key
    client.check_material(auth)


def test_an_empty_directory_names_the_ca_first(tmp_path: Path) -> None:
    assert "ca.crt is missing" in refused(tmp_path)


def _pem_private_key() -> bytes:
    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_pem_private_key(), id="pem-pkcs8-key"),
        pytest.param(b"garbage\n", id="garbage"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_node_key_that_is_not_openssh_is_refused_naming_the_file(
    auth: Path, content: bytes
) -> None:
    (auth / "node.key").write_bytes(content)
    message = refused(auth)
    assert str(auth / "node.key") in message
    assert "is not an unencrypted OpenSSH private key" in message


def test_the_public_key_in_place_of_the_node_key_is_refused(
    auth: Path, material: pki.RunMaterial
) -> None:
    (auth / "node.key").write_bytes(material.nodes["hospital-a"].public_key)
    assert str(auth / "node.key") in refused(auth)


def test_an_ed25519_node_key_is_refused_as_flower_reads_only_ec_keys(auth: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    (auth / "node.key").write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    assert "not an ECDSA (NIST curve) key" in refused(auth)


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"garbage\n", id="garbage"), pytest.param(b"", id="empty")],
)
def test_a_ca_that_is_not_a_certificate_is_refused_naming_the_file(
    auth: Path, content: bytes
) -> None:
    (auth / "ca.crt").write_bytes(content)
    message = refused(auth)
    assert str(auth / "ca.crt") in message
    assert "is not a PEM certificate" in message


def test_the_server_key_in_place_of_the_ca_is_refused(
    auth: Path, material: pki.RunMaterial
) -> None:
    (auth / "ca.crt").write_bytes(material.server_key)
    assert "is not a PEM certificate" in refused(auth)


# --------------------------------------------------------------------------- explain_flower_exit


@pytest.mark.parametrize(
    ("line", "meaning"),
    [
        pytest.param(WRONG_CA, "does not verify against this run's CA", id="T2-wrong-ca"),
        pytest.param(EXPIRED, "expired", id="T3-expired"),
        pytest.param(OTHER_NAME, "does not verify against this run's CA", id="T4-other-name"),
        pytest.param(UNKNOWN_KEY, "does not know this hospital's node key", id="A4-unknown-key"),
        pytest.param(NO_KEY, "this hospital has no node key", id="A3-no-key"),
    ],
)
def test_a_refusal_gives_flower_s_line_and_what_it_means(line: str, meaning: str) -> None:
    why = explain_flower_exit(flower_exit(305, CONNECT, line))
    assert why.startswith(line)  # the line itself, stripped
    assert meaning in why
    assert "\n" not in why and "Exit Code" not in why


def test_the_meaning_names_the_hospital_s_secret() -> None:
    assert "<run>-<hospital>-auth" in explain_flower_exit([WRONG_CA])
    assert "another run" in explain_flower_exit([UNKNOWN_KEY])


def test_unrelated_output_explains_nothing() -> None:
    assert explain_flower_exit([]) == ""
    assert explain_flower_exit(["\n", f"{INFO}Starting Flower SuperNode\n"]) == ""
    other = flower_exit(305, CONNECT, "[Errno 111] Connection refused")
    assert explain_flower_exit(other) == ""
    # "unregistered" is not "registered".
    assert explain_flower_exit(["All SuperNodes must be unregistered via the CLI.\n"]) == ""


def test_the_last_matching_line_is_the_one_given() -> None:
    lines = [f"{WRONG_CA} first try\n", "retrying\n", f"{WRONG_CA} last try\n"]
    assert explain_flower_exit(lines).startswith(f"{WRONG_CA} last try")


def test_a_long_line_is_cut_to_its_end() -> None:
    line = "x" * 1000 + WRONG_CA
    why = explain_flower_exit([line])
    assert why.startswith(line[-300:])
    assert "x" * 301 not in why


# --------------------------------------------------------------------------- OutputTail


def test_output_tail_copies_and_keeps_the_last_lines(capfd: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfor i in range(10): print(f'line {i}')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    tail = OutputTail(proc, keep=3)
    proc.wait(timeout=60)
    assert tail.join(timeout_s=30) == ["line 7\n", "line 8\n", "line 9\n"]
    assert "line 0\n" in capfd.readouterr().err


# --------------------------------------------------------------------------- run_client


@pytest.fixture
def keep_signal_handlers() -> Iterator[None]:
    """run_client installs SIGTERM/SIGINT handlers: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RUN), encoding="utf-8")
    return str(path)


@pytest.fixture
def listening() -> Iterator[str]:
    """A loopback port that accepts connections, standing for the server's fleet port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def fake_supernode(
    monkeypatch: pytest.MonkeyPatch, directory: Path, lines: list[str], code: int
) -> None:
    """Make ``flwr_env.supernode_command()`` a script printing ``lines``."""
    script = directory / "flower-supernode"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.stdout.write({''.join(lines)!r})\nsys.exit({code})\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    monkeypatch.setattr(flwr_env, "supernode_command", lambda: [str(script)])


def options(config: str, tmp_path: Path, server: str, tls_dir: Path | None) -> ClientOptions:
    return ClientOptions(
        config=config,
        hospital="hospital-a",
        server=server,
        state_dir=tmp_path / "state",
        server_lost_timeout_s=30,
        termination_log=tmp_path / "termination-log",
        isolation="subprocess",
        tls_dir=tls_dir,
    )


@pytest.mark.usefixtures("keep_signal_handlers")
def test_bad_material_exits_2_before_dialling_the_server(
    tmp_path: Path, config: str, auth: Path
) -> None:
    (auth / "node.key").write_bytes(b"garbage\n")
    # Port 1 is not listening: the wrapper must not get as far as waiting for it.
    opts = options(config, tmp_path, "127.0.0.1:1", auth)
    assert run_client(opts) == client.EXIT_CONFIG == 2
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert message.startswith("hospital hospital-a: ")
    assert str(auth / "node.key") in message


@pytest.mark.usefixtures("keep_signal_handlers")
@pytest.mark.parametrize(
    ("line", "meaning"),
    [
        pytest.param(EXPIRED, "expired", id="T3-expired"),
        pytest.param(UNKNOWN_KEY, "does not know this hospital's node key", id="A4-unknown-key"),
    ],
)
def test_a_refused_supernode_exits_1_with_flower_s_reason(
    tmp_path: Path,
    config: str,
    auth: Path,
    listening: str,
    monkeypatch: pytest.MonkeyPatch,
    line: str,
    meaning: str,
) -> None:
    fake_supernode(monkeypatch, tmp_path, flower_exit(305, CONNECT, line), code=1)
    assert run_client(options(config, tmp_path, listening, auth)) == client.EXIT_FAILED
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert f"refused by or refusing server {listening}" in message
    assert line in message and meaning in message


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_supernode_failing_otherwise_passes_its_status_on(
    tmp_path: Path, config: str, auth: Path, listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_supernode(monkeypatch, tmp_path, [f"{ERROR}something else\n"], code=7)
    assert run_client(options(config, tmp_path, listening, auth)) == 7
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert "Flower SuperNode exited with status 7" in message


# --------------------------------------------------------------------------- rejoin after restart
# A restarted hospital container comes back with the same node key, which the server holds
# online until the old SuperNode's heartbeats have lapsed: Flower refuses it (A4) meanwhile.


def rejoining_supernode(
    monkeypatch: pytest.MonkeyPatch,
    directory: Path,
    state_dir: Path,
    refusals: int | None,
    refusal: str = UNKNOWN_KEY,
) -> Path:
    """A stand-in ``flower-supernode`` that Flower refuses the first ``refusals`` times
    (``None``: every time); after that it joins: it writes the DONE marker, as the hospital
    app does when the server ends the run, and runs until it is stopped.

    Each start appends its arguments (JSON) to the returned file, and the joined one its pid.
    """
    starts = directory / "supernode-starts"
    script = directory / "flower-supernode"
    limit = -1 if refusals is None else refusals
    script.write_text(
        f"""#!{sys.executable}
import json, os, pathlib, signal, sys
starts = pathlib.Path({str(starts)!r})
with starts.open("a", encoding="utf-8") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
n = len(starts.read_text(encoding="utf-8").splitlines())
if {limit} < 0 or n <= {limit}:
    sys.stdout.write({"".join(flower_exit(305, CONNECT, refusal))!r})
    sys.exit(1)
sys.stdout.write("joined\\n")
sys.stdout.flush()
pathlib.Path({str(directory / "joined.pid")!r}).write_text(str(os.getpid()))
done = pathlib.Path({str(state_dir / DONE_MARKER)!r})
tmp = done.with_name(".done.tmp")
tmp.write_text("{{}}")
tmp.replace(done)
signal.pause()
""",
        encoding="utf-8",
    )
    script.chmod(0o755)
    monkeypatch.setattr(flwr_env, "supernode_command", lambda: [str(script)])
    return starts


def started_with(starts: Path) -> list[list[str]]:
    """The arguments of each start of the stand-in, in order."""
    if not starts.exists():
        return []
    return [json.loads(line) for line in starts.read_text(encoding="utf-8").splitlines()]


def without_port(argv: list[str]) -> list[str]:
    """A SuperNode's arguments less its private runtime port (free_port picks one a start)."""
    i = argv.index("--port")
    return argv[:i] + argv[i + 2 :]


def restarted_options(config: str, tmp_path: Path, server: str, tls_dir: Path) -> ClientOptions:
    """Options for a container that ran before: its state dir holds STARTED_MARKER."""
    opts = options(config, tmp_path, server, tls_dir)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    (opts.state_dir / client.STARTED_MARKER).touch()
    return opts


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_restarted_hospital_retries_while_its_node_is_held_and_then_joins(
    tmp_path: Path, config: str, auth: Path, listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "REJOIN_RETRY_S", 0.05)
    monkeypatch.setattr(client, "REJOIN_WAIT_S", 120.0)
    opts = restarted_options(config, tmp_path, listening, auth)
    starts = rejoining_supernode(monkeypatch, tmp_path, opts.state_dir.resolve(), refusals=3)

    assert run_client(opts) == client.EXIT_DONE
    argvs = started_with(starts)
    assert len(argvs) == 4  # three refusals, then the start that joined
    # Every start is the same hospital: same server, node key and incarnation.
    assert len({json.dumps(without_port(a)) for a in argvs}) == 1
    assert "--auth-supernode-private-key" in argvs[0]
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert message.strip() == "hospital hospital-a: run finished"
    # The joined SuperNode was stopped (and reaped) before run_client returned.
    pid = int((tmp_path / "joined.pid").read_text(encoding="utf-8"))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_restarted_hospital_refused_for_longer_than_the_rejoin_wait_exits_1(
    tmp_path: Path, config: str, auth: Path, listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_s = 1.0
    monkeypatch.setattr(client, "REJOIN_RETRY_S", 0.05)
    monkeypatch.setattr(client, "REJOIN_WAIT_S", wait_s)
    opts = restarted_options(config, tmp_path, listening, auth)
    starts = rejoining_supernode(monkeypatch, tmp_path, opts.state_dir.resolve(), refusals=None)

    started = time.monotonic()
    assert run_client(opts) == client.EXIT_FAILED
    assert time.monotonic() - started >= wait_s  # it kept trying that long
    assert len(started_with(starts)) >= 2
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert message.startswith(
        f"hospital hospital-a: Flower SuperNode refused by or refusing server {listening}: "
    )
    assert UNKNOWN_KEY in message
    assert "does not know this hospital's node key" in message


@pytest.mark.usefixtures("keep_signal_handlers")
@pytest.mark.parametrize(
    ("restarted", "line", "meaning"),
    [
        pytest.param(
            False, UNKNOWN_KEY, "does not know this hospital's node key", id="first-start-A4"
        ),
        # Only "not activated" means the server still holds the node: nothing else is retried.
        pytest.param(True, EXPIRED, "expired", id="restarted-T3-expired"),
    ],
)
def test_a_refusal_that_is_no_held_node_exits_1_at_the_first_start(
    tmp_path: Path,
    config: str,
    auth: Path,
    listening: str,
    monkeypatch: pytest.MonkeyPatch,
    restarted: bool,
    line: str,
    meaning: str,
) -> None:
    monkeypatch.setattr(client, "REJOIN_RETRY_S", 0.05)
    monkeypatch.setattr(client, "REJOIN_WAIT_S", 120.0)
    if restarted:
        opts = restarted_options(config, tmp_path, listening, auth)
    else:
        opts = options(config, tmp_path, listening, auth)
    state_dir = opts.state_dir.resolve()
    assert not (state_dir / client.STARTED_MARKER).exists() or restarted
    # Refused once only: a wrapper that tried again would join and exit 0.
    starts = rejoining_supernode(monkeypatch, tmp_path, state_dir, refusals=1, refusal=line)

    assert run_client(opts) == client.EXIT_FAILED
    assert len(started_with(starts)) == 1
    message = (tmp_path / "termination-log").read_text(encoding="utf-8")
    assert f"refused by or refusing server {listening}: " in message
    assert line in message and meaning in message
    # The container's next start counts as a restart.
    assert (state_dir / client.STARTED_MARKER).exists()

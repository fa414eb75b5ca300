"""The server pod's check of its TLS material, and the ``flwr`` CLI's connection file.

``check_material`` runs before any Flower process starts: Flower itself would start with an
expired or mismatched certificate and only its clients would fail (docs/security.md, T6).
The files are written exactly as the run's ``<run>-server-tls`` Secret mounts them: the
Secret is rendered by ``security.secret_manifests`` from ``pki`` material and each data key
becomes a file.
"""

from __future__ import annotations

import base64
import socket
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrun_core import names, pki
from fedrun_core.api import FederatedRun, parse_run
from fedrun_render import security
from fedrun_trainer.common import flwr_env
from fedrun_trainer.server.superlink import LOOPBACK, MaterialError, ServerTls, check_material

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


def make_run(name: str = "demo") -> FederatedRun:
    return parse_run(
        {
            "apiVersion": "fedrun.io/v1alpha1",
            "kind": "FederatedRun",
            "metadata": {"name": name, "namespace": "clinic"},
            "spec": {
                "rounds": 3,
                "minHospitals": 2,
                "data": {"preset": "stroke"},
                "hospitals": [{"name": h, "dataUri": f"file:///data/{h}.csv"} for h in HOSPITALS],
            },
        }
    )


@pytest.fixture(scope="module")
def demo() -> FederatedRun:
    return make_run()


@pytest.fixture(scope="module")
def keys() -> pki.Keys:
    return pki.new_keys(HOSPITALS)


@pytest.fixture(scope="module")
def material(keys: pki.Keys) -> pki.RunMaterial:
    return pki.issue("demo", "clinic", keys, now=NOW)


@pytest.fixture(scope="module")
def other_run() -> pki.RunMaterial:
    """Another run's material: same names, its own CA and keys."""
    return pki.generate("demo", "clinic", HOSPITALS, now=NOW)


def mount(run: FederatedRun, material: pki.RunMaterial, directory: Path) -> ServerTls:
    """Write the run's <run>-server-tls Secret as a volume mount would: one file per key."""
    secret = security.secret_manifests(run, material)[0]
    assert secret["metadata"]["name"] == security.server_tls_secret_name(run)
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in secret["data"].items():
        (directory / name).write_bytes(base64.b64decode(value))
    return ServerTls(directory)


@pytest.fixture
def tls(tmp_path: Path, demo: FederatedRun, material: pki.RunMaterial) -> ServerTls:
    return mount(demo, material, tmp_path / "server-tls")


def refused(tls: ServerTls, now: datetime = NOW, hospitals: list[str] | None = None) -> str:
    with pytest.raises(MaterialError) as err:
        check_material(tls, HOSPITALS if hospitals is None else hospitals, now)
    return str(err.value)


# --------------------------------------------------------------------------- good material


def test_server_tls_names_are_the_secret_s_keys(
    tmp_path: Path, demo: FederatedRun, material: pki.RunMaterial
) -> None:
    tls = mount(demo, material, tmp_path / "d")
    expected = {names.CA_FILE, names.TLS_CERT_FILE, names.TLS_KEY_FILE}
    expected |= {names.hospital_pub_file(h) for h in HOSPITALS}
    assert {p.name for p in tls.directory.iterdir()} == expected
    assert {tls.ca.name, tls.cert.name, tls.key.name} == {
        names.CA_FILE,
        names.TLS_CERT_FILE,
        names.TLS_KEY_FILE,
    }
    assert tls.public_key("hospital-b").name == names.hospital_pub_file("hospital-b")


def test_a_fresh_set_passes(tls: ServerTls) -> None:
    check_material(tls, HOSPITALS, NOW)
    # Anywhere in the certificates' lifetime, the clock-skew allowance included.
    check_material(tls, HOSPITALS, NOW - pki.CLOCK_SKEW + timedelta(seconds=1))
    check_material(tls, HOSPITALS, NOW + pki.DEFAULT_LIFETIME - timedelta(seconds=1))


def test_the_server_certificate_covers_loopback_where_flower_s_tools_dial() -> None:
    assert LOOPBACK in pki.SERVER_IPS


# --------------------------------------------------------------------------- missing files


def test_missing_files_are_named_and_the_secret_to_mount_is_said(tls: ServerTls) -> None:
    tls.key.unlink()
    tls.public_key("hospital-b").unlink()
    message = refused(tls)
    assert "tls.key" in message and "hospital-b.pub" in message
    assert "ca.crt" not in message and "hospital-a.pub" not in message
    assert str(tls.directory) in message
    assert "<run>-server-tls Secret" in message


def test_an_empty_directory_names_every_file(tmp_path: Path) -> None:
    message = refused(ServerTls(tmp_path / "nothing-mounted"))
    for name in ["ca.crt", "tls.crt", "tls.key", *(f"{h}.pub" for h in HOSPITALS)]:
        assert name in message
    assert "mount the run's <run>-server-tls Secret" in message


def test_a_hospital_of_the_run_without_its_public_key(
    tmp_path: Path, demo: FederatedRun, material: pki.RunMaterial
) -> None:
    # The Secret of a run with three hospitals, the config of a run with a fourth one.
    tls = mount(demo, material, tmp_path / "d")
    message = refused(tls, hospitals=[*HOSPITALS, "hospital-d"])
    assert "hospital-d.pub" in message
    assert "<run>-server-tls Secret" in message
    # Keys of hospitals the run does not name are not needed (and not registered).
    check_material(tls, HOSPITALS[:2], NOW)


# --------------------------------------------------------------------------- validity


def test_an_expired_certificate_is_refused_as_expired(tls: ServerTls) -> None:
    later = NOW + pki.DEFAULT_LIFETIME + timedelta(minutes=1)
    message = refused(tls, now=later)
    assert "expired" in message
    assert "the server certificate" in message
    assert str(tls.directory) in message


def test_material_made_long_ago_is_expired_now(
    tmp_path: Path, demo: FederatedRun, keys: pki.Keys
) -> None:
    old = pki.issue(
        "demo", "clinic", keys, now=NOW - timedelta(days=2), valid_for=timedelta(days=1)
    )
    message = refused(mount(demo, old, tmp_path / "d"))
    assert "expired at" in message
    assert "create a new run" in message


def test_a_certificate_not_yet_valid_is_refused(
    tmp_path: Path, demo: FederatedRun, keys: pki.Keys
) -> None:
    future = pki.issue("demo", "clinic", keys, now=NOW + timedelta(hours=1))
    message = refused(mount(demo, future, tmp_path / "d"))
    assert "is not valid before" in message
    assert "clock" in message
    assert "expired" not in message


# --------------------------------------------------------------------------- another run


def test_a_certificate_from_another_run_s_ca_is_refused(
    tls: ServerTls, other_run: pki.RunMaterial
) -> None:
    # Certificate and key of the other run (they match each other), this run's CA.
    tls.cert.write_bytes(other_run.server_cert)
    tls.key.write_bytes(other_run.server_key)
    message = refused(tls)
    assert "was not issued by the CA" in message
    assert "different runs" in message


def test_the_ca_of_another_run_is_refused(tls: ServerTls, other_run: pki.RunMaterial) -> None:
    tls.ca.write_bytes(other_run.ca_cert)
    assert "was not issued by the CA" in refused(tls)


def test_a_tls_key_from_another_run_does_not_belong_to_the_certificate(
    tls: ServerTls, other_run: pki.RunMaterial
) -> None:
    tls.key.write_bytes(other_run.server_key)
    message = refused(tls)
    assert "does not belong to the certificate" in message
    assert "<run>-server-tls Secret" in message


def test_key_and_certificate_swapped(tls: ServerTls, material: pki.RunMaterial) -> None:
    tls.cert.write_bytes(material.server_key)
    tls.key.write_bytes(material.server_cert)
    message = refused(tls)
    assert "not a PEM certificate" in message


def test_a_tls_key_that_is_not_a_key(tls: ServerTls) -> None:
    tls.key.write_text("not a key\n", encoding="utf-8")
    assert "the private key cannot be read" in refused(tls)


# --------------------------------------------------------------------------- hospital keys


def _pem_public_key() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a key\n", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(_pem_public_key(), id="pem-public-key"),
    ],
)
def test_a_public_key_that_is_not_openssh_names_the_hospital(
    tls: ServerTls, content: bytes
) -> None:
    tls.public_key("hospital-c").write_bytes(content)
    message = refused(tls)
    assert "hospital-c.pub" in message
    assert "is not an OpenSSH public key" in message
    assert "hospital hospital-c" in message
    assert "hospital-a" not in message and "hospital-b" not in message


def test_a_hospital_s_private_key_in_place_of_its_public_key(
    tls: ServerTls, material: pki.RunMaterial
) -> None:
    tls.public_key("hospital-a").write_bytes(material.nodes["hospital-a"].private_key)
    message = refused(tls)
    assert "hospital-a.pub" in message and "hospital hospital-a" in message


def test_an_ed25519_public_key_is_refused_as_flower_registers_only_ec_keys(
    tls: ServerTls,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    line = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    tls.public_key("hospital-b").write_bytes(line)
    message = refused(tls)
    assert "hospital-b.pub" in message and "not an ECDSA (NIST curve) key" in message


def test_a_public_key_line_without_a_trailing_newline_or_comment_is_accepted(
    tls: ServerTls, material: pki.RunMaterial
) -> None:
    line = material.nodes["hospital-a"].public_key
    tls.public_key("hospital-a").write_bytes(b" ".join(line.split()[:2]))
    check_material(tls, HOSPITALS, NOW)


# --------------------------------------------------------------------------- flwr connection


def _connection(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def test_connection_with_root_certificates_speaks_tls(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    ca = tmp_path / "tls" / "ca.crt"
    ca.write_bytes(b"")
    home = tmp_path / "flwr-home"
    path = flwr_env.write_connection(home, "127.0.0.1:40123", root_certificates=ca)
    assert path == home / "config.toml"
    text = path.read_text(encoding="utf-8")
    assert f'root-certificates = "{ca.resolve()}"' in text
    assert "insecure" not in text
    doc = _connection(path)
    assert doc == {
        "superlink": {
            "default": "local",
            "local": {"address": "127.0.0.1:40123", "root-certificates": str(ca.resolve())},
        }
    }
    assert Path(doc["superlink"]["local"]["root-certificates"]).is_absolute()


def test_connection_with_a_relative_ca_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.crt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    path = flwr_env.write_connection(
        tmp_path / "home", "127.0.0.1:1", root_certificates=Path("tls/ca.crt")
    )
    local = _connection(path)["superlink"]["local"]
    assert local["root-certificates"] == str(tmp_path.resolve() / "tls" / "ca.crt")


def test_connection_without_root_certificates_is_insecure(tmp_path: Path) -> None:
    path = flwr_env.write_connection(tmp_path / "home", "127.0.0.1:9092")
    text = path.read_text(encoding="utf-8")
    assert "insecure = true" in text
    assert "root-certificates" not in text
    assert _connection(path) == {
        "superlink": {"default": "local", "local": {"address": "127.0.0.1:9092", "insecure": True}}
    }


def test_connection_is_rewritten_not_appended(tmp_path: Path) -> None:
    home = tmp_path / "home"
    flwr_env.write_connection(home, "127.0.0.1:1")
    path = flwr_env.write_connection(home, "127.0.0.1:2", root_certificates=tmp_path / "ca.crt")
    local = _connection(path)["superlink"]["local"]
    assert local["address"] == "127.0.0.1:2"
    assert "insecure" not in local


def test_free_port_is_a_bindable_loopback_port() -> None:
    port = flwr_env.free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))

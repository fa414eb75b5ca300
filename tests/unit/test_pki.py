"""Per-run PKI: formats Flower reads, names, validity, real TLS handshakes and clear errors."""

from __future__ import annotations

import argparse
import ipaddress
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrun_core import pki

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]
NAMES = [
    "demo-server",
    "demo-server.clinic",
    "demo-server.clinic.svc",
    "demo-server.clinic.svc.cluster.local",
    "localhost",
]


@pytest.fixture(scope="module")
def keys() -> pki.Keys:
    return pki.new_keys(HOSPITALS)


@pytest.fixture(scope="module")
def material(keys: pki.Keys) -> pki.RunMaterial:
    return pki.issue("demo", "clinic", keys, now=NOW)


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- certificates


def test_server_certificate_covers_the_service_names_localhost_and_loopback(
    material: pki.RunMaterial,
) -> None:
    san = cert(material.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == NAMES
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert pki.server_dns_names("demo", "clinic") == NAMES


def test_ca_and_server_certificate_roles(material: pki.RunMaterial) -> None:
    ca, server = cert(material.ca_cert), cert(material.server_cert)
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.issuer == ca.subject
    # gRPC and Python's ssl accept ECDSA; Ed25519 certificates they do not.
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)


def test_validity_is_bounded_and_starts_a_little_early(material: pki.RunMaterial) -> None:
    server = cert(material.server_cert)
    assert server.not_valid_before_utc == NOW - pki.CLOCK_SKEW
    assert server.not_valid_after_utc == NOW + pki.DEFAULT_LIFETIME == material.not_after
    assert cert(material.ca_cert).not_valid_after_utc == material.not_after


def test_lifetime_follows_the_run_s_deadline() -> None:
    assert pki.lifetime(None) == timedelta(days=30)
    assert pki.lifetime(3600) == timedelta(hours=1) + pki.PENDING_ALLOWANCE


def test_issue_is_pure_given_the_keys_and_the_clock(
    keys: pki.Keys, material: pki.RunMaterial
) -> None:
    again = pki.issue("demo", "clinic", keys, now=NOW)
    assert again.ca_cert == material.ca_cert
    assert again.server_cert == material.server_cert
    assert again.server_key == material.server_key
    assert {h: n.public_key for h, n in again.nodes.items()} == {
        h: n.public_key for h, n in material.nodes.items()
    }


def test_every_run_gets_its_own_keys() -> None:
    one = pki.generate("demo", "clinic", HOSPITALS, now=NOW)
    two = pki.generate("demo", "clinic", HOSPITALS, now=NOW)
    assert one.ca_cert != two.ca_cert
    assert one.server_key != two.server_key
    for h in HOSPITALS:
        assert one.nodes[h].public_key != two.nodes[h].public_key


def test_the_ca_private_key_is_not_in_the_material(
    keys: pki.Keys, material: pki.RunMaterial
) -> None:
    ca_public = public_der(keys.ca.public_key())
    assert public_der(cert(material.ca_cert).public_key()) == ca_public  # type: ignore[arg-type]
    private = [material.server_key] + [n.private_key for n in material.nodes.values()]
    for blob in private:
        key = (
            serialization.load_ssh_private_key(blob, None)
            if b"OPENSSH" in blob
            else serialization.load_pem_private_key(blob, None)
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert public_der(key.public_key()) != ca_public
    assert not hasattr(material, "ca_key")


def test_naive_clock_is_refused(keys: pki.Keys) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.issue("demo", "clinic", keys, now=datetime(2026, 1, 1))


# --------------------------------------------------------------------------- node keys


def test_node_keys_are_in_the_formats_flower_reads(
    material: pki.RunMaterial, tmp_path: Path
) -> None:
    """Flower's own parsers: `flwr supernode register` and `flower-supernode`."""
    register = pytest.importorskip("flwr.cli.supernode.register")
    supernode = pytest.importorskip("flwr.supernode.cli.flower_supernode")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for hospital, node in material.nodes.items():
        pub = tmp_path / f"{hospital}.pub"
        key = tmp_path / f"{hospital}.key"
        pub.write_bytes(node.public_key)
        key.write_bytes(node.private_key)
        assert node.public_key.startswith(b"ecdsa-sha2-nistp384 ")
        registered = register.try_load_public_key(pub)
        args = argparse.Namespace(
            auth_supernode_private_key=str(key), auth_supernode_public_key=None
        )
        loaded = supernode._try_setup_client_authentication(args)
        assert loaded is not None
        # The key the SuperNode signs with is the one the SuperLink registered.
        assert public_key_to_bytes(loaded[1]) == registered


def test_hospitals_have_distinct_node_keys(material: pki.RunMaterial) -> None:
    assert sorted(material.nodes) == sorted(HOSPITALS)
    publics = {n.public_key.split()[1] for n in material.nodes.values()}
    assert len(publics) == len(HOSPITALS)
    for hospital, node in material.nodes.items():
        assert node.public_key.rstrip().endswith(f"clinic-demo-{hospital}".encode())


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("name", [*NAMES, "127.0.0.1", "DEMO-SERVER.clinic.svc"])
def test_chain_verifies_for_every_name(material: pki.RunMaterial, name: str) -> None:
    pki.verify_chain(material.server_cert, material.ca_cert, now=NOW, name=name)


def test_chain_verifies_without_a_name(material: pki.RunMaterial) -> None:
    pki.verify_chain(material.server_cert, material.ca_cert, now=NOW + timedelta(days=29))


def test_expired_certificate_says_so(material: pki.RunMaterial) -> None:
    later = NOW + pki.DEFAULT_LIFETIME + timedelta(seconds=1)
    with pytest.raises(pki.CertificateError) as err:
        pki.verify_chain(material.server_cert, material.ca_cert, now=later, name="demo-server")
    text = str(err.value)
    assert "server certificate" in text
    assert "expired at 2026-12-24T12:00:00Z" in text
    assert "create a new run" in text


def test_not_yet_valid_certificate_says_so(material: pki.RunMaterial) -> None:
    earlier = NOW - pki.CLOCK_SKEW - timedelta(seconds=1)
    with pytest.raises(pki.CertificateError, match=r"not valid before 2026-11-24T11:55:00Z"):
        pki.verify_chain(material.server_cert, material.ca_cert, now=earlier)


def test_certificate_from_another_run_s_ca_is_refused(material: pki.RunMaterial) -> None:
    other = pki.generate("demo", "clinic", [], now=NOW)  # same names, another run
    with pytest.raises(pki.CertificateError, match="not issued by the CA") as err:
        pki.verify_chain(material.server_cert, other.ca_cert, now=NOW, name="demo-server")
    assert "different runs" in str(err.value)
    with pytest.raises(pki.CertificateError, match="not issued by the CA"):
        pki.verify_chain(other.server_cert, material.ca_cert, now=NOW)


@pytest.mark.parametrize("name", ["other-server", "demo-server.elsewhere", "10.0.0.1"])
def test_name_mismatch_says_which_names_the_certificate_has(
    material: pki.RunMaterial, name: str
) -> None:
    with pytest.raises(pki.CertificateError, match=f"does not cover '{name}'") as err:
        pki.verify_chain(material.server_cert, material.ca_cert, now=NOW, name=name)
    assert "demo-server.clinic.svc" in str(err.value)


def test_garbage_is_not_a_certificate(material: pki.RunMaterial) -> None:
    with pytest.raises(pki.CertificateError, match="not a PEM certificate"):
        pki.verify_chain(b"hello", material.ca_cert, now=NOW)


def test_key_pair_check(material: pki.RunMaterial) -> None:
    pki.check_pair(material.server_cert, material.server_key)
    other = pki.generate("demo", "clinic", [], now=NOW)
    with pytest.raises(pki.CertificateError, match="does not belong to the certificate"):
        pki.check_pair(material.server_cert, other.server_key)
    with pytest.raises(pki.CertificateError, match="does not belong"):
        pki.check_pair(material.server_cert, material.nodes["hospital-a"].private_key)
    with pytest.raises(pki.CertificateError, match="cannot be read"):
        pki.check_pair(material.server_cert, b"-----BEGIN PRIVATE KEY-----\nAAAA\n")


# --------------------------------------------------------------------------- real TLS


def handshake(material: pki.RunMaterial, ca_cert: bytes, name: str, tmp_path: Path) -> str:
    """A TLS 1.3 handshake through memory: the server with the run's files, the client
    trusting only `ca_cert` and checking `name`, strictly (RFC 5280, as Python >= 3.13 does
    by default). Returns the negotiated version."""
    (tmp_path / "tls.crt").write_bytes(material.server_cert)
    (tmp_path / "tls.key").write_bytes(material.server_key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca_cert.decode())
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, conn in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    conn.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(to_server.read())
        to_client.write(s_out.read())
        if all(done.values()):
            return str(client.version())
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def live() -> pki.RunMaterial:
    # ssl checks validity against the real clock.
    return pki.generate("demo", "clinic", HOSPITALS, now=datetime.now(UTC))


@pytest.mark.parametrize("name", ["demo-server.clinic.svc", "demo-server", "127.0.0.1"])
def test_tls_handshake_with_the_run_s_ca(live: pki.RunMaterial, name: str, tmp_path: Path) -> None:
    assert handshake(live, live.ca_cert, name, tmp_path) == "TLSv1.3"


def test_tls_handshake_fails_with_another_run_s_ca(live: pki.RunMaterial, tmp_path: Path) -> None:
    other = pki.generate("demo", "clinic", [], now=datetime.now(UTC))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(live, other.ca_cert, "demo-server", tmp_path)


def test_tls_handshake_fails_for_another_name(live: pki.RunMaterial, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(live, live.ca_cert, "other-server", tmp_path)

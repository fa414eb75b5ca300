"""The certificates a test control plane needs, made with `cryptography` (no openssl CLI).

One CA signs: the API server's serving certificate (127.0.0.1 and localhost), client
certificates (an admin in `system:masters`, a node in `system:nodes`), and an RSA key pair
signs service-account tokens. Everything is written under one directory, keys owner-only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ClientCert", "Pki", "make_pki"]

_VALID = datetime.timedelta(days=7)


@dataclass(frozen=True)
class ClientCert:
    """A client certificate and its key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Where the control plane's certificates and keys are."""

    directory: Path
    ca: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path
    admin: ClientCert

    def client(self, name: str, user: str, groups: tuple[str, ...] = ()) -> ClientCert:
        """A client certificate for ``user`` in ``groups`` (written once, then reused)."""
        cert_path, key_path = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        if not cert_path.exists():
            ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
            ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            key = ec.generate_private_key(ec.SECP256R1())
            subject = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
            subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
            cert = _sign(
                _builder(x509.Name(subject), ca_cert.subject, key.public_key()).add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                ),
                ca_key,
            )
            _write_key(key_path, key)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ClientCert(cert_path, key_path)


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
    )


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def make_pki(directory: Path) -> Pki:
    """Create (or reuse, when complete) the control plane's certificates in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = Pki(
        directory=directory,
        ca=directory / "ca.crt",
        ca_key=directory / "ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
        admin=ClientCert(directory / "admin.crt", directory / "admin.key"),
    )
    if all(
        p.exists() for p in (pki.ca, pki.serving_cert, pki.sa_key, pki.admin.cert, pki.admin.key)
    ):
        return pki
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrun-test-ca")])
    ca_cert = _sign(
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ),
        ca_key,
    )
    _write_key(pki.ca_key, ca_key)
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = _sign(
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            ca_name,
            serving_key.public_key(),
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False),
        ca_key,
    )
    _write_key(pki.serving_key, serving_key)
    pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pki.client("admin", "fedrun-test-admin", ("system:masters",))
    return pki

"""Per-run PKI: the run's CA, the server's TLS certificate and one Flower node key per hospital.

Every FederatedRun gets its own material, made once by the operator when the run is created
and stored in the run's Secrets (`security.secret_manifests`):

- a CA (ECDSA P-256) whose private key signs the server certificate and is then dropped: it
  is never returned, stored or mounted, so nothing can issue another certificate for the run.
  Rotation is a new run.
- a server certificate (ECDSA P-256: gRPC and Python's ssl both accept it) for the server
  Service's DNS names (`<run>-server`, `.<ns>`, `.<ns>.svc`, `.<ns>.svc.cluster.local`),
  `localhost` and 127.0.0.1 (the server's own tools reach the SuperLink on loopback).
- one SuperNode authentication key pair per hospital, in the formats Flower 1.41 reads:
  `flower-supernode --auth-supernode-private-key` loads an OpenSSH private key
  (`load_ssh_private_key`, EC only) and `flwr supernode register KEY.pub` loads an OpenSSH
  public key line (`ecdsa-sha2-nistp384 AAAA...`, NIST curves only). P-384, as Flower's own
  `generate_key_pairs`.

Key generation (`new_keys`) is the only randomness. `issue` is pure: given the keys and the
clock it always returns the same certificates (deterministic ECDSA, RFC 6979, and serial
numbers derived from the public keys); only the OpenSSH encoding of a node's private key
carries a random check number, as OpenSSH's own format prescribes. `check_pair` and
`verify_chain` give the messages the server and the hospitals print when their files do not
fit together.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrun_core import names as c
from fedrun_core.times import rfc3339

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_LIFETIME",
    "PENDING_ALLOWANCE",
    "SERVER_IPS",
    "CertificateError",
    "Keys",
    "NodeKey",
    "RunMaterial",
    "check_pair",
    "generate",
    "issue",
    "lifetime",
    "new_keys",
    "server_dns_names",
    "verify_chain",
]

# How long material lives when the run has no activeDeadlineSeconds. Certificates are not
# renewed: a run that outlives them fails with "expired" and is re-created (rotation).
DEFAULT_LIFETIME = timedelta(days=30)
# With activeDeadlineSeconds the deadline counts from the run's start, but the material is
# made at creation: this much time to wait for images, nodes and hospitals is added.
PENDING_ALLOWANCE = timedelta(days=1)
# Certificates start this much before `now`, so a node whose clock is slightly behind the
# operator's does not refuse a brand-new certificate as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)
# Addresses besides the Service's names: the server's own Flower tools (flwr, the ServerApp
# executor) reach the SuperLink on loopback, and verify the certificate there too.
SERVER_IPS: tuple[str, ...] = ("127.0.0.1",)
_LOCALHOST = "localhost"

_CA_CURVE = ec.SECP256R1()
_NODE_CURVE = ec.SECP384R1()


class CertificateError(ValueError):
    """A certificate or key that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- material


@dataclass(frozen=True)
class NodeKey:
    """A hospital's Flower SuperNode authentication key pair.

    `private_key` is an OpenSSH private key (what `--auth-supernode-private-key` reads);
    `public_key` the matching OpenSSH public key line (what `flwr supernode register` reads).
    """

    private_key: bytes
    public_key: bytes


@dataclass(frozen=True)
class RunMaterial:
    """Everything a run's pods need for TLS and node authentication; no CA private key.

    Certificates and the server key are PEM (`server_key` is PKCS#8); `nodes` maps each
    hospital name to its key pair. `not_after` is when the certificates expire.
    """

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    nodes: Mapping[str, NodeKey]
    not_after: datetime


@dataclass(frozen=True)
class Keys:
    """Freshly generated private keys for one run (the only random input of `issue`)."""

    ca: ec.EllipticCurvePrivateKey
    server: ec.EllipticCurvePrivateKey
    nodes: Mapping[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)


def new_keys(hospitals: Iterable[str]) -> Keys:
    """New CA, server and per-hospital node keys (ECDSA P-256, P-256 and P-384)."""
    return Keys(
        ca=ec.generate_private_key(_CA_CURVE),
        server=ec.generate_private_key(_CA_CURVE),
        nodes={h: ec.generate_private_key(_NODE_CURVE) for h in hospitals},
    )


def server_dns_names(run: str, namespace: str) -> list[str]:
    """DNS names the server certificate covers: the server Service's names and localhost."""
    service = f"{run}{c.SERVER_SUFFIX}"
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        _LOCALHOST,
    ]


def lifetime(active_deadline_seconds: int | None) -> timedelta:
    """How long a run's certificates are valid.

    `activeDeadlineSeconds` plus `PENDING_ALLOWANCE` when the run has a deadline (it cannot
    need them longer), otherwise `DEFAULT_LIFETIME`.
    """
    if active_deadline_seconds is None:
        return DEFAULT_LIFETIME
    return timedelta(seconds=active_deadline_seconds) + PENDING_ALLOWANCE


def _serial(key: ec.EllipticCurvePublicKey) -> int:
    # Unique per key and deterministic; RFC 5280 allows at most 20 octets, positive.
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return int.from_bytes(hashlib.sha256(der).digest()[:19], "big") | 1


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrun"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC).replace(microsecond=0)


def issue(
    run: str,
    namespace: str,
    keys: Keys,
    *,
    now: datetime,
    valid_for: timedelta = DEFAULT_LIFETIME,
) -> RunMaterial:
    """Issue a run's CA and server certificate and serialise every key (pure).

    The CA key in `keys` signs and is not part of the result. Certificates are valid from
    `now - CLOCK_SKEW` to `now + valid_for`; `now` must be timezone-aware.
    """
    start = _utc(now)
    not_before = start - CLOCK_SKEW
    not_after = start + valid_for
    ca_public = keys.ca.public_key()
    ca_name = _name(f"fedrun CA {namespace}/{run}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_public)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_public)
        .serial_number(_serial(ca_public))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        )
        .add_extension(ca_ski, critical=False)
        .sign(keys.ca, hashes.SHA256(), ecdsa_deterministic=True)
    )
    server_public = keys.server.public_key()
    dns = server_dns_names(run, namespace)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns[0]))
        .issuer_name(ca_name)
        .public_key(server_public)
        .serial_number(_serial(server_public))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(keys.ca, hashes.SHA256(), ecdsa_deterministic=True)
    )
    nodes = {
        hospital: NodeKey(
            private_key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            public_key=key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" fedrun-{namespace}-{run}-{hospital}\n".encode(),
        )
        for hospital, key in keys.nodes.items()
    }
    return RunMaterial(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert=server_cert.public_bytes(serialization.Encoding.PEM),
        server_key=keys.server.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        nodes=nodes,
        not_after=not_after,
    )


def generate(
    run: str,
    namespace: str,
    hospitals: Sequence[str],
    *,
    now: datetime,
    valid_for: timedelta = DEFAULT_LIFETIME,
) -> RunMaterial:
    """New keys and certificates for a run (`new_keys` then `issue`); the CA key is dropped."""
    return issue(run, namespace, new_keys(hospitals), now=now, valid_for=valid_for)


# --------------------------------------------------------------------------- checks


def _load_cert(cert: bytes | x509.Certificate, what: str) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        return x509.load_pem_x509_certificate(cert)
    except ValueError as err:
        raise CertificateError(f"{what} is not a PEM certificate: {err}") from None


def _load_private_key(key: bytes) -> ec.EllipticCurvePrivateKey:
    loaded: object
    try:
        if b"OPENSSH PRIVATE KEY" in key:
            loaded = serialization.load_ssh_private_key(key, password=None)
        else:
            loaded = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertificateError(f"the private key cannot be read: {err}") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"the private key is a {type(loaded).__name__}, fedrun expects an EC key"
        )
    return loaded


def _public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _when(moment: datetime) -> str:
    return rfc3339(moment.astimezone(UTC))


def check_pair(cert: bytes | x509.Certificate, key: bytes) -> None:
    """Raise CertificateError unless `key` (PEM or OpenSSH) is the private key of `cert`."""
    certificate = _load_cert(cert, "the certificate")
    private = _load_private_key(key)
    cert_public = certificate.public_key()
    if not isinstance(cert_public, ec.EllipticCurvePublicKey) or _public_der(
        cert_public
    ) != _public_der(private.public_key()):
        fingerprint = hashlib.sha256(_public_der(private.public_key())).hexdigest()[:16]
        raise CertificateError(
            f"the private key (public key sha256 {fingerprint}...) does not belong to the "
            f"certificate {_subject(certificate)}: the key and certificate files come from "
            "different runs or were mixed up; mount both from the run's <run>-server-tls Secret"
        )


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def _check_time(cert: x509.Certificate, what: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{what} {_subject(cert)} is not valid before {_when(cert.not_valid_before_utc)} "
            f"(now {_when(now)}): this machine's clock is behind the one that issued it"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} {_subject(cert)} expired at {_when(cert.not_valid_after_utc)} "
            f"(now {_when(now)}): a run's certificates live as long as the run; create a new "
            "run to get new ones"
        )


def verify_chain(
    cert: bytes | x509.Certificate,
    ca: bytes | x509.Certificate,
    *,
    now: datetime,
    name: str | None = None,
) -> None:
    """Raise CertificateError unless `cert` is a server certificate `ca` issued, valid at `now`.

    With `name` (a DNS name or an IP address) the certificate must also cover it. Each
    failure names its cause: expired, not yet valid, issued by another CA (another run's),
    or made for other names. A certificate that passes those is finally checked by
    cryptography's RFC 5280 verifier, as a TLS client would.
    """
    at = _utc(now)
    certificate = _load_cert(cert, "the server certificate")
    authority = _load_cert(ca, "the CA certificate")
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, InvalidSignature, TypeError):
        raise CertificateError(
            f"the server certificate {_subject(certificate)} was not issued by the CA "
            f"{_subject(authority)} (issuer: {certificate.issuer.rfc4514_string()}): the "
            "certificate and the CA belong to different runs"
        ) from None
    _check_time(certificate, "the server certificate", at)
    _check_time(authority, "the CA certificate", at)
    if name is None:
        return
    dns, ips = _names(certificate)
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if (ip is not None and str(ip) not in ips) or (ip is None and name.lower() not in dns):
        raise CertificateError(
            f"the server certificate {_subject(certificate)} does not cover {name!r}; it is "
            f"valid for {', '.join([*dns, *ips]) or 'no names'}: connect with the server "
            "Service's name (<run>-server) or check that the certificate belongs to this run"
        )
    subject: verification.Subject = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([authority]))
        .time(at)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(certificate, [])
    except verification.VerificationError as err:
        raise CertificateError(
            f"the server certificate {_subject(certificate)} fails TLS verification: {err}"
        ) from None

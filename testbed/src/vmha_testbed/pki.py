"""A small certificate authority for the local control plane and the webhook servers under test.

Keys are ECDSA P-256: quick to generate, and accepted by kube-apiserver, etcd, kubectl, Go's
TLS stack and Python's `ssl`. Kubernetes takes a client certificate's CN as the user name and
its O entries as the groups, which is how `issue_client_certificate` makes identities.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY = datetime.timedelta(days=365)
# Certificates start a little in the past so that a clock a few seconds behind still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(data)


@dataclass(frozen=True)
class IssuedCertificate:
    """A PEM certificate and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Writes `<name>.crt` and `<name>.key` (mode 0600); returns their paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        _write_private(key_path, self.key_pem)
        return cert_path, key_path


@dataclass(frozen=True)
class SigningKey:
    """The service-account token signing key pair (kube-apiserver signs, verifies with public)."""

    private_pem: bytes
    public_pem: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        key = _new_key()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(private_pem=_key_pem(key), public_pem=public)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Writes `<name>.key` (mode 0600) and `<name>.pub`; returns their paths."""
        private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
        _write_private(private_path, self.private_pem)
        public_path.write_bytes(self.public_pem)
        return private_path, public_path


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(
        cls, common_name: str, validity: datetime.timedelta = DEFAULT_VALIDITY
    ) -> CertificateAuthority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public = key.public_key()
        cert = (
            _builder(name, name, public, validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: Path, name: str = "ca") -> tuple[Path, Path]:
        return IssuedCertificate(self.cert_pem, self.key_pem).write(directory, name)

    def issue_server_certificate(
        self, hosts: Sequence[str], validity: datetime.timedelta = DEFAULT_VALIDITY
    ) -> IssuedCertificate:
        """A TLS serving certificate for `hosts` (DNS names and/or IP addresses)."""
        if not hosts:
            raise ValueError("a serving certificate needs at least one host")
        return self._issue(
            common_name=hosts[0],
            organizations=(),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            alt_names=[_general_name(host) for host in hosts],
            validity=validity,
        )

    def issue_client_certificate(
        self,
        user: str,
        groups: Sequence[str] = (),
        validity: datetime.timedelta = DEFAULT_VALIDITY,
    ) -> IssuedCertificate:
        """A TLS client certificate that Kubernetes reads as `user` in `groups`."""
        return self._issue(
            common_name=user,
            organizations=groups,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            alt_names=[],
            validity=validity,
        )

    def _issue(
        self,
        common_name: str,
        organizations: Sequence[str],
        usage: x509.ObjectIdentifier,
        alt_names: list[x509.GeneralName],
        validity: datetime.timedelta,
    ) -> IssuedCertificate:
        key = _new_key()
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            _builder(x509.Name(attributes), self.cert.subject, key.public_key(), validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    validity: datetime.timedelta,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)

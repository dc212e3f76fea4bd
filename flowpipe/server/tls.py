"""TLS for the built-in Observer server: server SSL contexts (TLS, mutual TLS) and throwaway test PKIs."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowpipe.errors import ObserverServerError

DEFAULT_SERVER_NAME = "relay.flowpipe.test"


@dataclass(frozen=True)
class ServerTLSConfig:
    """Server certificate and key (PEM files); with `client_ca`, clients must present a certificate it signed."""

    cert_path: Path
    key_path: Path
    client_ca_path: Path | None = None

    @property
    def mutual(self) -> bool:
        """True when client certificates are required (mutual TLS)."""
        return self.client_ca_path is not None

    def ssl_context(self) -> ssl.SSLContext:
        """An SSLContext for the server side: TLS 1.2+, ALPN h2, client certificates verified when mutual."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        try:
            context.load_cert_chain(str(self.cert_path), str(self.key_path))
        except (OSError, ssl.SSLError) as exc:
            raise ObserverServerError(
                f"cannot load the server certificate {self.cert_path} with key {self.key_path}: {exc}"
            ) from exc
        if self.client_ca_path is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            try:
                context.load_verify_locations(cafile=str(self.client_ca_path))
            except (OSError, ssl.SSLError) as exc:
                raise ObserverServerError(f"cannot load the client CA {self.client_ca_path}: {exc}") from exc
        return context


@dataclass(frozen=True)
class TestPKI:
    """Paths of a generated PKI: a CA, a server and a client certificate, and an unrelated second CA."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path
    server_name: str
    expired_server_cert: Path
    """A server certificate of the CA, for the same names, that expired a day ago (key: `server_key`)."""
    future_server_cert: Path
    """A server certificate of the CA, for the same names, valid only from tomorrow (key: `server_key`)."""

    def server_tls(self, mutual: bool = True, *, cert: Path | None = None) -> ServerTLSConfig:
        """The server side of this PKI; `mutual` requires client certificates signed by the CA. `cert` is
        another server certificate for the same key (`expired_server_cert`, `future_server_cert`)."""
        return ServerTLSConfig(cert or self.server_cert, self.server_key, self.ca_cert if mutual else None)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowpipe test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(
    builder: x509.CertificateBuilder, days: int, *, starts_in_days: float = 0
) -> x509.CertificateBuilder:
    """Valid from an hour ago (or `starts_in_days` from now, negative for the past) for `days` days."""
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=starts_in_days)
    return builder.not_valid_before(start - datetime.timedelta(hours=1)).not_valid_after(
        start + datetime.timedelta(days=days)
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = _validity(x509.CertificateBuilder(), days)
    builder = (
        builder.subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256()), key


def _make_leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int,
    starts_in_days: float = 0,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = key or _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _validity(x509.CertificateBuilder(), days, starts_in_days=starts_in_days)
    builder = (
        builder.subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def generate_test_pki(
    directory: Path | str,
    *,
    server_name: str = DEFAULT_SERVER_NAME,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    client_name: str = "flowpipe-client",
    valid_days: int = 30,
) -> TestPKI:
    """Write a throwaway PKI into `directory` (created if needed) and return its paths.

    The server certificate names `server_name`, `dns_names` and `ip_addresses`; the client certificate is
    signed by the same CA; `other-ca.crt` and `other-client.*` come from an unrelated CA (negative tests).
    For tests and demos only: keys are unencrypted.
    """
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ObserverServerError(f"cannot create the TLS directory {root}: {exc}") from exc
    ca = _make_ca("flowpipe test CA", valid_days)
    names = {"dns_names": [server_name, *dns_names], "ip_addresses": ip_addresses}
    server = _make_leaf(server_name, ca, server=True, days=valid_days, **names)
    expired = _make_leaf(
        server_name, ca, server=True, days=1, starts_in_days=-2, key=server[1], **names
    )  # from 2 days ago to yesterday
    future = _make_leaf(
        server_name, ca, server=True, days=valid_days, starts_in_days=1, key=server[1], **names
    )
    client = _make_leaf(client_name, ca, server=False, days=valid_days)
    other_ca = _make_ca("unrelated test CA", valid_days)
    other_client = _make_leaf(client_name, other_ca, server=False, days=valid_days)
    pki = TestPKI(
        directory=root,
        ca_cert=root / "ca.crt",
        ca_key=root / "ca.key",
        server_cert=root / "server.crt",
        server_key=root / "server.key",
        client_cert=root / "client.crt",
        client_key=root / "client.key",
        other_ca_cert=root / "other-ca.crt",
        other_client_cert=root / "other-client.crt",
        other_client_key=root / "other-client.key",
        server_name=server_name,
        expired_server_cert=root / "expired-server.crt",
        future_server_cert=root / "future-server.crt",
    )
    try:
        for cert_path, key_path, (cert, key) in (
            (pki.ca_cert, pki.ca_key, ca),
            (pki.server_cert, pki.server_key, server),
            (pki.client_cert, pki.client_key, client),
            (pki.other_ca_cert, None, other_ca),
            (pki.other_client_cert, pki.other_client_key, other_client),
            (pki.expired_server_cert, None, expired),
            (pki.future_server_cert, None, future),
        ):
            _write_cert(cert_path, cert)
            if key_path is not None:
                _write_key(key_path, key)
    except OSError as exc:
        raise ObserverServerError(f"cannot write the test PKI into {root}: {exc}") from exc
    return pki

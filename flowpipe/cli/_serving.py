"""What the commands that serve the Hubble API (`simulate-relay`, `serve-hubble`) share: the listen address,
their TLS options and how they tell a user to connect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from flowpipe.errors import ConfigError
from flowpipe.server import ServerTLSConfig, generate_test_pki
from flowpipe.server.tls import DEFAULT_SERVER_NAME


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:4245`) → (host, port); raises ConfigError when malformed."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid --listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:4245")
    return host, int(port_text)


F = TypeVar("F", bound=Callable[..., Any])


def server_tls_options(func: F) -> F:
    """`--tls-cert/--tls-key [--tls-client-ca]`, `--tls-generate DIR` and `--tls-server-name`: how a gRPC server
    of flowpipe (`simulate-relay`, `serve-hubble`) serves TLS or mutual TLS; `tls_config` reads them."""
    for decorate in reversed([
        click.option("--tls-cert", default=None, metavar="PEM",
                     help="Serve TLS with this certificate (needs --tls-key)."),
        click.option("--tls-key", default=None, metavar="PEM", help="Private key of --tls-cert."),
        click.option("--tls-client-ca", default=None, metavar="PEM",
                     help="Require client certificates signed by this CA."),
        click.option("--tls-generate", default=None, metavar="DIR",
                     help="Generate a throwaway CA, server and client certificates into DIR and serve mutual "
                     "TLS with them."),
        click.option("--tls-server-name", default=DEFAULT_SERVER_NAME, show_default=True,
                     help="DNS name in the generated server certificate (besides 127.0.0.1 and localhost)."),
    ]):  # fmt: skip
        func = decorate(func)
    return func


def tls_config(
    cert: str | None, key: str | None, client_ca: str | None, generate: str | None, server_name: str
) -> tuple[ServerTLSConfig | None, dict[str, Path]]:
    if generate and (cert or key or client_ca):
        raise ConfigError("--tls-generate cannot be combined with --tls-cert/--tls-key/--tls-client-ca")
    if generate:
        pki = generate_test_pki(generate, server_name=server_name)
        files = {"ca": pki.ca_cert, "cert": pki.client_cert, "key": pki.client_key}
        return pki.server_tls(mutual=True), files
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if client_ca and not cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if not cert or not key:
        return None, {}
    return ServerTLSConfig(Path(cert), Path(key), Path(client_ca) if client_ca else None), {}


def client_hints(
    address: str, tls: ServerTLSConfig | None, files: dict[str, Path], server_name: str
) -> list[str]:
    if tls is None:
        return [
            f"hubble observe --server {address} --last 20",
            f"flowpipe collect --relay {address}",
            f"grpcurl -plaintext {address} list   (gRPC reflection is on)",
        ]
    ca = str(files.get("ca", "CA.crt"))
    hubble = (
        f"hubble observe --server {address} --tls --tls-ca-cert-files {ca} --tls-server-name {server_name}"
    )
    collect = f"flowpipe collect --relay {address} --tls-ca {ca} --tls-server-name {server_name}"
    if tls.mutual:
        cert, key = str(files.get("cert", "CLIENT.crt")), str(files.get("key", "CLIENT.key"))
        hubble += f" --tls-client-cert-file {cert} --tls-client-key-file {key}"
        collect += f" --tls-cert {cert} --tls-key {key}"
    return [hubble + " --last 20", collect]

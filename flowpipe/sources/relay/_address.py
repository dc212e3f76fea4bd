"""The relay's address and TLS settings, and the HTTP/2 limits of its stream: what both the collector (grpcio)
and its receiving process (`_h2call`, which loads no grpcio) need to reach it."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from flowpipe.errors import ConfigError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest response message taken (grpcio's limit, and the receiving process's)."""

RECEIVE_WINDOW_BYTES = 1 << 20
"""HTTP/2 receive window of the GetFlows stream: about a thousand flows in flight, so the relay is not held
up waiting for window updates (grpc's 64 KiB default holds some fifty), yet a bound on what grpcio buffers."""


@dataclass(frozen=True, slots=True)
class RelayTLS:
    """TLS settings for the relay connection; `ca_path` None uses the system's trusted CAs."""

    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_path is None) != (self.key_path is None):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS needs both)")

    @property
    def mutual(self) -> bool:
        """Whether a client certificate is presented."""
        return self.cert_path is not None


DEFAULT_RELAY_PORT = 4245
"""The port `hubble observe --server` assumes when none is given (hubble-relay's own port; its Service in a
default Cilium install listens on 80)."""


def with_default_port(address: str) -> str:
    """`address` with `DEFAULT_RELAY_PORT` added when it names only a host (`hubble-relay`, `[::1]`)."""
    text = address.strip()
    if re.fullmatch(r"\[[^\]]+\]|[^:\[\]\s]+", text):
        return f"{text}:{DEFAULT_RELAY_PORT}"
    return address


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); ConfigError naming the address otherwise."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<p1>\d+)|(?P<host>[^:\[\]\s]+):(?P<p2>\d+)", address.strip())
    if match is None:
        raise ConfigError(
            f"relay address {address!r} is not HOST:PORT (e.g. hubble-relay:4245 or 127.0.0.1:4245)"
        )
    host = match["v6"] or match["host"]
    port = int(match["p1"] or match["p2"])
    if not 0 < port < 65536:
        raise ConfigError(f"relay address {address!r}: port {port} is out of range")
    return host, port


def tls_context(tls: RelayTLS | None, *, verify: bool = True) -> ssl.SSLContext:
    """A client TLS context offering HTTP/2 (ALPN): verifying the relay with `tls` (its CA, or the system's,
    and its client certificate), or (`verify=False`) verifying nothing, to look at what a server presents."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    assert tls is not None
    if tls.ca_path:
        context.load_verify_locations(cafile=tls.ca_path)
    else:
        context.load_default_certs()
    if tls.cert_path and tls.key_path:
        context.load_cert_chain(tls.cert_path, tls.key_path)
    return context

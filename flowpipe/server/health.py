"""The standard gRPC health service (`grpc.health.v1.Health/Check`), which `hubble status` calls first.

The two messages are tiny, so they are encoded by hand: HealthCheckRequest is `string service = 1`,
HealthCheckResponse is `ServingStatus status = 1` (SERVING = 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from flowpipe.server._http2 import GrpcAbort, RpcMethod

HEALTH_SERVICE = "grpc.health.v1.Health"
_SERVING = b"\x08\x01"
RELAY_HEALTH_NAME = "hubble.server.Observer"
"""The name `hubble status` asks about (the one hubble-relay registers with its health server)."""


def _service_name(data: bytes) -> str:
    """The `service` field of a HealthCheckRequest ("" when absent); INVALID_ARGUMENT when malformed."""
    if not data:
        return ""
    if data[0] != 0x0A:
        raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode grpc.health.v1.HealthCheckRequest")
    length, shift, i = 0, 0, 1
    while i < len(data):
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            break
        shift += 7
    name = data[i : i + length]
    if len(name) != length:
        raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "cannot decode grpc.health.v1.HealthCheckRequest")
    return name.decode("utf-8", "replace")


class HealthService:
    """SERVING for the whole server ("") and for each served service; NOT_FOUND for any other name."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = frozenset(["", RELAY_HEALTH_NAME, *services])

    def methods(self) -> dict[str, RpcMethod]:
        """The method table for GrpcServer (Watch is not offered: UNIMPLEMENTED, as grpc-go allows)."""
        return {f"/{HEALTH_SERVICE}/Check": RpcMethod(False, self.check)}

    def check(self, data: bytes) -> bytes:
        """Check: SERVING, or NOT_FOUND for a service this server does not have."""
        name = _service_name(data)
        if name not in self.services:
            raise GrpcAbort(grpc.StatusCode.NOT_FOUND, f"unknown service {name!r}")
        return _SERVING

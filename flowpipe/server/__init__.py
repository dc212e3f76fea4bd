"""The built-in Observer server: a hubble-relay compatible gRPC endpoint over in-memory per-node buffers."""

from flowpipe.server.buffer import DEFAULT_BUFFER_SIZE, FlowStore
from flowpipe.server.feed import FlowFeeder
from flowpipe.server.observer import ObserverServer
from flowpipe.server.tls import ServerTLSConfig, TestPKI, generate_test_pki

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "FlowFeeder",
    "FlowStore",
    "ObserverServer",
    "ServerTLSConfig",
    "TestPKI",
    "generate_test_pki",
]

"""serve-hubble as a library call: the stored flows over hubble-relay's Observer API (`HistoryServer`), with
its own /metrics and /healthz, until stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from flowpipe.metrics.families import MetricsServer, serve
from flowpipe.server.history import DEFAULT_FOLLOW_INTERVAL, HistoryServer
from flowpipe.server.tls import ServerTLSConfig

DEFAULT_LISTEN = "127.0.0.1:4245"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9967"


def _registry(server: HistoryServer) -> CollectorRegistry:
    registry = CollectorRegistry()
    service = server.service
    requests = Gauge("flowpipe_serve_hubble_get_flows_requests", "GetFlows calls answered", registry=registry)
    requests.set_function(lambda: service.requests)
    sent = Gauge("flowpipe_serve_hubble_flows_sent", "Stored flows sent to Hubble clients", registry=registry)
    sent.set_function(lambda: service.flows_sent)
    return registry


def serve_hubble(
    dataset: str,
    stop: threading.Event,
    *,
    host: str = "127.0.0.1",
    port: int = 4245,
    tls: ServerTLSConfig | None = None,
    follow_interval: float = DEFAULT_FOLLOW_INTERVAL,
    metrics_address: str | None = DEFAULT_METRICS_ADDRESS,
    on_started: Callable[[HistoryServer, MetricsServer | None], None] = lambda server, metrics: None,
) -> HistoryServer:
    """Serve the flows of `dataset` until `stop` is set (`metrics_address` None: no /metrics); returns the
    stopped server (its `service` counts what was sent)."""
    server = HistoryServer(dataset, host=host, port=port, tls=tls, follow_interval=follow_interval)
    metrics = None
    try:
        server.start()
        if metrics_address is not None:
            metrics = serve(_registry(server), metrics_address)
        on_started(server, metrics)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        if metrics is not None:
            metrics.close()
    return server

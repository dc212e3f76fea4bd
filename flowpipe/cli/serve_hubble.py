"""`flowpipe serve-hubble`: the stored flows over hubble-relay's Observer API, until Ctrl-C."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from flowpipe.app.serve_hubble import DEFAULT_LISTEN, DEFAULT_METRICS_ADDRESS
from flowpipe.app.serve_hubble import serve_hubble as run_serve_hubble
from flowpipe.cli._options import dataset_option
from flowpipe.cli._serving import client_hints, parse_listen, server_tls_options, tls_config
from flowpipe.metrics.families import MetricsServer
from flowpipe.pipeline import handle_stop_signals
from flowpipe.server.history import DEFAULT_FOLLOW_INTERVAL, HistoryServer

_OFF = ("", "off", "none")


@click.command("serve-hubble")
@dataset_option
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Address to serve on (port 0: any free port).",
)
@click.option(
    "--metrics-address",
    default=DEFAULT_METRICS_ADDRESS,
    show_default=True,
    help="HOST:PORT for /metrics and /healthz (`off`: none).",
)
@click.option(
    "--follow-interval",
    type=click.FloatRange(min=0.05),
    default=DEFAULT_FOLLOW_INTERVAL,
    show_default=True,
    help="Seconds between two looks for new part files while a client follows.",
)
@server_tls_options
def serve_hubble(
    dataset: str,
    listen: str,
    metrics_address: str,
    follow_interval: float,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    tls_generate: str | None,
    tls_server_name: str,
) -> None:
    """Serve the stored flows like hubble-relay, so `hubble observe --since 3d` and Hubble UI read history.

    Answers GetFlows (since/until, --last/--first, --follow for flows collected later, filters, field masks,
    lost events), ServerStatus, GetNodes, GetNamespaces and the gRPC health check. Ctrl-C stops it.
    """
    host, port = parse_listen(listen)
    tls, files = tls_config(tls_cert, tls_key, tls_client_ca, tls_generate, tls_server_name)

    def started(server: HistoryServer, metrics: MetricsServer | None) -> None:
        mode = "plaintext" if tls is None else ("mutual TLS" if tls.mutual else "TLS")
        click.echo(
            f"Serving the flows of {server.dataset.uri} over the Hubble API on {server.address} ({mode})."
        )
        if metrics is not None:
            click.echo(f"Metrics on {metrics.url}/metrics, health on {metrics.url}/healthz")
        if files:
            click.echo(f"Test certificates in {Path(tls_generate or '.').resolve()}")
        click.echo("Connect with:")
        for hint in client_hints(server.address, tls, files, tls_server_name):
            click.echo(f"  {hint}")
        click.echo("Press Ctrl-C to stop.", err=True)

    stop = threading.Event()
    with handle_stop_signals(stop, doing="stopping"):
        server = run_serve_hubble(
            dataset,
            stop,
            host=host,
            port=port,
            tls=tls,
            follow_interval=follow_interval,
            metrics_address=None if metrics_address.strip().lower() in _OFF else metrics_address,
            on_started=started,
        )
    click.echo(f"Stopped after sending {server.service.flows_sent} stored flows.", err=True)

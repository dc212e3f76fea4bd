"""`flowpipe simulate-relay`: serve the built-in simulator's flows over gRPC like hubble-relay, until Ctrl-C."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from flowpipe.cli._options import choose_faults, simulation_options
from flowpipe.cli._serving import client_hints, parse_listen, server_tls_options, tls_config
from flowpipe.errors import ConfigError, ObserverServerError
from flowpipe.pipeline import handle_stop_signals
from flowpipe.query.timeparse import parse_seconds
from flowpipe.server import (
    DEFAULT_BUFFER_SIZE,
    FlowFeeder,
    ObserverServer,
)
from flowpipe.sim import Simulator, SimulatorConfig


@click.command("simulate-relay")
@click.option(
    "--listen",
    default="127.0.0.1:4245",
    show_default=True,
    help="Address to serve on (port 0: any free port).",
)
@click.option(
    "--backlog",
    default="2m",
    show_default=True,
    help="Traffic from before now that is in the buffers at start (`0s`: start empty).",
)
@click.option(
    "--buffer-size",
    type=int,
    default=DEFAULT_BUFFER_SIZE,
    show_default=True,
    help="Flows kept per node (Hubble's ring buffer capacity).",
)
@simulation_options(
    rate=200.0,
    rate_help="Average flows per second, in real time.",
    duration="24h",
    duration_help="How long the simulated traffic runs, e.g. 10m, 2h.",
)
@server_tls_options
def simulate_relay(
    listen: str,
    seed: int,
    rate: float,
    duration: str,
    backlog: str,
    buffer_size: int,
    fault: tuple[str, ...],
    faults: str | None,
    no_faults: bool,
    cluster_name: str,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    tls_generate: str | None,
    tls_server_name: str,
) -> None:
    """Serve simulated cluster traffic over gRPC like hubble-relay, so any Hubble client can connect.

    The simulated traffic starts --backlog before now and then flows in real time at --rate flows/s; each
    node keeps --buffer-size flows. Point `hubble observe --server`, grpcurl or `flowpipe collect --relay` at
    the printed address. Ctrl-C stops it.
    """
    host, port = parse_listen(listen)
    if buffer_size <= 0:
        raise ConfigError(f"--buffer-size must be > 0, got {buffer_size}")
    backlog_seconds = parse_seconds(backlog, allow_zero=True)
    duration_seconds = parse_seconds(duration)
    start = datetime.now(UTC) - timedelta(seconds=backlog_seconds)
    config = SimulatorConfig(
        seed=seed,
        start=start,
        duration_seconds=duration_seconds,
        rate_flows_per_second=rate,
        faults=choose_faults(fault, faults, no_faults),
        cluster_name=cluster_name,
    )
    simulator = Simulator(config)
    tls, files = tls_config(tls_cert, tls_key, tls_client_ca, tls_generate, tls_server_name)
    server = ObserverServer(
        host=host, port=port, buffer_size=buffer_size, tls=tls, nodes=simulator.node_names
    )
    stop = threading.Event()

    with handle_stop_signals(stop, doing="stopping"):
        try:
            server.start()
            feeder = FlowFeeder(server, simulator.flows(), realtime=True).start()
            feeder.caught_up.wait()  # the backlog is in the buffers before anyone is told to connect
            mode = "plaintext" if tls is None else ("mutual TLS" if tls.mutual else "TLS")
            click.echo(
                f"Simulated hubble-relay listening on {server.address} ({mode}): cluster {cluster_name!r}, "
                f"{len(simulator.node_names)} nodes, {rate:g} flows/s, {buffer_size} flows buffered per node."
            )
            if files:
                click.echo(f"Test certificates in {Path(tls_generate or '.').resolve()}")
            click.echo("Connect with:")
            for hint in client_hints(server.address, tls, files, tls_server_name):
                click.echo(f"  {hint}")
            click.echo("Press Ctrl-C to stop.", err=True)
            finished_reported = False
            while not stop.wait(0.5):
                if feeder.finished.is_set() and not finished_reported:
                    finished_reported = True
                    if feeder.error is not None:
                        raise ObserverServerError(f"the simulator feeding the relay stopped: {feeder.error}")
                    click.echo("The simulated traffic has ended; still serving the buffers.", err=True)
            feeder.stop()
        finally:
            server.stop()
    seen = sum(n.seen_flows for n in server.store.node_stats())
    click.echo(f"Stopped after serving {seen} simulated flows.", err=True)

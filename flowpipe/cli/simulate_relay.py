"""`flowpipe simulate-relay`: serve the built-in simulator's flows over gRPC like hubble-relay, until Ctrl-C."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from flowpipe.cli._options import choose_faults, simulation_options
from flowpipe.errors import ConfigError, ObserverServerError
from flowpipe.pipeline import handle_stop_signals
from flowpipe.query.timeparse import parse_seconds
from flowpipe.server import (
    DEFAULT_BUFFER_SIZE,
    FlowFeeder,
    ObserverServer,
    ServerTLSConfig,
    generate_test_pki,
)
from flowpipe.server.tls import DEFAULT_SERVER_NAME
from flowpipe.sim import Simulator, SimulatorConfig


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

"""`flowpipe collect --relay HOST:PORT`: follow hubble-relay into the dataset, with /metrics, until SIGTERM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from flowpipe.app.collect import COLLECT_MAX_BATCH_BYTES, CollectConfig, source_writer_id
from flowpipe.app.progress import collect_with_progress
from flowpipe.cli._options import cluster_name_option, dataset_option
from flowpipe.config import ParquetSinkConfig, PipelineConfig, field_defaults, field_help
from flowpipe.metrics.families import DEFAULT_METRICS_ADDRESS
from flowpipe.sources.relay import RelaySourceConfig, parse_node_shard
from flowpipe.sources.relay._address import DEFAULT_RELAY_PORT, with_default_port
from flowpipe.sources.relay._config import RECEIVERS

_SINK = field_help(ParquetSinkConfig)
_RELAY = field_help(RelaySourceConfig)
_SINK_DEFAULT = field_defaults(ParquetSinkConfig)
_RELAY_DEFAULT = field_defaults(RelaySourceConfig)
_COLLECT_DEFAULT = field_defaults(CollectConfig)
_OFF = ("", "off", "none")


F = TypeVar("F", bound=Callable[..., Any])


def _option(*names: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option (flowpipe's spelling first, then hubble's) that also reads `FLOWPIPE_<env>`."""
    decorate: Callable[[F], F] = click.option(*names, envvar=f"FLOWPIPE_{env}", show_envvar=True, **kwargs)
    return decorate


@click.command("collect")
@_option("--relay", "--server", "relay", env="RELAY_ADDRESS", required=True, metavar="HOST[:PORT]",
         help=_RELAY["address"] + f" Port {DEFAULT_RELAY_PORT} when none is given, as for hubble observe.")  # fmt: skip
@_option("--tls-ca", "--tls-ca-cert-files", "tls_ca", env="TLS_CA", metavar="FILE", help=_RELAY["tls_ca"])
@_option(
    "--tls-cert",
    "--tls-client-cert-file",
    "tls_cert",
    env="TLS_CERT",
    metavar="FILE",
    help=_RELAY["tls_cert"],
)
@_option(
    "--tls-key", "--tls-client-key-file", "tls_key", env="TLS_KEY", metavar="FILE", help=_RELAY["tls_key"]
)
@_option("--tls-server-name", env="TLS_SERVER_NAME", metavar="NAME", help=_RELAY["tls_server_name"])
@_option("-n", "--namespace", "namespace", env="NAMESPACE", multiple=True, metavar="NS",
         help=_RELAY["namespaces"] + " Repeatable; the variable takes a space-separated list.")  # fmt: skip
@_option("--verdict", env="VERDICT", multiple=True, metavar="VERDICT",
         help=_RELAY["verdicts"] + " Repeatable: FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED.")  # fmt: skip
@_option(
    "--node",
    "--node-name",
    "node",
    env="NODE",
    multiple=True,
    metavar="PATTERN",
    help=_RELAY["nodes"] + " Repeatable.",
)
@dataset_option
@_option("--flush-interval-seconds", env="FLUSH_INTERVAL_SECONDS", type=click.FloatRange(min=0.01),
         default=_SINK_DEFAULT["flush_interval_seconds"],
         show_default=True, help=_SINK["flush_interval_seconds"])  # fmt: skip
@_option("--max-batch-rows", env="MAX_BATCH_ROWS", type=click.IntRange(min=1),
         default=_SINK_DEFAULT["max_batch_rows"], show_default=True,
         help=_SINK["max_batch_rows"])  # fmt: skip
@_option("--max-batch-bytes", env="MAX_BATCH_BYTES", type=click.IntRange(min=1), default=COLLECT_MAX_BATCH_BYTES,
         show_default=True, help=_SINK["max_batch_bytes"])  # fmt: skip
@_option("--edge-rollups/--no-edge-rollups", env="EDGE_ROLLUPS", default=False, show_default=True,
         help=_SINK["edge_rollups"])  # fmt: skip
@_option("--metrics-address", env="METRICS_ADDRESS", default=DEFAULT_METRICS_ADDRESS, show_default=True,
         help="HOST:PORT for /metrics, /healthz and /readyz (port 0: any free port; 0.0.0.0: all interfaces; "
         "`off`: no endpoint).")  # fmt: skip
@_option("--node-shard", env="NODE_SHARD", metavar="I/N",
         help="Run as shard I of N collectors (0 <= I < N) writing one dataset: each takes the nodes whose name "
         "hashes to its shard.")  # fmt: skip
@_option("--writer-id", env="WRITER_ID",
         help="Id of this writer in part-file names; unique among writers running on one dataset (default: named "
         "after the checkpoint, e.g. relay-shard-0-of-2, the same across restarts).")  # fmt: skip
@cluster_name_option(_RELAY["cluster_name"], envvar="FLOWPIPE_CLUSTER_NAME", show_envvar=True)
@_option(
    "--field-mask/--no-field-mask",
    env="FIELD_MASK",
    default=True,
    show_default=True,
    help=_RELAY["field_mask"],
)
@_option("--startup-timeout-seconds", env="STARTUP_TIMEOUT_SECONDS", type=click.FloatRange(min=0.1),
         help=_RELAY["startup_timeout_seconds"] + " Problems that waiting cannot fix (not a Hubble relay, TLS "
         "versus plaintext, certificates) stop at once.")  # fmt: skip
@_option("--reconnect-backoff-initial-seconds", env="RECONNECT_BACKOFF_INITIAL_SECONDS", type=click.FloatRange(min=0.001),
         default=_RELAY_DEFAULT["reconnect_backoff_initial_seconds"], show_default=True,
         help=_RELAY["reconnect_backoff_initial_seconds"])  # fmt: skip
@_option("--reconnect-backoff-max-seconds", env="RECONNECT_BACKOFF_MAX_SECONDS", type=click.FloatRange(min=0.001),
         default=_RELAY_DEFAULT["reconnect_backoff_max_seconds"], show_default=True,
         help=_RELAY["reconnect_backoff_max_seconds"])  # fmt: skip
@_option("--resume-overlap-seconds", env="RESUME_OVERLAP_SECONDS", type=click.FloatRange(min=0),
         default=_RELAY_DEFAULT["resume_overlap_seconds"],
         show_default=True, help=_RELAY["resume_overlap_seconds"])  # fmt: skip
@_option("--question-interval-seconds", env="QUESTION_INTERVAL_SECONDS", type=click.FloatRange(min=0.1),
         default=_COLLECT_DEFAULT["question_interval_seconds"], show_default=True,
         help="How often the unexpected_drops and dns_failures questions refresh their gauges "
         "(flowpipe_unexpected_drops, flowpipe_dns_lookups, flowpipe_dns_failed_lookups).")  # fmt: skip
@_option("--workers", env="WORKERS", type=click.IntRange(1, 2),
         help="Processes that collect: 1 reads, decodes and writes in one process; 2 reads the relay's stream in "
         "a process of its own, so that a second CPU decodes and writes (default: 2 when the container may use "
         "two CPUs, from its CPU limit and affinity, else 1; 1 with --receiver grpcio).")  # fmt: skip
@_option("--receiver", env="RECEIVER", type=click.Choice(RECEIVERS), default=_RELAY_DEFAULT["receiver"],
         show_default=True, help=_RELAY["receiver"] + " grpcio runs with --workers 1.")  # fmt: skip
@_option("--max-namespaces", env="MAX_NAMESPACES", type=click.IntRange(min=0),
         default=_COLLECT_DEFAULT["max_namespaces"],
         show_default=True, help="Namespaces with their own label value in the flow analytics metrics; the rest "
         "are counted as 'other'.")  # fmt: skip
def collect_command(
    relay: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
    namespace: tuple[str, ...],
    verdict: tuple[str, ...],
    node: tuple[str, ...],
    dataset: str,
    flush_interval_seconds: float,
    max_batch_rows: int,
    max_batch_bytes: int,
    edge_rollups: bool,
    metrics_address: str,
    node_shard: str | None,
    writer_id: str | None,
    cluster_name: str | None,
    field_mask: bool,
    startup_timeout_seconds: float | None,
    reconnect_backoff_initial_seconds: float,
    reconnect_backoff_max_seconds: float,
    resume_overlap_seconds: float,
    question_interval_seconds: float,
    workers: int | None,
    receiver: str,
    max_namespaces: int,
) -> None:
    """Follow hubble-relay's flow stream into the dataset, without loss or duplicates, until SIGTERM/SIGINT.

    The first start takes everything the relay still buffers, then follows new flows; a restart resumes from the
    checkpoint in the dataset (`_state/`). Lost connections are retried forever with backoff. TLS is used when
    any --tls-* option is given (mutual TLS with --tls-cert/--tls-key) and is never given up for plaintext.
    SIGTERM or SIGINT flushes the open batch, saves the checkpoint and exits 0.
    """
    sink_options: dict[str, Any] = {
        "path": dataset,
        "flush_interval_seconds": flush_interval_seconds,
        "max_batch_rows": max_batch_rows,
        "max_batch_bytes": max_batch_bytes,
        "edge_rollups": edge_rollups,
    }
    relay = with_default_port(relay)
    source = RelaySourceConfig(
        address=relay,
        tls_ca=tls_ca or None,
        tls_cert=tls_cert or None,
        tls_key=tls_key or None,
        tls_server_name=tls_server_name or None,
        namespaces=namespace,
        verdicts=verdict,
        nodes=node,
        node_shard=parse_node_shard(node_shard) if node_shard else None,
        cluster_name=cluster_name or None,
        field_mask=field_mask,
        startup_timeout_seconds=startup_timeout_seconds,
        reconnect_backoff_initial_seconds=reconnect_backoff_initial_seconds,
        reconnect_backoff_max_seconds=reconnect_backoff_max_seconds,
        resume_overlap_seconds=resume_overlap_seconds,
        receiver=receiver,
    )
    # by default named after the checkpoint: a restart finds and removes what it left when it was killed
    sink_options["writer_id"] = writer_id or source_writer_id(source)
    config = CollectConfig(
        source=source,
        sink=ParquetSinkConfig(**sink_options),
        pipeline=PipelineConfig(stop_timeout_seconds=5.0),
        metrics_address=None if metrics_address.strip().lower() in _OFF else metrics_address,
        question_interval_seconds=question_interval_seconds,
        max_namespaces=max_namespaces,
        workers=workers,
    )
    collect_with_progress(config, echo=lambda line: click.echo(line, err=True))

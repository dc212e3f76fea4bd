"""`flowpipe serve-metrics`: Prometheus metrics of a dataset filled by files, following new part files.

The library side is `flowpipe.metrics.server`.
"""

from __future__ import annotations

import sys
import threading

import click

from flowpipe.cli._options import dataset_option, param_option, parse_param_options
from flowpipe.config import field_defaults, field_help
from flowpipe.metrics.families import MetricsServer
from flowpipe.metrics.server import DatasetMetrics, DatasetMetricsConfig
from flowpipe.pipeline import handle_stop_signals

_DEFAULT = field_defaults(DatasetMetricsConfig)
_HELP = field_help(DatasetMetricsConfig)


@click.command("serve-metrics")
@dataset_option
@click.option(
    "--metrics-address",
    default=_DEFAULT["metrics_address"],
    show_default=True,
    envvar="FLOWPIPE_METRICS_ADDRESS",
    show_envvar=True,
    help=_HELP["metrics_address"],
)
@click.option(
    "--poll-interval-seconds",
    type=click.FloatRange(min=0.05),
    default=_DEFAULT["poll_interval_seconds"],
    show_default=True,
    envvar="FLOWPIPE_POLL_INTERVAL_SECONDS",
    help=_HELP["poll_interval_seconds"],
)
@click.option(
    "--question-interval-seconds",
    type=click.FloatRange(min=1.0),
    default=_DEFAULT["question_interval_seconds"],
    show_default=True,
    envvar="FLOWPIPE_QUESTION_INTERVAL_SECONDS",
    help=_HELP["question_interval_seconds"],
)
@param_option(
    "Parameter of the questions behind the gauges, unexpected_drops and dns_failures (repeatable; each takes "
    "those it declares), e.g. -p since=24h.",
    aliases=("--question-param",),
)
@click.option(
    "--max-namespaces",
    type=click.IntRange(min=0),
    default=_DEFAULT["max_namespaces"],
    show_default=True,
    envvar="FLOWPIPE_MAX_NAMESPACES",
    help=_HELP["max_namespaces"],
)
@click.option("--once", is_flag=True, help="Read the dataset once, print the metrics to stdout and exit.")
def serve_metrics(
    dataset: str,
    metrics_address: str,
    poll_interval_seconds: float,
    question_interval_seconds: float,
    param_options: tuple[str, ...],
    max_namespaces: int,
    once: bool,
) -> None:
    """Serve Prometheus metrics of a dataset filled by files, following new part files as they appear."""
    config = DatasetMetricsConfig(
        dataset=dataset,
        metrics_address=metrics_address,
        poll_interval_seconds=poll_interval_seconds,
        question_interval_seconds=question_interval_seconds,
        question_params=parse_param_options(param_options),
        max_namespaces=max_namespaces,
    )
    served = DatasetMetrics(config, zero_first=not once)
    if once:
        click.echo(served.once().decode(), nl=False)
        return

    def started(server: MetricsServer) -> None:
        click.echo(f"serving metrics of {dataset} on {server.url}/metrics", err=True)
        sys.stderr.flush()

    stop = threading.Event()
    with handle_stop_signals(stop, doing="stopping"):
        served.serve(stop, on_started=started)

"""`flowpipe serve-metrics`: Prometheus metrics of a dataset filled by files, following new part files.

For datasets that `flowpipe ingest` (or another collector) fills: every part file is read once (only the
columns the analytics need), its flows counted by verdict and fed to the Prometheus sink, its lost events
counted by source and node. New part files are picked up on every poll; files already read are remembered
by path, and a compacted file (`flowpipe compact`) adds only the rows of its inputs that were not read
before. The `unexpected_drops` question refreshes `flowpipe_unexpected_drops` on its own interval when the
catalog has it.

Counters start at 0 and grow as data arrives: the dataset already there when serve-metrics starts is first
exported at 0, then added after the next scrape, so Prometheus's `rate()` and `increase()` see it as it came
(a counter born at its full value reads as no increase at all). Any GET of `/metrics` counts as that scrape
(`/healthz` and `/readyz` do not).

`/readyz` turns ready once the first full scan of the dataset is done.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry

from flowpipe.cli._options import dataset_option
from flowpipe.dataset.compact import compacted_inputs
from flowpipe.dataset.layout import FLOWS_TABLE, LOST_EVENTS_TABLE, Dataset
from flowpipe.errors import ConfigError
from flowpipe.metrics.families import DEFAULT_METRICS_ADDRESS, PipelineMetrics, parse_address, render, serve
from flowpipe.metrics.questions import (
    DEFAULT_QUESTION_INTERVAL_SECONDS,
    UnexpectedDropsRefresher,
    unexpected_drops_runner,
)
from flowpipe.sinks.prometheus import ANALYTICS_COLUMNS, DEFAULT_MAX_NAMESPACES, PrometheusSink

log = logging.getLogger(__name__)

FLOW_COLUMNS_READ = ("time", *ANALYTICS_COLUMNS)
LOST_COLUMNS_READ = ("source", "node_name", "num_events_lost")
MAX_READ_ATTEMPTS = 3
"""A part file that fails this many reads is reported, counted as failed and left alone."""


class DatasetFollower:
    """Reads each new part file of a dataset once and feeds it to the metrics and the Prometheus sink."""

    def __init__(self, dataset: Dataset, metrics: PipelineMetrics, sink: PrometheusSink) -> None:
        self.dataset = dataset
        self.metrics = metrics
        self.sink = sink
        self.scans = 0
        self._done: set[str] = set()
        self._failures: dict[str, int] = {}

    @property
    def files_read(self) -> int:
        """Part files handled so far (read, or given up after repeated failures)."""
        return len(self._done)

    def scan(self) -> int:
        """Read every part file not read yet, oldest partition first; returns how many were read."""
        read = 0
        for table_name, handler in ((FLOWS_TABLE, self._read_flows), (LOST_EVENTS_TABLE, self._read_lost)):
            for path in self.dataset.list_part_files(table_name):
                if path in self._done:
                    continue
                try:
                    handler(path)
                except (OSError, pa.ArrowException) as exc:
                    self._failed(table_name, path, exc)
                    continue
                self._done.add(path)
                self._failures.pop(path, None)
                self.metrics.record_part_read(table_name, ok=True)
                read += 1
        self.scans += 1
        return read

    def _failed(self, table_name: str, path: str, exc: Exception) -> None:
        attempts = self._failures.get(path, 0) + 1
        self._failures[path] = attempts
        if attempts >= MAX_READ_ATTEMPTS:
            log.error("cannot read part file %s (%d attempts), leaving it out: %s", path, attempts, exc)
            self._done.add(path)
            self._failures.pop(path, None)
            self.metrics.record_part_read(table_name, ok=False)
            self.metrics.record_error("receiving", "read_failed")
        else:
            log.warning("cannot read part file %s (attempt %d, will retry): %s", path, attempts, exc)

    def _read(self, path: str, wanted: tuple[str, ...]) -> pa.Table:
        with self.dataset.filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in wanted if name in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
            inputs = compacted_inputs(parquet.metadata.metadata)
        if inputs is None:
            return table
        # A compacted file holds its inputs' rows, input after input: count only the rows of inputs not read
        # yet, and remember the inputs as read (they may still be listed until compaction deletes them).
        folder = path.rpartition("/")[0]
        unread, offset = [], 0
        for name, rows in inputs:
            if f"{folder}/{name}" not in self._done:
                unread.append(table.slice(offset, rows))
            self._done.add(f"{folder}/{name}")
            offset += rows
        return pa.concat_tables(unread) if unread else table.slice(0, 0)

    def _read_flows(self, path: str) -> None:
        table = self._read(path, FLOW_COLUMNS_READ)
        if "verdict" in table.column_names:
            self.metrics.observe_flows(table)
        if "time" in table.column_names:
            self.metrics.observe_newest_flow(table)
        self.sink.write(table)

    def _read_lost(self, path: str) -> None:
        table = self._read(path, LOST_COLUMNS_READ)
        if table.num_rows == 0 or "num_events_lost" not in table.column_names:
            return
        source = (
            table.column("source")
            if "source" in table.column_names
            else pa.nulls(table.num_rows, pa.string())
        )
        node = (
            table.column("node_name")
            if "node_name" in table.column_names
            else pa.nulls(table.num_rows, pa.string())
        )
        grouped = (
            pa.table(
                {
                    "source": pc.fill_null(source, ""),
                    "node": pc.fill_null(node, ""),
                    "lost": table.column("num_events_lost"),
                }
            )
            .group_by(["source", "node"])
            .aggregate([("lost", "sum")])
        )
        for row in grouped.to_pylist():
            self.metrics.add_lost_events(row["source"], row["node"], int(row["lost_sum"] or 0))


def run(
    follower: DatasetFollower,
    refresher: UnexpectedDropsRefresher | None,
    stop: threading.Event,
    *,
    poll_interval_seconds: float,
    on_scanned: Callable[[], None] = lambda: None,
) -> None:
    """Scan the dataset and refresh the question gauge until `stop` is set (`on_scanned` after each scan)."""
    while not stop.is_set():
        started = time.monotonic()
        follower.scan()
        on_scanned()
        if refresher is not None:
            refresher.poll()
        stop.wait(max(0.0, poll_interval_seconds - (time.monotonic() - started)))


def _parse_params(values: tuple[str, ...]) -> Mapping[str, object]:
    params: dict[str, object] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"question parameter {value!r} is not KEY=VALUE (e.g. -p since=24h)")
        params[key.strip()] = text
    return params


@click.command("serve-metrics")
@dataset_option
@click.option(
    "--metrics-address",
    default=DEFAULT_METRICS_ADDRESS,
    show_default=True,
    envvar="FLOWPIPE_METRICS_ADDRESS",
    show_envvar=True,
    help="HOST:PORT for /metrics, /healthz and /readyz (port 0: any free port; 0.0.0.0 for all interfaces).",
)
@click.option(
    "--poll-interval-seconds",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    envvar="FLOWPIPE_POLL_INTERVAL_SECONDS",
    help="How often to look for new part files.",
)
@click.option(
    "--question-interval-seconds",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_QUESTION_INTERVAL_SECONDS,
    show_default=True,
    envvar="FLOWPIPE_QUESTION_INTERVAL_SECONDS",
    help="How often to rerun the unexpected_drops question for flowpipe_unexpected_drops.",
)
@click.option(
    "-p",
    "--question-param",
    multiple=True,
    metavar="KEY=VALUE",
    help="Parameter of the unexpected_drops question (repeatable), e.g. -p since=24h.",
)
@click.option(
    "--max-namespaces",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_NAMESPACES,
    show_default=True,
    envvar="FLOWPIPE_MAX_NAMESPACES",
    help="Namespaces with their own label value; the rest are counted as 'other'.",
)
@click.option("--once", is_flag=True, help="Read the dataset once, print the metrics to stdout and exit.")
def serve_metrics(
    dataset: str,
    metrics_address: str,
    poll_interval_seconds: float,
    question_interval_seconds: float,
    question_param: tuple[str, ...],
    max_namespaces: int,
    once: bool,
) -> None:
    """Serve Prometheus metrics of a dataset filled by files, following new part files as they appear."""
    address = parse_address(metrics_address)
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset", zero_first=not once)
    follower = DatasetFollower(
        Dataset(dataset), metrics, PrometheusSink(metrics, max_namespaces=max_namespaces)
    )
    refresher = UnexpectedDropsRefresher(
        metrics,
        unexpected_drops_runner(dataset, _parse_params(question_param)),
        interval_seconds=question_interval_seconds,
    )
    if once:
        follower.scan()
        refresher.refresh()
        click.echo(render(registry).decode(), nl=False)
        return
    scanned = threading.Event()
    stop = threading.Event()
    server = serve(registry, address, ready=scanned.is_set, after_scrape=metrics.after_scrape)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    click.echo(f"serving metrics of {dataset} on {server.url}/metrics", err=True)
    sys.stderr.flush()
    try:
        run(follower, refresher, stop, poll_interval_seconds=poll_interval_seconds, on_scanned=scanned.set)
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

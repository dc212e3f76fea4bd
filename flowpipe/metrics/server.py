"""Prometheus metrics of a dataset filled by files (`flowpipe serve-metrics`), following new part files.

For datasets that `flowpipe ingest` (or another collector) fills: every part file is read once (only the
columns the analytics need), its flows counted by verdict and fed to the Prometheus sink, its lost events
counted by source and node. New part files are picked up on every poll; files already read are remembered
by path, and a compacted file (`flowpipe compact`) adds only the rows of its inputs that were not read
before. The `unexpected_drops` and `dns_failures` questions refresh their gauges (`flowpipe_unexpected_drops`,
`flowpipe_dns_lookups`, ...) on their own interval when the catalog has them.

Counters start at 0 and grow as data arrives: the dataset already there when serve-metrics starts is first
exported at 0, then added after the next scrape, so Prometheus's `rate()` and `increase()` see it as it came
(a counter born at its full value reads as no increase at all). Any GET of `/metrics` counts as that scrape
(`/healthz` and `/readyz` do not).

`/readyz` turns ready once the first full scan of the dataset is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry

from flowpipe.dataset.layout import FLOWS_TABLE, LOST_EVENTS_TABLE, Dataset
from flowpipe.dataset.visible import compacted_inputs
from flowpipe.errors import ConfigError
from flowpipe.metrics.families import (
    DEFAULT_METRICS_ADDRESS,
    MetricsServer,
    PipelineMetrics,
    parse_address,
    render,
    serve,
)
from flowpipe.metrics.questions import (
    DEFAULT_QUESTION_INTERVAL_SECONDS,
    QuestionRefreshers,
    check_question_params,
    question_refreshers,
)
from flowpipe.sinks.prometheus import ANALYTICS_COLUMNS, DEFAULT_MAX_NAMESPACES, PrometheusSink

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_SECONDS = 5.0

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
    refresher: QuestionRefreshers | None,
    stop: threading.Event,
    *,
    poll_interval_seconds: float,
    on_scanned: Callable[[], None] = lambda: None,
) -> None:
    """Scan the dataset and refresh the question gauges until `stop` is set (`on_scanned` after each scan)."""
    while not stop.is_set():
        started = time.monotonic()
        follower.scan()
        on_scanned()
        if refresher is not None:
            refresher.poll()
        stop.wait(max(0.0, poll_interval_seconds - (time.monotonic() - started)))


@dataclass(frozen=True, slots=True)
class DatasetMetricsConfig:
    """What `serve-metrics` serves: the metrics of one dataset, on one address, refreshed on intervals."""

    dataset: str
    metrics_address: str = field(
        default=DEFAULT_METRICS_ADDRESS,
        metadata={
            "help": "HOST:PORT for /metrics, /healthz and /readyz (port 0: any free port; 0.0.0.0 for all "
            "interfaces)."
        },
    )
    poll_interval_seconds: float = field(
        default=DEFAULT_POLL_INTERVAL_SECONDS, metadata={"help": "How often to look for new part files."}
    )
    question_interval_seconds: float = field(
        default=DEFAULT_QUESTION_INTERVAL_SECONDS,
        metadata={
            "help": "How often to rerun the questions behind the gauges (unexpected_drops for "
            "flowpipe_unexpected_drops, dns_failures for flowpipe_dns_lookups and flowpipe_dns_failed_lookups)."
        },
    )
    question_params: Mapping[str, object] = field(
        default_factory=dict,
        metadata={"help": "Parameters of those questions (each takes those it declares, e.g. since)."},
    )
    max_namespaces: int = field(
        default=DEFAULT_MAX_NAMESPACES,
        metadata={"help": "Namespaces with their own label value; the rest are counted as 'other'."},
    )

    def __post_init__(self) -> None:
        parse_address(self.metrics_address)
        if self.poll_interval_seconds <= 0 or self.question_interval_seconds <= 0:
            raise ConfigError("poll_interval_seconds and question_interval_seconds must be > 0")
        if self.max_namespaces < 0:
            raise ConfigError("max_namespaces must be >= 0")
        check_question_params(self.question_params)


class DatasetMetrics:
    """The metrics of one dataset: the registry, the follower that reads new part files, the question gauges."""

    def __init__(self, config: DatasetMetricsConfig, *, zero_first: bool = True) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = PipelineMetrics.create(self.registry, role="dataset", zero_first=zero_first)
        self.follower = DatasetFollower(
            Dataset(config.dataset),
            self.metrics,
            PrometheusSink(self.metrics, max_namespaces=config.max_namespaces),
        )
        self.refresher = question_refreshers(
            self.metrics,
            config.dataset,
            params=config.question_params,
            interval_seconds=config.question_interval_seconds,
            max_namespaces=config.max_namespaces,
        )

    def once(self) -> bytes:
        """Read the dataset once, answer the questions once; the metrics in the text format."""
        self.follower.scan()
        self.refresher.refresh()
        return render(self.registry)

    def serve(
        self, stop: threading.Event, *, on_started: Callable[[MetricsServer], None] = lambda server: None
    ) -> None:
        """Serve /metrics, /healthz and /readyz (ready after the first full scan) until `stop` is set."""
        scanned = threading.Event()
        server = serve(
            self.registry,
            self.config.metrics_address,
            ready=scanned.is_set,
            after_scrape=self.metrics.after_scrape,
        )
        try:
            on_started(server)
            run(
                self.follower,
                self.refresher,
                stop,
                poll_interval_seconds=self.config.poll_interval_seconds,
                on_scanned=scanned.set,
            )
        finally:
            server.close()

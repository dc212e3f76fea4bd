"""Live collection as a library call: relay source → pipeline → Parquet sink + Prometheus sink, with /metrics.

```
RelaySource ──▶ bounded buffer ──▶ ParquetSink (dataset; acks move the checkpoint)
                                └─▶ PrometheusSink (flow analytics)      /metrics /healthz /readyz
```

The checkpoint lives in the dataset (`_state/relay.json`; `relay-cluster-NAME.json` with `--cluster`, and
`...-shard-I-of-N.json` per shard, so that collectors of several clusters share a dataset), so a restarted
collector resumes where the durable data ends. One collector at a time writes a checkpoint: `collect` takes a
lease claiming it (`flowpipe._leases`), and a second collector of the same relay, cluster and shard into the
same dataset is refused with a message naming the first (host, pid, since when) instead of storing every flow
twice. `collect` returns when `stop` is set (the CLI sets it on
SIGTERM/SIGINT): the open batch is flushed, the checkpoint saved. `/readyz` answers ready while the relay stream
is open and the Parquet sink keeps flushing (nothing waits much longer than the flush interval).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry

from flowpipe._leases import Lease, take_lease
from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset import Dataset
from flowpipe.errors import ConfigError, SinkError
from flowpipe.metrics import MetricsServer, PipelineMetrics, parse_address, serve
from flowpipe.model import EventBatch
from flowpipe.pipeline import PipelineResult, run_pipeline
from flowpipe.sinks import Ack, Sink
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sinks.prometheus import (
    DEFAULT_MAX_NAMESPACES,
    DEFAULT_QUESTION_INTERVAL_SECONDS,
    PrometheusSink,
    UnexpectedDropsRefresher,
    unexpected_drops_runner,
)
from flowpipe.sources.relay import RelaySource, RelaySourceConfig
from flowpipe.stored_flows import StoredFlows

log = logging.getLogger(__name__)

READY_GRACE_SECONDS = 30.0
"""How much longer than the flush interval flows may wait unflushed before /readyz says not ready."""


COLLECT_MAX_BATCH_BYTES = 24 * 1024 * 1024
"""The collector's open-batch size limit: smaller than the file ingest's, to keep a long-running process small."""


def use_system_memory_pool() -> None:
    """Make Arrow allocate with the system allocator, which returns freed memory to the OS sooner than the
    bundled one: a collector that runs for days then keeps a flat, smaller resident size."""
    pa.set_memory_pool(pa.system_memory_pool())


def source_writer_id(config: RelaySourceConfig) -> str:
    """The default writer id of a collector: named after its checkpoint (`relay`, `relay-shard-0-of-2`, ...).

    It stays the same across restarts, so a restarted collector removes the temporary files it left when it
    was killed; and it is unique among running collectors of a dataset, because one checkpoint has one
    collector at a time (its lease).
    """
    name = checkpoint_name(config).removesuffix(".json")
    if len(name) > 64:
        name = f"{name[:55]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def checkpoint_name(config: RelaySourceConfig) -> str:
    """The checkpoint's file name in `_state/`: one per cluster (`--cluster`) and shard, so collectors of several
    clusters, and shards, sharing a dataset each keep their own."""
    name = "relay"
    if config.cluster_name:
        name += "-cluster-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", config.cluster_name)
    if config.node_shard is not None:
        index, count = config.node_shard
        name += f"-shard-{index}-of-{count}"
    return name + ".json"


@dataclass(frozen=True, slots=True)
class CollectConfig:
    """Everything `flowpipe collect` needs: the relay, the dataset writer, the pipeline and the metrics."""

    source: RelaySourceConfig
    sink: ParquetSinkConfig = field(default_factory=ParquetSinkConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    metrics_address: str | None = field(
        default=None, metadata={"help": "HOST:PORT for /metrics, /healthz, /readyz."}
    )
    max_namespaces: int = field(
        default=DEFAULT_MAX_NAMESPACES, metadata={"help": "Namespaces with their own label value."}
    )
    question_interval_seconds: float = field(
        default=DEFAULT_QUESTION_INTERVAL_SECONDS,
        metadata={
            "help": "How often the unexpected_drops question refreshes flowpipe_unexpected_drops (0: never; "
            "the question then runs only where serve-metrics runs)."
        },
    )

    def __post_init__(self) -> None:
        if self.metrics_address is not None:
            parse_address(self.metrics_address)
        if self.max_namespaces < 0:
            raise ConfigError("max_namespaces must be >= 0")
        if self.question_interval_seconds < 0:
            raise ConfigError("question_interval_seconds must be >= 0 (0: never)")


class InstrumentedParquetSink:
    """The Parquet sink, measured: each flush's rows, bytes, duration and newest flow time go to the metrics."""

    name = "parquet"

    def __init__(
        self, inner: ParquetSink, metrics: PipelineMetrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self._clock = clock
        self._newest: datetime | None = None
        self.waiting_since: float | None = None
        self.failed = False

    def _measured(self, call: Callable[[], Ack | None]) -> Ack | None:
        started = time.perf_counter()
        try:
            ack = call()
        except SinkError:
            self.failed = True
            self.metrics.record_error("sending", "write_failed")
            raise
        if ack is not None and ack.files:
            size = sum(
                info.size or 0 for info in self.inner.dataset.filesystem.get_file_info(list(ack.files))
            )
            self.metrics.record_flush(
                ack.flows, size, time.perf_counter() - started, newest_flow_time=self._newest
            )
        if ack is not None and self.inner.buffered_rows == 0:
            self.waiting_since = None
        return ack

    def write(self, batch: EventBatch) -> Ack | None:
        """Hand the batch to the Parquet sink (which may flush)."""
        if batch.flows.num_rows:
            newest = pc.max(batch.flows.column("time")).as_py()
            if newest is not None and (self._newest is None or newest > self._newest):
                self._newest = newest
            if self.waiting_since is None:
                self.waiting_since = self._clock()
        return self._measured(lambda: self.inner.write(batch))

    def poll(self) -> Ack | None:
        """Flush on age."""
        return self._measured(self.inner.poll)

    def flush(self) -> Ack | None:
        """Flush what is open."""
        return self._measured(self.inner.flush)

    def close(self) -> Ack | None:
        """Flush what is open."""
        return self._measured(self.inner.close)

    def keeping_up(self, flush_interval_seconds: float) -> bool:
        """False when flows have waited unflushed far longer than the flush interval, or a flush failed."""
        if self.failed:
            return False
        if self.waiting_since is None:
            return True
        limit = max(2 * flush_interval_seconds, flush_interval_seconds + READY_GRACE_SECONDS)
        return self._clock() - self.waiting_since <= limit


@dataclass(slots=True)
class CollectResult:
    """What a collect run did."""

    pipeline: PipelineResult
    flows_received: int
    reconnects: int
    repeats_skipped: int
    checkpoint_state: str
    metrics_url: str | None = None


def collect(
    config: CollectConfig,
    *,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
    on_batch: Callable[[EventBatch], None] | None = None,
    on_started: Callable[[RelaySource, MetricsServer | None], None] | None = None,
) -> CollectResult:
    """Follow the relay into the dataset until `stop` is set; returns what was done.

    Raises RelayError when the relay cannot be used at startup, DatasetWriteError when a flush fails (nothing of
    that flush is acknowledged, so the next start fetches it again).
    """
    stop = stop or threading.Event()
    registry = registry if registry is not None else CollectorRegistry()
    dataset = Dataset(config.sink.path)
    state = checkpoint_name(config.source)
    lease = take_lease(
        dataset,
        "collect",
        {f"relay/{state}": f"the relay checkpoint {state}"},
        writer_id=config.sink.writer_id,
        advice=(
            "run one collector per relay (and --cluster) on a dataset, or split the nodes between collectors "
            "with --node-shard I/N (each shard has its own checkpoint)"
        ),
    )
    try:
        return _collect(config, dataset, state, lease, stop, registry, on_batch, on_started)
    finally:
        lease.release()


def _collect(
    config: CollectConfig,
    dataset: Dataset,
    state: str,
    lease: Lease,
    stop: threading.Event,
    registry: CollectorRegistry,
    on_batch: Callable[[EventBatch], None] | None,
    on_started: Callable[[RelaySource, MetricsServer | None], None] | None,
) -> CollectResult:
    removed = dataset.clean_temp_files(writer_ids=lease.dead_writers)
    if removed:
        log.warning(
            "removed %d temporary file(s) left by a writer that died: %s", len(removed), ", ".join(removed)
        )
    if (
        config.sink.edge_rollups
    ):  # the rollups of flow files published by writers that died before writing them
        from flowpipe.rollups.build import repair_writers

        repair_writers(dataset, lease.dead_writers)
    # Counters shown at 0 before they count, so rate() sees a namespace's first flows (only with a scraper).
    metrics = PipelineMetrics.create(registry, role="collect", zero_first=bool(config.metrics_address))
    stored = StoredFlows.for_writer(dataset, config.sink, config.pipeline)
    source = RelaySource(
        config.source, dataset=dataset, state_name=state, metrics=metrics, stop=stop, stored=stored
    )
    parquet = InstrumentedParquetSink(ParquetSink(config.sink, dataset=dataset), metrics)
    # Flow analytics are only worth their cost when someone can scrape them (`--metrics-address off` skips them).
    sinks: list[Sink] = [parquet]
    if config.metrics_address:
        sinks.append(PrometheusSink(metrics, max_namespaces=config.max_namespaces))
    flush_interval = config.sink.flush_interval_seconds

    def ready() -> bool:
        # a lease removed by another process (this one stalled past its expiry) may mean two writers now
        return source.connected and parquet.keeping_up(flush_interval) and not lease.lost

    server = (
        serve(registry, config.metrics_address, ready=ready, after_scrape=metrics.after_scrape)
        if config.metrics_address
        else None
    )
    # One answer per cluster: a collector given --cluster answers for its cluster, and of sharded collectors
    # (one cluster, one dataset) only shard 0 does, so summing over collectors counts each drop once.
    cluster = config.source.cluster_name
    refresher = UnexpectedDropsRefresher(
        metrics,
        unexpected_drops_runner(config.sink.path, cluster=cluster),
        interval_seconds=config.question_interval_seconds,
        cluster=cluster,
    )
    refresher_stop = threading.Event()
    refresher_thread = threading.Thread(
        target=refresher.run_forever, args=(refresher_stop,), name="flowpipe-questions", daemon=True
    )
    shard = config.source.node_shard
    # 0: leave flowpipe_unexpected_drops to serve-metrics
    questions = config.question_interval_seconds > 0 and (shard is None or shard[0] == 0)

    def count(batch: EventBatch) -> None:
        metrics.observe_batch(batch)
        if batch.decode_errors:
            metrics.record_dropped(len(batch.decode_errors), reason="decode_error", intentional=False)
            for error in batch.decode_errors[:3]:
                log.error("%s", error)
        if on_batch is not None:
            on_batch(batch)

    try:
        if on_started is not None:
            on_started(source, server)
        if questions:
            refresher_thread.start()
        result = run_pipeline(source, sinks, config=config.pipeline, stop=stop, on_batch=count)
    finally:
        refresher_stop.set()
        if (
            refresher_thread.is_alive()
        ):  # a question run in progress (DuckDB) must end before the process does
            refresher_thread.join(60.0)
        if server is not None:
            server.close()
        source.close()
    return CollectResult(
        pipeline=result,
        flows_received=source.flows_received,
        reconnects=source.reconnects,
        repeats_skipped=source.repeats_skipped,
        checkpoint_state=dataset.state_path(state),
        metrics_url=server.url if server is not None else None,
    )

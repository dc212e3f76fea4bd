"""Live collection as a library call: relay source → pipeline → Parquet sink + Prometheus sink, with /metrics.

```
RelaySource ──▶ bounded buffer ──▶ ParquetSink (dataset; acks move the checkpoint)
                                └─▶ PrometheusSink (flow analytics)      /metrics /healthz /readyz
```

The checkpoint lives in the dataset (`_state/relay.json`; `relay-cluster-NAME.json` with `--cluster`, and
`...-shard-I-of-N.json` per shard, so that collectors of several clusters share a dataset), so a restarted
collector resumes where the durable data ends. One collector at a time writes a checkpoint: `collect` takes a
lease claiming it (`flowpipe.dataset.leases`), and a second collector of the same relay, cluster and shard into the
same dataset is refused with a message naming the first (host, pid, since when) instead of storing every flow
twice. `collect` returns when `stop` is set (the CLI sets it on
SIGTERM/SIGINT): the open batch is flushed, the checkpoint saved. `/readyz` answers ready while the relay stream
is open (and its receiving process runs) and the Parquet sink keeps flushing (nothing waits much longer than the
flush interval).

With two workers (`workers=2`, the default where the container may use two CPUs) the stream is read and decoded
by a process of its own (`flowpipe.sources.relay._receiver`), which hands batches of flow-table rows to this
process; this one skips repeats, writes and moves the checkpoint, as with one worker. Either process killed,
nothing is lost or written twice: this one owns everything durable, and starts a new receiving process when
its receiving process ends; the receiving process exits when this one is gone. The stream is read by flowpipe's
own HTTP/2 reader in either mode; `--receiver grpcio` reads it with the gRPC library's client instead (one
process, several microseconds a flow more: for relays or proxies the built-in reader has trouble with).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
from prometheus_client import CollectorRegistry

from flowpipe._resources import available_cpus
from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.leases import Lease, take_lease
from flowpipe.dataset.stored_flows import StoredFlows
from flowpipe.errors import ConfigError
from flowpipe.metrics.families import MetricsServer, PipelineMetrics, parse_address, serve
from flowpipe.metrics.questions import (
    DEFAULT_QUESTION_INTERVAL_SECONDS,
    question_refreshers,
)
from flowpipe.model import EventBatch
from flowpipe.pipeline import PipelineResult, run_pipeline
from flowpipe.sinks import Sink
from flowpipe.sinks.instrumented import InstrumentedParquetSink
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sinks.prometheus import DEFAULT_MAX_NAMESPACES, PrometheusSink
from flowpipe.sources.relay import RelaySource, RelaySourceConfig

log = logging.getLogger(__name__)


COLLECT_MAX_BATCH_BYTES = 24 * 1024 * 1024
"""The collector's open-batch size limit: smaller than the file ingest's, to keep a long-running process small."""


COLLECT_MAX_STORED_KEYS = 1_000_000
"""Uuids of stored flows the collector keeps in memory at most (16 MB, beyond the hours it is writing into; the
hours touched least recently are forgotten first): a live stream comes in time order, seldom back to an hour."""


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
    workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes that collect: 1 reads, decodes and writes in one process; 2 reads and decodes the "
            "stream in a process of its own (default: 2 when the container may use 1.5 CPUs or more, else 1; 1 with the "
            "grpcio receiver)."
        },
    )
    question_interval_seconds: float = field(
        default=DEFAULT_QUESTION_INTERVAL_SECONDS,
        metadata={
            "help": "How often the unexpected_drops and dns_failures questions refresh their gauges "
            "(flowpipe_unexpected_drops, flowpipe_dns_lookups, ...; 0: never; the questions then run only where "
            "serve-metrics runs)."
        },
    )

    def __post_init__(self) -> None:
        if self.metrics_address is not None:
            parse_address(self.metrics_address)
        if self.max_namespaces < 0:
            raise ConfigError("max_namespaces must be >= 0")
        if self.question_interval_seconds < 0:
            raise ConfigError("question_interval_seconds must be >= 0 (0: never)")
        if self.workers is not None and self.workers not in (1, 2):
            raise ConfigError(f"workers must be 1 or 2, got {self.workers!r}")
        if self.workers == 2 and self.source.receiver == "grpcio":
            raise ConfigError(
                "--receiver grpcio reads the stream in the collecting process: it runs with --workers 1"
            )

    @property
    def processes(self) -> int:
        """The collecting processes: `workers`, or by default as many as the CPUs allow (one with grpcio)."""
        if self.workers is not None:
            return self.workers
        return 1 if self.source.receiver == "grpcio" else default_workers()


RECEIVE_PROCESS_MIN_CPUS = 1.5
"""The CPUs from which `collect` reads the stream in a process of its own by default: below that, the two
processes would share one CPU and only add the cost of handing batches over."""


def default_workers(cpus: float | None = None) -> int:
    """The number of collecting processes for the CPUs available (the container's limit, not the host's)."""
    cpus = available_cpus() if cpus is None else cpus
    return 2 if cpus >= RECEIVE_PROCESS_MIN_CPUS else 1


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
    # the rollups of flow files published by writers that died before writing them
    if config.sink.edge_rollups:
        from flowpipe.dataset.rollups.build import repair_writers

        repair_writers(dataset, lease.dead_writers)
    # Counters shown at 0 before they count, so rate() sees a namespace's first flows (only with a scraper).
    metrics = PipelineMetrics.create(registry, role="collect", zero_first=bool(config.metrics_address))
    stored = StoredFlows.for_writer(dataset, config.sink, config.pipeline, max_keys=COLLECT_MAX_STORED_KEYS)
    source = RelaySource(
        config.source,
        dataset=dataset,
        state_name=state,
        metrics=metrics,
        stop=stop,
        stored=stored,
        receive_process=config.processes > 1,
    )
    parquet = InstrumentedParquetSink(ParquetSink(config.sink, dataset=dataset), metrics)
    # Flow analytics are only worth their cost when someone can scrape them (`--metrics-address off` skips them).
    sinks: list[Sink] = [parquet]
    if config.metrics_address:
        sinks.append(PrometheusSink(metrics, max_namespaces=config.max_namespaces))
    flush_interval = config.sink.flush_interval_seconds

    def ready() -> bool:
        # a lease removed by another process (this one stalled past its expiry) may mean two writers now
        ready = source.connected and source.receiving and parquet.keeping_up(flush_interval)
        return ready and not lease.lost

    server = (
        serve(registry, config.metrics_address, ready=ready, after_scrape=metrics.after_scrape)
        if config.metrics_address
        else None
    )
    # One answer per cluster: a collector given --cluster answers for its cluster, and of sharded collectors
    # (one cluster, one dataset) only shard 0 does, so summing over collectors counts each drop and lookup once.
    cluster = config.source.cluster_name
    refresher = question_refreshers(
        metrics,
        config.sink.path,
        cluster=cluster,
        interval_seconds=config.question_interval_seconds,
        max_namespaces=config.max_namespaces,
    )
    refresher_stop = threading.Event()
    refresher_thread = threading.Thread(
        target=refresher.run_forever, args=(refresher_stop,), name="flowpipe-questions", daemon=True
    )
    shard = config.source.node_shard
    # 0: leave the question gauges to serve-metrics
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

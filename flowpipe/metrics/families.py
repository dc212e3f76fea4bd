"""flowpipe's Prometheus instruments, all defined here (registry injected), and the `/metrics` HTTP server.

`PipelineMetrics.create(registry)` builds every metric family of flowpipe: pipeline health (what the collector
received, wrote, lost and how far behind it is) and flow analytics (what the flows say: drops, DNS, policy
verdicts, updated by `flowpipe.metrics.questions.PrometheusSink`). Names follow
`flowpipe_<noun>_<unit>[_total]` with base units (seconds, bytes), and every family has help text.
`METRICS` lists them for the README.

Labels are bounded: enum values (verdict, direction, reason class, rcode), small fixed sets (reasons, stages),
namespaces capped by the Prometheus sink (top N, the rest `other`), and node names (bounded by cluster size,
capped at `MAX_NODE_LABELS`). Every label whose values come from the flows is capped (`BoundedLabel`): enum
labels keep their known names and admit `MAX_ENUM_LABELS` others, clusters `MAX_CLUSTER_LABELS`. Never pods,
IPs or ports. An enum label uses `unknown` for the enum's zero
value. No legend is blank: a flow end without a namespace (world, host, remote node) counts as `NO_NAMESPACE`,
a flow without a traffic direction as `NO_DIRECTION`, a flow without a cluster name as `NO_CLUSTER`, lost events
without a node as `NO_NODE`; none of them can be a real namespace, direction, cluster or node name.

The flow analytics families and the question gauges (`flowpipe_unexpected_drops`, `flowpipe_expected_drops`,
`flowpipe_dns_lookups`, `flowpipe_dns_failed_lookups`) carry a `cluster` label (the flows' `cluster_name`): one
answer per cluster. Every `why` of `UNEXPECTED_WHYS` is exported for each cluster, and every reason of
`DNS_FAILURE_REASONS` for each client namespace with lookups, 0 when the question found none.

Counters start at 0 and grow as data arrives, so `rate()` and `increase()` see every flow: with `zero_first`
(serve-metrics, which reads a whole dataset at start, and collect, whose namespaces appear as flows do), a
series is first exported at 0 and what it counted is added after the next scrape (`after_scrape()`, called by the `/metrics` server), instead of being born at
its full value, which Prometheus cannot tell from a counter that was always there.

A metric is exported by the commands it means something for (`role`): the collector exports the pipeline
families, `serve-metrics` (a dataset filled by files) the families it can fill from part files. Objects for
the others still exist, unregistered, so callers never test for None.

`serve(registry, "127.0.0.1:9966", ready=...)` serves `/metrics`, `/healthz` (the process is up) and `/readyz`
(the `ready` callable says yes: e.g. connected to the relay and writing) on a daemon thread.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from flowpipe import __version__
from flowpipe.errors import ConfigError, FlowDecodeError
from flowpipe.model import SCHEMA_VERSION, EventBatch, LostEvent

log = logging.getLogger(__name__)

Role = Literal["collect", "dataset"]
ROLES: tuple[Role, ...] = ("collect", "dataset")
BOTH: tuple[Role, ...] = ROLES
COLLECT: tuple[Role, ...] = ("collect",)
DATASET: tuple[Role, ...] = ("dataset",)

DEFAULT_METRICS_ADDRESS = "127.0.0.1:9966"
FLUSH_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_NODE_LABELS = 1000
"""Node names become label values of the lost-events counter; past this many, the rest count as `other`."""
MAX_REASON_LABELS = 32
"""Free-form reasons (decode errors, flowpipe drops, error types, `why`) beyond this many count as `other`."""
MAX_ENUM_LABELS = 16
"""Names of an enum label (verdict, direction, lost-event source) that flowpipe does not know (a newer Hubble)
beyond this many count as `other`; the known names always keep theirs."""
MAX_CLUSTER_LABELS = 100
"""Cluster names (from the flows' node names) beyond this many count as `other`."""
OTHER = "other"
UNKNOWN = "unknown"
NO_NAMESPACE = "(no namespace)"
"""`namespace` of a flow end outside every namespace (world, host, remote node, health)."""
NO_DIRECTION = "(no direction)"
"""`direction` of a flow Cilium reported without a traffic direction."""
NO_NODE = "(no node)"
"""`node` of lost events Hubble reported without a node name (the relay's own)."""
NO_CLUSTER = "(no cluster)"
"""`cluster` of flows without a cluster name, and of a question answer over a dataset without flows."""
UNEXPECTED_WHYS = ("non_policy", "dns_blocked", "regression", "infrastructure")
"""Every `why` of the unexpected_drops question (sql/unexpected_drops.sql) but `expected`."""
EXPECTED_WHY = "expected"
DNS_FAILURE_REASONS = ("NXDOMAIN", "SERVFAIL", "REFUSED", "no_answer", "dropped", "unresolved_final_not_seen")
"""`reason`s of `flowpipe_dns_failed_lookups` exported for every client namespace, 0 when none: the rcodes a
failed lookup usually ends with, then the other kinds of the dns_failures question (sql/dns_failures.sql). Other
rcodes (FORMERR, NOTIMP, ...) appear when a lookup ends with them."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family: exported name, type, labels, help text, and which commands export it."""

    attr: str
    kind: Literal["counter", "gauge", "histogram", "info"]
    name: str
    labels: tuple[str, ...]
    help: str
    roles: tuple[Role, ...] = BOTH


# One family per entry, kept as a table.
# fmt: off
METRICS: tuple[MetricSpec, ...] = (
    # pipeline health
    MetricSpec("build_info", "info", "flowpipe_build_info", ("version", "schema_version"),
               "flowpipe version and flow table schema version (value 1)."),
    MetricSpec("flows_received", "counter", "flowpipe_flows_received_total", ("verdict",),
               "Flows received from the source (relay stream or dataset part files), by Hubble verdict."),
    MetricSpec("flows_written", "counter", "flowpipe_flows_written_total", (),
               "Flows made durable in the dataset (part files renamed into place).", COLLECT),
    MetricSpec("written_bytes", "counter", "flowpipe_dataset_written_bytes_total", (),
               "Bytes of part files written to the dataset.", COLLECT),
    MetricSpec("batches_flushed", "counter", "flowpipe_batches_flushed_total", (),
               "Flushes of the open batch into part files.", COLLECT),
    MetricSpec("flush_duration", "histogram", "flowpipe_flush_duration_seconds", (),
               "Time to write and publish the part files of one flush.", COLLECT),
    MetricSpec("ingest_lag", "gauge", "flowpipe_ingest_lag_seconds", (),
               "Now minus the time of the newest flow written (collect) or read (serve-metrics); "
               "absent until the first flow."),
    MetricSpec("relay_connected", "gauge", "flowpipe_relay_connected", (),
               "1 while the GetFlows stream from hubble-relay is open, else 0.", COLLECT),
    MetricSpec("relay_reconnects", "counter", "flowpipe_relay_reconnects_total", (),
               "Reconnections to hubble-relay after the stream broke.", COLLECT),
    MetricSpec("hubble_lost_events", "counter", "flowpipe_hubble_lost_events_total", ("source", "node"),
               "Events Hubble itself reported lost (lost_events records, never a flowpipe drop), "
               "by source and node."),
    MetricSpec("decode_errors", "counter", "flowpipe_decode_errors_total", ("reason",),
               "Records that could not be decoded into a flow row, by reason.", COLLECT),
    MetricSpec("checkpoint_age", "gauge", "flowpipe_checkpoint_age_seconds", (),
               "Seconds since the source checkpoint was last saved; absent until the first save.", COLLECT),
    MetricSpec("flows_dropped", "counter", "flowpipe_flows_dropped_total", ("reason", "intentional"),
               "Flows flowpipe itself discarded (filters, decode errors), by reason; intentional is true for "
               "filters.", COLLECT),
    MetricSpec("errors", "counter", "flowpipe_errors_total", ("stage", "error_type"),
               "Errors by pipeline stage (receiving, processing, sending) and error type."),
    MetricSpec("parts_read", "counter", "flowpipe_dataset_parts_read_total", ("table", "outcome"),
               "Dataset part files read by serve-metrics, by table (flows, lost_events) and outcome (ok, "
               "failed).", DATASET),
    # flow analytics (flowpipe.metrics.questions)
    MetricSpec("observed_drops", "counter", "flowpipe_observed_drops_total",
               ("cluster", "namespace", "direction", "reason_class"),
               "Flows Cilium dropped (verdict DROPPED), by namespace of the enforcing endpoint, traffic "
               "direction and drop reason class (flowpipe.drop_reasons)."),
    MetricSpec("dns_responses", "counter", "flowpipe_observed_dns_responses_total", ("cluster", "namespace", "rcode"),
               "DNS responses seen by the DNS proxy (L7 records), by client namespace and rcode name."),
    MetricSpec("dns_failures", "counter", "flowpipe_observed_dns_failures_total", ("cluster", "namespace", "reason"),
               "DNS error answers (NXDOMAIN, SERVFAIL, REFUSED, ...; every answer to a search-path expansion "
               "counts) and dropped DNS requests (reason dropped), by client namespace, as they come; failed "
               "lookups are flowpipe_dns_failed_lookups."),
    MetricSpec("dns_lookups", "counter", "flowpipe_observed_dns_lookups_total", ("cluster", "namespace"),
               "DNS requests by client namespace, as they come: requests seen by the DNS proxy (each name of a "
               "search path is one) plus dropped DNS requests; lookups are flowpipe_dns_lookups."),
    MetricSpec("policy_verdicts", "counter", "flowpipe_observed_policy_verdicts_total",
               ("cluster", "namespace", "direction", "verdict"),
               "Policy verdict events, by namespace of the enforcing endpoint, direction and verdict."),
    MetricSpec("world_flows", "counter", "flowpipe_observed_world_flows_total", ("cluster", "namespace", "verdict"),
               "Requests to the world identity (outside the cluster), by source namespace and verdict."),
    MetricSpec("unexpected_drops", "gauge", "flowpipe_unexpected_drops", ("cluster", "why"),
               "Dropped flows the latest run of the unexpected_drops question found, by cluster and why "
               "(every why exported, 0 when none)."),
    MetricSpec("expected_drops", "gauge", "flowpipe_expected_drops", ("cluster",),
               "Policy drops the same run classed as expected (traffic never seen delivered), by cluster."),
    MetricSpec("dns_question_lookups", "gauge", "flowpipe_dns_lookups", ("cluster", "namespace"),
               "DNS lookups the latest run of the dns_failures question counted over its window, by cluster and "
               "client namespace: a client's answers for one name across its search-path expansions are one "
               "lookup; requests without an answer and dropped DNS requests count too."),
    MetricSpec("dns_question_failed_lookups", "gauge", "flowpipe_dns_failed_lookups",
               ("cluster", "namespace", "reason"),
               "Failed DNS lookups the same run found, by cluster, client namespace and reason: the final "
               "name's rcode (NXDOMAIN answers to search-path expansions of a name that resolved are no "
               "failure), no_answer, dropped, or unresolved_final_not_seen (every name seen failed, the name "
               "itself was never seen). Every usual reason exported, 0 when none."),
    MetricSpec("question_runs", "counter", "flowpipe_question_runs_total", ("question", "outcome"),
               "Periodic question runs that refresh gauges, by question and outcome (ok, failed)."),
)
# fmt: on
"""Every metric family flowpipe exports, in README order."""

_BY_ATTR = {spec.attr: spec for spec in METRICS}

_PREINITIALIZED: dict[Role, dict[str, tuple[tuple[str, ...], ...]]] = {
    "collect": {
        "flows_dropped": (("decode_error", "false"), ("filter", "true")),
        "errors": (
            ("receiving", "decode_error"),
            ("receiving", "relay_unavailable"),
            ("sending", "write_failed"),
            ("processing", "query_failed"),
        ),
    },
    "dataset": {"errors": (("receiving", "read_failed"), ("processing", "query_failed"))},
}
"""Label sets exported at 0 from the start, so "none yet" reads as 0 rather than as a missing series."""


def metric_names(*, role: Role | None = None) -> frozenset[str]:
    """The exported family names (as written in PromQL: `_total` for counters); all roles when None."""
    return frozenset(s.name for s in METRICS if role is None or role in s.roles)


def series_names(*, role: Role | None = None) -> frozenset[str]:
    """Every name that can appear in a PromQL selector: families plus histogram `_bucket/_sum/_count`."""
    names = set(metric_names(role=role))
    for spec in METRICS:
        if spec.kind == "histogram" and (role is None or role in spec.roles):
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    return frozenset(names)


class BoundedLabel:
    """Admits at most `limit` distinct label values; later newcomers become `other`. Thread-safe.

    `known` values (an enum's names, a placeholder such as `unknown`) always keep their name and take no room:
    only values the code does not expect (a newer Hubble's enum name, or a flood of made-up ones) are counted.

    >>> reasons = BoundedLabel(2)
    >>> [reasons("a"), reasons("b"), reasons("c"), reasons("a")]
    ['a', 'b', 'other', 'a']
    """

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self.limit = limit
        self.known = frozenset(known)
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._admitted or value in self.known:
            return value
        with self._lock:
            if len(self._admitted) < self.limit:
                self._admitted.add(value)
                return value
        return OTHER

    def column(self, values: pa.Array) -> pa.Array:
        """`values` (strings, no nulls) with every value this label does not admit as `other`; vectorized: one
        call per distinct value, none per row."""
        distinct = pc.unique(values).to_pylist()
        kept = [value for value in distinct if self(value) == value]
        if len(kept) == len(distinct):
            return values
        return pc.if_else(pc.is_in(values, value_set=pa.array(kept, pa.string())), values, OTHER)


def _data_label_caps() -> dict[str, BoundedLabel]:
    """One cap per label whose values come from the flows (the namespace has its own, `NamespaceCap`)."""
    from flowpipe.transforms._enums import enum_names

    def names(enum: str) -> list[str]:
        return list(enum_names(enum).values())

    return {
        "verdict": BoundedLabel(MAX_ENUM_LABELS, [*names("Verdict"), UNKNOWN]),
        "direction": BoundedLabel(MAX_ENUM_LABELS, [*names("TrafficDirection"), NO_DIRECTION]),
        "source": BoundedLabel(
            MAX_ENUM_LABELS, [label_token(name.lower()) for name in names("LostEventSource")] + [UNKNOWN]
        ),
        "cluster": BoundedLabel(MAX_CLUSTER_LABELS, [NO_CLUSTER]),
    }


_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def label_token(value: object, *, default: str = UNKNOWN, max_length: int = 64) -> str:
    """A short label value from free text (never raw exception text): `decode error!` → `decode_error`."""
    text = _LABEL_SAFE.sub("_", str(value or "")).strip("_")[:max_length]
    return text or default


class _LiveState:
    """Moments and flags behind the scrape-time gauges (ingest lag, checkpoint age) and the readiness helpers.

    Both gauges are "now minus a moment"; computing them when scraped keeps them growing while nothing happens
    (a stalled stream shows as rising lag), and they are absent until the moment is first known.
    """

    def __init__(self, clock: Callable[[], float], include_checkpoint: bool) -> None:
        self.clock = clock
        self.newest_flow: float | None = None
        self.checkpoint: float | None = None
        self.last_flush: float | None = None
        self.connected = False
        self._include_checkpoint = include_checkpoint

    def describe(self) -> Iterable[Metric]:
        return list(self._families(describe=True))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(describe=False))

    def _families(self, *, describe: bool) -> Iterator[Metric]:
        now = self.clock()
        moments = [("ingest_lag", self.newest_flow)]
        if self._include_checkpoint:
            moments.append(("checkpoint_age", self.checkpoint))
        for attr, moment in moments:
            spec = _BY_ATTR[attr]
            if describe:
                yield GaugeMetricFamily(spec.name, spec.help)
            elif moment is not None:
                yield GaugeMetricFamily(spec.name, spec.help, value=max(0.0, now - moment))


def _epoch_seconds(moment: datetime | float) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


@dataclass(frozen=True, slots=True)
class PipelineMetrics:
    """Every instrument of flowpipe, created on one injected registry. See `METRICS` for names and meanings.

    >>> metrics = PipelineMetrics.create(CollectorRegistry())
    >>> metrics.observe_batch(batch)        # flows received by verdict, lost events, decode errors
    >>> metrics.record_flush(rows=5000, size_bytes=180_000, seconds=0.12, newest_flow_time=t)
    >>> metrics.set_connected(True)
    """

    registry: CollectorRegistry
    role: Role
    build_info: Info
    flows_received: Counter
    flows_written: Counter
    written_bytes: Counter
    batches_flushed: Counter
    flush_duration: Histogram
    relay_connected: Gauge
    relay_reconnects: Counter
    hubble_lost_events: Counter
    decode_errors: Counter
    flows_dropped: Counter
    errors: Counter
    parts_read: Counter
    observed_drops: Counter
    dns_responses: Counter
    dns_failures: Counter
    dns_lookups: Counter
    policy_verdicts: Counter
    world_flows: Counter
    unexpected_drops: Gauge
    expected_drops: Gauge
    dns_question_lookups: Gauge
    dns_question_failed_lookups: Gauge
    question_runs: Counter
    _times: _LiveState
    _nodes: BoundedLabel
    _reasons: BoundedLabel
    _caps: dict[str, BoundedLabel]
    _question_lock: threading.Lock
    _gate: _ZeroFirstGate | None = None

    @classmethod
    def create(
        cls,
        registry: CollectorRegistry,
        *,
        role: Role = "collect",
        clock: Callable[[], float] = time.time,
        zero_first: bool = False,
    ) -> PipelineMetrics:
        """Create every family on `registry`; only those of `role` are exported. `clock`: epoch seconds.

        `zero_first`: a new counter series is exported at 0 until the next scrape, and counts from then on
        (see the module docstring); `after_scrape()` releases what was held."""
        if role not in ROLES:
            raise ConfigError(f"metrics role must be one of {', '.join(ROLES)}, got {role!r}")
        built: dict[str, Any] = {}
        gate = _ZeroFirstGate() if zero_first else None
        for spec in METRICS:
            if spec.attr in ("ingest_lag", "checkpoint_age"):
                continue
            target = registry if role in spec.roles else None
            if spec.kind == "counter":
                built[spec.attr] = Counter(spec.name, spec.help, spec.labels, registry=target)
                if gate is not None and spec.labels:
                    built[spec.attr] = _ZeroFirstCounter(built[spec.attr], gate)
            elif spec.kind == "gauge":
                built[spec.attr] = Gauge(spec.name, spec.help, spec.labels, registry=target)
            elif spec.kind == "histogram":
                built[spec.attr] = Histogram(
                    spec.name, spec.help, spec.labels, registry=target, buckets=FLUSH_BUCKETS_SECONDS
                )
            else:
                built[spec.attr] = Info(spec.name.removesuffix("_info"), spec.help, registry=target)
        times = _LiveState(clock, include_checkpoint="collect" == role)
        registry.register(times)
        metrics = cls(
            registry=registry,
            role=role,
            _times=times,
            _nodes=BoundedLabel(MAX_NODE_LABELS),
            _reasons=BoundedLabel(MAX_REASON_LABELS),
            _caps=_data_label_caps(),
            _question_lock=threading.Lock(),
            _gate=gate,
            **built,
        )
        metrics.build_info.info({"version": __version__, "schema_version": SCHEMA_VERSION})
        for attr, label_sets in _PREINITIALIZED[role].items():
            for values in label_sets:
                getattr(metrics, attr).labels(*values)
        return metrics

    def bounded(self, label: str, values: pa.Array) -> pa.Array:
        """A column of values for `label` (`verdict`, `direction`, `source`, `cluster`) taken from the flows,
        capped as the namespace label is: newcomers past the label's limit become `other`."""
        return self._caps[label].column(values)

    # -- what the source delivered ----------------------------------------------------------------------

    def observe_batch(self, batch: EventBatch | pa.Table) -> None:
        """Count one batch: flows received by verdict; for an `EventBatch` also lost events, decode errors."""
        if isinstance(batch, EventBatch):
            self.observe_flows(batch.flows)
            self.record_lost_events(batch.lost_events)
            self.record_decode_errors(batch.decode_errors)
        else:
            self.observe_flows(batch)

    def observe_flows(self, table: pa.Table) -> None:
        """Count flows received, by verdict (one vectorized value count per batch, not per row)."""
        if table.num_rows == 0:
            return
        verdicts = self.bounded("verdict", pc.fill_null(table.column("verdict"), UNKNOWN))
        for item in pc.value_counts(verdicts).to_pylist():
            self.flows_received.labels(verdict=item["values"]).inc(item["counts"])

    def record_lost_events(self, events: Iterable[LostEvent]) -> None:
        """Count Hubble's own `lost_events` records by source (lower case, as Hubble's metric) and node."""
        for event in events:
            self.add_lost_events(event.source, event.node_name, event.num_events_lost)

    def add_lost_events(self, source: str | None, node: str | None, count: int) -> None:
        """Add `count` lost events for one source name (e.g. `HUBBLE_RING_BUFFER`) and node."""
        if count <= 0:
            return
        label = self._caps["source"](label_token((source or "").lower(), default=UNKNOWN))
        self.hubble_lost_events.labels(source=label, node=self._nodes(node or NO_NODE)).inc(count)

    def record_decode_errors(self, errors: Iterable[Exception]) -> None:
        """Count records that failed to decode, by their reason (`FlowDecodeError.reason`, else the type)."""
        for error in errors:
            reason = error.reason if isinstance(error, FlowDecodeError) else type(error).__name__
            self.decode_errors.labels(reason=self._reasons(label_token(reason))).inc()

    def record_dropped(self, count: int, *, reason: str, intentional: bool) -> None:
        """Count flows flowpipe itself discarded (a filter: intentional; a decode error: not)."""
        if count > 0:
            self.flows_dropped.labels(
                reason=self._reasons(label_token(reason)), intentional="true" if intentional else "false"
            ).inc(count)

    def record_error(self, stage: str, error_type: str) -> None:
        """Count an error at a stage (`receiving`, `processing`, `sending`) of a type from a small fixed set."""
        error_type = self._reasons(label_token(error_type))
        self.errors.labels(stage=label_token(stage), error_type=error_type).inc()

    # -- relay connection -------------------------------------------------------------------------------

    def set_connected(self, connected: bool) -> None:
        """Say whether the GetFlows stream is open."""
        self._times.connected = connected
        self.relay_connected.set(1 if connected else 0)

    def is_connected(self) -> bool:
        """What `set_connected` last said (False before the first call)."""
        return self._times.connected

    def seconds_since_flush(self) -> float | None:
        """Seconds since the last `record_flush` by the injected clock; None before the first flush."""
        last = self._times.last_flush
        return None if last is None else max(0.0, self._times.clock() - last)

    def record_reconnect(self) -> None:
        """Count one reconnection attempt after the stream broke."""
        self.relay_reconnects.inc()

    # -- what the sink made durable ---------------------------------------------------------------------

    def record_flush(
        self,
        rows: int,
        size_bytes: int,
        seconds: float,
        *,
        newest_flow_time: datetime | float | None = None,
    ) -> None:
        """Count one flush: `rows` flows in part files of `size_bytes` bytes, written in `seconds`.

        `newest_flow_time` (the latest `time` among the flushed flows, datetime or epoch seconds) moves the
        ingest lag; flows older than the newest seen so far do not move it back.
        """
        self._times.last_flush = self._times.clock()
        self.batches_flushed.inc()
        self.flows_written.inc(max(rows, 0))
        self.written_bytes.inc(max(size_bytes, 0))
        self.flush_duration.observe(max(seconds, 0.0))
        if newest_flow_time is not None:
            self.set_newest_flow_time(newest_flow_time)

    def set_newest_flow_time(self, moment: datetime | float | None) -> None:
        """Record the time of the newest flow written or read; the ingest lag is measured from it."""
        if moment is None:
            return
        value = _epoch_seconds(moment)
        if math.isfinite(value) and (self._times.newest_flow is None or value > self._times.newest_flow):
            self._times.newest_flow = value

    def observe_newest_flow(self, table: pa.Table) -> None:
        """Move the ingest lag to the newest `time` of a table of flows (vectorized max)."""
        if table.num_rows:
            newest = pc.max(table.column("time")).as_py()
            if newest is not None:
                self.set_newest_flow_time(newest)

    def record_checkpoint(self, at: datetime | float | None = None) -> None:
        """Record that the checkpoint was saved (now, by the injected clock, unless `at` is given)."""
        self._times.checkpoint = self._times.clock() if at is None else _epoch_seconds(at)

    # -- periodic questions -----------------------------------------------------------------------------

    def set_unexpected_drops(
        self, counts: Mapping[tuple[str, str], float], *, clusters: Iterable[str] = ()
    ) -> None:
        """Replace the question gauges with the latest unexpected_drops run: (cluster, why) → flows.

        Every cluster in `counts` or `clusters` gets every why of `UNEXPECTED_WHYS` (0 when absent) and an
        expected count; with no cluster at all, `NO_CLUSTER` stands for the (empty) answer. `why` expected
        goes to `flowpipe_expected_drops`."""
        unexpected: dict[tuple[str, str], float] = {}
        expected: dict[str, float] = {}
        cap = self._caps["cluster"]
        names = {cap(cluster or NO_CLUSTER) for cluster in clusters} | {
            cap(c or NO_CLUSTER) for c, _ in counts
        }
        for cluster in names or {NO_CLUSTER}:
            expected[cluster] = 0.0
            for why in UNEXPECTED_WHYS:
                unexpected[(cluster, why)] = 0.0
        for (cluster, why), value in counts.items():
            name = cap(cluster or NO_CLUSTER)
            if why == EXPECTED_WHY:
                expected[name] += float(value)
                continue
            key = (name, self._reasons(label_token(why)))
            unexpected[key] = unexpected.get(key, 0.0) + float(value)
        with self._question_lock:
            self.unexpected_drops.clear()
            self.expected_drops.clear()
            for (cluster, why), value in sorted(unexpected.items()):
                self.unexpected_drops.labels(cluster=cluster, why=why).set(value)
            for cluster, value in sorted(expected.items()):
                self.expected_drops.labels(cluster=cluster).set(value)

    def set_dns_lookups(
        self,
        lookups: Mapping[tuple[str, str], float],
        failed: Mapping[tuple[str, str, str], float],
        *,
        clusters: Iterable[str] = (),
    ) -> None:
        """Replace the DNS question gauges with the latest dns_failures run: (cluster, namespace) → lookups and
        (cluster, namespace, reason) → failed lookups, namespaces already capped by the caller.

        Every (cluster, namespace) in either mapping gets a lookup count and every reason of
        `DNS_FAILURE_REASONS` (0 when absent); a cluster in `clusters` without any namespace gets
        `NO_NAMESPACE` at 0, and with no cluster at all `NO_CLUSTER` stands for the (empty) answer."""
        cap = self._caps["cluster"]
        counts: dict[tuple[str, str], float] = {}
        for (cluster, namespace), value in lookups.items():
            key = (cap(cluster or NO_CLUSTER), namespace or NO_NAMESPACE)
            counts[key] = counts.get(key, 0.0) + float(value)
        failures: dict[tuple[str, str, str], float] = {}
        for (cluster, namespace, reason), value in failed.items():
            key = (cap(cluster or NO_CLUSTER), namespace or NO_NAMESPACE, self._reasons(label_token(reason)))
            counts.setdefault(key[:2], 0.0)
            failures[key] = failures.get(key, 0.0) + float(value)
        named = {cluster for cluster, _ in counts}
        wanted = {cap(cluster or NO_CLUSTER) for cluster in clusters} or (
            {NO_CLUSTER} if not named else set()
        )
        for cluster in wanted - named:
            counts[(cluster, NO_NAMESPACE)] = 0.0
        for cluster, namespace in counts:
            for reason in DNS_FAILURE_REASONS:
                failures.setdefault((cluster, namespace, reason), 0.0)
        with self._question_lock:
            self.dns_question_lookups.clear()
            self.dns_question_failed_lookups.clear()
            for (cluster, namespace), value in sorted(counts.items()):
                self.dns_question_lookups.labels(cluster=cluster, namespace=namespace).set(value)
            for (cluster, namespace, reason), value in sorted(failures.items()):
                self.dns_question_failed_lookups.labels(
                    cluster=cluster, namespace=namespace, reason=reason
                ).set(value)

    def after_scrape(self) -> None:
        """Called after each scrape: series shown at 0 start counting (see `zero_first`)."""
        if self._gate is not None:
            self._gate.release()

    def record_question_run(self, question: str, *, ok: bool) -> None:
        """Count a periodic question run and its outcome."""
        self.question_runs.labels(question=label_token(question), outcome="ok" if ok else "failed").inc()

    def record_part_read(self, table: str, *, ok: bool) -> None:
        """Count one dataset part file read by serve-metrics."""
        self.parts_read.labels(table=label_token(table), outcome="ok" if ok else "failed").inc()


class _ZeroFirstGate:
    """Series created since the last scrape, and what they counted meanwhile (held until they were shown at 0)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shown: set[tuple[int, tuple[str, ...]]] = set()
        self.held: dict[tuple[int, tuple[str, ...]], tuple[Any, float]] = {}

    def inc(self, family: Counter, values: tuple[str, ...], amount: float) -> None:
        key = (id(family), values)
        child = family.labels(*values)
        with self.lock:
            if key not in self.shown:
                _, pending = self.held.get(key, (child, 0.0))
                self.held[key] = (child, pending + amount)
                return
        child.inc(amount)

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, {}
            self.shown.update(held)
        for child, amount in held.values():
            if amount:
                child.inc(amount)


class _ZeroFirstChild:
    def __init__(self, gate: _ZeroFirstGate, family: Counter, values: tuple[str, ...]) -> None:
        self._gate, self._family, self._values = gate, family, values

    def inc(self, amount: float = 1.0) -> None:
        self._gate.inc(self._family, self._values, amount)


class _ZeroFirstCounter:
    """A labelled counter family whose new series are exported at 0 for one scrape before they count."""

    def __init__(self, family: Counter, gate: _ZeroFirstGate) -> None:
        self._family, self._gate = family, gate
        self._labelnames: tuple[str, ...] = tuple(family._labelnames)

    def labels(self, *values: str, **named: str) -> _ZeroFirstChild:
        if named:
            values = tuple(named[name] for name in self._labelnames)
        labels = tuple(str(v) for v in values)
        self._family.labels(*labels)  # the series exists from now on, at 0
        return _ZeroFirstChild(self._gate, self._family, labels)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)


# -- the HTTP endpoint ------------------------------------------------------------------------------------


class _WithoutCreated:
    """A view of a registry without the `_created` samples prometheus_client adds to counters and histograms.

    They double the series count and no flowpipe dashboard or alert uses them.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            trimmed = copy.copy(family)
            trimmed.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield trimmed


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format, as served on `/metrics`."""
    return generate_latest(_WithoutCreated(registry))


def parse_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all interfaces) → (host, port); `ConfigError` when malformed.

    >>> parse_address("127.0.0.1:9966")
    ('127.0.0.1', 9966)
    """
    text = address.strip()
    match = re.fullmatch(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]*):(?P<port2>\d+)", text)
    if match is None:
        raise ConfigError(
            f"metrics address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9966 or 0.0.0.0:9966)"
        )
    host = match["v6"] if match["v6"] is not None else (match["host"] or "0.0.0.0")
    port = int(match["port"] if match["port"] is not None else match["port2"])
    if port > 65535:
        raise ConfigError(f"metrics address {address!r}: port {port} is out of range")
    return host, port


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        server_address: tuple[str, int],
        registry: CollectorRegistry,
        ready: Callable[[], bool] | None,
        after_scrape: Callable[[], None] | None = None,
    ) -> None:
        if ":" in server_address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(server_address, _Handler)
        self.registry = registry
        self.ready = ready
        self.after_scrape = after_scrape


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "flowpipe"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = render(self.server.registry)
            # released once rendered, before the answer leaves: a scrape that follows at once sees the counts
            if not head and self.server.after_scrape is not None:
                self.server.after_scrape()
            self._send(200, body, CONTENT_TYPE_PLAIN_0_0_4, head)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
        elif path == "/readyz":
            ready = self._is_ready()
            self._send(
                200 if ready else 503,
                b"ready\n" if ready else b"not ready\n",
                "text/plain; charset=utf-8",
                head,
            )
        elif path == "/":
            body = b"flowpipe: /metrics /healthz /readyz\n"
            self._send(200, body, "text/plain; charset=utf-8", head)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", head)

    def _is_ready(self) -> bool:
        check = self.server.ready
        if check is None:
            return True
        try:
            return bool(check())
        except Exception:  # a failing check means "not ready", never a crashed handler
            log.exception("readiness check failed")
            return False

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """A running `/metrics` server; `close()` stops it. Usable as a context manager."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.host: str = str(host)
        self.port: int = int(port)

    @property
    def url(self) -> str:
        """The base URL, e.g. `http://127.0.0.1:9966`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    registry: CollectorRegistry,
    address: str | tuple[str, int],
    *,
    ready: Callable[[], bool] | None = None,
    health: Callable[[], bool] | None = None,
    after_scrape: Callable[[], None] | None = None,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on a daemon thread; port 0 picks a free port.

    `ready` (alias `health`) answers `/readyz`: 200 while it returns true, else 503 (no callable: always
    ready). `/healthz` answers 200 whenever the process serves HTTP. `after_scrape` is called after each
    `/metrics` response (`PipelineMetrics.after_scrape`). Raises `ConfigError` when the address is malformed or
    cannot be bound.

    >>> server = serve(registry, "127.0.0.1:0", ready=metrics.is_connected)
    >>> server.url                                  # doctest: +SKIP
    'http://127.0.0.1:40123'
    """
    host, port = parse_address(address) if isinstance(address, str) else address
    try:
        httpd = _Server((host, port), registry, ready if ready is not None else health, after_scrape)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    thread = threading.Thread(target=httpd.serve_forever, name="flowpipe-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)

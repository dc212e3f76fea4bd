"""The Prometheus sink: flow analytics counters (drops, DNS, policy verdicts, world traffic), bounded labels.

Each batch of flow rows (`FLOW_SCHEMA`) updates the analytics families of `flowpipe.metrics.families.PipelineMetrics`
with a handful of vectorized `pyarrow.compute` passes and counts of label combinations (`_Groups`: each label
column dictionary-encoded once a batch, combinations counted with numpy; Arrow's group-by costs about a
millisecond a call, as much as the rest of the sink together on a batch of a few thousand flows): the Python
work per batch is one loop over the *groups* (bounded by the label sets), never over rows.

Which namespace a flow counts for:

- drops and policy verdicts count for the **enforcing endpoint**: the source for egress, the destination for
  ingress, swapped for reply packets (a reply travelling back to a client is still that client's egress
  connection). Without a direction: the source of a request, the destination of a reply.
- DNS and world traffic count for the **client**: the source of a request, the destination of a response.
- No namespace (world, host, remote node): `NO_NAMESPACE`; no traffic direction: `NO_DIRECTION`.

The sink counts as the questions do where a flow says enough: a drop is a drop notification (the policy-verdict
event Cilium sends for the same denied packet is counted by `flowpipe_observed_policy_verdicts_total`, not again
as a drop). DNS is counted as it comes: requests seen by the DNS proxy plus dropped DNS requests, error answers
plus dropped requests. Lookups need the whole window (a lookup's search-path expansions, unanswered requests):
the `dns_failures` question counts them, and `flowpipe.metrics.questions` exports its answer as
`flowpipe_dns_lookups` and `flowpipe_dns_failed_lookups`.

Namespaces are capped (`NamespaceCap`): the first `max_namespaces` namespaces seen get their own label value,
largest first within each batch (so the initial read of a dataset ranks them by volume); later newcomers are
counted as `other`. A namespace keeps its label for the life of the process, as counters require.
Every other label taken from the flows is capped too (`PipelineMetrics.bounded`): verdict and direction keep
their enum names and admit `MAX_ENUM_LABELS` names flowpipe does not know, the cluster `MAX_CLUSTER_LABELS`
names; past that, `other`. Made-up values in the data never grow the number of series without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.drop_reasons import UNKNOWN_CLASS, class_lookup_keys
from flowpipe.metrics.families import NO_CLUSTER, NO_DIRECTION, NO_NAMESPACE, OTHER, UNKNOWN, PipelineMetrics
from flowpipe.model import FLOW_SCHEMA, EventBatch
from flowpipe.sinks import Ack

log = logging.getLogger(__name__)

DEFAULT_MAX_NAMESPACES = 50
POLICY_VERDICT_EVENT = 5
"""`Flow.event_type.type` of a policy verdict notification (hubble-api.md section 7)."""
DNS_PORT = 53
WORLD_LABELS = ("reserved:world", "reserved:world-ipv4", "reserved:world-ipv6")
WORLD_IDENTITIES = (2, 9, 10)
"""Reserved identities of the world (world, world-ipv4, world-ipv6)."""
LOCAL_IDENTITY_MIN = 1 << 24
"""Identities from here on are node-local (CIDR, FQDN selectors): their labels say whether it is the world."""
DROPPED_DNS = "dropped"
"""`reason` of `flowpipe_observed_dns_failures_total` for DNS requests that Cilium dropped."""

DNS_RCODE_NAMES: Mapping[int, str] = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
}
"""DNS rcode → name (RFC 1035, 2136); any other rcode is labelled `other`."""

ANALYTICS_COLUMNS: tuple[str, ...] = (
    "cluster_name",
    "verdict",
    "drop_reason",
    "drop_reason_desc",
    "event_type",
    "traffic_direction",
    "is_reply",
    "source_namespace",
    "destination_namespace",
    "destination_identity",
    "destination_labels",
    "l4_protocol",
    "destination_port",
    "l7_type",
    "l7_protocol",
    "dns_rcode",
)
"""The flow-table columns the sink reads (readers of part files can read just these)."""

_REASON_KEYS, _REASON_CLASSES = class_lookup_keys()
_REASON_KEY_SET = pa.array(_REASON_KEYS, pa.string())
_REASON_CLASS_ARRAY = pa.array(_REASON_CLASSES, pa.string())
_RCODE_SET = pa.array(list(DNS_RCODE_NAMES), pa.int32())
_WORLD_IDENTITY_SET = pa.array(WORLD_IDENTITIES, pa.int64())
_WORLD_LABEL_SET = pa.array(WORLD_LABELS, pa.string())
_RCODE_NAMES = pa.array(list(DNS_RCODE_NAMES.values()), pa.string())


class NamespaceCap:
    """Bounds the namespace label: at most `limit` namespaces keep their name, the rest become `other`."""

    def __init__(self, limit: int = DEFAULT_MAX_NAMESPACES) -> None:
        if limit < 0:
            raise ValueError(f"namespace limit must be >= 0, got {limit}")
        self.limit = limit
        self._admitted: set[str] = set()
        self._known = pa.array([], pa.string())
        self._lock = threading.Lock()

    @property
    def admitted(self) -> frozenset[str]:
        """The namespaces that have their own label value."""
        return frozenset(self._admitted)

    def apply(self, *columns: pa.Array) -> list[pa.Array]:
        """Admit newcomers (largest first) while there is room, then fold the others into `other`."""
        with self._lock:
            if len(self._admitted) < self.limit:
                self._admit(pa.concat_arrays(list(columns)) if len(columns) > 1 else columns[0])
            known = self._known
        folded = []
        for column in columns:
            keep = pc.or_(pc.is_in(column, value_set=known), pc.equal(column, ""))
            folded.append(pc.if_else(keep, column, OTHER))
        return folded

    def _admit(self, values: pa.Array) -> None:
        counts = pc.value_counts(values).to_pylist()
        newcomers = [
            (c["counts"], c["values"]) for c in counts if c["values"] and c["values"] not in self._admitted
        ]
        newcomers.sort(key=lambda item: (-item[0], item[1]))
        room = self.limit - len(self._admitted)
        if newcomers and room > 0:
            self._admitted.update(name for _, name in newcomers[:room])
            self._known = pa.array(sorted(self._admitted), pa.string())


def _column(table: pa.Table, name: str) -> pa.Array:
    """One column as a single array; all nulls when an older part file lacks it."""
    index = table.schema.get_field_index(name)  # (`column_names` builds a list of every name: ~30 µs a call)
    if index >= 0:
        column = table.column(index)
        if isinstance(column, pa.ChunkedArray):  # (one chunk: that chunk, where combining copies it)
            return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        return column
    return pa.nulls(table.num_rows, FLOW_SCHEMA.field(name).type)


class _Groups:
    """Counts the rows of one batch per combination of label columns; each column is encoded once per batch
    (`pc.dictionary_encode`, nulls as a value of their own) however many counts use it."""

    _DENSE_LIMIT = 1 << 62
    _BINCOUNT_LIMIT = 1 << 16

    def __init__(self) -> None:
        self._encoded: dict[int, tuple[pa.Array, np.ndarray, list[Any]]] = {}

    def _codes(self, column: pa.Array) -> tuple[np.ndarray, list[Any]]:
        found = self._encoded.get(id(column))
        if found is None or found[0] is not column:
            encoded = pc.dictionary_encode(column, null_encoding="encode")
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            found = (column, codes, encoded.dictionary.to_pylist())  # (the column kept: its id stays its own)
            self._encoded[id(column)] = found
        return found[1], found[2]

    def count(self, columns: Mapping[str, pa.Array], mask: pa.Array | None = None) -> list[dict[str, Any]]:
        """Rows per distinct combination of `columns` (where `mask` is true): [{col: value, ..., "count": n}]."""
        coded = [self._codes(column) for column in columns.values()]
        key: np.ndarray | None = None
        size = 1
        renumbered = False
        for codes, values in coded:
            if key is None:
                key, size = codes, len(values)
                continue
            if size * len(values) >= self._DENSE_LIMIT:  # renumber the combinations so far: no overflow
                renumbered = True
                key = np.unique(key, return_inverse=True)[1].astype(np.int64)
                size = int(key.max()) + 1 if len(key) else 1
            key, size = key * len(values) + codes, size * len(values)
        if key is None:
            return []
        rows = None
        if mask is not None:
            rows = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
            key = key[rows]
        if not len(key):
            return []
        names = list(columns)
        if not renumbered and size <= self._BINCOUNT_LIMIT:
            # few combinations (the usual case): counted by number, and each one's values read off its number
            counts = np.bincount(key, minlength=size)
            found = np.flatnonzero(counts)
            result = []
            for combination, n in zip(found.tolist(), counts[found].tolist(), strict=True):
                values_of: list[Any] = []
                for _, values in reversed(coded):
                    combination, code = divmod(combination, len(values))
                    values_of.append(values[code])
                result.append({**dict(zip(names, reversed(values_of), strict=True)), "count": n})
            return result
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        if rows is not None:
            first = rows[first]
        return [
            {
                **{name: values[codes[row]] for name, (codes, values) in zip(names, coded, strict=True)},
                "count": n,
            }
            for row, n in zip(first.tolist(), counts.tolist(), strict=True)
        ]


def _labels(row: Mapping[str, Any]) -> list[str]:
    """The label values of a `_Groups.count` row, in the order of its columns (the count left out)."""
    return [value for key, value in row.items() if key != "count"]


def _is_true(values: pa.Array) -> pa.Array:
    return pc.fill_null(values, False)


class PrometheusSink:
    """Updates the flow-analytics counters from each batch; keeps nothing, so every batch is durable at once.

    >>> sink = PrometheusSink(PipelineMetrics.create(registry), max_namespaces=50)
    >>> sink.write(batch)         # an EventBatch or a FLOW_SCHEMA table
    Ack(batches=1, flows=0, files=())
    """

    name = "prometheus"

    def __init__(self, metrics: PipelineMetrics, *, max_namespaces: int = DEFAULT_MAX_NAMESPACES) -> None:
        self.metrics = metrics
        self.namespaces = NamespaceCap(max_namespaces)
        self._batches = 0

    def write(self, batch: EventBatch | pa.Table) -> Ack | None:
        """Count the analytics of one batch and acknowledge it (and every batch before it)."""
        self.observe(batch.flows if isinstance(batch, EventBatch) else batch)
        self._batches += 1
        return Ack(batches=self._batches)

    def poll(self) -> Ack | None:
        """Nothing is buffered: no-op."""
        return None

    def flush(self) -> Ack | None:
        """Nothing is buffered: no-op."""
        return None

    def close(self) -> Ack | None:
        """Nothing to release."""
        return None

    def observe(self, table: pa.Table) -> None:
        """Update drops, DNS, policy-verdict and world-traffic counters from a table of flow rows."""
        n = table.num_rows
        if n == 0:
            return
        verdict = pc.fill_null(_column(table, "verdict"), UNKNOWN)
        # every label taken from the flows is capped (a flood of made-up names is `other`, not new series)
        verdict_label = self.metrics.bounded("verdict", verdict)
        direction = _column(table, "traffic_direction")
        l7_type = _column(table, "l7_type")
        reply = _is_true(pc.coalesce(_column(table, "is_reply"), pc.equal(l7_type, "RESPONSE")))
        source_ns = pc.fill_null(_column(table, "source_namespace"), "")
        destination_ns = pc.fill_null(_column(table, "destination_namespace"), "")

        # The enforcing endpoint is on the source side for egress requests and ingress replies.
        egress = pc.equal(direction, "EGRESS")
        enforcing_is_source = pc.if_else(pc.is_null(direction), pc.invert(reply), pc.xor(egress, reply))
        enforcing_ns = pc.if_else(_is_true(enforcing_is_source), source_ns, destination_ns)
        client_ns = pc.if_else(reply, destination_ns, source_ns)
        groups = _Groups()
        enforcing_ns, client_ns = (
            pc.if_else(pc.equal(column, ""), NO_NAMESPACE, column)
            for column in self.namespaces.apply(enforcing_ns, client_ns)
        )
        direction_label = self.metrics.bounded("direction", pc.fill_null(direction, NO_DIRECTION))
        # Every analytics family is per cluster: several clusters in one dataset (or one Prometheus) stay apart.
        cluster = pc.fill_null(_column(table, "cluster_name"), NO_CLUSTER)
        cluster = self.metrics.bounded("cluster", pc.if_else(pc.equal(cluster, ""), NO_CLUSTER, cluster))

        event_type = _column(table, "event_type")
        is_verdict_event = _is_true(pc.equal(event_type, POLICY_VERDICT_EVENT))
        # A policy verdict event repeats the drop notification of the same packet: a drop is counted once.
        dropped = pc.and_(pc.equal(verdict, "DROPPED"), pc.invert(is_verdict_event))
        self._count_drops(groups, table, dropped, cluster, enforcing_ns, direction_label)
        self._count_dns(groups, table, dropped, reply, l7_type, cluster, client_ns)
        labels = {
            "cluster": cluster,
            "namespace": enforcing_ns,
            "direction": direction_label,
            "verdict": verdict_label,
        }
        for row in groups.count(labels, is_verdict_event):
            self.metrics.policy_verdicts.labels(*_labels(row)).inc(row["count"])
        # Likewise the trace event of a forwarded packet: count the packet once.
        requests = pc.and_(pc.invert(reply), pc.invert(is_verdict_event))
        world = self._to_world(table, requests)
        for row in groups.count(
            {"cluster": cluster, "namespace": client_ns, "verdict": verdict_label}, world
        ):
            self.metrics.world_flows.labels(*_labels(row)).inc(row["count"])

    def _count_drops(
        self,
        groups: _Groups,
        table: pa.Table,
        dropped: pa.Array,
        cluster: pa.Array,
        namespace: pa.Array,
        direction: pa.Array,
    ) -> None:
        if not pc.any(dropped).as_py():
            return
        # Classify only the dropped rows: drops are a small part of most traffic.
        number = pc.filter(_column(table, "drop_reason"), dropped)
        number_text = pc.if_else(pc.not_equal(number, 0), pc.cast(number, pa.string()), None)
        key = pc.coalesce(pc.filter(_column(table, "drop_reason_desc"), dropped), number_text)
        reason_class = pc.fill_null(
            pc.take(_REASON_CLASS_ARRAY, pc.index_in(key, value_set=_REASON_KEY_SET)), UNKNOWN_CLASS
        )
        labels = {
            "cluster": pc.filter(cluster, dropped),
            "namespace": pc.filter(namespace, dropped),
            "direction": pc.filter(direction, dropped),
            "reason_class": reason_class,
        }
        for row in groups.count(labels):
            self.metrics.observed_drops.labels(*_labels(row)).inc(row["count"])

    def _count_dns(
        self,
        groups: _Groups,
        table: pa.Table,
        dropped: pa.Array,
        reply: pa.Array,
        l7_type: pa.Array,
        cluster: pa.Array,
        client_ns: pa.Array,
    ) -> None:
        l7_dns = _is_true(pc.equal(_column(table, "l7_protocol"), "dns"))
        rcode = _column(table, "dns_rcode")
        responses = pc.and_(pc.and_(l7_dns, _is_true(pc.equal(l7_type, "RESPONSE"))), pc.is_valid(rcode))
        if pc.any(responses).as_py():
            rcode_name = pc.fill_null(pc.take(_RCODE_NAMES, pc.index_in(rcode, value_set=_RCODE_SET)), OTHER)
            labels = {"cluster": cluster, "namespace": client_ns, "rcode": rcode_name}
            for row in groups.count(labels, responses):
                self.metrics.dns_responses.labels(*_labels(row)).inc(row["count"])
                if row["rcode"] != "NOERROR":
                    self.metrics.dns_failures.labels(*_labels(row)).inc(row["count"])
        # A dropped DNS request: an L7 DNS record, or an L3/L4 packet to port 53 over UDP or TCP.
        port_53 = pc.and_(
            _is_true(pc.equal(_column(table, "destination_port"), DNS_PORT)),
            _is_true(pc.is_in(_column(table, "l4_protocol"), value_set=pa.array(["UDP", "TCP"]))),
        )
        dropped_dns = pc.and_(pc.and_(dropped, pc.invert(reply)), pc.or_(l7_dns, port_53))
        for row in groups.count({"cluster": cluster, "namespace": client_ns}, dropped_dns):
            self.metrics.dns_failures.labels(row["cluster"], row["namespace"], DROPPED_DNS).inc(row["count"])
        # DNS requests: those the DNS proxy saw, plus DNS requests dropped below it.
        proxied = pc.and_(l7_dns, _is_true(pc.equal(l7_type, "REQUEST")))
        lookups = pc.or_(proxied, pc.and_(dropped_dns, pc.invert(l7_dns)))
        for row in groups.count({"cluster": cluster, "namespace": client_ns}, lookups):
            self.metrics.dns_lookups.labels(*_labels(row)).inc(row["count"])

    @staticmethod
    def _to_world(table: pa.Table, candidates: pa.Array) -> pa.Array:
        """True where a candidate row goes to the world: a world identity or a `reserved:world*` label."""
        identity = _column(table, "destination_identity")
        by_identity = pc.and_(candidates, _is_true(pc.is_in(identity, value_set=_WORLD_IDENTITY_SET)))
        # Labels are only needed where the identity does not say: none, or a local (CIDR) identity.
        unclear = pc.or_(pc.is_null(identity), _is_true(pc.greater_equal(identity, LOCAL_IDENTITY_MIN)))
        rows = pc.indices_nonzero(pc.and_(candidates, unclear))
        if len(rows) == 0:
            return by_identity
        labels = pc.take(_column(table, "destination_labels"), rows)
        hits = pc.filter(
            pc.list_parent_indices(labels), pc.is_in(pc.list_flatten(labels), value_set=_WORLD_LABEL_SET)
        )
        by_label = np.zeros(table.num_rows, dtype=bool)
        by_label[pc.take(rows, hits).to_numpy()] = True
        return pc.or_(by_identity, pa.array(by_label))

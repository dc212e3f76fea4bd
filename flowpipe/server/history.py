"""The Observer API over a stored dataset: `flowpipe serve-hubble`, so Hubble clients read days of history.

`HistoryServer` answers `observer.Observer` like hubble-relay, from the Parquet dataset instead of ring buffers::

    with HistoryServer("flowpipe-data", port=0) as server:     # 127.0.0.1, a free port
        channel = grpc.insecure_channel(server.address)
        ...

GetFlows, per request:

- the part files are listed afresh (without the inputs a compaction already merged, so a flow is served once
  while `compact` or `retention` run) and only the `date=/hour=` partitions that overlap `since`/`until` are read;
- the time window and the filters DuckDB can evaluate (namespace, pod, verdict, IP, port, protocol, labels,
  node) go into the SQL as bound parameters, a superset of the answer; every flow read is then checked by the
  same FlowFilter matcher the built-in server uses, so the answer is exactly Hubble's;
- the result is read in batches of `BATCH_ROWS` rows, at most `PREFETCH_BATCHES` of them ahead of the one
  being sent (DuckDB reads on one thread of the call, another encodes, the event loop sends, all at once;
  HTTP/2 flow control holds the send): memory stays bounded whatever the window, and a client that stops
  reading stops the read;
- `number` gives the last N flows in time order (the first N with `first`, or from `since`) across all nodes;
  no `number` gives the whole window; `follow` goes on with flows from part files published later;
- `lost_events` records of the window are sent in time order among the flows.

FlowFilter fields over what the table does not keep (HTTP headers, trace ids, interfaces, node labels,
translated source IPs, service namespaces, endpoint cluster names, CEL) are refused with UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import duckdb
import grpc
import numpy as np
import pyarrow as pa
from google.protobuf import wrappers_pb2

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe._proto.relay import relay_pb2
from flowpipe._resources import spill_directory
from flowpipe.dataset.layout import FLOWS_TABLE, Dataset
from flowpipe.dataset.visible import is_compacted_name, read_compacted_inputs, visible_part_files
from flowpipe.errors import ConfigError, FlowpipeError, ObserverServerError, QueryError
from flowpipe.model import FLOW_SCHEMA
from flowpipe.query.engine import (
    FLOWS_VIEW,
    MAX_ATTEMPTS,
    DuckDBEngine,
    _maybe_vanished,
    translate_duckdb_errors,
)
from flowpipe.server._http2 import GrpcAbort, GrpcServer, RpcMethod, ServerStream
from flowpipe.server.buffer import envelope_tail, frame_message, varint
from flowpipe.server.fieldmask import MaskPlan, apply_field_mask, compile_field_mask
from flowpipe.server.filters import FlowMatcher, MessageRecord, NodeMatcher, parse_pod_filter
from flowpipe.server.frames import Frames, empty_frames, interleave
from flowpipe.server.health import HealthService
from flowpipe.server.hour_merge import HourMerge, MergeFallback
from flowpipe.server.observer import DEFAULT_RELAY_NAME, DEFAULT_VERSION, _decode, _timestamp_ns
from flowpipe.server.reflection import ReflectionService
from flowpipe.server.tls import ServerTLSConfig
from flowpipe.transforms.flow_responses import encode_framed
from flowpipe.transforms.to_flow import enum_number, served_node_name

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_ROWS = 2048
"""Rows read from the dataset at a time (the next batch is read once the client took this one)."""

MERGED_ROWS = 4096
"""Rows of a merged hour read from each part file and handed on at a time: each is encoded in one go (fewer,
larger steps of Arrow compute and protobuf encoding)."""

PREFETCH_BATCHES = 2
"""Batches read and encoded ahead of the one being sent (so that reading, encoding and sending overlap); no more
are ever held."""

FIRST_ROWS = 256
"""Rows of the first batch handed on (then 4x more each time up to BATCH_ROWS): the first flow goes out sooner."""

SLICE_ROWS = 20_000
"""About this many flows are sorted at a time (an hour partition is read in slices of its time range)."""

FIRST_SLICE_ROWS = 4096
"""About this many flows are sorted in the first slice of an answer read oldest first (the rest of its hour is
merged)."""

DUCKDB_MEMORY_LIMIT = "64MB"
"""DuckDB's memory per request; sorting an hour larger than that spills to its temporary folder."""

_DUCKDB_SETTINGS = {
    "threads": "1",
    "streaming_buffer_size": "1MB",
    "disable_parquet_prefetching": "true",
    "allocator_flush_threshold": "8MB",
    "allocator_bulk_deallocation_flush_threshold": "8MB",
}

DEFAULT_FOLLOW_INTERVAL = 1.0
"""Seconds between two listings of the dataset while following."""

_STREAM_VIEW = "flows_stream"
_SERVICE = "/observer.Observer/"
_PARTITION = re.compile(r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")
_HOUR_NS = 3_600_000_000_000
_EVERYTHING = 1 << 32  # a `number` this large means every flow (`hubble observe --all` sends 2^64-1)
_MAX_LOST_EVENTS = 100_000  # lost_events records sent with one answer (the table is small: one per loss)

# FlowFilter fields over data the flow table does not keep: refused, never ignored.
_UNKEPT_FILTER_FIELDS = {
    "source_service": "service namespaces",
    "destination_service": "service namespaces",
    "source_cluster_name": "endpoint cluster names",
    "destination_cluster_name": "endpoint cluster names",
    "http_header": "HTTP headers",
    "trace_id": "trace contexts",
    "source_ip_xlated": "translated source addresses",
    "interface": "interfaces",
    "node_labels": "node labels",
    "ip_trace_id": "IP trace ids",
}


def _unsupported_filters(filters: Sequence[flow_pb2.FlowFilter], kind: str) -> None:
    for i, flt in enumerate(filters):
        for name, what in _UNKEPT_FILTER_FIELDS.items():
            if len(getattr(flt, name)):
                raise GrpcAbort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{kind}[{i}].{name}: the stored flows do not keep {what}, so this filter cannot be answered",
                )
        if flt.HasField("experimental") and flt.experimental.cel_expression:
            raise GrpcAbort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{kind}[{i}].experimental.cel_expression: CEL is not supported",
            )


# -- pushdown ----------------------------------------------------------------------------------------------


class _Sql:
    """WHERE clauses with their bound parameters (`$p0`, `$p1`, ...)."""

    def __init__(self) -> None:
        self.params: dict[str, object] = {}

    def bind(self, value: object) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"${name}"


_L4_PROTOCOLS = {
    "tcp": ["TCP"], "udp": ["UDP"], "sctp": ["SCTP"], "icmp": ["ICMPv4", "ICMPv6"], "icmpv4": ["ICMPv4"],
    "icmpv6": ["ICMPv6"], "vrrp": ["VRRP"], "igmp": ["IGMP"],
}  # fmt: skip
_L7_PROTOCOLS = {"dns": "dns", "http": "http", "kafka": "kafka"}


def _filter_sql(flt: flow_pb2.FlowFilter, sql: _Sql) -> str | None:
    """A predicate true for every flow `flt` accepts (looser is fine: the matcher decides); None: no pushdown."""
    terms: list[str] = []
    for side in ("source", "destination"):
        pods = [parse_pod_filter(p) for p in getattr(flt, f"{side}_pod")]
        if pods:
            ors = []
            for namespace, prefix in pods:
                parts = []
                if namespace:
                    parts.append(f"{side}_namespace = {sql.bind(namespace)}")
                if prefix:
                    parts.append(f"starts_with({side}_pod_name, {sql.bind(prefix)})")
                ors.append(" AND ".join(parts) if parts else f"{side}_pod_name IS NOT NULL")
            terms.append("(" + " OR ".join(ors) + ")")
        ips = list(getattr(flt, f"{side}_ip"))
        if ips and all("/" not in ip for ip in ips):
            try:
                values = [str(ipaddress.ip_address(ip)) for ip in ips]
            except ValueError:
                values = []  # the matcher reports it
            if values:
                terms.append(f"{side}_ip IN ({', '.join(sql.bind(v) for v in values)})")
        ports = [p for p in getattr(flt, f"{side}_port") if p.isdigit()]
        if ports and len(ports) == len(getattr(flt, f"{side}_port")):
            terms.append(f"{side}_port IN ({', '.join(sql.bind(int(p)) for p in ports)})")
        labels = list(getattr(flt, f"{side}_label"))
        if labels and all(_plain_label(label) for label in labels):
            # key=value selectors: the stored label "source:key=value" ends with "key=value".
            ors = [
                f"len(list_filter({side}_labels, x -> x = {sql.bind(label)}"
                f" OR ends_with(x, {sql.bind(':' + label)}))) > 0"
                for label in labels
            ]
            terms.append("(" + " OR ".join(ors) + ")")
    if flt.verdict:
        names = [flow_pb2.Verdict.Name(v) for v in flt.verdict if v in flow_pb2.Verdict.values()]
        if len(names) == len(flt.verdict):
            terms.append(f"verdict IN ({', '.join(sql.bind(n) for n in names)})")
    if flt.protocol:
        l4: list[str] = []
        l7: list[str] = []
        for name in flt.protocol:
            l4.extend(_L4_PROTOCOLS.get(name.lower(), []))
            if name.lower() in _L7_PROTOCOLS:
                l7.append(_L7_PROTOCOLS[name.lower()])
        if len(l4) + len(l7) >= len(flt.protocol):
            ors = []
            if l4:
                ors.append(f"l4_protocol IN ({', '.join(sql.bind(n) for n in l4)})")
            if l7:
                ors.append(f"l7_protocol IN ({', '.join(sql.bind(n) for n in l7)})")
            terms.append("(" + " OR ".join(ors) + ")")
    if flt.uuid:
        terms.append(f"uuid IN ({', '.join(sql.bind(u) for u in flt.uuid)})")
    return " AND ".join(terms) if terms else None


def _plain_label(label: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_.\-/]+=[A-Za-z0-9_.\-/]*", label))


# -- reading the dataset -----------------------------------------------------------------------------------


class _WindowEngine(DuckDBEngine):
    """A DuckDBEngine whose `flows` view covers only the hour partitions overlapping [since, until].

    `only`: read just these part files of `flows` (the ones a follower has not read yet). `listed` keeps the
    whole listing of `flows` the view was built from (what a follower has then seen). `flows` covers no part
    file until `define_flows` names some (a reader reads an hour at a time), or all of the window's with `whole`.
    """

    def __init__(
        self,
        dataset: Dataset,
        since_ns: int | None,
        until_ns: int | None,
        only: frozenset[str] | None = None,
        *,
        whole: bool = False,
    ) -> None:
        self._window = (since_ns, until_ns)
        self._whole = whole
        self._only = only
        self.listed: tuple[str, ...] = ()
        self._defined: tuple[str, ...] | None = None
        # No user SQL runs here (only the server's own, with bound parameters), and the views are redefined
        # over each window's part files and spill to a temporary folder: the connection stays unlocked.
        super().__init__(dataset, external_access=True)
        # Bounded memory: DuckDB spills a large hour's sort to disk instead of growing.
        self.connection.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        self.connection.execute("SET temp_directory = $dir", {"dir": spill_directory()})
        self.connection.execute("SET preserve_insertion_order = false")
        # One thread, small read-ahead and little freed memory kept: a request reads a few streams at a time
        # (its flows are encoded and sent meanwhile), and a server answers many requests in one process.
        for setting, value in _DUCKDB_SETTINGS.items():
            try:
                self.connection.execute(f"SET {setting} = '{value}'")
            except duckdb.CatalogException:
                log.debug("DuckDB %s has no setting %s", duckdb.__version__, setting)

    def _define_views(self) -> None:
        # Only `flows` and `lost_events`: the shared question views are not read here.
        self._define_table_views()

    def _define_view(self, view: str, schema: pa.Schema, files: tuple[str, ...]) -> None:
        # `flows` starts over no part file (reading the schemas of the whole window's files would cost more
        # than a short answer): a reader defines it over the hour it reads (`define_flows`).
        if view == FLOWS_VIEW and not self._whole:
            files, self._defined = (), ()
        super()._define_view(view, schema, files)

    def define_flows(self, files: Sequence[str]) -> None:
        """Redefine the view `flows` over just these part files (one hour's); nothing to do if it is."""
        if tuple(files) != self._defined:
            super()._define_view(FLOWS_VIEW, FLOW_SCHEMA, tuple(files))
            self._defined = tuple(files)

    def define_stream(self, view: str, files: Sequence[str]) -> None:
        """A view like `flows` over just these part files, in this order."""
        self._sql_types.setdefault(view, self._sql_types[FLOWS_VIEW])
        self._define_view(view, FLOW_SCHEMA, tuple(files))

    def relist(self) -> tuple[str, ...]:
        """List the part files of `flows` again (the window's)."""
        return self._list_files(FLOWS_TABLE)

    def _list_files(self, table: str) -> tuple[str, ...]:
        files = super()._list_files(table)
        if table != FLOWS_TABLE:
            return files
        self.listed = files
        if self._only is not None:
            files = tuple(f for f in files if f in self._only)
        since, until = self._window
        if since is None and until is None:
            return files
        kept = []
        for path in files:
            match = _PARTITION.search(path)
            if match is None:
                continue  # the partition of flows without a time: outside any window
            start = datetime.strptime(f"{match[1]} {match[2]}", "%Y-%m-%d %H").replace(tzinfo=UTC)
            start_ns = int(start.timestamp()) * 1_000_000_000
            if since is not None and start_ns + _HOUR_NS <= since:
                continue
            if until is not None and start_ns > until:
                continue
            kept.append(path)
        return tuple(kept)


@dataclass(frozen=True)
class DatasetSummary:
    """What ServerStatus, GetNodes and GetNamespaces report, for one listing of the part files."""

    num_flows: int
    oldest_ns: int | None
    newest_ns: int | None
    nodes: tuple[tuple[str, int], ...]  # (served node name, flows)
    namespaces: tuple[tuple[str, str], ...]  # (cluster, namespace)


def summarize(dataset: Dataset) -> DatasetSummary:
    """Count flows per node, the time range and the namespaces of the dataset (one scan)."""
    with _WindowEngine(dataset, None, None, whole=True) as engine:
        nodes = engine.run(
            "SELECT node_name, cluster_name, count(*) AS n, epoch_ns(min(time)) AS oldest,"
            " epoch_ns(max(time)) AS newest FROM flows GROUP BY ALL"
        ).to_pylist()
        namespaces = engine.run(
            "SELECT DISTINCT coalesce(cluster_name, '') AS c, ns FROM ("
            " SELECT cluster_name, source_namespace AS ns FROM flows"
            " UNION ALL SELECT cluster_name, destination_namespace FROM flows) WHERE ns IS NOT NULL ORDER BY ALL"
        ).to_pylist()
    per_node: dict[str, int] = {}
    for row in nodes:
        name = served_node_name(row["node_name"], row["cluster_name"])
        per_node[name] = per_node.get(name, 0) + row["n"]
    oldest = [r["oldest"] for r in nodes if r["oldest"] is not None]
    newest = [r["newest"] for r in nodes if r["newest"] is not None]
    return DatasetSummary(
        num_flows=sum(per_node.values()),
        oldest_ns=min(oldest) if oldest else None,
        newest_ns=max(newest) if newest else None,
        nodes=tuple(sorted(per_node.items())),
        namespaces=tuple((r["c"], r["ns"]) for r in namespaces),
    )


class _Request:
    """A validated GetFlowsRequest and its SQL."""

    def __init__(self, data: bytes) -> None:
        req = _decode(observer_pb2.GetFlowsRequest, data)
        if req.first and req.follow:
            raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be specified with follow")
        _unsupported_filters(req.whitelist, "whitelist")
        _unsupported_filters(req.blacklist, "blacklist")
        try:
            self.matcher = FlowMatcher(req.whitelist, req.blacklist)
            self.mask: MaskPlan | None = (
                compile_field_mask(list(req.field_mask.paths)) if req.HasField("field_mask") else None
            )
        except ConfigError as exc:
            raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        self.number = req.number
        self.first = req.first
        self.follow = req.follow
        self.since = _timestamp_ns(req.since) if req.HasField("since") else None
        self.until = _timestamp_ns(req.until) if req.HasField("until") else None
        self.whitelist = list(req.whitelist)
        self.everything = False

    @property
    def history(self) -> bool:
        """Whether stored flows are sent before following (follow without number or since: only new ones)."""
        return self.everything or not (self.follow and self.number == 0 and self.since is None)

    def where(self, sql: _Sql, after_ns: int | None = None) -> str:
        terms = ["time IS NOT NULL"]
        if self.since is not None:
            terms.append(f"time >= CAST(make_timestamp_ns({sql.bind(self.since)}) AS TIMESTAMPTZ_NS)")
        if after_ns is not None:
            terms.append(f"time > CAST(make_timestamp_ns({sql.bind(after_ns)}) AS TIMESTAMPTZ_NS)")
        if self.until is not None:
            terms.append(f"time <= CAST(make_timestamp_ns({sql.bind(self.until)}) AS TIMESTAMPTZ_NS)")
        if self.whitelist:
            ors = [_filter_sql(flt, sql) for flt in self.whitelist]
            if all(o is not None for o in ors):
                terms.append("(" + " OR ".join(f"({o})" for o in ors) + ")")
        return " AND ".join(terms)

    def query(self) -> tuple[str, dict[str, object], bool, int]:
        """The history query: WHERE clause, parameters, newest first (to be reversed), and a LIMIT (0: none).

        Without filters to check in Python, DuckDB applies the LIMIT of `number`.
        """
        sql = _Sql()
        where = self.where(sql)
        exact = self.matcher.accepts_all
        if self.number and not self.first and self.since is None:
            return where, sql.params, True, self.number if exact else 0
        limit = self.number if exact and self.number and not self.follow else 0
        return where, sql.params, False, limit


def _frame(flow: bytes, node: str, time_ns: int) -> bytes:
    """A framed GetFlowsResponse around serialised flow bytes."""
    return frame_message(b"\x0a" + varint(len(flow)) + flow + envelope_tail(node, time_ns))


_ORDER = ("time", "node_name", "uuid", "source_ip", "destination_ip", "source_port", "destination_port")


class _Reader:
    """Reads one query hour by hour, in time order, as framed responses of the flows that pass the filters.

    Oldest first, an hour's part files are merged (`HourMerge`: each file read once, in its stored order, with
    the memory of a few batches). Newest first, or where the merge cannot go on (part files far from time
    order, too many writers at once), the rest of the hour is cut into slices of about `SLICE_ROWS` flows (by
    its row count), and each slice is sorted and read on its own: DuckDB's memory stays at a slice's flows
    whatever the window. A part file that vanishes under the read (compaction or retention) makes the hour be
    listed again and read on from where it was: the merge from its bound (every flow sent is older, none
    other is), a slice from the same row (the order, time then enough columns to break ties, is the same
    whichever files hold the rows).
    """

    def __init__(
        self, engine: _WindowEngine, req: _Request, where: str, params: dict[str, object], newest_first: bool,
        limit: int,
    ) -> None:  # fmt: skip
        self.req = req
        self.engine = engine
        self.where, self.params, self.newest_first, self.limit = where, params, newest_first, limit
        self.matchers: dict[str, NodeMatcher | None] = {}
        self._cursor: Any = None
        self.reader: pa.RecordBatchReader | None = None
        self._hours = sorted(self._by_hour(engine.flow_files), reverse=newest_first)
        self._hour: str | None = None
        self._merge: HourMerge | None = None
        self._from: int | None = None  # the rest of the hour starts at this time (None: the hour's start)
        self._files: tuple[str, ...] = ()
        self._slices: list[tuple[int, int]] = []
        self._slice: tuple[int, int] | None = None
        self._read_in_slice = 0
        self._attempts = 0
        self._pending: pa.RecordBatch | None = None
        self._first_rows = FIRST_ROWS
        self._done = False
        self._cutting = False
        self._merging = False
        self._merge_after = not newest_first
        self._streams = 0
        self._reopen = False

    @staticmethod
    def _by_hour(files: Sequence[str]) -> dict[str, list[str]]:
        hours: dict[str, list[str]] = {}
        for path in files:
            match = _PARTITION.search(path)
            if match is not None:  # the partition of flows without a time never answers
                hours.setdefault(match.group(0), []).append(path)
        return hours

    def _open_next(self) -> None:
        """Open the next slice or merge (taking the next hour first); `_done` once there is none."""
        self._close_cursor()
        while not self._slices:
            if not self._cutting:
                if not self._hours:
                    self._done = True
                    return
                self._hour = self._hours.pop(0)
                self._files = self._files_of(self._hour, self.engine.flow_files)
                self._from = None
                self._cutting = True
                # Oldest first, the hours are merged; the answer's first hour begins with a sorted slice, which
                # gives its first flow sooner than the first pass of a merge.
                self._merging = not self.newest_first and not self._merge_after
            assert self._hour is not None
            if self._merging:
                self._merge = self._start_merge()
                if self._merge is not None:
                    return
            self._slices = self._cut(self._hour, self._files)
            self._cutting = False
        self._slice, self._read_in_slice = self._slices.pop(0), 0
        self._open()

    def _start_merge(self) -> HourMerge | None:
        """A merge of the current hour from `_from` on; None (and slices from its bound) if it cannot be."""
        self._streams = 0  # the views of the last merge's streams are reused (they are closed)
        try:
            merge = HourMerge(
                self._files, self._stream_times, self._open_stream, _ORDER, MERGED_ROWS, bound=self._from
            )
        except MergeFallback as exc:
            log.debug("reading %s in sorted slices: %s", self._hour, exc)
            self._merging = False
            self._from = exc.bound
            return None
        self._cutting = False
        return merge

    def _stream_sql(self, view: str, columns: str) -> tuple[str, dict[str, object]]:
        sql = f"SELECT {columns} FROM {view} WHERE {self.where}"
        params = dict(self.params)
        if self._from is not None:
            sql += " AND time >= CAST(make_timestamp_ns($merge_from) AS TIMESTAMPTZ_NS)"
            params["merge_from"] = self._from
        return sql, params

    def _stream_times(self, path: str) -> np.ndarray:
        """The times of a part file's flows of the request, as a stream of the file gives them (first pass)."""
        sql, params = self._stream_sql(_STREAM_VIEW, "epoch_ns(time) AS t")
        with translate_duckdb_errors(sql):
            self.engine.define_stream(_STREAM_VIEW, (path,))
            table = self.engine.connection.sql(sql, params=params).to_arrow_table()
        return table.column("t").to_numpy().astype(np.int64, copy=False)

    def _open_stream(self, paths: Sequence[str]) -> tuple[pa.RecordBatchReader, Any]:
        """A reader of the flows of the request in these part files, each in its stored order, one file after
        the other."""
        view = f"{_STREAM_VIEW}_{self._streams}"
        self._streams += 1
        sql, params = self._stream_sql(view, "*")
        with translate_duckdb_errors(sql):
            self.engine.define_stream(view, tuple(paths))
            cursor = self.engine.connection.cursor()
            try:
                cursor.execute("SET preserve_insertion_order = true")
                return _batches(cursor.sql(sql, params=params), MERGED_ROWS), cursor
            except BaseException:
                cursor.close()
                raise

    def _cut(self, hour: str, files: tuple[str, ...]) -> list[tuple[int, int]]:
        """The hour's time slices (from `_from`, if set), in reading order."""
        match = _PARTITION.search(hour)
        assert match is not None
        start = datetime.strptime(f"{match[1]} {match[2]}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        start_ns = int(start.timestamp()) * 1_000_000_000
        end_ns = start_ns + _HOUR_NS
        bounds = self._time_bounds(files)
        if bounds is not None:
            # The slices cover the flows' times, not the whole hour (the newest hour is often partial).
            start_ns, end_ns = max(start_ns, bounds[0]), max(start_ns, min(end_ns, bounds[1]))
        if self._from is not None:
            start_ns = max(start_ns, min(self._from, end_ns))
        sql, params = "SELECT count(*) FROM flows", {}
        if self._from is not None:  # (a whole hour is counted from the Parquet footers)
            sql += " WHERE time >= CAST(make_timestamp_ns($start) AS TIMESTAMPTZ_NS)"
            params["start"] = start_ns
        with translate_duckdb_errors(sql):
            self.engine.define_flows(files)
            rows = self.engine.connection.execute(sql, params).fetchall()[0]
        count = int(rows[0]) if rows else 0
        parts = max(1, -(-count // (FIRST_SLICE_ROWS if self._merge_after else SLICE_ROWS)))
        step = max(1, -(-(end_ns - start_ns) // parts))
        slices = [
            (start_ns + i * step, min(start_ns + (i + 1) * step, end_ns))
            for i in range(parts)
            if start_ns + i * step < end_ns
        ]
        return slices[::-1] if self.newest_first else slices

    def _time_bounds(self, files: tuple[str, ...]) -> tuple[int, int] | None:
        """The oldest time and past the newest of local part files, from their footers' statistics; None when
        they are not local or a row group has none (the slices then cover the hour)."""
        dataset = self.engine.dataset
        if not files or dataset is None or not dataset.is_local:
            return None
        # Statistics as text, read at microseconds: the newest is moved one microsecond on (slices end before).
        sql = (
            "SELECT epoch_ns(min(CAST(stats_min_value AS TIMESTAMPTZ))),"
            " epoch_ns(max(CAST(stats_max_value AS TIMESTAMPTZ))) + 1000,"
            " count(*) FILTER (WHERE stats_min_value IS NULL OR stats_max_value IS NULL)"
            " FROM parquet_metadata($files) WHERE path_in_schema = 'time'"
        )
        try:
            oldest, newest, missing = self.engine.connection.execute(sql, {"files": list(files)}).fetchall()[
                0
            ]
        except duckdb.Error:
            return None  # (a vanished file: the count that follows reports it)
        if missing or oldest is None or newest is None:
            return None
        return int(oldest), int(newest)

    @staticmethod
    def _files_of(hour: str, files: Sequence[str]) -> tuple[str, ...]:
        return tuple(path for path in files if hour in path)

    def _open(self) -> None:
        self._close_cursor()
        assert self._slice is not None
        direction = " DESC" if self.newest_first else ""
        order = ", ".join(f"{column}{direction}" for column in _ORDER)
        params = dict(self.params, slice_start=self._slice[0], slice_end=self._slice[1])
        sql = (
            f"SELECT * FROM flows WHERE {self.where}"
            " AND time >= CAST(make_timestamp_ns($slice_start) AS TIMESTAMPTZ_NS)"
            " AND time < CAST(make_timestamp_ns($slice_end) AS TIMESTAMPTZ_NS)"
            f" ORDER BY {order}"
        )
        if self.limit:
            sql += f" LIMIT {min(self.limit, 1 << 62)}"
        if self._read_in_slice:
            sql += f" OFFSET {self._read_in_slice}"
        with translate_duckdb_errors(sql):
            self.engine.define_flows(self._files)
            # its own cursor: the connection stays free for the lost_events query
            self._cursor = self.engine.connection.cursor()
            self.reader = _batches(self._cursor.sql(sql, params=params))

    def _close_cursor(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        self.reader = None
        if self._merge is not None:
            self._merge.close()
            self._merge = None

    def _read(self) -> pa.RecordBatch | None:
        """The next rows: the first few hundred alone (the first flow goes out sooner), then whole batches."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
        else:
            batch = self._read_batch()
        if batch is None:
            return None
        if self._first_rows and batch.num_rows > self._first_rows:
            batch, self._pending = batch.slice(0, self._first_rows), batch.slice(self._first_rows)
        self._first_rows = self._first_rows * 4 if self._first_rows < BATCH_ROWS else 0
        return batch

    def _split_slice(self, exc: BaseException) -> bool:
        """A slice too large for DuckDB's memory (a burst of flows) is read as two halves; False if it cannot be."""
        while exc is not None and not isinstance(exc, duckdb.OutOfMemoryException):
            exc = exc.__cause__  # type: ignore[assignment]
        if exc is None or self._slice is None or self._read_in_slice or self._cutting:
            return False
        start, end = self._slice
        if end - start < 2:
            return False
        middle = start + (end - start) // 2
        first, second = (
            ((middle, end), (start, middle)) if self.newest_first else ((start, middle), (middle, end))
        )
        log.info("a slice of %s is too large for DuckDB's memory limit; reading it in two halves", self._hour)
        self._close_cursor()
        self._slices.insert(0, second)
        self._slice = first
        self._reopen = True
        return True

    def _read_batch(self) -> pa.RecordBatch | None:
        while not self._done:
            try:
                if self._reopen:
                    self._reopen = False
                    self._open()  # the same slice again, from the row it had reached
                    continue
                if self._merge is not None:
                    merged = self._merge.next()
                    if merged is None:
                        self._merge.close()
                        self._merge = None
                        self._merging = False
                        self._open_next()
                        continue
                    return merged
                if self.reader is None:
                    self._open_next()
                    continue
                try:
                    batch = self.reader.read_next_batch()
                except StopIteration:
                    if self._merge_after and self._slices:
                        # The first slice of the answer is out (its first flow soon): merge the rest of the hour.
                        assert self._slice is not None
                        self._close_cursor()
                        self._slices, self._from = [], self._slice[1]
                        self._merging = self._cutting = True
                    self._merge_after = False
                    self._open_next()
                    continue
            except MergeFallback as exc:
                log.debug("reading the rest of %s in sorted slices: %s", self._hour, exc)
                self._close_cursor()
                self._merging = False
                self._from = exc.bound
                self._cutting = True
                continue
            except (duckdb.Error, pa.ArrowException, QueryError) as exc:
                if self._split_slice(exc):
                    continue
                self._attempts += 1
                if self._attempts >= MAX_ATTEMPTS or not _maybe_vanished(exc) or self._hour is None:
                    raise
                log.info(
                    "part files vanished while reading %s (compaction or retention); listing again",
                    self._hour,
                )
                if self._merge is not None:
                    self._from = self._merge.bound  # merged on from there
                    self._cutting = True
                self._close_cursor()
                self._files = self._files_of(self._hour, self.engine.relist())
                self._reopen = not self._cutting and self._slice is not None
                continue
            self._read_in_slice += batch.num_rows
            return batch
        return None

    def next(self) -> Frames | None:
        """The next batch: framed responses of the flows that pass the filters; None at the end."""
        batch = self.read()
        return None if batch is None else self.encode(batch)

    def read(self) -> pa.RecordBatch | None:
        """The next rows read, in order (DuckDB's part: its work runs without the GIL); None at the end.

        Raises QueryError naming the hour when its part files cannot be read (a damaged file: DuckDB's errors
        come out of its Arrow stream as OSError).
        """
        try:
            return self._read()
        except (duckdb.Error, pa.ArrowException, OSError, QueryError) as exc:
            detail = str(exc).strip() or type(exc).__name__
            raise QueryError(f"reading the flows of {self._hour or 'the window'} failed: {detail}") from exc

    def encode(self, batch: pa.RecordBatch) -> Frames:
        """Rows `read` gave as framed responses of the flows that pass the filters (one thread at a time)."""
        req = self.req
        encoded = encode_framed(batch)
        frames = Frames.encoded(encoded)
        if req.matcher.accepts_all and req.mask is None:
            return frames
        nodes = encoded.nodes.to_pylist()
        kept: list[bytes] = []
        times: list[int] = []
        for i, node in enumerate(nodes):
            message = frames.message(i)
            flow = observer_pb2.GetFlowsResponse.FromString(message[5:]).flow
            if not req.matcher.accepts_all:
                if node not in self.matchers:
                    self.matchers[node] = req.matcher.for_node(node)
                matcher = self.matchers[node]
                if matcher is None or not matcher(MessageRecord(flow)):
                    continue
            time_ns = int(frames.times[i])
            if req.mask is not None:
                apply_field_mask(flow, req.mask)
                message = _frame(flow.SerializeToString(), node, time_ns)
            kept.append(message)
            times.append(time_ns)
        return Frames.of(kept, times)

    def close(self) -> None:
        self._close_cursor()
        self.engine.close()


class _CallThread:
    """One thread of one GetFlows call, for its dataset reads (or its encoding), started at its first task."""

    def __init__(self, name: str = "flowpipe-serve-hubble-read") -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` on the call's thread."""
        return await self.start(call, *args)

    def start(self, call: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`call(*args)` handed to the call's thread now (after what it was handed before); its future."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        return asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    def close(self) -> None:
        """The thread ends once what was handed to it is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)


class _ReadAhead:
    """The batches of a `_Reader`, up to `PREFETCH_BATCHES` ahead of the one being sent.

    Three steps overlap instead of taking turns: DuckDB reads rows on the call's thread (without the GIL),
    a second thread encodes the rows read before, and the event loop sends the batch before those. As the
    batches ahead are never more than that, a client that stops reading stops the read after them (HTTP/2 flow
    control holds the send, and no further read is started).
    """

    def __init__(self, thread: _CallThread, reader: _Reader, depth: int = PREFETCH_BATCHES) -> None:
        self._thread = thread
        self._encoder = _CallThread("flowpipe-serve-hubble-encode")
        self._reader = reader
        self._depth = depth
        self._ahead: collections.deque[asyncio.Future[Frames | None]] = collections.deque()
        self._ended = False

    def _fill(self, count: int) -> None:
        while not self._ended and len(self._ahead) < count:
            rows = self._thread.start(self._reader.read)  # handed to the reading thread now, in order
            rows.add_done_callback(_retrieve)
            task = asyncio.ensure_future(self._encoded(rows))
            task.add_done_callback(_retrieve)
            self._ahead.append(task)

    async def _encoded(self, rows: asyncio.Future[pa.RecordBatch | None]) -> Frames | None:
        batch = await rows
        return None if batch is None else await self._encoder.start(self._reader.encode, batch)

    async def next(self) -> Frames | None:
        """The next batch (read ahead, or now); None at the end."""
        self._fill(1)
        batch = await self._ahead.popleft()
        if batch is None:
            self._ended = True
        return batch

    def read_on(self) -> None:
        """Have the batches after the last one read meanwhile (an answer cut at `number` does not)."""
        self._fill(self._depth)

    def close(self) -> None:
        """Ask for no more batches: those not begun are dropped (the one being read ends on its own), and the
        encoding thread ends."""
        self._ended = True
        while self._ahead:
            self._ahead.popleft().cancel()
        self._encoder.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A batch read ahead and then dropped: its error (if any) is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class HistoryService:
    """The RPC handlers of `observer.Observer` over a dataset."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        relay_name: str,
        version: str,
        tls_enabled: bool,
        follow_interval: float = DEFAULT_FOLLOW_INTERVAL,
    ) -> None:
        self.dataset = dataset
        self.relay_name = relay_name
        self.version = version
        self.tls_enabled = tls_enabled
        self.follow_interval = follow_interval
        self.started_ns = time.time_ns()
        self.flows_sent = 0
        self.requests = 0
        self._summary: tuple[tuple[str, ...], DatasetSummary] | None = None
        self._summary_lock = threading.Lock()

    def methods(self) -> dict[str, RpcMethod]:
        """The method table for GrpcServer (the unary calls answer from a worker thread, as one message)."""
        return {
            _SERVICE + "GetFlows": RpcMethod(True, self.get_flows),
            _SERVICE + "GetAgentEvents": RpcMethod(True, self._unimplemented("GetAgentEvents")),
            _SERVICE + "GetDebugEvents": RpcMethod(True, self._unimplemented("GetDebugEvents")),
            _SERVICE + "GetNodes": RpcMethod(True, self._unary(self.get_nodes)),
            _SERVICE + "GetNamespaces": RpcMethod(True, self._unary(self.get_namespaces)),
            _SERVICE + "ServerStatus": RpcMethod(True, self._unary(self.server_status)),
        }

    @staticmethod
    def _unimplemented(name: str) -> Any:
        async def handler(data: bytes, stream: ServerStream) -> None:
            raise GrpcAbort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by hubble-relay")

        return handler

    @staticmethod
    def _unary(handler: Callable[[bytes], bytes]) -> Any:
        async def call(data: bytes, stream: ServerStream) -> None:
            try:
                response = await asyncio.to_thread(handler, data)
            except FlowpipeError as exc:
                raise GrpcAbort(grpc.StatusCode.UNAVAILABLE, f"cannot read the dataset: {exc}") from exc
            await stream.send(frame_message(response))

        return call

    # -- unary calls -----------------------------------------------------------------------------------------

    def recent_summary(self) -> DatasetSummary:
        """The last figures computed (possibly older than the newest part files); computed if there are none."""
        known = self._summary
        return known[1] if known is not None else self.summary()

    def warm_up(self) -> None:
        """Compute the dataset's figures ahead of the first call (errors are left for the calls to report)."""
        try:
            self.summary()
        except Exception:
            log.debug("could not summarize the dataset ahead of the first call", exc_info=True)

    def summary(self) -> DatasetSummary:
        """The dataset's figures, computed again only when the part files changed."""
        with self._summary_lock:
            files = tuple(self.dataset.list_part_files(FLOWS_TABLE))
            if self._summary is None or self._summary[0] != files:
                self._summary = (files, summarize(self.dataset))
            return self._summary[1]

    def server_status(self, data: bytes) -> bytes:
        """ServerStatus: flows stored (num_flows, max_flows and seen_flows alike), nodes, oldest and newest."""
        _decode(observer_pb2.ServerStatusRequest, data)
        summary = self.summary()
        response = observer_pb2.ServerStatusResponse(
            num_flows=summary.num_flows,
            max_flows=summary.num_flows,
            seen_flows=summary.num_flows,
            uptime_ns=time.time_ns() - self.started_ns,
            num_connected_nodes=wrappers_pb2.UInt32Value(value=len(summary.nodes)),
            num_unavailable_nodes=wrappers_pb2.UInt32Value(value=0),
            version=self.version,
        )
        return bytes(response.SerializeToString())

    def get_nodes(self, data: bytes) -> bytes:
        """GetNodes: every node with stored flows, connected, with its flow count."""
        _decode(observer_pb2.GetNodesRequest, data)
        response = observer_pb2.GetNodesResponse()
        for name, count in self.summary().nodes:
            response.nodes.add(
                name=name,
                version=self.version,
                state=relay_pb2.NODE_CONNECTED,
                tls=observer_pb2.TLS(enabled=self.tls_enabled),
                uptime_ns=time.time_ns() - self.started_ns,
                num_flows=count,
                max_flows=count,
                seen_flows=count,
            )
        return bytes(response.SerializeToString())

    def get_namespaces(self, data: bytes) -> bytes:
        """GetNamespaces: (cluster, namespace) pairs of the stored flows."""
        _decode(observer_pb2.GetNamespacesRequest, data)
        response = observer_pb2.GetNamespacesResponse()
        for cluster, namespace in self.summary().namespaces:
            response.namespaces.add(cluster=cluster, namespace=namespace)
        return bytes(response.SerializeToString())

    # -- GetFlows --------------------------------------------------------------------------------------------

    def _envelope(
        self, response: observer_pb2.GetFlowsResponse, node_name: str, time_ns: int | None = None
    ) -> bytes:
        response.node_name = node_name
        response.time.FromNanoseconds(time_ns if time_ns is not None else time.time_ns())
        return frame_message(response.SerializeToString())

    async def get_flows(self, data: bytes, stream: ServerStream) -> None:
        """GetFlows: node_status, the stored flows of the request in time order, then (with follow) new ones."""
        req = _Request(data)
        self.requests += 1
        try:
            summary = await asyncio.to_thread(self.recent_summary)
        except FlowpipeError as exc:
            raise GrpcAbort(grpc.StatusCode.UNAVAILABLE, f"cannot read the dataset: {exc}") from exc
        if req.number >= _EVERYTHING:
            # `hubble observe --all` (and a collector) asks for 2^64-1 flows: every stored one, in order.
            req.number, req.everything = 0, True
        nodes = [name for name, _ in summary.nodes]
        if nodes:
            status = relay_pb2.NodeStatusEvent(state_change=relay_pb2.NODE_CONNECTED, node_names=nodes)
            await stream.send(
                self._envelope(observer_pb2.GetFlowsResponse(node_status=status), self.relay_name)
            )
        # The call's reads all run on one thread of its own: DuckDB's allocator keeps memory per thread, so a
        # read hopping over the pool's threads held several times its memory.
        thread = _CallThread()
        try:
            await self._answer(req, stream, thread)
        except FlowpipeError as exc:  # met while streaming (a damaged part file): a status, not a traceback
            log.warning("GetFlows ended: cannot read the dataset: %s", exc)
            raise GrpcAbort(grpc.StatusCode.UNAVAILABLE, f"cannot read the dataset: {exc}") from exc
        finally:
            thread.close()

    async def _answer(self, req: _Request, stream: ServerStream, thread: _CallThread) -> None:
        seen: frozenset[str] | None = None
        if req.history:
            seen = await self._history(req, stream, thread)
        if req.follow and not (req.until is not None and req.until < time.time_ns()):
            if seen is None:
                seen = frozenset(await self._listing())
            await self._follow(req, stream, seen, thread)

    async def _listing(self) -> list[str]:
        try:
            return await asyncio.to_thread(visible_part_files, self.dataset, FLOWS_TABLE)
        except FlowpipeError as exc:
            raise GrpcAbort(grpc.StatusCode.UNAVAILABLE, f"cannot list the dataset: {exc}") from exc

    async def _read(
        self,
        req: _Request,
        where: str,
        params: dict[str, object],
        *,
        newest_first: bool = False,
        limit: int = 0,
        thread: _CallThread,
        only: frozenset[str] | None = None,
    ) -> _Reader:
        def open_reader() -> _Reader:
            engine = _WindowEngine(self.dataset, req.since, req.until, only)
            try:
                return _Reader(engine, req, where, params, newest_first, limit)
            except BaseException:
                engine.close()
                raise

        try:
            return await thread.run(open_reader)
        except FlowpipeError as exc:
            raise GrpcAbort(grpc.StatusCode.UNAVAILABLE, f"cannot read the dataset: {exc}") from exc

    async def _history(self, req: _Request, stream: ServerStream, thread: _CallThread) -> frozenset[str]:
        """Send the stored part of the answer; returns the part files it was read from (all of them listed).

        Lost events of the `lost_events` table go among the flows in time order: those between `since` (else
        the first flow sent, when `number` cut the start) and `until` (else the last flow sent, when `number`
        cut the end).
        """
        where, params, newest_first, sql_limit = req.query()
        reader = await self._read(
            req, where, params, newest_first=newest_first, limit=sql_limit, thread=thread
        )
        limit = req.number if req.number and (newest_first or not req.follow) else 0
        ahead = _ReadAhead(thread, reader)
        try:
            lost = await thread.run(self._lost_events, reader.engine, req)
            if newest_first:
                # The last N: collect N passing flows newest first (N is bounded by the request), then send.
                runs: list[Frames] = []
                count = 0
                while count < limit and (batch := await ahead.next()) is not None:
                    runs.append(batch.head(limit - count))
                    count += len(runs[-1])
                newest = Frames.concat(runs)
                kept = newest.select(range(len(newest) - 1, -1, -1))
                if len(kept) and req.since is None:
                    lost = [event for event in lost if event[0] >= kept.times[0]]
                await self._send_merged(stream, kept, lost, final=True)
            else:
                sent = 0
                first = True
                while (batch := await ahead.next()) is not None:
                    if limit:
                        batch = batch.head(limit - sent)
                    if first and len(batch) and limit and req.since is None:
                        lost = [event for event in lost if event[0] >= batch.times[0]]
                    first = first and not len(batch)
                    sent += len(batch)
                    done = bool(limit) and sent >= limit
                    if not done:
                        ahead.read_on()  # the next batches are read while this one is sent
                    lost = await self._send_merged(stream, batch, lost, final=False)
                    if done:
                        break
                if not (limit and sent >= limit):
                    await self._send_merged(stream, empty_frames(), lost, final=True)
        finally:
            ahead.close()
            await thread.run(reader.close)
        return frozenset(reader.engine.listed)

    def _lost_events(self, engine: DuckDBEngine, req: _Request) -> list[tuple[int, bytes]]:
        """The window's lost_events records as (time_ns, framed response), oldest first."""
        sql = _Sql()
        terms = ["time IS NOT NULL"]
        if req.since is not None:
            terms.append(f"time >= CAST(make_timestamp_ns({sql.bind(req.since)}) AS TIMESTAMPTZ_NS)")
        if req.until is not None:
            terms.append(f"time <= CAST(make_timestamp_ns({sql.bind(req.until)}) AS TIMESTAMPTZ_NS)")
        rows = engine.run(
            "SELECT epoch_ns(time) AS t, node_name, cluster_name, source, num_events_lost, cpu,"
            f" epoch_ns(first) AS first_ns, epoch_ns(last) AS last_ns FROM lost_events WHERE {' AND '.join(terms)}"
            f" ORDER BY time LIMIT {_MAX_LOST_EVENTS}",
            sql.params,
        ).to_pylist()
        out = []
        for row in rows:
            lost = flow_pb2.LostEvent(
                source=enum_number("LostEventSource", row["source"]),
                num_events_lost=row["num_events_lost"] or 0,
            )
            if row["cpu"] is not None:
                lost.cpu.value = row["cpu"]
            if row["first_ns"] is not None:
                lost.first.FromNanoseconds(row["first_ns"])
            if row["last_ns"] is not None:
                lost.last.FromNanoseconds(row["last_ns"])
            node = served_node_name(row["node_name"], row["cluster_name"])
            response = observer_pb2.GetFlowsResponse(lost_events=lost)
            out.append((row["t"], self._envelope(response, node, row["t"])))
        return out

    async def _send_merged(
        self, stream: ServerStream, flows: Frames, lost: list[tuple[int, bytes]], *, final: bool
    ) -> list[tuple[int, bytes]]:
        """Send `flows` with the lost events due before each; returns the lost events not sent yet.

        `final`: also send the lost events after the last flow (up to `until`: the caller chose them).
        """
        data, rest = interleave(flows, lost, final=final)
        if data:
            self.flows_sent += len(flows)
            await stream.send(data)
        return rest

    async def _follow(
        self, req: _Request, stream: ServerStream, seen: frozenset[str], thread: _CallThread
    ) -> None:
        """Flows of part files published after `seen` was listed, every `follow_interval` seconds.

        A compacted file whose inputs were already read is only marked as read: its flows were sent.
        """
        seen_names = {path.rpartition("/")[2] for path in seen}
        known = set(seen)
        while True:
            await asyncio.sleep(self.follow_interval)
            listed = await self._listing()
            new = [path for path in listed if path not in known]
            known.update(new)
            fresh = []
            for path in new:
                name = path.rpartition("/")[2]
                if is_compacted_name(name):
                    try:
                        inputs = await asyncio.to_thread(read_compacted_inputs, self.dataset, path)
                    except (OSError, pa.ArrowException):
                        continue  # gone again (retention, another compaction): nothing new in it
                    if any(input_name in seen_names for input_name, _ in inputs or []):
                        continue
                seen_names.add(name)
                fresh.append(path)
            if fresh:
                sql = _Sql()
                reader = await self._read(
                    req, req.where(sql), sql.params, thread=thread, only=frozenset(fresh)
                )
                ahead = _ReadAhead(thread, reader)
                try:
                    while (batch := await ahead.next()) is not None:
                        ahead.read_on()
                        await self._send_merged(stream, batch, [], final=False)
                finally:
                    ahead.close()
                    await thread.run(reader.close)
            if req.until is not None and req.until < time.time_ns():
                return


class HistoryServer:
    """hubble-relay's Observer API over a dataset, on 127.0.0.1 by default, in a background thread.

    Plaintext by default; `tls=ServerTLSConfig(cert, key)` for TLS, plus `client_ca_path` for mutual TLS.
    """

    def __init__(
        self,
        dataset: str | Dataset,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTLSConfig | None = None,
        relay_name: str = DEFAULT_RELAY_NAME,
        version: str = DEFAULT_VERSION,
        follow_interval: float = DEFAULT_FOLLOW_INTERVAL,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        self.host = host
        self.port = port
        self.tls = tls
        self.service = HistoryService(
            self.dataset,
            relay_name=relay_name,
            version=version,
            tls_enabled=tls is not None,
            follow_interval=follow_interval,
        )
        self._ssl_context = tls.ssl_context() if tls is not None else None
        self._metadata = [("hubble-relay-version", version)]
        self._grpc: GrpcServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """`host:port` to dial (the chosen port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> Self:
        """Start listening in a background thread; raises ObserverServerError if it cannot bind."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="flowpipe-serve-hubble", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        threading.Thread(
            target=self.service.warm_up, name="flowpipe-serve-hubble-summary", daemon=True
        ).start()
        return self

    async def _listen(self) -> None:
        methods = {
            **self.service.methods(),
            **ReflectionService(["observer.Observer"]).methods(),
            **HealthService(["observer.Observer"]).methods(),
        }
        server = GrpcServer(methods, ssl_context=self._ssl_context, initial_metadata=self._metadata)
        try:
            self.port = await server.start(self.host, self.port)
        except OSError as exc:
            raise ObserverServerError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        self._grpc = server

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        if self._loop is None:
            raise ObserverServerError("the server is not started")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _shutdown(self) -> None:
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop("server is shutting down")

    def stop(self) -> None:
        """End every call with UNAVAILABLE, close connections, stop the thread."""
        if self._loop is None:
            return
        self._call(self._shutdown())
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _batches(relation: Any, rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
    """A reader of `rows`-row batches of a DuckDB relation (the method's name changed in DuckDB 1.4)."""
    to_reader = getattr(relation, "to_arrow_reader", None)
    if to_reader is not None:
        return to_reader(rows)
    return relation.fetch_arrow_reader(rows)

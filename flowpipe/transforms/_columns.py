"""Nested Hubble flow structs (Arrow, proto field names) → the flow table, column by column with pyarrow.compute.

This is the single row builder of the JSON path: the fast block parser and the per-line fallback both hand it
the same canonical struct, so a flow gives the same row whichever way it was read. The protobuf decoder
(`from_proto`) implements the same row conventions (model.py / README) over the Arrow arrays ptars decodes.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.model import FLOW_SCHEMA
from flowpipe.transforms._enums import ZERO_NAMES
from flowpipe.transforms._json_schema import (
    L4_KINDS,
    L7_KINDS,
    POLICY_LISTS,
    TCP_FLAG_NAMES,
    TCP_FLAG_STRINGS,
)

_TIMESTAMP = FLOW_SCHEMA.field("time").type


class _Paths:
    """Cached access to nested children: `self["l4", "TCP", "source_port"]` (NULL where any parent is NULL)."""

    def __init__(self, root: pa.StructArray) -> None:
        self._cache: dict[tuple[str, ...], pa.Array] = {(): root}

    def __getitem__(self, path: tuple[str, ...]) -> pa.Array:
        found = self._cache.get(path)
        if found is None:
            found = pc.struct_field(self[path[:-1]], [path[-1]])
            self._cache[path] = found
        return found

    def present(self, path: tuple[str, ...]) -> pa.Array:
        """TRUE where the message at `path` is present."""
        return pc.is_valid(self[path])


def _null_where(mask: pa.Array, values: pa.Array) -> pa.Array:
    """`values` with NULL where `mask` is TRUE (rebuilt only when some row is masked: strings copy)."""
    if not pc.any(mask).as_py():
        return values
    return pc.if_else(mask, None, values)


def _nonempty(values: pa.Array) -> pa.Array:
    """Empty strings become NULL."""
    return _null_where(pc.equal(values, ""), values)


def _enum(values: pa.Array, enum: str) -> pa.Array:
    """Enum names as they are; the zero value (and empty) becomes NULL."""
    return _null_where(pc.is_in(values, pa.array(["", ZERO_NAMES[enum]])), values)


def _scalar_in(present: pa.Array, values: pa.Array, zero: Any) -> pa.Array:
    """A scalar inside a message: its value (zero when omitted) where the message is present, else NULL."""
    return pc.if_else(present, pc.coalesce(values, pa.scalar(zero, values.type)), None)


def _first_present(choices: list[tuple[pa.Array, Any]], length: int, type_: pa.DataType) -> pa.Array:
    """Per row, the value of the first choice whose condition is TRUE (oneof order), else NULL."""
    result = pa.nulls(length, type_)
    for condition, value in reversed(choices):
        result = pc.if_else(condition, value, result)
    return result


def _first_label(choices: list[tuple[pa.Array, str]], length: int) -> pa.Array:
    """Per row, the label of the first choice whose condition is TRUE, else NULL (numeric if_else, then take)."""
    index = pa.nulls(length, pa.int8())
    for position in range(len(choices) - 1, -1, -1):
        index = pc.if_else(choices[position][0], pa.scalar(position, pa.int8()), index)
    return pa.array([label for _, label in choices], pa.string()).take(index)


def _strings(values: pa.Array) -> pa.Array:
    """A repeated string field: an empty list when absent."""
    return _empty_when_null(values)


def _empty_when_null(lists: pa.Array) -> pa.ListArray:
    """NULL lists become empty lists (pc.fill_null is slow on lists; this rebuilds the offsets instead)."""
    if lists.null_count == 0 and lists.offset == 0:
        return lists
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())])
    return pa.ListArray.from_arrays(offsets, pc.list_flatten(lists))


def _timestamps(values: pa.Array) -> pa.Array:
    """RFC 3339 strings (any fraction digits, `Z` or offset) → timestamp[ns, UTC]; raises ArrowInvalid if bad."""
    return pc.cast(_nonempty(values), _TIMESTAMP)


def _policies(values: pa.Array) -> pa.Array:
    """list<Policy> → list<"namespace/name" or "name">, an empty list when absent."""
    lists = _empty_when_null(values)
    items = lists.values
    name = pc.coalesce(pc.struct_field(items, ["name"]), "")
    namespace = pc.coalesce(pc.struct_field(items, ["namespace"]), "")
    joined = pc.if_else(pc.equal(namespace, ""), name, pc.binary_join_element_wise(namespace, name, "/"))
    return pa.ListArray.from_arrays(lists.offsets, joined)


_TCP_FLAG_STRINGS = pa.array(TCP_FLAG_STRINGS, pa.string())


def _tcp_flags(flags: list[pa.Array]) -> pa.Array:
    """Set TCP flags joined by "," in field order; NULL when none is set (or the flow is not TCP)."""
    mask = pa.repeat(0, len(flags[0])) if flags else pa.array([], pa.int64())
    for bit, flag in enumerate(flags):
        mask = pc.add(mask, pc.if_else(pc.coalesce(flag, False), 1 << bit, 0))
    return _TCP_FLAG_STRINGS.take(mask)


def _first_workload(workloads: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Name and kind of the first entry of each `workloads` list (NULL when there is none)."""
    lists = _empty_when_null(workloads)
    starts = pc.list_value_length(lists)
    offsets = lists.offsets.slice(0, len(lists))
    index = pc.if_else(pc.greater(starts, 0), offsets, None)
    first = lists.values.take(index)
    return (
        _nonempty(pc.struct_field(first, ["name"])),
        _nonempty(pc.struct_field(first, ["kind"])),
    )


def cluster_of(node_name: pa.Array, default: str | None = None) -> pa.Array:
    """The cluster part of "<cluster>/<node>" node names (NULL without one), else `default`."""
    parts = pc.split_pattern(node_name, "/", max_splits=1)
    has_cluster = pc.greater(pc.list_value_length(parts), 1)
    cluster = _nonempty(_null_where(pc.invert(has_cluster), pc.list_element(parts, 0)))
    if default:
        cluster = pc.coalesce(cluster, pa.scalar(default))
    return cluster


def build_flow_table(
    flows: pa.StructArray,
    envelope_node_name: pa.Array,
    envelope_time: pa.Array,
    *,
    cluster_name: str | None = None,
) -> pa.Table:
    """The flow table for canonical Flow structs and their envelopes' `node_name`/`time` (same length).

    Raises pyarrow.ArrowInvalid when a value cannot be converted (a bad timestamp, an out-of-range number);
    the caller then isolates the offending line.
    """
    n = len(flows)
    p = _Paths(flows)
    cols: dict[str, pa.Array] = {}

    flow_time = _timestamps(p["time",])
    cols["time"] = pc.coalesce(flow_time, _timestamps(envelope_time))
    node_name = pc.coalesce(_nonempty(p["node_name",]), _nonempty(envelope_node_name))
    cols["node_name"] = node_name
    cols["cluster_name"] = cluster_of(node_name, cluster_name)
    cols["uuid"] = _nonempty(p["uuid",])

    cols["verdict"] = _enum(p["verdict",], "Verdict")
    cols["drop_reason"] = pc.coalesce(p["drop_reason",], 0)
    cols["drop_reason_desc"] = _enum(p["drop_reason_desc",], "DropReason")
    cols["policy_match_type"] = pc.coalesce(p["policy_match_type",], 0)
    cols["auth_type"] = _enum(p["auth_type",], "AuthType")

    cols["flow_type"] = _enum(p["Type",], "FlowType")
    event_present = p.present(("event_type",))
    cols["event_type"] = _scalar_in(event_present, p["event_type", "type"], 0)
    cols["event_sub_type"] = _scalar_in(event_present, p["event_type", "sub_type"], 0)
    cols["trace_observation_point"] = _enum(p["trace_observation_point",], "TraceObservationPoint")
    cols["traffic_direction"] = _enum(p["traffic_direction",], "TrafficDirection")
    # is_reply: the wrapper when set; else TRUE when the legacy `reply` is true; else unknown.
    legacy = pc.if_else(pc.coalesce(p["reply",], False), True, None)
    cols["is_reply"] = pc.coalesce(p["is_reply",], legacy)
    cols["sock_xlate_point"] = _enum(p["sock_xlate_point",], "SocketTranslationPoint")
    for name in ("socket_cookie", "cgroup_id"):
        # uint64 in protobuf JSON is a string; 0 (the proto default) means "not set".
        value = pc.cast(p[name,], pa.uint64())
        zero = pa.scalar(0, pa.uint64())  # a plain 0 is int64, which would refuse a cookie beyond int64
        cols[name] = _null_where(pc.equal(pc.coalesce(value, zero), zero), value)

    ip_present = p.present(("IP",))
    cols["ip_version"] = _enum(p["IP", "ipVersion"], "IPVersion")
    cols["source_ip"] = _nonempty(p["IP", "source"])
    cols["destination_ip"] = _nonempty(p["IP", "destination"])
    cols["encrypted"] = _scalar_in(ip_present, p["IP", "encrypted"], False)

    for side in ("source", "destination"):
        cols[f"{side}_namespace"] = _nonempty(p[side, "namespace"])
        cols[f"{side}_pod_name"] = _nonempty(p[side, "pod_name"])
        cols[f"{side}_workload_name"], cols[f"{side}_workload_kind"] = _first_workload(p[side, "workloads"])
        cols[f"{side}_identity"] = _scalar_in(p.present((side,)), p[side, "identity"], 0)
        cols[f"{side}_labels"] = _strings(p[side, "labels"])
        cols[f"{side}_service_name"] = _nonempty(p[f"{side}_service", "name"])
        cols[f"{side}_names"] = _strings(p[f"{side}_names",])

    l4 = {kind: p.present(("l4", kind)) for kind in L4_KINDS}
    cols["l4_protocol"] = _first_label([(l4[k], k) for k in L4_KINDS], n)
    for port in ("source_port", "destination_port"):
        cols[port] = _first_present(
            [(l4[k], pc.coalesce(p["l4", k, port], 0)) for k in ("TCP", "UDP", "SCTP")], n, pa.int64()
        )
    cols["tcp_flags"] = _tcp_flags([p["l4", "TCP", "flags", name] for name in TCP_FLAG_NAMES])
    for field in ("type", "code"):
        cols[f"icmp_{field}"] = _first_present(
            [(l4[k], pc.coalesce(p["l4", k, field], 0)) for k in ("ICMPv4", "ICMPv6")], n, pa.int64()
        )

    l7_present = p.present(("l7",))
    l7 = {kind: p.present(("l7", kind)) for kind in L7_KINDS}
    cols["l7_type"] = _enum(p["l7", "type"], "L7FlowType")
    cols["l7_protocol"] = _first_label([(l7[k], k) for k in L7_KINDS], n)
    cols["latency_ns"] = _scalar_in(l7_present, pc.cast(p["l7", "latency_ns"], pa.int64()), 0)
    cols["dns_query"] = _nonempty(p["l7", "dns", "query"])
    cols["dns_rcode"] = _scalar_in(l7["dns"], p["l7", "dns", "rcode"], 0)
    cols["dns_qtypes"] = _strings(p["l7", "dns", "qtypes"])
    cols["dns_ips"] = _strings(p["l7", "dns", "ips"])
    cols["dns_ttl"] = _scalar_in(l7["dns"], p["l7", "dns", "ttl"], 0)
    cols["http_method"] = _nonempty(p["l7", "http", "method"])
    cols["http_url"] = _nonempty(p["l7", "http", "url"])
    cols["http_code"] = _scalar_in(l7["http"], p["l7", "http", "code"], 0)
    cols["http_protocol"] = _nonempty(p["l7", "http", "protocol"])
    cols["kafka_api_key"] = _nonempty(p["l7", "kafka", "api_key"])
    cols["kafka_topic"] = _nonempty(p["l7", "kafka", "topic"])
    cols["kafka_error_code"] = _scalar_in(l7["kafka"], p["l7", "kafka", "error_code"], 0)

    for name in POLICY_LISTS:
        cols[name] = _policies(p[name,])

    arrays = [_cast(cols[field.name], field.type) for field in FLOW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=FLOW_SCHEMA)


def _cast(values: pa.Array, type_: pa.DataType) -> pa.Array:
    """`values` as the column type; an integer beyond the column's range becomes NULL, as on the protobuf path."""
    try:
        return pc.cast(values, type_)
    except pa.ArrowInvalid:
        if not (pa.types.is_integer(type_) and pa.types.is_integer(values.type)):
            raise
    # An unsigned value that does not fit the signed column (never seen in real flows): NULL, not a lost line.
    bits = type_.bit_width - 1
    outside = pc.or_(pc.less(values, -(1 << bits)), pc.greater(values, (1 << bits) - 1))
    return pc.cast(pc.if_else(outside, pa.scalar(None, values.type), values), type_)

"""Protobuf `flow.Flow` messages → the flow table, by attribute access (the gRPC collector's hot path).

One Python pass fills plain column lists (no MessageToDict, no per-row dicts); columns of rarely present
messages (L7, services, workloads, policies) start as NULL and are only written where the message is set.
The row conventions are the same as the JSON path's (`_columns.py`); a test compares both on real captures.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.model import FLOW_SCHEMA
from flowpipe.transforms._columns import cluster_of
from flowpipe.transforms._enums import enum_row_values
from flowpipe.transforms._json_schema import TCP_FLAG_NAMES, TCP_FLAG_STRINGS

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from flowpipe._proto.flow.flow_pb2 import Flow


_NO_STRINGS: list[str] = []


def _policy_names(policies: Any) -> list[str]:
    return [f"{p.namespace}/{p.name}" if p.namespace else p.name for p in policies]


def flows_to_table(
    flows: Sequence[Flow],
    node_names: Sequence[str] | None = None,
    times: Sequence[Timestamp | None] | None = None,
    *,
    cluster_name: str | None = None,
) -> pa.Table:
    """The flow table for protobuf flows; `node_names`/`times` are their envelopes' (GetFlowsResponse)."""
    n = len(flows)

    def nulls() -> list[Any]:
        return [None] * n

    def zeros() -> list[int]:
        return [0] * n

    c_time, c_node, c_uuid = nulls(), nulls(), nulls()
    c_verdict, c_drop, c_drop_desc, c_match, c_auth = zeros(), zeros(), zeros(), zeros(), zeros()
    c_type, c_ev, c_ev_sub, c_point, c_dir, c_reply = zeros(), nulls(), nulls(), zeros(), zeros(), nulls()
    c_ipv, c_sip, c_dip, c_enc = zeros(), nulls(), nulls(), nulls()
    c_xlate, c_cookie, c_cgroup = zeros(), nulls(), nulls()
    c_src: list[int | None] = nulls()
    c_dst: list[int | None] = nulls()
    # Endpoints repeat from flow to flow (the same pods talk again and again): each distinct one (keyed by its
    # wire bytes) is decoded once and becomes one row of `unique`; the columns are then taken from it.
    unique: list[tuple[Any, ...]] = []
    seen: dict[bytes, int] = {}
    c_ssvc, c_dsvc, c_snames, c_dnames = nulls(), nulls(), [_NO_STRINGS] * n, [_NO_STRINGS] * n
    c_l4, c_sport, c_dport, c_flags, c_icmp_t, c_icmp_c = nulls(), nulls(), nulls(), nulls(), nulls(), nulls()
    c_l7t, c_l7p, c_lat = zeros(), nulls(), nulls()
    c_dq, c_drc, c_dqt, c_dips, c_dttl = nulls(), nulls(), [_NO_STRINGS] * n, [_NO_STRINGS] * n, nulls()
    c_hm, c_hu, c_hc, c_hp, c_ka, c_kt, c_ke = nulls(), nulls(), nulls(), nulls(), nulls(), nulls(), nulls()
    c_iab, c_eab, c_idb, c_edb = [_NO_STRINGS] * n, [_NO_STRINGS] * n, [_NO_STRINGS] * n, [_NO_STRINGS] * n
    endpoints = _ENDPOINT_CACHE

    def endpoint_index(endpoint: Any) -> int:
        key = endpoint.SerializeToString()
        index = seen.get(key)
        if index is None:
            index = seen[key] = len(unique)
            unique.append(endpoints.get(key) or _endpoint(endpoint, key))
        return index

    flag_strings = _TCP_FLAG_CACHE
    if len(endpoints) > _CACHE_LIMIT:
        endpoints.clear()

    for i, f in enumerate(flows):
        has = f.HasField
        if has("time"):
            t = f.time
            c_time[i] = t.seconds * 1_000_000_000 + t.nanos
        elif times is not None and (t := times[i]) is not None:
            c_time[i] = t.seconds * 1_000_000_000 + t.nanos
        c_node[i] = f.node_name or (node_names[i] if node_names is not None else None) or None
        c_uuid[i] = f.uuid or None
        c_verdict[i] = f.verdict
        c_drop[i] = f.drop_reason
        c_drop_desc[i] = f.drop_reason_desc
        c_match[i] = f.policy_match_type
        c_auth[i] = f.auth_type
        c_type[i] = f.Type
        if has("event_type"):
            ev = f.event_type
            c_ev[i] = ev.type
            c_ev_sub[i] = ev.sub_type
        c_point[i] = f.trace_observation_point
        c_dir[i] = f.traffic_direction
        c_xlate[i] = f.sock_xlate_point
        c_cookie[i] = f.socket_cookie or None
        c_cgroup[i] = f.cgroup_id or None
        if has("is_reply"):
            c_reply[i] = f.is_reply.value
        elif f.reply:
            c_reply[i] = True
        if has("IP"):
            ip = f.IP
            c_ipv[i] = ip.ipVersion
            c_sip[i] = ip.source or None
            c_dip[i] = ip.destination or None
            c_enc[i] = ip.encrypted
        if has("source"):
            c_src[i] = endpoint_index(f.source)
        if has("destination"):
            c_dst[i] = endpoint_index(f.destination)
        if has("source_service"):
            c_ssvc[i] = f.source_service.name or None
        if has("destination_service"):
            c_dsvc[i] = f.destination_service.name or None
        if f.source_names:
            c_snames[i] = list(f.source_names)
        if f.destination_names:
            c_dnames[i] = list(f.destination_names)

        if has("l4"):
            l4 = f.l4
            kind = l4.WhichOneof("protocol")
            if kind is not None:
                c_l4[i] = kind
                if kind == "TCP":
                    tcp = l4.TCP
                    c_sport[i] = tcp.source_port
                    c_dport[i] = tcp.destination_port
                    if tcp.HasField("flags"):
                        key = tcp.flags.SerializeToString()
                        c_flags[i] = flag_strings.get(key) or _tcp_flags(tcp.flags, key)
                elif kind == "UDP" or kind == "SCTP":
                    ports = getattr(l4, kind)
                    c_sport[i] = ports.source_port
                    c_dport[i] = ports.destination_port
                elif kind == "ICMPv4" or kind == "ICMPv6":
                    icmp = getattr(l4, kind)
                    c_icmp_t[i] = icmp.type
                    c_icmp_c[i] = icmp.code

        if has("l7"):
            l7 = f.l7
            c_l7t[i] = l7.type
            c_lat[i] = l7.latency_ns
            record = l7.WhichOneof("record")
            c_l7p[i] = record
            if record == "dns":
                dns = l7.dns
                c_dq[i] = dns.query or None
                c_drc[i] = dns.rcode
                c_dttl[i] = dns.ttl
                if dns.qtypes:
                    c_dqt[i] = list(dns.qtypes)
                if dns.ips:
                    c_dips[i] = list(dns.ips)
            elif record == "http":
                http = l7.http
                c_hm[i] = http.method or None
                c_hu[i] = http.url or None
                c_hc[i] = http.code
                c_hp[i] = http.protocol or None
            elif record == "kafka":
                kafka = l7.kafka
                c_ka[i] = kafka.api_key or None
                c_kt[i] = kafka.topic or None
                c_ke[i] = kafka.error_code
        if f.ingress_allowed_by:
            c_iab[i] = _policy_names(f.ingress_allowed_by)
        if f.egress_allowed_by:
            c_eab[i] = _policy_names(f.egress_allowed_by)
        if f.ingress_denied_by:
            c_idb[i] = _policy_names(f.ingress_denied_by)
        if f.egress_denied_by:
            c_edb[i] = _policy_names(f.egress_denied_by)

    node = pa.array(c_node, pa.string())
    columns: dict[str, pa.Array | list[Any]] = {
        "time": pa.array(c_time, pa.int64()), "node_name": node,
        "cluster_name": cluster_of(node, cluster_name), "uuid": c_uuid,
        "verdict": _enum(c_verdict, "Verdict"), "drop_reason": c_drop,
        "drop_reason_desc": _enum(c_drop_desc, "DropReason"), "policy_match_type": c_match,
        "auth_type": _enum(c_auth, "AuthType"), "flow_type": _enum(c_type, "FlowType"),
        "event_type": c_ev, "event_sub_type": c_ev_sub,
        "trace_observation_point": _enum(c_point, "TraceObservationPoint"),
        "traffic_direction": _enum(c_dir, "TrafficDirection"), "is_reply": c_reply,
        "sock_xlate_point": _enum(c_xlate, "SocketTranslationPoint"), "socket_cookie": c_cookie,
        "cgroup_id": c_cgroup,
        "ip_version": _enum(c_ipv, "IPVersion"), "source_ip": c_sip,
        "destination_ip": c_dip, "encrypted": c_enc,
        "l4_protocol": c_l4, "source_port": c_sport, "destination_port": c_dport, "tcp_flags": c_flags,
        "icmp_type": c_icmp_t, "icmp_code": c_icmp_c,
        "l7_type": _enum(c_l7t, "L7FlowType"), "l7_protocol": c_l7p, "latency_ns": c_lat,
        "dns_query": c_dq, "dns_rcode": c_drc, "dns_qtypes": c_dqt, "dns_ips": c_dips, "dns_ttl": c_dttl,
        "http_method": c_hm, "http_url": c_hu, "http_code": c_hc, "http_protocol": c_hp,
        "kafka_api_key": c_ka, "kafka_topic": c_kt, "kafka_error_code": c_ke,
        "ingress_allowed_by": c_iab, "egress_allowed_by": c_eab,
        "ingress_denied_by": c_idb, "egress_denied_by": c_edb,
        "source_service_name": c_ssvc, "destination_service_name": c_dsvc,
        "source_names": c_snames, "destination_names": c_dnames,
    }  # fmt: skip
    distinct = [
        _array(list(values), FLOW_SCHEMA.field(f"source_{suffix}").type)
        for suffix, values in zip(_ENDPOINT_COLUMNS, zip(*unique, _NO_ENDPOINT, strict=True), strict=True)
    ]
    for side, rows in (("source", c_src), ("destination", c_dst)):
        # Absent endpoints point at the last row of `distinct`: the all-NULL endpoint (empty labels).
        indices = pc.fill_null(pa.array(rows, pa.int64()), len(unique))
        for suffix, values in zip(_ENDPOINT_COLUMNS, distinct, strict=True):
            columns[f"{side}_{suffix}"] = values.take(indices)
    arrays = [_array(columns[field.name], field.type) for field in FLOW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=FLOW_SCHEMA)


_ENDPOINT_COLUMNS = ("namespace", "pod_name", "workload_name", "workload_kind", "identity", "labels")
_NO_ENDPOINT: tuple[Any, ...] = (None, None, None, None, None, _NO_STRINGS)
_CACHE_LIMIT = 50_000
_ENDPOINT_CACHE: dict[bytes, tuple[Any, ...]] = {}
_TCP_FLAG_CACHE: dict[bytes, str | None] = {}


def _endpoint(endpoint: Any, key: bytes) -> tuple[Any, ...]:
    workload = endpoint.workloads[0] if endpoint.workloads else None
    row = (
        endpoint.namespace or None,
        endpoint.pod_name or None,
        (workload.name or None) if workload is not None else None,
        (workload.kind or None) if workload is not None else None,
        endpoint.identity,
        list(endpoint.labels),
    )
    _ENDPOINT_CACHE[key] = row
    return row


def _tcp_flags(flags: Any, key: bytes) -> str | None:
    mask = sum(1 << i for i, name in enumerate(TCP_FLAG_NAMES) if getattr(flags, name))
    _TCP_FLAG_CACHE[key] = TCP_FLAG_STRINGS[mask]
    return TCP_FLAG_STRINGS[mask]


def _enum(numbers: list[int], enum: str) -> pa.Array:
    """Enum numbers → names (zero → NULL, unknown → decimal string), vectorized."""
    known, names = _enum_arrays(enum)
    raw = pa.array(numbers, pa.int64())
    index = pc.index_in(raw, value_set=known)
    named = names.take(index)
    return pc.if_else(pc.is_null(index), pc.cast(raw, pa.string()), named)


@cache
def _enum_arrays(enum: str) -> tuple[pa.Array, pa.Array]:
    table = enum_row_values(enum)
    return pa.array(list(table), pa.int64()), pa.array(list(table.values()), pa.string())


def _array(values: pa.Array | list[Any], type_: pa.DataType) -> pa.Array:
    # String values were made NULL when empty while they were collected.
    if isinstance(values, pa.Array):
        return values.cast(type_)
    try:
        return pa.array(values, type_)
    except (OverflowError, pa.ArrowInvalid):
        if not pa.types.is_integer(type_):
            raise
    # An unsigned wire value beyond the column's signed range (never seen in real flows): NULL, not a crash.
    bits = type_.bit_width - 1
    low, high = -(1 << bits), (1 << bits) - 1
    return pa.array([v if v is None or low <= v <= high else None for v in values], type_)

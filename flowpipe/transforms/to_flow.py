"""The flow table → protobuf `flow.Flow` messages: the inverse of the decoders (`from_proto`, `_columns.py`).

Every column goes back to the Flow field it was read from, so that decoding the messages again gives the same
rows (a test checks it on the real captures and the simulator). The row conventions are undone one by one:

- enum columns hold names (NULL for the zero value, a decimal string for a number the descriptors did not know):
  the number comes from the generated descriptors;
- a message the row says was present (`event_type`, `IP`, `source`/`destination`, the L4 and L7 records) is set
  even when all its kept fields are zero: `encrypted`, `*_identity`, `latency_ns`, `dns_rcode`, `http_code` and
  `kafka_error_code` are non-NULL exactly where their message was present;
- `tcp_flags` ("SYN,ACK") becomes the flags message, `*_workload_*` the first `workloads` entry, policy columns
  ("namespace/name" or "name") `Policy` messages, `*_service_name` the service's name;
- `is_reply` sets the `is_reply` wrapper and, like Cilium's agents, the deprecated `reply` when it is true.

What the table does not keep cannot come back (listed in the README: `ethernet`, `Summary`, endpoint `ID`,
`cluster_name` and further `workloads`, service namespaces, policy labels/revision/kind, HTTP headers, DNS cnames,
`interface`, `proxy_port`, `trace_context`, `node_labels`, `source_xlated`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import pyarrow as pa

from flowpipe._proto.flow import flow_pb2
from flowpipe.transforms._enums import enum_names
from flowpipe.transforms._json_schema import TCP_FLAG_NAMES

# Columns whose values are enum names, and the enum each belongs to.
_ENUM_COLUMNS = {
    "verdict": "Verdict",
    "drop_reason_desc": "DropReason",
    "auth_type": "AuthType",
    "flow_type": "FlowType",
    "trace_observation_point": "TraceObservationPoint",
    "traffic_direction": "TrafficDirection",
    "sock_xlate_point": "SocketTranslationPoint",
    "ip_version": "IPVersion",
    "l7_type": "L7FlowType",
}
_POLICY_FIELDS = ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by", "egress_denied_by")
_PORT_KINDS = frozenset({"TCP", "UDP", "SCTP"})
_ICMP_KINDS = frozenset({"ICMPv4", "ICMPv6"})


@cache
def _enum_numbers(enum: str) -> dict[str, int]:
    return {name: number for number, name in enum_names(enum).items()}


def enum_number(enum: str, value: str | None) -> int:
    """The number of a flow-table enum value: 0 for NULL, the descriptor's number, or the stored decimal string.

    Raises ValueError for a name that is neither (a value no decoder writes).
    """
    if value is None:
        return 0
    number = _enum_numbers(enum).get(value)
    if number is not None:
        return number
    if value.lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{value!r} is not a value of the enum flow.{enum}")


def _policy(text: str) -> flow_pb2.Policy:
    namespace, sep, name = text.partition("/")
    return flow_pb2.Policy(namespace=namespace, name=name) if sep else flow_pb2.Policy(name=text)


def _tcp_flags(text: str) -> flow_pb2.TCPFlags:
    names = set(text.split(","))
    return flow_pb2.TCPFlags(**{name: True for name in TCP_FLAG_NAMES if name in names})


def served_node_name(node_name: str | None, cluster_name: str | None) -> str:
    """The node name a flow is served under: `cluster/node` as hubble-relay names nodes.

    A stored name that already carries its cluster is kept; a bare name gets the row's `cluster_name` (set by
    `collect --cluster-name`) unless that is `default`, whose nodes Hubble names without a cluster.
    """
    name = node_name or ""
    if "/" in name or not cluster_name or cluster_name == "default" or not name:
        return name
    return f"{cluster_name}/{name}"


class _Endpoints:
    """Endpoint messages built once per distinct (namespace, pod, workload, identity, labels) and copied."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], bytes] = {}

    def bytes_of(self, key: tuple[Any, ...]) -> bytes:
        found = self._cache.get(key)
        if found is None:
            namespace, pod, workload_name, workload_kind, identity, labels = key
            endpoint = flow_pb2.Endpoint(
                identity=identity, namespace=namespace or "", pod_name=pod or "", labels=labels
            )
            if workload_name is not None or workload_kind is not None:
                endpoint.workloads.add(name=workload_name or "", kind=workload_kind or "")
            found = endpoint.SerializeToString()
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = found
        return found


def table_to_flows(table: pa.Table | pa.RecordBatch) -> Iterator[flow_pb2.Flow]:
    """One `flow.Flow` per row of the flow table, in row order (node names as stored)."""
    columns = {
        name: (table.column(name).cast(pa.int64()) if name == "time" else table.column(name)).to_pylist()
        for name in table.schema.names
    }
    endpoints = _Endpoints()
    enums = {
        column: (_enum_numbers(enum), enum) for column, enum in _ENUM_COLUMNS.items() if column in columns
    }
    for i in range(table.num_rows):
        row = {name: values[i] for name, values in columns.items()}
        yield _flow(row, enums, endpoints)


def _flow(row: dict[str, Any], enums: dict[str, tuple[dict[str, int], str]], endpoints: _Endpoints) -> Any:
    f = flow_pb2.Flow()
    numbers: dict[str, int] = {}
    for column, (known, enum) in enums.items():
        value = row[column]
        if value is not None:
            numbers[column] = known[value] if value in known else enum_number(enum, value)
    time = row.get("time")
    if time is not None:
        f.time.FromNanoseconds(time)
    f.node_name = row.get("node_name") or ""
    f.uuid = row.get("uuid") or ""
    f.verdict = numbers.get("verdict", 0)
    f.drop_reason = row.get("drop_reason") or 0
    f.drop_reason_desc = numbers.get("drop_reason_desc", 0)
    f.policy_match_type = row.get("policy_match_type") or 0
    f.auth_type = numbers.get("auth_type", 0)
    f.Type = numbers.get("flow_type", 0)
    if row.get("event_type") is not None or row.get("event_sub_type") is not None:
        f.event_type.type = row.get("event_type") or 0
        f.event_type.sub_type = row.get("event_sub_type") or 0
    f.trace_observation_point = numbers.get("trace_observation_point", 0)
    f.traffic_direction = numbers.get("traffic_direction", 0)
    reply = row.get("is_reply")
    if reply is not None:
        f.is_reply.value = reply
        f.reply = reply
    f.sock_xlate_point = numbers.get("sock_xlate_point", 0)
    f.socket_cookie = row.get("socket_cookie") or 0
    f.cgroup_id = row.get("cgroup_id") or 0

    source_ip, destination_ip = row.get("source_ip"), row.get("destination_ip")
    if row.get("encrypted") is not None or source_ip or destination_ip or "ip_version" in numbers:
        ip = f.IP
        ip.source = source_ip or ""
        ip.destination = destination_ip or ""
        ip.ipVersion = numbers.get("ip_version", 0)
        ip.encrypted = bool(row.get("encrypted"))

    for side in ("source", "destination"):
        identity = row.get(f"{side}_identity")
        if identity is not None:
            key = (
                row.get(f"{side}_namespace"),
                row.get(f"{side}_pod_name"),
                row.get(f"{side}_workload_name"),
                row.get(f"{side}_workload_kind"),
                identity,
                tuple(row.get(f"{side}_labels") or ()),
            )
            getattr(f, side).MergeFromString(endpoints.bytes_of(key))
        service = row.get(f"{side}_service_name")
        if service is not None:
            getattr(f, f"{side}_service").name = service
        names = row.get(f"{side}_names")
        if names:
            getattr(f, f"{side}_names").extend(names)

    kind = row.get("l4_protocol")
    if kind is not None:
        layer = getattr(f.l4, kind)
        layer.SetInParent()
        if kind in _PORT_KINDS:
            layer.source_port = row.get("source_port") or 0
            layer.destination_port = row.get("destination_port") or 0
            flags = row.get("tcp_flags")
            if kind == "TCP" and flags:
                layer.flags.CopyFrom(_tcp_flags(flags))
        elif kind in _ICMP_KINDS:
            layer.type = row.get("icmp_type") or 0
            layer.code = row.get("icmp_code") or 0

    if row.get("latency_ns") is not None or row.get("l7_protocol") is not None:
        _layer7(f.l7, row, numbers.get("l7_type", 0))

    for name in _POLICY_FIELDS:
        policies = row.get(name)
        if policies:
            getattr(f, name).extend(_policy(p) for p in policies)
    return f


def _layer7(l7: Any, row: dict[str, Any], l7_type: int) -> None:
    l7.type = l7_type
    l7.latency_ns = row.get("latency_ns") or 0
    record = row.get("l7_protocol")
    if record == "dns":
        dns = l7.dns
        dns.SetInParent()
        dns.query = row.get("dns_query") or ""
        dns.rcode = row.get("dns_rcode") or 0
        dns.ttl = row.get("dns_ttl") or 0
        dns.qtypes.extend(row.get("dns_qtypes") or ())
        dns.ips.extend(row.get("dns_ips") or ())
    elif record == "http":
        http = l7.http
        http.SetInParent()
        http.method = row.get("http_method") or ""
        http.url = row.get("http_url") or ""
        http.code = row.get("http_code") or 0
        http.protocol = row.get("http_protocol") or ""
    elif record == "kafka":
        kafka = l7.kafka
        kafka.SetInParent()
        kafka.api_key = row.get("kafka_api_key") or ""
        kafka.topic = row.get("kafka_topic") or ""
        kafka.error_code = row.get("kafka_error_code") or 0

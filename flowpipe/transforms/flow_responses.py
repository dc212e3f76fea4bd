"""Flow-table record batches → serialised `GetFlowsResponse` messages, column at a time (the serving fast path).

`FlowResponseEncoder().encode(batch)` gives, for every row of a batch of the `flows` view, the serialised
`GetFlowsResponse` whose `flow` is what `to_flow.table_to_flows` gives for the row (with the node name
`served_node_name` gives, also the response's `node_name`) and whose `time` is the flow's. The rows are
turned into the nested Arrow layout of the Flow message with Arrow compute (the row conventions of `to_flow`
undone column by column), and `ptars` writes the protobuf bytes of the whole batch in compiled code: no Python
object is built per flow.

`frame_responses` puts the messages in gRPC's length-prefixed framing, one buffer for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.transforms._enums import enum_names
from flowpipe.transforms._json_schema import TCP_FLAG_NAMES

# Columns whose values are enum names, the enum each belongs to and the Flow field it goes back to.
_ENUM_FIELDS = {
    "verdict": ("Verdict", "verdict"),
    "drop_reason_desc": ("DropReason", "drop_reason_desc"),
    "auth_type": ("AuthType", "auth_type"),
    "flow_type": ("FlowType", "Type"),
    "trace_observation_point": ("TraceObservationPoint", "trace_observation_point"),
    "traffic_direction": ("TrafficDirection", "traffic_direction"),
    "sock_xlate_point": ("SocketTranslationPoint", "sock_xlate_point"),
}
_POLICY_FIELDS = ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by", "egress_denied_by")
_PORT_KINDS = ("TCP", "UDP", "SCTP")
_ICMP_KINDS = ("ICMPv4", "ICMPv6")
_EMPTY_KINDS = ("VRRP", "IGMP")  # kept as present, with none of their fields
_U32 = pa.uint32()


@cache
def _handler(message: str) -> Any:
    """ptars' encoder of `flow.Flow` or `observer.GetFlowsResponse`."""
    import ptars

    from flowpipe._proto.flow import flow_pb2
    from flowpipe._proto.observer import observer_pb2

    descriptor = {"flow": flow_pb2.Flow, "response": observer_pb2.GetFlowsResponse}[message].DESCRIPTOR
    return ptars.HandlerPool([descriptor.file]).get_for_message(descriptor)


@cache
def _enum_table(enum: str) -> tuple[pa.Array, pa.Array]:
    names = enum_names(enum)
    return pa.array(list(names.values()), pa.string()), pa.array(list(names), pa.int32())


def _enum_numbers(values: pa.Array, enum: str) -> pa.Array:
    """Enum names → numbers (NULL stays NULL: the zero value); a stored decimal string is the number.

    Raises ValueError for a name that is neither (a value no decoder writes), as `to_flow.enum_number` does.
    """
    names, numbers = _enum_table(enum)
    out = pc.take(numbers, pc.index_in(values, value_set=names))
    if out.null_count != values.null_count:  # values that are not names of the enum
        unknown = pc.and_(pc.is_null(out), pc.is_valid(values))
        try:
            out = pc.coalesce(out, pc.cast(pc.if_else(unknown, values, None), pa.int32()))
        except pa.ArrowInvalid as exc:
            raise ValueError(
                f"a value of {values.type} is not a value of the enum flow.{enum}: {exc}"
            ) from exc
    return out


# The masks of which rows have a message are computed with numpy from the arrays' buffers: each Arrow compute
# call costs several microseconds whatever its size, and a batch took a few hundred of them.


def _valid(values: pa.Array) -> np.ndarray:
    """Whether each value is not NULL (bool numpy array)."""
    count = len(values)
    if values.null_count == 0:
        return np.ones(count, dtype=bool)
    bitmap = values.buffers()[0]
    if bitmap is None:  # (the null type: every value NULL)
        return np.zeros(count, dtype=bool)
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[values.offset : values.offset + count].view(bool)


def _offsets(values: pa.Array) -> np.ndarray:
    """The offsets of a string, binary or list array's values (one more than its length)."""
    wide = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    wide = wide or pa.types.is_large_list(values.type)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64 if wide else np.int32)
    return offsets[values.offset : values.offset + len(values) + 1]


def _nonempty(values: pa.Array) -> np.ndarray:
    """Whether each string is neither NULL nor empty."""
    return (np.diff(_offsets(values)) > 0) & _valid(values)


def _codes(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """The index of each value in `value_set`, -1 where it is not there (or NULL)."""
    return _indices(pc.index_in(values, value_set=value_set))


def _indices(found: pa.Array) -> np.ndarray:
    """An int32 array's values, -1 where NULL."""
    codes = np.frombuffer(found.buffers()[1], dtype=np.int32)[found.offset : found.offset + len(found)]
    return np.where(_valid(found), codes, -1)


def _u32(values: pa.Array) -> pa.Array:
    if values.type == pa.int32():
        return values.view(_U32)  # the same bits as an unchecked cast
    return pc.cast(values, _U32, safe=False)


def _struct(fields: dict[str, pa.Array], present: np.ndarray | None = None) -> pa.StructArray:
    """A struct column; rows where `present` is false are NULL: the message is absent."""
    mask = None if present is None else pa.array(~present)
    return pa.StructArray.from_arrays(list(fields.values()), names=list(fields), mask=mask)


def _one_item_lists(items: pa.StructArray, present: np.ndarray) -> pa.ListArray:
    """A list of the row's one item where `present`, else an empty list (NULL: protobuf has no other)."""
    offsets = pa.array(np.arange(len(items) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, items, mask=pa.array(~present))


_POLICY_ITEM = pa.struct([("name", pa.string()), ("namespace", pa.string())])


def _policies(lists: pa.Array) -> pa.ListArray:
    """ "namespace/name" or "name" strings → lists of Policy structs (name, namespace)."""
    lengths = np.where(_valid(lists), np.diff(_offsets(lists)), 0)
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = lists.flatten()  # (the values of the rows, without those under NULL lists)
    if not len(flat):
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array([], _POLICY_ITEM))
    parts = pc.extract_regex(flat, r"(?s)^(?:(?P<namespace>[^/]*)/)?(?P<name>.*)$")
    items = _struct(
        {"name": pc.struct_field(parts, ["name"]), "namespace": pc.struct_field(parts, ["namespace"])}
    )
    return pa.ListArray.from_arrays(pa.array(offsets), items)


def _endpoint(batch: pa.RecordBatch, side: str) -> pa.StructArray:
    workload_name = batch.column(f"{side}_workload_name")
    workload_kind = batch.column(f"{side}_workload_kind")
    workloads = _one_item_lists(
        _struct({"name": workload_name, "kind": workload_kind}),
        _valid(workload_name) | _valid(workload_kind),
    )
    identity = batch.column(f"{side}_identity")
    return _struct(
        {
            "identity": _u32(identity),
            "namespace": batch.column(f"{side}_namespace"),
            "pod_name": batch.column(f"{side}_pod_name"),
            "labels": batch.column(f"{side}_labels"),
            "workloads": workloads,
        },
        _valid(identity),
    )


def _tcp_flags(flags_text: pa.Array, tcp: np.ndarray) -> pa.StructArray:
    """The TCPFlags of each row: present where `tcp` and the text (flag names between commas) is not empty.

    A few flag combinations recur: the flags of each distinct text are found once, then spread to the rows.
    """
    distinct = pc.dictionary_encode(flags_text)
    texts = distinct.dictionary.to_pylist()
    # table[k, f]: whether text k has flag f; the last row (index -1) for rows without a text
    table = np.zeros((len(texts) + 1, len(TCP_FLAG_NAMES)), dtype=bool)
    for k, text in enumerate(texts):
        words = set(text.split(","))
        table[k] = [name in words for name in TCP_FLAG_NAMES]
    rows = table[_indices(distinct.indices)]
    return _struct(
        {name: pa.array(rows[:, f]) for f, name in enumerate(TCP_FLAG_NAMES)}, tcp & _nonempty(flags_text)
    )


_LAYER4_KINDS = (*_PORT_KINDS, *_ICMP_KINDS, *_EMPTY_KINDS)


@cache
def _value_set(values: tuple[str, ...]) -> pa.Array:
    return pa.array(values, pa.string())


def _layer4(batch: pa.RecordBatch) -> pa.StructArray:
    kind = _codes(batch.column("l4_protocol"), _value_set(_LAYER4_KINDS))
    present = {name: kind == i for i, name in enumerate(_LAYER4_KINDS)}
    source_port, destination_port = _u32(batch.column("source_port")), _u32(batch.column("destination_port"))
    icmp = {"type": _u32(batch.column("icmp_type")), "code": _u32(batch.column("icmp_code"))}
    flags = _tcp_flags(batch.column("tcp_flags"), present["TCP"])
    nothing = pa.nulls(len(kind), _U32)
    layers: dict[str, pa.Array] = {}
    for name in _PORT_KINDS:
        fields = {"source_port": source_port, "destination_port": destination_port}
        if name == "TCP":
            fields["flags"] = flags
        layers[name] = _struct(fields, present[name])
    for name in _ICMP_KINDS:
        layers[name] = _struct(icmp, present[name])
    for name in _EMPTY_KINDS:
        layers[name] = _struct({"type": nothing}, present[name])
    return _struct(layers, kind >= 0)


_L7_RECORDS = ("dns", "http", "kafka")


def _layer7(batch: pa.RecordBatch) -> pa.StructArray:
    record = batch.column("l7_protocol")
    kind = _codes(record, _value_set(_L7_RECORDS))
    latency = batch.column("latency_ns")
    dns = _struct(
        {
            "query": batch.column("dns_query"),
            "rcode": _u32(batch.column("dns_rcode")),
            "ttl": _u32(batch.column("dns_ttl")),
            "qtypes": batch.column("dns_qtypes"),
            "ips": batch.column("dns_ips"),
        },
        kind == 0,
    )
    http = _struct(
        {
            "method": batch.column("http_method"),
            "url": batch.column("http_url"),
            "code": _u32(batch.column("http_code")),
            "protocol": batch.column("http_protocol"),
        },
        kind == 1,
    )
    kafka = _struct(
        {
            "api_key": batch.column("kafka_api_key"),
            "topic": batch.column("kafka_topic"),
            "error_code": batch.column("kafka_error_code"),
        },
        kind == 2,
    )
    return _struct(
        {
            "type": _enum_numbers(batch.column("l7_type"), "L7FlowType"),
            "latency_ns": pc.cast(latency, pa.uint64(), safe=False),
            "dns": dns,
            "http": http,
            "kafka": kafka,
        },
        _valid(latency) | _valid(record),
    )


def served_node_names(node_name: pa.Array, cluster_name: pa.Array) -> pa.Array:
    """`to_flow.served_node_name` of each row: `cluster/node` unless the name has a cluster or it is `default`."""
    name = pc.fill_null(node_name, "")
    bare = pc.and_(
        pc.and_(pc.invert(pc.match_substring(name, "/")), pc.not_equal(name, "")),
        pc.fill_null(pc.not_equal(cluster_name, "default"), False),
    )
    return pc.if_else(bare, pc.binary_join_element_wise(cluster_name, name, "/"), name)


def flow_structs(batch: pa.RecordBatch, node_names: pa.Array) -> pa.StructArray:
    """The rows of a batch of the flow table in the Arrow layout of `flow.Flow` (`node_names`: as served)."""
    col = batch.column
    fields: dict[str, pa.Array] = {"time": col("time"), "node_name": node_names, "uuid": col("uuid")}
    for column, (enum, field) in _ENUM_FIELDS.items():
        fields[field] = _enum_numbers(col(column), enum)
    fields["drop_reason"] = _u32(col("drop_reason"))
    fields["policy_match_type"] = _u32(col("policy_match_type"))
    event_type, event_sub_type = col("event_type"), col("event_sub_type")
    fields["event_type"] = _struct(
        {"type": event_type, "sub_type": event_sub_type},
        _valid(event_type) | _valid(event_sub_type),
    )
    # Like Cilium's agents, the deprecated `reply` beside the `is_reply` wrapper.
    fields["is_reply"] = col("is_reply")
    fields["reply"] = col("is_reply")
    fields["socket_cookie"] = col("socket_cookie")
    fields["cgroup_id"] = col("cgroup_id")
    ip_version = _enum_numbers(col("ip_version"), "IPVersion")
    source_ip, destination_ip, encrypted = col("source_ip"), col("destination_ip"), col("encrypted")
    fields["IP"] = _struct(
        {"source": source_ip, "destination": destination_ip, "ipVersion": ip_version, "encrypted": encrypted},
        _valid(encrypted) | _valid(ip_version) | _nonempty(source_ip) | _nonempty(destination_ip),
    )
    for side in ("source", "destination"):
        fields[side] = _endpoint(batch, side)
        service = col(f"{side}_service_name")
        fields[f"{side}_service"] = _struct({"name": service}, _valid(service))
        fields[f"{side}_names"] = col(f"{side}_names")
    fields["l4"] = _layer4(batch)
    fields["l7"] = _layer7(batch)
    for name in _POLICY_FIELDS:
        fields[name] = _policies(col(name))
    return _struct(fields)


@dataclass(frozen=True)
class EncodedResponses:
    """A batch's GetFlowsResponse messages, with each flow's time (ns since the epoch) and served node name."""

    messages: pa.BinaryArray
    times: np.ndarray
    nodes: pa.Array


@dataclass(frozen=True)
class FramedResponses:
    """A batch's GetFlowsResponse messages in gRPC's framing, one after another in `data`.

    The i-th is `data[starts[i]:starts[i + 1]]`; `times` and `nodes` as in `EncodedResponses`.
    """

    data: pa.Buffer
    starts: np.ndarray
    times: np.ndarray
    nodes: pa.Array


_VARINT_BYTES = 5  # a length below 2^35: every message here


def _lengths(values: pa.BinaryArray) -> np.ndarray:
    return pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)


def _heads(flow_lengths: np.ndarray, tail_lengths: np.ndarray, framed: bool) -> pa.BinaryArray:
    """What goes before each serialised flow: gRPC's framing prefix (if `framed`: a zero byte and the
    message's big-endian length), the key of GetFlowsResponse's `flow` and the flow's length (a varint)."""
    count = len(flow_lengths)
    varint_size = np.ones(count, dtype=np.int64)
    for shift in range(7, 7 * _VARINT_BYTES, 7):
        varint_size += flow_lengths >= (1 << shift)
    at = 5 if framed else 0
    columns = np.zeros((count, at + 1 + _VARINT_BYTES), dtype=np.uint8)
    if framed:
        message_lengths = 1 + varint_size + flow_lengths + tail_lengths
        columns[:, 1:5] = message_lengths.astype(">u4").view(np.uint8).reshape(count, 4)
    columns[:, at] = 0x0A  # GetFlowsResponse.flow: field 1, length-delimited
    for k in range(_VARINT_BYTES):
        more = (varint_size > k + 1).astype(np.uint8) << 7
        columns[:, at + 1 + k] = ((flow_lengths >> (7 * k)) & 0x7F).astype(np.uint8) | more
    width = at + 1 + varint_size
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(width, out=offsets[1:])
    data = columns[np.arange(columns.shape[1]) < width[:, None]]  # row by row, each row's first `width`
    return pa.BinaryArray.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _responses(batch: pa.RecordBatch, framed: bool) -> tuple[pa.BinaryArray, np.ndarray, pa.Array]:
    """The batch's GetFlowsResponse messages (framed or not), each flow's time (ns) and served node name.

    ptars writes each row's `flow.Flow` and, apart, the response's other fields (`node_name`, `time`: its
    tail); the head before the flow is computed here, and the three are joined in one copy (ptars would copy
    each flow once more into its response, and the framing once more again).
    """
    nodes = served_node_names(batch.column("node_name"), batch.column("cluster_name"))
    time = batch.column("time")
    flows = _handler("flow").record_batch_to_array(
        pa.RecordBatch.from_struct_array(flow_structs(batch, nodes))
    )
    tails = _handler("response").record_batch_to_array(
        pa.RecordBatch.from_arrays([nodes, time], names=["node_name", "time"])
    )
    heads = _heads(_lengths(flows), _lengths(tails), framed)
    messages = pc.binary_join_element_wise(heads, flows, tails, b"")
    times = pc.cast(time, pa.int64()).to_numpy(zero_copy_only=False)
    return messages, times, nodes


def encode_responses(batch: pa.RecordBatch) -> EncodedResponses:
    """One serialised GetFlowsResponse per row of a batch of the flow table, the time of each its flow's."""
    messages, times, nodes = _responses(batch, framed=False)
    return EncodedResponses(messages, times, nodes)


def encode_framed(batch: pa.RecordBatch) -> FramedResponses:
    """`encode_responses` in gRPC's framing, every message in one buffer (what is sent)."""
    messages, times, nodes = _responses(batch, framed=True)
    data, starts = _joined(messages)
    return FramedResponses(data, starts, times, nodes)


def _joined(messages: pa.BinaryArray) -> tuple[pa.Buffer, np.ndarray]:
    """The bytes of every message one after another (one buffer), and where each starts (and the end)."""
    count = len(messages)
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(_lengths(messages), out=starts[1:])
    _, offsets, data = messages.buffers()
    first = (
        int(np.frombuffer(offsets, dtype=np.int32, count=1, offset=4 * messages.offset)[0]) if count else 0
    )
    return (data.slice(first, int(starts[-1])) if data is not None else pa.py_buffer(b"")), starts


def frame_responses(messages: pa.BinaryArray) -> tuple[pa.Buffer, np.ndarray]:
    """The messages in gRPC's framing (a zero byte and the big-endian length before each), one after another.

    Returns the buffer and where each framed message starts in it (one more entry: the end).
    """
    count = len(messages)
    lengths = _lengths(messages)
    headers = np.zeros((count, 5), dtype=np.uint8)
    headers[:, 1:] = lengths.astype(">u4").view(np.uint8).reshape(count, 4)
    prefixes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(5), count, [None, pa.py_buffer(headers)])
    return _joined(pc.binary_join_element_wise(prefixes.cast(pa.binary()), messages, b""))

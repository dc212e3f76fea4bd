"""Serialised GetFlowsResponse messages → flow rows, lost events and node status, decoded in bulk into Arrow.

This is the one decoder of protobuf flows. The relay source receives each response as raw bytes (no protobuf
object per flow) and decodes them a batch at a time with `ptars`, which parses protobuf straight into Arrow
arrays in compiled code; `normalize_flows` and `normalize_responses` (callers holding protobuf messages)
serialise them and decode them here too (`flow_response` wraps a serialised Flow in its envelope). The decoder
is given a *reduced* copy of the message types: only the fields that reach the flow table, with the same field
numbers (derived at import time from the generated `flow`/`observer`/`relay` descriptors, so it cannot drift
from them). Every other field is skipped as unknown, which keeps the decoder's work proportional to what
flowpipe stores. Enums decode as numbers and are named here, so unknown numbers from newer Cilium versions
survive as decimal strings.

The row conventions are those of the JSON decoder (`_json`, the README's flow table), and the pieces both need
come from `flowpipe.transforms.conventions`; tests check that both give identical tables for the same flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2, wrappers_pb2

from flowpipe._proto.observer import observer_pb2
from flowpipe.errors import FlowDecodeError
from flowpipe.model import FLOW_SCHEMA, LostEvent
from flowpipe.transforms.conventions import (
    L4_KINDS,
    L7_KINDS,
    POLICY_LISTS,
    TCP_FLAG_NAMES,
    TCP_FLAG_STRINGS,
    cluster_of,
    enum_names,
    enum_row_values,
)
from flowpipe.transforms.wire import encode_varint

_PACKAGE = "flowpipe_wire"
_FILE = "flowpipe_wire/relay_subset.proto"
_TIMESTAMP = FLOW_SCHEMA.field("time").type

STORED_FIELDS: dict[str, tuple[str, ...]] = {
    "observer.GetFlowsResponse": ("flow", "node_status", "lost_events", "node_name", "time"),
    "flow.Flow": (
        "time", "verdict", "drop_reason", "IP", "l4", "source", "destination", "Type", "node_name",
        "source_names", "destination_names", "l7", "reply", "event_type", "source_service",
        "destination_service", "traffic_direction", "policy_match_type", "trace_observation_point",
        "drop_reason_desc", "is_reply", "uuid", "auth_type", "sock_xlate_point", "socket_cookie", "cgroup_id",
        *POLICY_LISTS,
    ),
    "flow.IP": ("source", "destination", "ipVersion", "encrypted"),
    "flow.Layer4": L4_KINDS,
    "flow.TCP": ("source_port", "destination_port", "flags"),
    "flow.UDP": ("source_port", "destination_port"),
    "flow.SCTP": ("source_port", "destination_port"),
    "flow.ICMPv4": ("type", "code"),
    "flow.ICMPv6": ("type", "code"),
    "flow.VRRP": ("type",),
    "flow.IGMP": ("type",),
    "flow.TCPFlags": TCP_FLAG_NAMES,
    "flow.Endpoint": ("identity", "namespace", "labels", "pod_name", "workloads"),
    "flow.Workload": ("name", "kind"),
    "flow.Layer7": ("type", "latency_ns", *L7_KINDS),
    "flow.DNS": ("query", "ips", "ttl", "rcode", "qtypes"),
    "flow.HTTP": ("code", "method", "url", "protocol"),
    "flow.Kafka": ("error_code", "api_key", "topic"),
    "flow.Service": ("name",),
    "flow.Policy": ("name", "namespace"),
    "flow.CiliumEventType": ("type", "sub_type"),
    "flow.LostEvent": ("source", "num_events_lost", "cpu", "first", "last"),
    "relay.NodeStatusEvent": ("state_change", "node_names", "message"),
}  # fmt: skip
"""The fields of each message that flowpipe stores: what the decoder reads (everything else is skipped)."""

FIELD_MASK_PATHS: tuple[str, ...] = STORED_FIELDS["flow.Flow"]
"""Top-level Flow paths sent as `GetFlowsRequest.field_mask`, so the relay leaves out what is not stored."""


def _subset_name(full_name: str) -> str:
    return f"{_PACKAGE}.{full_name.replace('.', '_')}"


@cache
def _subset_descriptor() -> Any:
    """The reduced GetFlowsResponse type, built in a private descriptor pool (never the default one)."""
    field_type = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    for module in (timestamp_pb2, wrappers_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    out = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package=_PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto", "google/protobuf/wrappers.proto"],
    )
    source_pool = descriptor_pool.Default()
    observer_pb2.DESCRIPTOR  # noqa: B018  (importing the stubs registers flow, relay and observer)
    for full_name, keep in STORED_FIELDS.items():
        original = descriptor_pb2.DescriptorProto()
        source_pool.FindMessageTypeByName(full_name).CopyToProto(original)
        message = out.message_type.add(name=_subset_name(full_name).rsplit(".", 1)[1])
        for proto_field in original.field:
            if proto_field.name not in keep:
                continue
            copied = message.field.add()
            copied.CopyFrom(proto_field)
            copied.ClearField("oneof_index")  # oneof members decode as separate nullable structs
            copied.ClearField("json_name")
            if proto_field.type == field_type.TYPE_ENUM:
                copied.type = field_type.TYPE_INT32  # same varint on the wire; named below
                copied.ClearField("type_name")
            elif proto_field.type == field_type.TYPE_MESSAGE:
                target = proto_field.type_name.lstrip(".")
                if not target.startswith("google.protobuf."):
                    copied.type_name = "." + _subset_name(target)
    pool.Add(out)
    return pool.FindMessageTypeByName(_subset_name("observer.GetFlowsResponse"))


@cache
def _handler() -> Any:
    import ptars

    descriptor = _subset_descriptor()
    return ptars.HandlerPool([descriptor.file]).get_for_message(descriptor)


def decode_record_batch(messages: Sequence[bytes] | pa.BinaryArray) -> pa.RecordBatch:
    """Serialised GetFlowsResponse messages (bytes, or an Arrow binary array of them, as the receiving process
    hands them over) → one Arrow record batch of the reduced response type.

    Raises an exception of the decoder (ptars) when a message is not valid protobuf; the caller isolates it.
    """
    if isinstance(messages, pa.BinaryArray):
        batch: pa.RecordBatch = _handler().array_to_record_batch(messages)
    else:
        batch = _handler().list_to_record_batch(list(messages))
    return batch


@dataclass(slots=True)
class DecodedResponses:
    """What a batch of responses held: flow rows, lost events, node status events and undecodable messages."""

    flows: pa.Table
    lost_events: list[LostEvent] = field(default_factory=list)
    node_status: list[tuple[str, list[str], str]] = field(default_factory=list)
    """(state name, node names, message) of each node_status response."""
    bad_messages: list[tuple[int, str]] = field(default_factory=list)
    """(index in the batch, error) of each message that could not be decoded."""


def decode_responses(
    messages: Sequence[bytes] | pa.BinaryArray, *, cluster_name: str | None = None
) -> DecodedResponses:
    """Decode serialised GetFlowsResponse messages; a message that fails to decode is reported, not raised."""
    bad: list[tuple[int, str]] = []
    try:
        batch = decode_record_batch(messages)
    except Exception:  # noqa: BLE001  (ptars raises its own errors: find the bad messages one by one)
        if isinstance(messages, pa.BinaryArray):
            messages = messages.to_pylist()
        good = []
        for index, message in enumerate(messages):
            try:
                decode_record_batch([message])
            except Exception as exc:  # noqa: BLE001
                bad.append((index, str(exc) or type(exc).__name__))
            else:
                good.append(message)
        batch = decode_record_batch(good)
    decoded = _split(batch, cluster_name)
    decoded.bad_messages = bad
    return decoded


def decode_flow_rows(
    messages: Sequence[bytes] | pa.BinaryArray, *, cluster_name: str | None = None
) -> tuple[pa.Table, list[bytes] | None]:
    """The flow table of the flow responses among `messages`, and the other responses (lost events, node status)
    as they came, for `decode_responses` to read, or None when every response is a flow. (A list of messages is
    read as it is: no copy into an Arrow array first.)

    This is what `collect`'s receiving process decodes: it never turns a row into Python objects (lost events'
    times would need pandas). Raises an exception of the decoder (ptars) when a message is not valid protobuf:
    the caller hands the batch on undecoded, and `decode_responses` finds the bad messages.
    """
    batch = decode_record_batch(messages)
    flow_column = batch.column("flow")
    is_flow = pc.is_valid(flow_column)
    if not batch.num_rows or is_flow.true_count == batch.num_rows:
        return flow_table(flow_column, batch.column("node_name"), batch.column("time"), cluster_name), None
    selected = batch.filter(is_flow)
    flows = flow_table(
        selected.column("flow"), selected.column("node_name"), selected.column("time"), cluster_name
    )
    others = pc.indices_nonzero(pc.invert(is_flow)).to_pylist()
    if isinstance(messages, pa.BinaryArray):
        return flows, messages.take(others).to_pylist()
    return flows, [messages[index] for index in others]


def decode_messages(
    messages: Sequence[bytes], *, cluster_name: str | None = None, what: str = "<protobuf>"
) -> DecodedResponses:
    """As `decode_responses`, for messages a caller serialised itself: one that cannot be decoded raises
    FlowDecodeError (naming `what` and its position, counted from 1) instead of being left out."""
    decoded = decode_responses(messages, cluster_name=cluster_name)
    if decoded.bad_messages:
        index, reason = decoded.bad_messages[0]
        raise FlowDecodeError(
            f"protobuf message {index + 1} could not be decoded: {reason}",
            path=what,
            line_number=None,
            reason=reason,
        )
    return decoded


_ENVELOPE = observer_pb2.GetFlowsResponse.DESCRIPTOR.fields_by_name
_LENGTH_DELIMITED = 2
_FLOW_KEY, _NODE_NAME_KEY, _TIME_KEY = (
    encode_varint(_ENVELOPE[name].number << 3 | _LENGTH_DELIMITED) for name in ("flow", "node_name", "time")
)


def flow_response(flow: bytes, node_name: str = "", time: bytes = b"") -> bytes:
    """A serialised GetFlowsResponse around a serialised `flow.Flow`, with the envelope's node name and
    serialised `Timestamp` when given (empty: left out, as protobuf leaves out unset fields)."""
    parts = [_FLOW_KEY, encode_varint(len(flow)), flow]
    if node_name:
        name = node_name.encode()
        parts += [_NODE_NAME_KEY, encode_varint(len(name)), name]
    if time:
        parts += [_TIME_KEY, encode_varint(len(time)), time]
    return b"".join(parts)


def _split(batch: pa.RecordBatch, cluster_name: str | None) -> DecodedResponses:
    flow_column = batch.column("flow")
    is_flow = pc.is_valid(flow_column)
    if batch.num_rows and pc.all(is_flow).as_py():
        flows = flow_table(flow_column, batch.column("node_name"), batch.column("time"), cluster_name)
        return DecodedResponses(flows)
    selected = batch.filter(is_flow)
    flows = flow_table(
        selected.column("flow"), selected.column("node_name"), selected.column("time"), cluster_name
    )
    lost: list[LostEvent] = []
    status: list[tuple[str, list[str], str]] = []
    others = batch.filter(pc.invert(is_flow)).to_pylist()
    for row in others:
        if row["lost_events"] is not None:
            lost.append(_lost_event(row))
        elif row["node_status"] is not None:
            event = row["node_status"]
            state = _relay_state_name(event["state_change"])
            status.append((state, list(event["node_names"]), event["message"]))
    return DecodedResponses(flows, lost, status)


def _lost_event(row: dict[str, Any]) -> LostEvent:
    lost = row["lost_events"]
    return LostEvent(
        source=enum_names("LostEventSource").get(lost["source"], str(lost["source"])),
        num_events_lost=int(lost["num_events_lost"]),
        node_name=row["node_name"],
        time=_datetime(row["time"]),
        cpu=lost["cpu"],
        first=_datetime(lost["first"]),
        last=_datetime(lost["last"]),
    )


def _datetime(value: Any) -> datetime | None:
    """A decoded timestamp as a UTC datetime (microseconds), as the other sources report lost events."""
    if value is None:
        return None
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp (nanoseconds)
        value = value.to_pydatetime(warn=False)
    result: datetime = value.astimezone(UTC)
    return result


@cache
def _relay_state_names() -> dict[int, str]:
    from flowpipe._proto.relay import relay_pb2

    return {value.number: value.name for value in relay_pb2.DESCRIPTOR.enum_types_by_name["NodeState"].values}


def _relay_state_name(number: int) -> str:
    return _relay_state_names().get(number, str(number))


# -- the flow table ---------------------------------------------------------------------------------------

_TCP_FLAG_STRINGS = pa.array(TCP_FLAG_STRINGS, pa.string())


@cache
def _enum_lookup(enum: str) -> tuple[pa.Array, pa.Array]:
    table = enum_row_values(enum)
    return pa.array(list(table), pa.int32()), pa.array(list(table.values()), pa.string())


@cache
def _enum_by_number(enum: str) -> tuple[pa.Array, int]:
    """The flow-table value of every number from 0 to the enum's largest, to be taken by number: its name, NULL for
    zero, the decimal string of a number the enum leaves out (as `_enum` gives them)."""
    table = enum_row_values(enum)
    top = max(table)
    return pa.array([table[n] if n in table else str(n) for n in range(top + 1)], pa.string()), top


def _enum(values: pa.Array, enum: str) -> pa.Array:
    """Enum numbers → names; the zero value (and NULL) → NULL; an unknown number → its decimal string."""
    by_number, top = _enum_by_number(enum)
    bounds = pc.min_max(values).as_py()
    if bounds["min"] is None or (bounds["min"] >= 0 and bounds["max"] <= top):
        # (every number within the table: one take, where a lookup builds a hash table of the enum each time)
        return by_number.take(values)
    known, names = _enum_lookup(enum)
    index = pc.index_in(values, value_set=known)
    named = names.take(index)
    if index.null_count == values.null_count:
        return named
    return pc.if_else(pc.is_null(index), pc.cast(values, pa.string()), named)


def _nonempty(values: pa.Array) -> pa.Array:
    empty = pc.equal(values, "")
    if not pc.any(empty).as_py():
        return values
    return pc.if_else(empty, None, values)


def _first_of(choices: list[tuple[pa.Array, pa.Array]], length: int, type_: pa.DataType) -> pa.Array:
    result = pa.nulls(length, type_)
    for present, value in reversed(choices):
        if present.true_count:
            result = pc.if_else(present, _fit(value, type_), result)
    return result


def _label_of(choices: list[tuple[pa.Array, str]], length: int) -> pa.Array:
    index = pa.nulls(length, pa.int8())
    for position in range(len(choices) - 1, -1, -1):
        if choices[position][0].true_count:
            index = pc.if_else(choices[position][0], pa.scalar(position, pa.int8()), index)
    return pa.array([label for _, label in choices], pa.string()).take(index)


_STRING_LIST = pa.list_(pa.string())


def _lists(values: pa.Array) -> pa.Array:
    """A repeated field as list<item>: an empty list where the enclosing message is absent."""
    if values.null_count:
        lengths = pc.fill_null(pc.list_value_length(values), 0)
        offsets = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(lengths).cast(pa.int32())])
        values = pa.ListArray.from_arrays(offsets, pc.list_flatten(values))
    return values.cast(_STRING_LIST)


def _policies(values: pa.Array) -> pa.Array:
    lists = values
    items = lists.flatten()
    name, namespace = pc.struct_field(items, ["name"]), pc.struct_field(items, ["namespace"])
    joined = pc.if_else(pc.equal(namespace, ""), name, pc.binary_join_element_wise(namespace, name, "/"))
    offsets = pc.subtract(lists.offsets, lists.offsets[0]) if len(lists) else lists.offsets
    return pa.ListArray.from_arrays(offsets, joined)


def _tcp_flags(flags: pa.Array) -> pa.Array:
    mask = pa.repeat(0, len(flags))
    for bit, name in enumerate(TCP_FLAG_NAMES):
        flag = pc.struct_field(flags, [name])
        if flag.true_count:
            mask = pc.add(mask, pc.if_else(pc.coalesce(flag, False), 1 << bit, 0))
    return _TCP_FLAG_STRINGS.take(mask)


def _first_workload(workloads: pa.Array) -> tuple[pa.Array, pa.Array]:
    lengths = pc.fill_null(pc.list_value_length(workloads), 0)
    if not pc.any(pc.greater(lengths, 0)).as_py():
        empty = pa.nulls(len(workloads), pa.string())
        return empty, empty
    index = pc.if_else(pc.greater(lengths, 0), workloads.offsets.slice(0, len(workloads)), None)
    first = workloads.values.take(index)
    return _nonempty(pc.struct_field(first, ["name"])), _nonempty(pc.struct_field(first, ["kind"]))


def _fit(values: pa.Array, type_: pa.DataType) -> pa.Array:
    """Cast to the column type; unsigned values beyond a signed column's range become NULL (as normalize)."""
    if values.type == type_:  # (most columns: a cast to the same type still costs a compute call)
        return values
    if (
        pa.types.is_unsigned_integer(values.type)
        and pa.types.is_signed_integer(type_)
        and values.type.bit_width >= type_.bit_width
    ):
        limit = 2 ** (type_.bit_width - 1) - 1
        top = pc.max(values).as_py()
        if top is not None and top > limit:
            over = pc.greater(values, pa.scalar(limit, values.type))
            values = pc.if_else(over, pa.scalar(None, values.type), values)
    return pc.cast(values, type_)


class _Paths:
    """Nested children by path, NULL where a parent message is absent; each looked up once.

    A message's fields are taken all at once (`StructArray.flatten`: its validity in each child's), one call a
    message instead of one compute call a field (about 10 µs each, whatever the batch's size)."""

    def __init__(self, root: pa.Array) -> None:
        self._cache: dict[tuple[str, ...], pa.Array] = {(): root}
        self._fields: dict[tuple[str, ...], dict[str, pa.Array]] = {}

    def __call__(self, *path: str) -> pa.Array:
        found = self._cache.get(path)
        if found is None:
            parent = path[:-1]
            fields = self._fields.get(parent)
            if fields is None:
                message = self(*parent)
                fields = self._fields[parent] = dict(
                    zip([field.name for field in message.type], message.flatten(), strict=True)
                )
            found = self._cache[path] = fields[path[-1]]
        return found

    def present(self, *path: str) -> pa.Array:
        return pc.is_valid(self(*path))


def flow_table(
    flows: pa.Array, node_name: pa.Array, time: pa.Array, cluster_name: str | None = None
) -> pa.Table:
    """Decoded (reduced) `flow.Flow` structs and their envelopes' node_name/time → the flow table."""
    n = len(flows)
    p = _Paths(flows)
    cols: dict[str, pa.Array] = {}
    cols["time"] = pc.coalesce(p("time"), time)
    node = pc.coalesce(_nonempty(p("node_name")), _nonempty(node_name))
    cols["node_name"] = node
    cols["cluster_name"] = cluster_of(node, cluster_name)
    cols["uuid"] = _nonempty(p("uuid"))
    cols["verdict"] = _enum(p("verdict"), "Verdict")
    cols["drop_reason"] = p("drop_reason")
    cols["drop_reason_desc"] = _enum(p("drop_reason_desc"), "DropReason")
    cols["policy_match_type"] = p("policy_match_type")
    cols["auth_type"] = _enum(p("auth_type"), "AuthType")
    cols["flow_type"] = _enum(p("Type"), "FlowType")
    cols["event_type"] = p("event_type", "type")
    cols["event_sub_type"] = p("event_type", "sub_type")
    cols["trace_observation_point"] = _enum(p("trace_observation_point"), "TraceObservationPoint")
    cols["traffic_direction"] = _enum(p("traffic_direction"), "TrafficDirection")
    legacy = pc.if_else(p("reply"), pa.scalar(True), pa.scalar(None, pa.bool_()))
    cols["is_reply"] = pc.coalesce(p("is_reply"), legacy)
    cols["sock_xlate_point"] = _enum(p("sock_xlate_point"), "SocketTranslationPoint")
    for name in ("socket_cookie", "cgroup_id"):
        value = p(name)
        cols[name] = pc.if_else(pc.equal(pc.coalesce(value, 0), 0), pa.scalar(None, value.type), value)

    cols["ip_version"] = _enum(p("IP", "ipVersion"), "IPVersion")
    cols["source_ip"] = _nonempty(p("IP", "source"))
    cols["destination_ip"] = _nonempty(p("IP", "destination"))
    cols["encrypted"] = p("IP", "encrypted")

    for side in ("source", "destination"):
        cols[f"{side}_namespace"] = _nonempty(p(side, "namespace"))
        cols[f"{side}_pod_name"] = _nonempty(p(side, "pod_name"))
        workloads = p(side, "workloads")
        cols[f"{side}_workload_name"], cols[f"{side}_workload_kind"] = _first_workload(workloads)
        cols[f"{side}_identity"] = p(side, "identity")
        cols[f"{side}_labels"] = _lists(p(side, "labels"))
        cols[f"{side}_service_name"] = _nonempty(p(f"{side}_service", "name"))
        cols[f"{side}_names"] = _lists(p(f"{side}_names"))

    l4 = {kind: p.present("l4", kind) for kind in L4_KINDS}
    cols["l4_protocol"] = _label_of([(l4[kind], kind) for kind in L4_KINDS], n)
    for port in ("source_port", "destination_port"):
        cols[port] = _first_of([(l4[k], p("l4", k, port)) for k in ("TCP", "UDP", "SCTP")], n, pa.int32())
    cols["tcp_flags"] = _tcp_flags(p("l4", "TCP", "flags"))
    for part in ("type", "code"):
        cols[f"icmp_{part}"] = _first_of(
            [(l4[k], p("l4", k, part)) for k in ("ICMPv4", "ICMPv6")], n, pa.int32()
        )

    l7 = {kind: p.present("l7", kind) for kind in L7_KINDS}
    cols["l7_type"] = _enum(p("l7", "type"), "L7FlowType")
    cols["l7_protocol"] = _label_of([(l7[kind], kind) for kind in L7_KINDS], n)
    cols["latency_ns"] = p("l7", "latency_ns")
    cols["dns_query"] = _nonempty(p("l7", "dns", "query"))
    cols["dns_rcode"] = p("l7", "dns", "rcode")
    cols["dns_qtypes"] = _lists(p("l7", "dns", "qtypes"))
    cols["dns_ips"] = _lists(p("l7", "dns", "ips"))
    cols["dns_ttl"] = p("l7", "dns", "ttl")
    cols["http_method"] = _nonempty(p("l7", "http", "method"))
    cols["http_url"] = _nonempty(p("l7", "http", "url"))
    cols["http_code"] = p("l7", "http", "code")
    cols["http_protocol"] = _nonempty(p("l7", "http", "protocol"))
    cols["kafka_api_key"] = _nonempty(p("l7", "kafka", "api_key"))
    cols["kafka_topic"] = _nonempty(p("l7", "kafka", "topic"))
    cols["kafka_error_code"] = p("l7", "kafka", "error_code")
    for name in POLICY_LISTS:
        cols[name] = _policies(p(name))

    arrays = [_fit(cols[f.name], f.type) for f in FLOW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=FLOW_SCHEMA)

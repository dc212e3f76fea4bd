"""The shape of Hubble JSON that flowpipe reads, as one spec: Arrow parse types and the keys' camelCase aliases.

Hubble writes proto field names (`node_name`, `IP`, `Type`, `source_port`); conforming protobuf JSON writers
(Python's `json_format` by default) write lowerCamelCase (`nodeName`, `sourcePort`). Both are read: the Arrow
parse schema carries every alias as an extra field, and `canonicalize` merges each alias into its proto-named
field, so that the row builder only ever sees proto names.

Only the fields that reach the flow table (or the lost-events table) are listed; every other key is ignored,
which is also how fields from newer Cilium versions pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True, slots=True)
class Leaf:
    """A scalar JSON value: `kind` is str, int, bool, int64str (64-bit int, a JSON string), enum or time.

    An integer leaf has the range of its proto type (`proto`, `low`..`high`); a value outside it is a bad line
    naming the field. A uint64 stored in a signed 64-bit column goes up to the column's maximum.
    """

    kind: str
    enum: str | None = None
    proto: str = ""
    low: int | None = None
    high: int | None = None


@dataclass(frozen=True, slots=True)
class ListOf:
    """A repeated field."""

    item: Spec


Spec = Leaf | ListOf | dict[str, "Spec"]

INT64_MAX = (1 << 63) - 1
STR = Leaf("str")
UINT32 = Leaf("int", proto="uint32", low=0, high=(1 << 32) - 1)
INT32 = Leaf("int", proto="int32", low=-(1 << 31), high=(1 << 31) - 1)
BOOL = Leaf("bool")
UINT64_STR = Leaf("int64str", proto="uint64", low=0, high=(1 << 64) - 1)
UINT64_STR_SIGNED = Leaf("int64str", proto="uint64 stored as int64", low=0, high=INT64_MAX)
"""A uint64 whose column is int64 (latencies, lost-event counts): up to the column's maximum."""
TIME = Leaf("time")


def _enum(name: str) -> Leaf:
    return Leaf("enum", name)


_PORTS: dict[str, Spec] = {"source_port": UINT32, "destination_port": UINT32}
_ICMP: dict[str, Spec] = {"type": UINT32, "code": UINT32}
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
TCP_FLAG_STRINGS: tuple[str | None, ...] = tuple(
    ",".join(name for bit, name in enumerate(TCP_FLAG_NAMES) if mask >> bit & 1) or None
    for mask in range(1 << 9)
)
"""The `tcp_flags` value of each of the 2**9 flag combinations, indexed by the bit mask (bit i = flag i)."""
L4_KINDS = ("TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP", "VRRP", "IGMP")
L7_KINDS = ("dns", "http", "kafka")
POLICY_LISTS = ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by", "egress_denied_by")

_ENDPOINT: dict[str, Spec] = {
    "identity": UINT32,
    "namespace": STR,
    "labels": ListOf(STR),
    "pod_name": STR,
    "workloads": ListOf({"name": STR, "kind": STR}),
}
_SERVICE: dict[str, Spec] = {"name": STR, "namespace": STR}
_POLICY = ListOf({"name": STR, "namespace": STR})

FLOW_SPEC: dict[str, Spec] = {
    "time": TIME,
    "uuid": STR,
    "verdict": _enum("Verdict"),
    "drop_reason": UINT32,
    "drop_reason_desc": _enum("DropReason"),
    "policy_match_type": UINT32,
    "auth_type": _enum("AuthType"),
    "Type": _enum("FlowType"),
    "event_type": {"type": INT32, "sub_type": INT32},
    "trace_observation_point": _enum("TraceObservationPoint"),
    "traffic_direction": _enum("TrafficDirection"),
    "is_reply": BOOL,
    "reply": BOOL,
    "sock_xlate_point": _enum("SocketTranslationPoint"),
    "socket_cookie": UINT64_STR,
    "cgroup_id": UINT64_STR,
    "IP": {"source": STR, "destination": STR, "ipVersion": _enum("IPVersion"), "encrypted": BOOL},
    "source": _ENDPOINT,
    "destination": _ENDPOINT,
    "source_names": ListOf(STR),
    "destination_names": ListOf(STR),
    "source_service": _SERVICE,
    "destination_service": _SERVICE,
    "l4": {
        "TCP": {**_PORTS, "flags": {name: BOOL for name in TCP_FLAG_NAMES}},
        "UDP": _PORTS,
        "ICMPv4": _ICMP,
        "ICMPv6": _ICMP,
        "SCTP": _PORTS,
        "VRRP": {"type": UINT32},
        "IGMP": {"type": UINT32},
    },
    "l7": {
        "type": _enum("L7FlowType"),
        "latency_ns": UINT64_STR_SIGNED,
        "dns": {"query": STR, "ips": ListOf(STR), "ttl": UINT32, "rcode": UINT32, "qtypes": ListOf(STR)},
        "http": {"code": UINT32, "method": STR, "url": STR, "protocol": STR},
        "kafka": {"error_code": INT32, "api_key": STR, "topic": STR},
    },
    "node_name": STR,
    **{name: _POLICY for name in POLICY_LISTS},
}

LOST_EVENTS_SPEC: dict[str, Spec] = {
    "source": _enum("LostEventSource"),
    "num_events_lost": UINT64_STR_SIGNED,
    "cpu": INT32,
    "first": TIME,
    "last": TIME,
}

# The kinds of event an envelope (GetFlowsResponse / ExportEvent) holds, in field-number order. Only `flow` and
# `lost_events` are read; the others are counted, so their content is not parsed.
EVENT_KINDS = ("flow", "node_status", "lost_events", "agent_event", "debug_event")

ENVELOPE_SPEC: dict[str, Spec] = {
    "flow": FLOW_SPEC,
    "node_status": {},
    "lost_events": LOST_EVENTS_SPEC,
    "agent_event": {},
    "debug_event": {},
    "node_name": STR,
    "time": TIME,
}

# One line is either an envelope or a legacy bare Flow; both are parsed with one schema (the union of their
# keys: `node_name` and `time` are common), so a file may even mix them.
LINE_SPEC: dict[str, Spec] = {**FLOW_SPEC, **ENVELOPE_SPEC}

# Keys that mark a line without envelope keys as a bare Flow (`time`/`node_name` alone do not).
BARE_FLOW_KEYS = tuple(name for name in FLOW_SPEC if name not in ("time", "node_name"))


def _ranged(spec: dict[str, Spec], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Leaf]]:
    for name, child in spec.items():
        if isinstance(child, Leaf) and child.low is not None:
            yield (*path, name), child
        elif isinstance(child, dict):
            yield from _ranged(child, (*path, name))


RANGED_LEAVES: tuple[tuple[tuple[str, ...], Leaf], ...] = tuple(_ranged(LINE_SPEC, ()))
"""Every integer leaf with a range, by its path in a canonical line (lists hold no integers)."""


def out_of_range(lines: pa.StructArray) -> bool:
    """Whether a parsed block (proto names) may hold an integer outside its proto type: a number beyond the
    range, or a negative unsigned 64-bit string. Vectorized (one min/max a field), for the fast path; the
    per-line path then names the field of each bad line."""
    present = set(lines.type.names)
    for path, leaf in RANGED_LEAVES:
        if path[0] not in present:
            continue
        try:
            values = pc.struct_field(lines, list(path))
        except (KeyError, IndexError, pa.ArrowInvalid):  # a narrow layout that only records presence there
            continue
        if values.null_count == len(values):
            continue
        if leaf.kind == "int64str":
            if pc.any(pc.starts_with(values, "-")).as_py():
                return True
            continue
        bounds = pc.min_max(values).as_py()
        assert leaf.low is not None and leaf.high is not None
        if bounds["min"] < leaf.low or bounds["max"] > leaf.high:
            return True
    return False


def camel(name: str) -> str:
    """The lowerCamelCase JSON name protobuf derives from a proto field name (`source_port` → `sourcePort`)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def arrow_type(spec: Spec, *, aliases: bool) -> pa.DataType:
    """The Arrow type of a spec; with `aliases`, every struct also has the camelCase spellings of its keys."""
    if isinstance(spec, Leaf):
        if spec.kind == "int":
            return pa.int64()
        if spec.kind == "bool":
            return pa.bool_()
        return pa.string()
    if isinstance(spec, ListOf):
        return pa.list_(arrow_type(spec.item, aliases=aliases))
    fields = [pa.field(name, arrow_type(child, aliases=aliases)) for name, child in spec.items()]
    if aliases:
        fields += [
            pa.field(camel(name), arrow_type(child, aliases=True))
            for name, child in spec.items()
            if camel(name) != name and camel(name) not in spec
        ]
    return pa.struct(fields)


# Parse layouts. The parser's cost grows with the schema's width, so a file is read with the narrowest one
# that fits it (guessed from its first line): ENVELOPE (proto names, the Hubble CLI and exporter) or BARE
# (legacy bare Flows, proto names). Each narrow schema carries a few sentinel fields; when one of them is set
# (camelCase keys, or a line of the other shape) the block is parsed again with FULL: every key, both shapes,
# both spellings.
ENVELOPE, BARE, FULL = "envelope", "bare", "full"

_PRESENCE = pa.struct([])
# camelCase keys a lowerCamelCase writer emits on (nearly) every flow.
_FLOW_SENTINELS = (
    "nodeName",
    "eventType",
    "trafficDirection",
    "isReply",
    "dropReasonDesc",
    "traceObservationPoint",
    "sourceService",
    "destinationService",
)
_ENVELOPE_SENTINELS = ("nodeName", "lostEvents", "nodeStatus", "agentEvent", "debugEvent")


@cache
def parse_schema(layout: str = FULL) -> pa.Schema:
    """The explicit schema given to `pyarrow.json.read_json` for one line, in a given layout."""
    if layout == FULL:
        return pa.schema(list(arrow_type(LINE_SPEC, aliases=True)))
    flow = arrow_type(FLOW_SPEC, aliases=False)
    flow_fields = list(flow) + [pa.field(name, _sentinel_type(name)) for name in _FLOW_SENTINELS]
    if layout == ENVELOPE:
        fields = [
            pa.field(name, pa.struct(flow_fields) if name == "flow" else arrow_type(spec, aliases=False))
            for name, spec in ENVELOPE_SPEC.items()
        ]
        fields += [pa.field(name, _sentinel_type(name)) for name in _ENVELOPE_SENTINELS]
        return pa.schema(fields)
    kinds = [pa.field(kind, _PRESENCE) for kind in EVENT_KINDS]
    camel_kinds = [pa.field(name, _PRESENCE) for name in _ENVELOPE_SENTINELS if name != "nodeName"]
    return pa.schema(flow_fields + kinds + camel_kinds)


def _sentinel_type(name: str) -> pa.DataType:
    # Only presence matters. A value of another type fails the block, which then takes the per-line path.
    return {"isReply": pa.bool_()}.get(name) or (
        pa.string()
        if name in ("nodeName", "trafficDirection", "dropReasonDesc", "traceObservationPoint")
        else _PRESENCE
    )


def sentinels(layout: str) -> list[tuple[str, ...]]:
    """Paths that must be NULL on every line for a narrow-layout parse to be complete."""
    if layout == ENVELOPE:
        return [(name,) for name in _ENVELOPE_SENTINELS] + [("flow", name) for name in _FLOW_SENTINELS]
    if layout == BARE:
        camel_kinds = [name for name in _ENVELOPE_SENTINELS if name != "nodeName"]
        return [(name,) for name in (*_FLOW_SENTINELS, *EVENT_KINDS, *camel_kinds)]
    return []


_ALIASES = frozenset(
    camel(name)
    for spec in (LINE_SPEC, FLOW_SPEC["l4"], FLOW_SPEC["l7"], FLOW_SPEC["source"], LOST_EVENTS_SPEC)
    if isinstance(spec, dict)
    for name in spec
    if camel(name) != name
)


def guess_layout(first_line: object) -> str:
    """The parse layout for a file whose first record (parsed JSON) is given."""
    if not isinstance(first_line, dict):
        return ENVELOPE
    keys = set(first_line)
    flow = first_line.get("flow")
    if isinstance(flow, dict):
        keys |= set(flow)
    if keys & _ALIASES:
        return FULL
    if keys & set(ENVELOPE_SPEC) - {"node_name", "time"}:
        return ENVELOPE
    return BARE


@cache
def canonical_type() -> pa.StructType:
    """The type of one canonical line: proto names only (what `canonicalize` and the dict path produce)."""
    struct = arrow_type(LINE_SPEC, aliases=False)
    assert isinstance(struct, pa.StructType)
    return struct


def canonicalize(array: pa.StructArray) -> pa.StructArray:
    """Merge camelCase alias fields into their proto-named fields (proto name wins); drop the aliases."""
    return _canonical_struct(array, LINE_SPEC)


def _canonical(array: pa.Array, spec: Spec) -> pa.Array:
    if isinstance(spec, dict):
        return _canonical_struct(array, spec)
    if (
        isinstance(spec, ListOf)
        and isinstance(spec.item, dict)
        and _has_aliases(spec.item)
        and array.null_count < len(array)
    ):
        flat = _canonical_struct(array.values, spec.item)
        return pa.ListArray.from_arrays(array.offsets, flat, mask=array.is_null())
    return array


def _has_aliases(spec: dict[str, Spec]) -> bool:
    return any(camel(name) != name or isinstance(child, (dict, ListOf)) for name, child in spec.items())


def _canonical_struct(array: pa.Array, spec: dict[str, Spec]) -> pa.Array:
    valid = array.is_valid()
    children: list[pa.Array] = []
    for name, child_spec in spec.items():
        child = _canonical(pc.struct_field(array, [name]), child_spec)
        alias = camel(name)
        if alias != name and alias not in spec:
            other = pc.struct_field(array, [alias])
            if other.null_count < len(other):
                child = _merge(child, _canonical(other, child_spec))
                valid = pc.or_(valid, other.is_valid())
        children.append(child)
    if not spec:
        return _empty_struct(valid)
    return pa.StructArray.from_arrays(children, names=list(spec), mask=pc.invert(valid))


def _empty_struct(valid: pa.Array) -> pa.Array:
    # A struct without fields that only records presence (node_status, agent_event, debug_event).
    return pa.StructArray.from_arrays([], fields=[], mask=pc.invert(valid))


def _merge(first: pa.Array, second: pa.Array) -> pa.Array:
    """Value of `first` where it is set, else of `second`; structs are merged field by field."""
    if pa.types.is_struct(first.type):
        names = [first.type.field(i).name for i in range(first.type.num_fields)]
        children = [_merge(pc.struct_field(first, [n]), pc.struct_field(second, [n])) for n in names]
        valid = pc.or_(first.is_valid(), second.is_valid())
        if not names:
            return _empty_struct(valid)
        return pa.StructArray.from_arrays(children, names=names, mask=pc.invert(valid))
    return pc.coalesce(first, second)

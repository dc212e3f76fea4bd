"""Fast encoding of simulated flows: pre-built per-endpoint-pair templates plus hand-encoded changing fields.

A simulated flow is a `Template` (everything that is the same for every packet between two endpoints seen at
one node: endpoints, IPs, verdict, event type, direction, attribution) and a few changing fields (time, L4 ports
and flags, the L7 record, uuid). Protobuf merges concatenated encodings of a message, so a flow's wire bytes are
the template's bytes followed by the encoded changing fields; its Hubble JSON line is the template's JSON pieces
with the changing fields spliced in at their field-number positions (Python's json_format orders keys by field
number). Both paths are checked against `json_format` by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from flowpipe._proto.flow import flow_pb2
from flowpipe.transforms.wire import encode_varint

US = 1_000
"""Nanoseconds in a microsecond."""
MS = 1_000_000
"""Nanoseconds in a millisecond."""

# Record classes, for counting what was emitted.
TRACE = 0
DROP = 1
POLICY_VERDICT = 2
L7_REQUEST = 3
L7_RESPONSE = 4
SOCK = 5
CLASS_NAMES = ("trace", "drop", "policy_verdict", "l7_request", "l7_response", "sock")

# Cilium monitor message types (Flow.event_type.type).
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_L7 = 129
EVENT_SOCK = 7

# Raw trace sub-types (the observation point numbers of the datapath; to-endpoint is 0 here, 101 in the enum).
_TRACE_SUB_TYPE: dict[int, int] = {
    flow_pb2.TO_ENDPOINT: 0,
    flow_pb2.TO_PROXY: 1,
    flow_pb2.TO_HOST: 2,
    flow_pb2.TO_STACK: 3,
    flow_pb2.TO_OVERLAY: 4,
}

TCP = 1
UDP = 2
ICMPV4 = 3

# TCP flag bits, in TCPFlags field order (FIN=1 ... NS=9).
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, NS = (1 << i for i in range(9))
_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")

_COMPACT = (",", ":")
_FIELD_NUMBERS: dict[str, int] = {f.name: f.number for f in flow_pb2.Flow.DESCRIPTOR.fields}
_FN_L4 = _FIELD_NUMBERS["l4"]
_FN_L7 = _FIELD_NUMBERS["l7"]
_FN_UUID = _FIELD_NUMBERS["uuid"]
_FN_COOKIE = _FIELD_NUMBERS["socket_cookie"]
_SOCK_MARK = "\x00"
"""Where a socket-LB event's JSON takes its socket cookie (a changing field, like the uuid)."""


_BYTE = [bytes((i,)) for i in range(256)]

varint = encode_varint
"""The protobuf base-128 varint (the simulator's name for it)."""


def _tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


def _int_field(number: int, value: int) -> bytes:
    return _tag(number, 0) + varint(value) if value else b""


_TAG_TIME = _tag(1, 2)
_TAG_L4 = _tag(_FN_L4, 2)
_TAG_L7 = _tag(_FN_L7, 2)
_TAG_UUID_36 = _tag(_FN_UUID, 2) + varint(36)
_TAG_ENVELOPE_FLOW = _tag(1, 2)
_TAG_ENVELOPE_NODE = 1000
_TAG_ENVELOPE_TIME = _tag(1001, 2)


class TimestampEncoder:
    """Encoded `google.protobuf.Timestamp` payloads, with the seconds part cached (time only moves forward)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def __call__(self, time_ns: int) -> bytes:
        seconds, nanos = divmod(time_ns, 1_000_000_000)
        if seconds != self._second:
            self._second = seconds
            self._prefix = b"\x08" + varint(seconds)
        if nanos:
            return self._prefix + b"\x10" + varint(nanos)
        return self._prefix


def timestamp_bytes(time_ns: int) -> bytes:
    """The encoded `google.protobuf.Timestamp` payload for `time_ns` nanoseconds since the epoch."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    if nanos:
        return b"\x08" + varint(seconds) + b"\x10" + varint(nanos)
    return b"\x08" + varint(seconds)


class TimeFormatter:
    """RFC 3339 strings exactly as protobuf's JSON mapping writes them (0, 3, 6 or 9 fractional digits)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, time_ns: int) -> str:
        seconds, nanos = divmod(time_ns, 1_000_000_000)
        if seconds != self._second:
            self._second = seconds
            self._prefix = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if nanos == 0:
            return self._prefix + "Z"
        if nanos % 1_000_000 == 0:
            return f"{self._prefix}.{nanos // 1_000_000:03d}Z"
        if nanos % 1000 == 0:
            return f"{self._prefix}.{nanos // 1000:06d}Z"
        return f"{self._prefix}.{nanos:09d}Z"


_MASK_128 = (1 << 128) - 1
_UUID_MULTIPLIER = 0x9E3779B97F4A7C15F39CC0605CEDC835


def flow_uuid(counter: int, salt: int) -> str:
    """A version-4-shaped uuid, unique per `counter` for one `salt` (a bijective mix, no randomness)."""
    x = ((counter + 1) * _UUID_MULTIPLIER + salt) & _MASK_128
    x ^= x >> 67
    x = (x * _UUID_MULTIPLIER) & _MASK_128
    h = f"{x:032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


# --- L4 -------------------------------------------------------------------------------------------------------

_FLAGS_PB: dict[int, bytes] = {}
_FLAGS_JSON: dict[int, str] = {}
for _bits in range(1 << 9):
    _flags = b"".join(_tag(i + 1, 0) + b"\x01" for i in range(9) if _bits >> i & 1)
    _FLAGS_PB[_bits] = _len_field(3, _flags) if _bits else b""
    _FLAGS_JSON[_bits] = ",".join(f'"{n}":true' for i, n in enumerate(_FLAG_NAMES) if _bits >> i & 1)
_L4_TAG = _BYTE[(_FN_L4 << 3) | 2]
_PROTO_TAG: dict[int, bytes] = {TCP: _BYTE[(1 << 3) | 2], UDP: _BYTE[(2 << 3) | 2]}


def l4_bytes(proto: int, a: int, b: int, flags: int = 0) -> bytes:
    """The encoded `l4` field: TCP/UDP (source port `a`, destination port `b`, TCP `flags`) or ICMPv4 (type, code)."""
    if proto == ICMPV4:
        inner = _int_field(1, a) + _int_field(2, b)
        body = _len_field(3, inner)
        return _TAG_L4 + varint(len(body)) + body
    # Ports are never 0 here and every piece is shorter than 128 bytes, so lengths are single bytes.
    inner = b"\x08" + varint(a) + b"\x10" + varint(b) + _FLAGS_PB[flags]
    body = _PROTO_TAG[proto] + _BYTE[len(inner)] + inner
    return _L4_TAG + _BYTE[len(body)] + body


def l4_json(proto: int, a: int, b: int, flags: int = 0) -> str:
    """The `"l4":{...}` JSON member for the same values as `l4_bytes`."""
    if proto == ICMPV4:
        parts = []
        if a:
            parts.append(f'"type":{a}')
        if b:
            parts.append(f'"code":{b}')
        return '"l4":{"ICMPv4":{' + ",".join(parts) + "}}"
    name = "TCP" if proto == TCP else "UDP"
    ports = f'"source_port":{a},"destination_port":{b}'
    if flags:
        return f'"l4":{{"{name}":{{{ports},"flags":{{{_FLAGS_JSON[flags]}}}}}}}'
    return f'"l4":{{"{name}":{{{ports}}}}}'


# --- L7 -------------------------------------------------------------------------------------------------------

L7Spec = tuple[Any, ...]
"""An L7 record: ("dns", type, latency_ns, query, ips, ttl, rcode, qtypes), ("http", type, latency_ns, code, method,
url, protocol) or ("kafka", type, latency_ns, error_code, api_version, api_key, correlation_id, topic)."""

_L7_TYPE_NAMES = {1: "REQUEST", 2: "RESPONSE"}


def l7_bytes(spec: L7Spec) -> bytes:
    """The encoded `l7` field of a flow for an L7 record spec."""
    kind, l7_type, latency = spec[0], spec[1], spec[2]
    if kind == "dns":
        _, _, _, query, ips, ttl, rcode, qtypes = spec
        record = (
            _str_field(1, query)
            + b"".join(_str_field(2, ip) for ip in ips)
            + _int_field(3, ttl)
            + _str_field(5, "proxy")
            + _int_field(6, rcode)
            + b"".join(_str_field(7, q) for q in qtypes)
        )
        if ips:
            record += b"".join(_str_field(8, q) for q in qtypes)
        number = 100
    elif kind == "http":
        _, _, _, code, method, url, protocol = spec
        record = _int_field(1, code) + _str_field(2, method) + _str_field(3, url) + _str_field(4, protocol)
        number = 101
    else:
        _, _, _, error_code, api_version, api_key, correlation_id, topic = spec
        record = (
            _int_field(1, error_code)
            + _int_field(2, api_version)
            + _str_field(3, api_key)
            + _int_field(4, correlation_id)
            + _str_field(5, topic)
        )
        number = 102
    body = _int_field(1, l7_type) + _int_field(2, latency) + _len_field(number, record)
    return _TAG_L7 + varint(len(body)) + body


def _strings(values: tuple[str, ...]) -> str:
    return "[" + ",".join(f'"{v}"' for v in values) + "]"


def l7_json(spec: L7Spec) -> str:
    """The `"l7":{...}` JSON member for an L7 record spec."""
    kind, l7_type, latency = spec[0], spec[1], spec[2]
    head = f'"type":"{_L7_TYPE_NAMES[l7_type]}"'
    if latency:
        head += f',"latency_ns":"{latency}"'
    if kind == "dns":
        _, _, _, query, ips, ttl, rcode, qtypes = spec
        parts = [f'"query":"{query}"']
        if ips:
            parts.append('"ips":' + _strings(ips))
        if ttl:
            parts.append(f'"ttl":{ttl}')
        parts.append('"observation_source":"proxy"')
        if rcode:
            parts.append(f'"rcode":{rcode}')
        parts.append('"qtypes":' + _strings(qtypes))
        if ips:
            parts.append('"rrtypes":' + _strings(qtypes))
        return f'"l7":{{{head},"dns":{{{",".join(parts)}}}}}'
    if kind == "http":
        _, _, _, code, method, url, protocol = spec
        record = (
            f'"code":{code},' if code else ""
        ) + f'"method":"{method}","url":"{url}","protocol":"{protocol}"'
        return f'"l7":{{{head},"http":{{{record}}}}}'
    _, _, _, error_code, api_version, api_key, correlation_id, topic = spec
    parts = []
    if error_code:
        parts.append(f'"error_code":{error_code}')
    if api_version:
        parts.append(f'"api_version":{api_version}')
    parts.append(f'"api_key":"{api_key}"')
    if correlation_id:
        parts.append(f'"correlation_id":{correlation_id}')
    parts.append(f'"topic":"{topic}"')
    return f'"l7":{{{head},"kafka":{{{",".join(parts)}}}}}'


# --- templates ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EndpointView:
    """One side of a flow as Hubble describes it; `node` is set for endpoints managed by a node's Cilium agent."""

    ip: str
    identity: int
    labels: tuple[str, ...]
    namespace: str = ""
    pod_name: str = ""
    workload: tuple[str, str] | None = None
    cluster_name: str = ""
    endpoint_id: int = 0
    node: str | None = None
    service: tuple[str, str] | None = None
    names: tuple[str, ...] = ()
    remote_labels_only: bool = False
    """Other nodes know this pod only by its identity and labels (their IP cache has no Kubernetes metadata for
    it): their records carry no namespace, pod name or workload."""

    def fill(self, endpoint: flow_pb2.Endpoint, observing_node: str) -> None:
        """Write this endpoint into a `flow.Endpoint`; the endpoint id only where it is local to the node."""
        if self.node == observing_node and self.endpoint_id:
            endpoint.ID = self.endpoint_id
        endpoint.identity = self.identity
        if self.remote_labels_only and self.node is not None and self.node != observing_node:
            endpoint.labels.extend(self.labels)
            return
        endpoint.namespace = self.namespace
        endpoint.labels.extend(self.labels)
        endpoint.pod_name = self.pod_name
        if self.workload is not None:
            workload = endpoint.workloads.add()
            workload.name, workload.kind = self.workload
        endpoint.cluster_name = self.cluster_name


@dataclass(frozen=True)
class PolicyRef:
    """A policy as it appears in flow attribution fields."""

    name: str
    namespace: str
    kind: str
    revision: int

    def fill(self, policy: flow_pb2.Policy) -> None:
        """Write this reference into a `flow.Policy`."""
        policy.name = self.name
        policy.namespace = self.namespace
        policy.kind = self.kind
        policy.revision = self.revision
        policy.labels.extend(
            [
                f"k8s:io.cilium.k8s.policy.derived-from={self.kind}",
                f"k8s:io.cilium.k8s.policy.name={self.name}",
                f"k8s:io.cilium.k8s.policy.namespace={self.namespace}",
            ]
        )


class Template:
    """The fixed part of a family of flows: protobuf bytes, and JSON pieces around the changing fields.

    The JSON pieces are built on first use (`json()`), so runs that only need protobuf never pay for them.
    """

    __slots__ = ("_flow", "_json", "cls", "dropped", "env_node", "node", "pb")

    def __init__(self, flow: flow_pb2.Flow, cls: int) -> None:
        self.pb: bytes = flow.SerializeToString()
        self.node: str = flow.node_name
        self.env_node = _tag(_TAG_ENVELOPE_NODE, 2) + varint(len(self.node.encode())) + self.node.encode()
        self.cls = cls
        self.dropped = flow.verdict == flow_pb2.DROPPED
        self._flow: flow_pb2.Flow | None = flow
        self._json: tuple[str, str, str, str] | None = None

    def json(self) -> tuple[str, str, str, str]:
        """The JSON members before `l4`, between `l4` and `l7`, between `l7` and `uuid`, and after `uuid`."""
        if self._json is None:
            assert self._flow is not None
            data = json_format.MessageToDict(self._flow, preserving_proto_field_name=True)
            pieces: list[list[str]] = [[], [], [], []]
            for key, value in data.items():
                number = _FIELD_NUMBERS[key]
                slot = 0 if number < _FN_L4 else 1 if number < _FN_L7 else 2 if number < _FN_UUID else 3
                if self.cls == SOCK and number > _FN_COOKIE and _SOCK_MARK not in pieces[2]:
                    pieces[2].append(_SOCK_MARK)  # where the per-connection socket cookie goes
                pieces[slot].append(json.dumps(key) + ":" + json.dumps(value, separators=_COMPACT))
            # Each member carries its own leading comma, so joining never needs to know what is present.
            head, mid, tail, end = (
                "".join("," + p if p != _SOCK_MARK else p for p in group) for group in pieces
            )
            self._json = (head, mid, tail, end)
            self._flow = None
        return self._json


class TemplateFactory:
    """Builds and caches templates, keyed by everything that shapes them."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], Template] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(
        self,
        node: str,
        src: EndpointView,
        dst: EndpointView,
        cls: int,
        *,
        verdict: int = flow_pb2.FORWARDED,
        direction: int = flow_pb2.EGRESS,
        point: int = 0,
        reply: bool | None = False,
        drop_reason: int = 0,
        match_type: int = 0,
        allowed: tuple[PolicyRef, ...] = (),
        denied: tuple[PolicyRef, ...] = (),
    ) -> Template:
        """The template for flows from `src` to `dst` observed at `node` (a `<cluster>/<node>` name)."""
        key = (
            node,
            id(src),
            id(dst),
            cls,
            verdict,
            direction,
            point,
            reply,
            drop_reason,
            match_type,
            allowed,
            denied,
        )
        template = self._cache.get(key)
        if template is None:
            template = self._cache[key] = self._build(key, src, dst)
        return template

    @staticmethod
    def _build(key: tuple[Any, ...], src: EndpointView, dst: EndpointView) -> Template:
        node, _, _, cls, verdict, direction, point, reply, drop_reason, match_type, allowed, denied = key
        short_node = node.split("/", 1)[-1]
        flow = flow_pb2.Flow()
        flow.verdict = verdict
        if drop_reason:
            flow.drop_reason = drop_reason
            flow.drop_reason_desc = drop_reason
        flow.IP.source = src.ip
        flow.IP.destination = dst.ip
        flow.IP.ipVersion = flow_pb2.IPv4
        src.fill(flow.source, short_node)
        dst.fill(flow.destination, short_node)
        if cls == SOCK:
            # A socket-LB translation at connect(): no packet, so no direction, reply flag or TCP flags; the
            # cookie and cgroup stand for the client's socket and container (stable per client here).
            flow.Type = flow_pb2.SOCK
            flow.node_name = node
            flow.event_type.type = EVENT_SOCK
            flow.sock_xlate_point = point
            # The socket cookie differs per connection: it rides with the changing fields (`sock_spec`).
            flow.cgroup_id = 10_000 + src.endpoint_id
            if dst.service is not None:
                flow.destination_service.name, flow.destination_service.namespace = dst.service
            return Template(flow, cls)
        flow.Type = flow_pb2.L7 if cls in (L7_REQUEST, L7_RESPONSE) else flow_pb2.L3_L4
        flow.node_name = node
        flow.source_names.extend(src.names)
        flow.destination_names.extend(dst.names)
        if cls == TRACE:
            flow.event_type.type = EVENT_TRACE
            flow.event_type.sub_type = _TRACE_SUB_TYPE[point]
            flow.trace_observation_point = point
        elif cls == DROP:
            flow.event_type.type = EVENT_DROP
            flow.event_type.sub_type = drop_reason
        elif cls == POLICY_VERDICT:
            flow.event_type.type = EVENT_POLICY_VERDICT
            flow.policy_match_type = match_type
        else:
            flow.event_type.type = EVENT_L7
        # Only the serving side names its service: the destination of requests, the source of replies.
        if reply and src.service is not None:
            flow.source_service.name, flow.source_service.namespace = src.service
        if not reply and dst.service is not None:
            flow.destination_service.name, flow.destination_service.namespace = dst.service
        flow.traffic_direction = direction
        if reply is not None:
            flow.is_reply.value = reply
            flow.reply = reply
        attribution = (
            (flow.ingress_allowed_by, flow.egress_allowed_by)
            if allowed
            else (flow.ingress_denied_by, flow.egress_denied_by)
        )
        for ref in allowed or denied:
            ref.fill((attribution[0] if direction == flow_pb2.INGRESS else attribution[1]).add())
        return Template(flow, cls)


class Renderer:
    """Turns records (see `shapes`) into flow bytes, envelope bytes or Hubble JSON lines.

    `counter` is the position of the record in the run; it decides the flow's uuid.
    """

    def __init__(self, salt: int) -> None:
        self._salt = salt
        self._time_text = TimeFormatter()
        self._time_pb = TimestampEncoder()

    def flow_bytes(self, rec: tuple[Any, ...], counter: int) -> bytes:
        """The wire bytes of one `flow.Flow`: template bytes, then time, l4, l7 and uuid."""
        return self._flow(rec, counter, self._time_pb(rec[0]))

    def _flow(self, rec: tuple[Any, ...], counter: int, ts: bytes) -> bytes:
        l7 = rec[7]
        changing = b"" if l7 is None else _int_field(_FN_COOKIE, l7[1]) if l7[0] == "sock" else l7_bytes(l7)
        return b"".join((
            rec[2].pb, _TAG_TIME, _BYTE[len(ts)], ts, l4_bytes(rec[3], rec[4], rec[5], rec[6]),
            changing, _TAG_UUID_36, flow_uuid(counter, self._salt).encode(),
        ))  # fmt: skip

    def response_bytes(self, rec: tuple[Any, ...], counter: int) -> bytes:
        """The wire bytes of the `observer.GetFlowsResponse` carrying the flow, its node_name and time."""
        ts = self._time_pb(rec[0])
        flow = self._flow(rec, counter, ts)
        return b"".join((
            _TAG_ENVELOPE_FLOW, varint(len(flow)), flow, rec[2].env_node, _TAG_ENVELOPE_TIME, _BYTE[len(ts)], ts,
        ))  # fmt: skip

    def json_line(self, rec: tuple[Any, ...], counter: int) -> str:
        """One `hubble observe -o jsonpb` line (compact, proto field names), without the newline."""
        t = self._time_text(rec[0])
        template: Template = rec[2]
        head, mid, tail, end = template._json or template.json()
        l4 = l4_json(rec[3], rec[4], rec[5], rec[6])
        spec = rec[7]
        if spec is not None and spec[0] == "sock":
            l7, tail = "", tail.replace(_SOCK_MARK, f',"socket_cookie":"{spec[1]}"')
        else:
            l7 = "," + l7_json(spec) if spec is not None else ""
        uuid = flow_uuid(counter, self._salt)
        return (
            f'{{"flow":{{"time":"{t}"{head},{l4}{mid}{l7}{tail},"uuid":"{uuid}"{end}}},'
            f'"node_name":"{template.node}","time":"{t}"}}'
        )

"""What of a Hubble JSON line the flow table keeps: both sides of a round trip are projected, then compared."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2

# Fields of flow.Flow the table does not keep (README: "What serve-hubble cannot give back").
_FLOW_DROPPED = (
    "ethernet", "debug_capture_point", "interface", "proxy_port", "trace_context", "trace_reason",
    "node_labels", "file", "tunnel", "ip_trace_id", "emitter", "policy_log", "aggregate", "Summary",
    "extensions",
)  # fmt: skip


def _endpoint(endpoint: Any) -> None:
    endpoint.ClearField("ID")
    endpoint.ClearField("cluster_name")
    first = [(w.name, w.kind) for w in endpoint.workloads[:1] if w.name or w.kind]
    del endpoint.workloads[:]
    for name, kind in first:
        endpoint.workloads.add(name=name, kind=kind)


def kept(flow: flow_pb2.Flow) -> flow_pb2.Flow:
    """A copy of `flow` with only what the flow table keeps (in the decoders' conventions)."""
    f = flow_pb2.Flow()
    f.CopyFrom(flow)
    for name in _FLOW_DROPPED:
        f.ClearField(name)
    reply = f.is_reply.value if f.HasField("is_reply") else (True if f.reply else None)
    f.ClearField("is_reply")
    f.reply = False
    if reply is not None:
        f.is_reply.value = reply
        f.reply = reply
    f.IP.ClearField("source_xlated")
    if f.IP.ByteSize() == 0 and not flow.HasField("IP"):
        f.ClearField("IP")
    for side in ("source", "destination"):
        if f.HasField(side):
            _endpoint(getattr(f, side))
        service = getattr(f, f"{side}_service")
        name = service.name
        f.ClearField(f"{side}_service")
        if name:
            getattr(f, f"{side}_service").name = name
    if f.l4.HasField("TCP") and not any(
        getattr(f.l4.TCP.flags, n) for n in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
    ):
        f.l4.TCP.ClearField("flags")
    record = f.l7.WhichOneof("record") if f.HasField("l7") else None
    dropped = {"dns": ("cnames", "observation_source", "rrtypes"), "http": ("headers",)}
    dropped["kafka"] = ("api_version", "correlation_id")
    for field in dropped.get(record or "", ()):
        getattr(f.l7, str(record)).ClearField(field)
    for name in ("ingress_allowed_by", "egress_allowed_by", "ingress_denied_by", "egress_denied_by"):
        policies = [(p.namespace, p.name) for p in getattr(f, name)]
        f.ClearField(name)
        for namespace, policy in policies:
            getattr(f, name).add(namespace=namespace, name=policy)
    return f


def kept_line(line: str | bytes) -> dict[str, Any]:
    """One `hubble observe -o jsonpb` line (or a bare Flow object) reduced to the kept fields, as JSON."""
    value = json.loads(line)
    if "flow" not in value:
        value = {"flow": value}
    response = json_format.ParseDict(value, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)
    flow = kept(response.flow)
    if not flow.node_name:
        flow.node_name = response.node_name
    if not flow.HasField("time") and response.HasField("time"):
        flow.time.CopyFrom(response.time)
    return json_format.MessageToDict(flow, preserving_proto_field_name=True)

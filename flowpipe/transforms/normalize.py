"""normalize: Hubble events (protobuf messages or JSON text) → flow-table rows, counting what is not a flow.

Two inputs, one result: `normalize_flows` takes protobuf `flow.Flow` messages (decoded by `from_proto`),
`normalize_json_lines` takes Hubble JSON lines (files: `hubble observe -o jsonpb`, exporter files, legacy bare
flows). The same flow gives the same row either way; the row conventions are listed in the README (flow table).

```python
table = normalize_flows(response.flow for response in responses)        # pa.Table, FLOW_SCHEMA
events = normalize_json_lines(b'{"flow": {...}, "node_name": "n1"}\\n')  # DecodedEvents
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from flowpipe.model import EventBatch
from flowpipe.transforms._json import DecodedEvents, decode_lines, decode_objects, decode_texts
from flowpipe.transforms.from_proto import decode_messages, flow_response

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    from flowpipe._proto.flow.flow_pb2 import Flow
    from flowpipe._proto.observer.observer_pb2 import ExportEvent, GetFlowsResponse

__all__ = [
    "DecodedEvents",
    "normalize_flows",
    "normalize_json_lines",
    "normalize_json_objects",
    "normalize_json_texts",
    "normalize_responses",
]


def normalize_flows(
    flows: Sequence[Flow] | Iterable[Flow],
    *,
    node_names: Sequence[str] | None = None,
    times: Sequence[Timestamp | None] | None = None,
    cluster_name: str | None = None,
) -> pa.Table:
    """Protobuf flows → the flow table (FLOW_SCHEMA), one row per flow, in order.

    `node_names`/`times` are the envelopes' (GetFlowsResponse) values, used where the flow has none;
    `cluster_name` fills `cluster_name` where the node name does not carry one. The flows are serialised and
    decoded as the relay's responses are (`flowpipe.transforms.from_proto`, the one protobuf decoder); a
    caller that has the serialised flows should hand those to `from_proto` instead.
    """
    messages = []
    for index, flow in enumerate(flows):
        stamp = times[index] if times is not None else None
        messages.append(
            flow_response(
                flow.SerializeToString(),
                node_names[index] if node_names is not None else "",
                stamp.SerializeToString() if stamp is not None else b"",
            )
        )
    return decode_messages(messages, cluster_name=cluster_name).flows


def normalize_responses(
    responses: Sequence[GetFlowsResponse | ExportEvent], *, cluster_name: str | None = None
) -> EventBatch:
    """GetFlowsResponse / ExportEvent messages → an EventBatch: flow rows, lost events, node_status count.

    Agent and debug events (ExportEvent only) are not flows and are left out. ExportEvent numbers its flow,
    node_status, lost_events, node_name and time fields as GetFlowsResponse does, so both decode alike
    (`flowpipe.transforms.from_proto`).
    """
    decoded = decode_messages(
        [response.SerializeToString() for response in responses], cluster_name=cluster_name
    )
    return EventBatch(
        flows=decoded.flows, lost_events=decoded.lost_events, node_status=len(decoded.node_status)
    )


def normalize_json_lines(
    data: bytes, *, path: str = "<memory>", first_line: int = 1, cluster_name: str | None = None
) -> DecodedEvents:
    """A block of whole Hubble JSON lines → flow rows, lost events, counts and per-line decode errors.

    Each line is an envelope (`flow`, `lost_events`, `node_status`, `agent_event`, `debug_event` plus
    `node_name`/`time`) or a legacy bare Flow. Bad lines become `FlowDecodeError(path, line, reason)` in
    `.errors`; the good lines of the block are still decoded.
    """
    return decode_lines(data, path=path, first_line=first_line, cluster_name=cluster_name)


def normalize_json_texts(
    items: Sequence[tuple[int, bytes | str]], *, path: str = "<memory>", cluster_name: str | None = None
) -> DecodedEvents:
    """JSON texts with their line numbers → as `normalize_json_lines`, decoding one text at a time."""
    return decode_texts(items, path=path, cluster_name=cluster_name)


def normalize_json_objects(
    objects: Iterable[tuple[int, Any]], *, path: str = "<memory>", cluster_name: str | None = None
) -> DecodedEvents:
    """Already parsed JSON values (e.g. the elements of a JSON array) with their line numbers → events."""
    return decode_objects(objects, path=path, cluster_name=cluster_name)

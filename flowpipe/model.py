"""The flow table: the one record shape every stage agrees on, and the column contract users query.

`FLOW_SCHEMA` is the Arrow schema of one Hubble flow per row. Column names are a public interface: users write
SQL against them, so renaming one is a breaking change (bump `SCHEMA_VERSION` and say so in the README).

`LOST_EVENTS_SCHEMA` is the small side table where Hubble's own `lost_events` records are kept, so that a
question can say "Hubble lost N events on node X at time T".

Types are chosen so that every engine reads them alike: signed integers only (Spark has no unsigned types),
timestamps in UTC with nanoseconds, lists of strings for repeated values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa

SCHEMA_VERSION = "1"
"""Stored in every part file's metadata under `flowpipe.schema_version`."""

SCHEMA_VERSION_KEY = b"flowpipe.schema_version"
WRITER_ID_KEY = b"flowpipe.writer_id"
"""Part file metadata: the writer id of the process that wrote the file (the sink's, or a compaction run's)."""

TIMESTAMP = pa.timestamp("ns", tz="UTC")
_STRINGS = pa.list_(pa.string())


def _endpoint(prefix: str) -> list[pa.Field]:
    return [
        pa.field(f"{prefix}_namespace", pa.string()),
        pa.field(f"{prefix}_pod_name", pa.string()),
        pa.field(f"{prefix}_workload_name", pa.string()),
        pa.field(f"{prefix}_workload_kind", pa.string()),
        pa.field(f"{prefix}_identity", pa.int64()),
        pa.field(f"{prefix}_labels", _STRINGS),
        pa.field(f"{prefix}_service_name", pa.string()),
        pa.field(f"{prefix}_names", _STRINGS),
    ]


FLOW_SCHEMA = pa.schema(
    [
        # when / where
        pa.field("time", TIMESTAMP),
        pa.field("node_name", pa.string()),
        pa.field("cluster_name", pa.string()),
        pa.field("uuid", pa.string()),
        # verdict
        pa.field("verdict", pa.string()),
        pa.field("drop_reason", pa.int32()),
        pa.field("drop_reason_desc", pa.string()),
        pa.field("policy_match_type", pa.int32()),
        pa.field("auth_type", pa.string()),
        # kind
        pa.field("flow_type", pa.string()),
        pa.field("event_type", pa.int32()),
        pa.field("event_sub_type", pa.int32()),
        pa.field("trace_observation_point", pa.string()),
        pa.field("traffic_direction", pa.string()),
        pa.field("is_reply", pa.bool_()),
        # socket-LB translation events (flow_type SOCK): not packets
        pa.field("sock_xlate_point", pa.string()),
        pa.field("socket_cookie", pa.uint64()),
        pa.field("cgroup_id", pa.uint64()),
        # L3
        pa.field("ip_version", pa.string()),
        pa.field("source_ip", pa.string()),
        pa.field("destination_ip", pa.string()),
        pa.field("encrypted", pa.bool_()),
        # endpoints
        *_endpoint("source"),
        *_endpoint("destination"),
        # L4
        pa.field("l4_protocol", pa.string()),
        pa.field("source_port", pa.int32()),
        pa.field("destination_port", pa.int32()),
        pa.field("tcp_flags", pa.string()),
        pa.field("icmp_type", pa.int32()),
        pa.field("icmp_code", pa.int32()),
        # L7
        pa.field("l7_type", pa.string()),
        pa.field("l7_protocol", pa.string()),
        pa.field("latency_ns", pa.int64()),
        pa.field("dns_query", pa.string()),
        pa.field("dns_rcode", pa.int32()),
        pa.field("dns_qtypes", _STRINGS),
        pa.field("dns_ips", _STRINGS),
        pa.field("dns_ttl", pa.int64()),
        pa.field("http_method", pa.string()),
        pa.field("http_url", pa.string()),
        pa.field("http_code", pa.int32()),
        pa.field("http_protocol", pa.string()),
        pa.field("kafka_api_key", pa.string()),
        pa.field("kafka_topic", pa.string()),
        pa.field("kafka_error_code", pa.int32()),
        # policy attribution (Cilium 1.15+): "<namespace>/<name>", or "<name>" for clusterwide policies
        pa.field("ingress_allowed_by", _STRINGS),
        pa.field("egress_allowed_by", _STRINGS),
        pa.field("ingress_denied_by", _STRINGS),
        pa.field("egress_denied_by", _STRINGS),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

FLOW_COLUMNS: tuple[str, ...] = tuple(FLOW_SCHEMA.names)

LOST_EVENTS_SCHEMA = pa.schema(
    [
        pa.field("time", TIMESTAMP),
        pa.field("node_name", pa.string()),
        pa.field("cluster_name", pa.string()),
        pa.field("source", pa.string()),  # LostEventSource name, e.g. HUBBLE_RING_BUFFER
        pa.field("num_events_lost", pa.int64()),
        pa.field("cpu", pa.int32()),
        pa.field("first", TIMESTAMP),
        pa.field("last", TIMESTAMP),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)


def empty_flows() -> pa.Table:
    """A table with the flow schema and no rows."""
    return FLOW_SCHEMA.empty_table()


@dataclass(frozen=True, slots=True)
class LostEvent:
    """One `lost_events` record: Hubble itself discarded events upstream (never called a drop)."""

    source: str
    num_events_lost: int
    node_name: str = ""
    time: datetime | None = None
    cpu: int | None = None
    first: datetime | None = None
    last: datetime | None = None


@dataclass(slots=True)
class EventBatch:
    """What a source yields: flow rows, plus the events that are counted rather than stored as flows.

    `position` is the source's checkpoint token after this batch (file: path and line; relay: time and uuid
    of the last flow). A source moves its checkpoint only after every sink has acknowledged the batch.
    """

    flows: pa.Table
    lost_events: list[LostEvent] = field(default_factory=list)
    node_status: int = 0
    decode_errors: list[Exception] = field(default_factory=list)
    position: object | None = None
    flows_already_stored: int = 0
    """Flows of this batch left out because the dataset already holds them (same uuid, `flowpipe.dataset.stored_flows`)."""

    def __len__(self) -> int:
        return self.flows.num_rows

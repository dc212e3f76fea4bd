"""Test helpers: flow rows with every column of the flow table, written as a dataset by the real ParquetSink."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from flowpipe.config import ParquetSinkConfig
from flowpipe.model import FLOW_SCHEMA, EventBatch, LostEvent
from flowpipe.sinks.parquet import ParquetSink

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
"""The start of the synthetic traffic; rows span the two hours after it."""

_LIST_COLUMNS = {f.name for f in FLOW_SCHEMA if pa.types.is_list(f.type)}


def flow(**values: Any) -> dict[str, Any]:
    """A flow row: every column of the flow table, NULL (or an empty list) unless given."""
    unknown = set(values) - set(FLOW_SCHEMA.names)
    assert not unknown, f"not flow columns: {unknown}"
    row: dict[str, Any] = {name: ([] if name in _LIST_COLUMNS else None) for name in FLOW_SCHEMA.names}
    row.update(values)
    return row


def flows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows as a table of the flow schema."""
    return pa.Table.from_pylist(list(rows), schema=FLOW_SCHEMA)


def write_dataset(
    root: Path,
    rows: Sequence[dict[str, Any]],
    *,
    lost_events: Iterable[LostEvent] = (),
    writer_id: str = "test",
    batch_rows: int = 10_000,
) -> list[str]:
    """Write rows (and lost events) into a Hive-partitioned dataset at `root`; returns the part files."""
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id=writer_id, max_batch_rows=batch_rows))
    sink.write(EventBatch(flows=flows_table(rows), lost_events=list(lost_events)))
    sink.close()
    return list(sink.files_written)


def synthetic_flows(count: int = 400, *, seed: int = 7) -> list[dict[str, Any]]:
    """Varied flows over two hours from `T0`: pods talking (requests and replies), policy and other drops,
    DNS lookups and answers (NOERROR, NXDOMAIN, SERVFAIL), world egress by name, host traffic without a
    namespace. Deterministic for a seed."""
    rng = random.Random(seed)
    pods = [
        ("shop", "frontend", "frontend-7d9f-abcde"),
        ("shop", "api", "api-5c6d-fghij"),
        ("shop", None, "legacy-pod"),
        ("billing", "worker", "worker-0"),
        ("other", None, "probe-xyz"),
    ]
    dns_server = ("kube-system", "coredns", "coredns-558bd-w2m67", "10.0.0.10")
    names = ["api.example.com.", "db.shop.svc.cluster.local.", "nope.invalid.", "flaky.example.org."]
    drop_reasons = ["POLICY_DENIED", "POLICY_DENIED", "CT_MAP_INSERTION_FAILED", "UNSUPPORTED_L3_PROTOCOL"]
    rows = []
    for index in range(count):
        when = T0 + timedelta(seconds=rng.randrange(0, 2 * 3600), microseconds=rng.randrange(1_000_000))
        kind = rng.random()
        src = rng.choice(pods)
        common = {"time": when, "node_name": f"kind/node-{rng.randrange(2)}", "cluster_name": "kind"}
        if kind < 0.25:  # DNS request and its answer
            query = rng.choice(names)
            rcode = {"nope.invalid.": 3, "flaky.example.org.": rng.choice([0, 2])}.get(query, 0)
            qtype = rng.choice(["A", "AAAA"])
            client = {
                "namespace": src[0],
                "workload_name": src[1],
                "pod_name": src[2],
                "ip": f"10.1.0.{index % 250}",
            }
            server = dict(zip(("namespace", "workload_name", "pod_name", "ip"), dns_server, strict=True))
            answer = [f"93.184.216.{rng.randrange(1, 5)}"] if rcode == 0 else []
            for l7_type, a, b in (("REQUEST", client, server), ("RESPONSE", server, client)):
                rows.append(
                    flow(
                        **common,
                        verdict="FORWARDED",
                        flow_type="L7",
                        l7_type=l7_type,
                        l7_protocol="dns",
                        l4_protocol="UDP",
                        is_reply=l7_type == "RESPONSE",
                        traffic_direction="EGRESS",
                        dns_query=query,
                        dns_rcode=rcode if l7_type == "RESPONSE" else 0,
                        dns_qtypes=[qtype],
                        dns_ips=answer if l7_type == "RESPONSE" else [],
                        **{f"source_{k}": v for k, v in a.items()},
                        **{f"destination_{k}": v for k, v in b.items()},
                        source_port=53 if l7_type == "RESPONSE" else 40000 + index,
                        destination_port=53 if l7_type == "REQUEST" else 40000 + index,
                    )
                )
            continue
        dst = rng.choice([p for p in pods if p != src] + [None])
        if dst is None:  # egress to the world, or from the host
            destination = {
                "destination_ip": f"203.0.113.{rng.randrange(1, 4)}",
                "destination_names": ["api.example.com"],
            }
            if rng.random() < 0.3:
                src = (None, None, None)
        else:
            destination = {
                "destination_namespace": dst[0],
                "destination_workload_name": dst[1],
                "destination_pod_name": dst[2],
                "destination_ip": f"10.2.0.{pods.index(dst)}",
            }
        dropped = rng.random() < 0.3
        reason = rng.choice(drop_reasons) if dropped else None
        reply = None if rng.random() < 0.1 else rng.random() < 0.35
        event = {"event_type": 1 if dropped else 4, "event_sub_type": 0}
        if dropped and rng.random() < 0.15:  # older captures: the number without the name, or nothing at all
            reason_number = rng.choice([0, 181, 250])
            reason = None
            if reason_number == 0 and rng.random() < 0.5:  # only the drop event's sub-type tells the reason
                event["event_sub_type"] = 133
        else:
            reason_number = {
                "POLICY_DENIED": 133,
                "CT_MAP_INSERTION_FAILED": 155,
                "UNSUPPORTED_L3_PROTOCOL": 139,
            }.get(reason or "", 0)
        rows.append(
            flow(
                **common,
                verdict="DROPPED" if dropped else "FORWARDED",
                drop_reason=reason_number,
                drop_reason_desc=reason,
                flow_type="L3_L4",
                is_reply=reply,
                traffic_direction=rng.choice(["INGRESS", "EGRESS"]),
                source_namespace=src[0],
                source_workload_name=src[1],
                source_pod_name=src[2],
                source_ip="192.168.1.1" if src[0] is None else f"10.2.0.{pods.index(src)}",
                **event,
                l4_protocol="TCP",
                source_port=30000 + index,
                destination_port=rng.choice([80, 443, 5432, 8080]),
                **destination,
            )
        )
    return rows

"""The observed-edge table: the contract between the observed-edges question and `draft`, and its replay form.

`OBSERVED_EDGE_SCHEMA` is what `sql/observed_edges.sql` returns and `draft.draft_policies` reads: one row per
distinct request edge in a window, replies excluded, each connection counted once although Hubble reports it at
both ends (egress at the source, ingress at the destination).

Columns:

| column | meaning |
|---|---|
| `source_namespace`, `source_workload` | the client pod's namespace and stable workload name (NULL for non-pods) |
| `source_labels` | the client's Cilium labels (`k8s:app=web`); only stable keys are used for selectors |
| `source_entity`, `source_ip` | for non-pods: the reserved identity (`world`, `host`, `remote-node`, `kube-apiserver`, `health`, `init`, `ingress`, `unmanaged`) and the address |
| `destination_*` | the same for the server, plus `destination_names`: DNS names Cilium knows for a world address |
| `l4_protocol`, `destination_port`, `icmp_type` | TCP, UDP, SCTP with a port; ICMPv4 / ICMPv6 with a type |
| `l7_protocol` | NULL for an L3/L4 edge; `http`, `kafka` or `dns` for an edge of L7 requests on that port |
| `http_method`, `http_path` | the request method and target (path with query string) |
| `kafka_role`, `kafka_topic` | `produce` / `consume` and the topic |
| `status` | `delivered` (no end reported it denied), or `denied` (an end reported a policy drop: a connection FORWARDED at the source and DROPPED at the destination is denied); with `learn_from_drops` every edge is `delivered` |
| `source_reserved_identity`, `destination_reserved_identity` | for a pod recorded with a reserved identity (`world`, `unmanaged`, `host`...) while the record names it: that identity (a label selector does not match the pod while it has it); NULL otherwise |

The question also returns `first_seen`, `last_seen` and `cluster_name`: edges are per cluster, and `suggest`
drafts from the edges of one cluster (`flowpipe.policy.clusters.choose_cluster`), so the drafts never read it.


`learned_requests` turns the table into replay edges, so that a draft can be checked against exactly the
requests it was built from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

_STRINGS = pa.list_(pa.string())
OBSERVED_EDGE_SCHEMA = pa.schema(
    [
        pa.field("source_namespace", pa.string()),
        pa.field("source_workload", pa.string()),
        pa.field("source_labels", _STRINGS),
        pa.field("source_entity", pa.string()),
        pa.field("source_ip", pa.string()),
        pa.field("destination_namespace", pa.string()),
        pa.field("destination_workload", pa.string()),
        pa.field("destination_labels", _STRINGS),
        pa.field("destination_entity", pa.string()),
        pa.field("destination_ip", pa.string()),
        pa.field("destination_names", _STRINGS),
        pa.field("l4_protocol", pa.string()),
        pa.field("destination_port", pa.int32()),
        pa.field("icmp_type", pa.int32()),
        pa.field("l7_protocol", pa.string()),
        pa.field("http_method", pa.string()),
        pa.field("http_path", pa.string()),
        pa.field("kafka_role", pa.string()),
        pa.field("kafka_topic", pa.string()),
        pa.field("flows", pa.int64()),
    ]
)
"""The observed-edge table `draft_policies` reads (extra columns such as first_seen/last_seen are ignored)."""


_KAFKA_ROLE_API_KEY = {"produce": "produce", "consume": "fetch"}
POD_NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace="


def endpoint_namespace(row: Mapping[str, Any], side: str) -> str | None:
    """The namespace of one end of an edge row: its namespace field, else the one its pod labels name (a record
    about a remote pod may carry its labels without its namespace); None for entities and the world."""
    if row.get(f"{side}_entity") is not None:
        return None
    namespace = row.get(f"{side}_namespace")
    if namespace is not None:
        return str(namespace)
    for label in row.get(f"{side}_labels") or ():
        if label.startswith(POD_NAMESPACE_LABEL):
            return label[len(POD_NAMESPACE_LABEL) :]
    return None


def learned_requests(edges: pa.Table | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The observed edges as replay edges (the shape of `replay.EDGES_SQL`), judged at both ends.

    `replay_edges(draft.policies, learned_requests(edges))` must report `would_break == 0`: a draft that does
    not allow every request it was built from is not offered.
    """
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    out = []
    for row in rows:
        replay_row: dict[str, Any] = {
            "verdict": "FORWARDED",
            "is_reply": False,
            "flows": int(row.get("flows") or 0),
        }
        for side in ("source", "destination"):
            entity = row.get(f"{side}_entity")
            labels = list(row.get(f"{side}_labels") or ())
            # A pod recorded with a reserved identity is that identity to Cilium: no label selector matches it.
            held = row.get(f"{side}_reserved_identity")
            namespace = endpoint_namespace(row, side) if entity is None and not held else None
            if namespace is None:
                labels = [f"reserved:{held or entity or 'world'}"]
            replay_row.update(
                {
                    f"{side}_namespace": namespace,
                    f"{side}_workload": row.get(f"{side}_workload"),
                    f"{side}_labels": labels,
                    f"{side}_ip": row.get(f"{side}_ip") if namespace is None else None,
                }
            )
        role = row.get("kafka_role")
        l7 = row.get("l7_protocol")
        replay_row.update(
            {
                "destination_names": row.get("destination_names") or [],
                "l4_protocol": row.get("l4_protocol"),
                "destination_port": row.get("destination_port"),
                "icmp_type": row.get("icmp_type"),
                # The edge table keeps no DNS query names: DNS requests are judged at L3/L4.
                "l7_protocol": None if l7 == "dns" else l7,
                "http_method": row.get("http_method"),
                "http_url": row.get("http_path"),
                "kafka_api_key": _KAFKA_ROLE_API_KEY.get(role) if role else None,
                "kafka_topic": row.get("kafka_topic"),
            }
        )
        out.append(replay_row)
    return out

"""Hand-built observed-edge tables for drafting tests: workload and entity ends, edges, a drafted policy."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from flowpipe.policy.draft import Draft
from flowpipe.policy.edges import OBSERVED_EDGE_SCHEMA
from flowpipe.policy.model import Policy


def wl(namespace: str, name: str, labels: dict[str, str] | None = None, **more: str) -> dict[str, Any]:
    """A workload end: its Cilium labels include per-rollout ones that must never reach a selector."""
    extra = {"app": name, **(labels or {}), **{k.replace("_", "-"): v for k, v in more.items()}}
    return {
        "namespace": namespace,
        "workload": name,
        "labels": [f"k8s:{k}={v}" for k, v in extra.items()]
        + [
            "k8s:pod-template-hash=7d4b9c8f6",
            "k8s:controller-revision-hash=5f6d",
            f"k8s:io.kubernetes.pod.namespace={namespace}",
            f"k8s:io.cilium.k8s.policy.serviceaccount={name}",
        ],
    }


def ent(entity: str, ip: str | None = None, names: list[str] | None = None) -> dict[str, Any]:
    return {"entity": entity, "ip": ip, "names": names or []}


def edge(
    src: dict[str, Any],
    dst: dict[str, Any],
    port: int | None = 80,
    protocol: str = "TCP",
    flows: int = 10,
    **l7: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {"l4_protocol": protocol, "destination_port": port, "flows": flows, **l7}
    for prefix, end in (("source", src), ("destination", dst)):
        for key, value in end.items():
            if prefix == "source" and key == "names":
                continue
            row[f"{prefix}_{key}"] = value
    return row


def edges(*rows: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in OBSERVED_EDGE_SCHEMA.names} for row in rows],
        schema=OBSERVED_EDGE_SCHEMA,
    )


WEB = wl("shop", "web")
API = wl("shop", "api")
DB = wl("shop", "db")
PROM = wl("monitoring", "prometheus")
DNS = wl("kube-system", "coredns", k8s_app="kube-dns")
DNS["labels"].remove("k8s:app=coredns")  # CoreDNS carries k8s-app only


def policy(draft: Draft, namespace: str, name: str) -> Policy:
    return next(p for p in draft.policies if p.namespace == namespace and p.name == name)

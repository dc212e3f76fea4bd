"""Hand-built flow rows for the policy tests: pods, reserved identities and requests in the flow-table shape."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from flowpipe.model import FLOW_SCHEMA


def pod(namespace: str, app: str, **labels: str) -> dict[str, Any]:
    """One end of a flow: a pod of workload `app` in `namespace`, with Cilium labels as Hubble reports them."""
    extra = [f"k8s:{k.replace('_', '-')}={v}" for k, v in labels.items()]
    return {
        "namespace": namespace,
        "pod_name": f"{app}-7d4b9c8f6-x2x9z",
        "workload_name": app,
        "workload_kind": "Deployment",
        "identity": 1000 + sum(map(ord, namespace + app)),
        "labels": sorted(
            [
                f"k8s:app={app}",
                f"k8s:io.kubernetes.pod.namespace={namespace}",
                f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}",
                f"k8s:io.cilium.k8s.policy.serviceaccount={app}",
                "k8s:io.cilium.k8s.policy.cluster=default",
                *extra,
            ]
        ),
        "ip": f"10.0.{len(namespace)}.{len(app)}",
    }


def reserved(name: str, ip: str | None = None, identity: int | None = None, names: list[str] | None = None) -> dict[str, Any]:
    """A reserved identity (`world`, `host`, `remote-node`, `kube-apiserver`, ...) at `ip`."""
    numbers = {"host": 1, "world": 2, "health": 4, "remote-node": 6, "kube-apiserver": 7}
    return {
        "identity": identity if identity is not None else numbers.get(name, 2),
        "labels": [f"reserved:{name}"],
        "ip": ip,
        "names": names or [],
    }


def flow(src: dict[str, Any], dst: dict[str, Any], port: int | None = 80, protocol: str = "TCP", **fields: Any) -> dict[str, Any]:
    """A request row from `src` to `dst` (FORWARDED, not a reply, no direction unless given)."""
    row: dict[str, Any] = {
        "verdict": "FORWARDED",
        "flow_type": "L3_L4",
        "is_reply": False,
        "l4_protocol": protocol,
        "source_port": 40000 if protocol in ("TCP", "UDP", "SCTP") else None,
        "destination_port": port if protocol in ("TCP", "UDP", "SCTP") else None,
        "tcp_flags": "SYN" if protocol == "TCP" else None,
    }
    for prefix, end in (("source", src), ("destination", dst)):
        for key, value in end.items():
            row[f"{prefix}_{key}"] = value
    row.update(fields)
    return row


def table(*rows: dict[str, Any]) -> pa.Table:
    """The rows as a flow table (missing columns are NULL, lists empty)."""
    full = []
    for row in rows:
        full.append({name: row.get(name, [] if pa.types.is_list(FLOW_SCHEMA.field(name).type) else None) for name in FLOW_SCHEMA.names})
    return pa.Table.from_pylist(full, schema=FLOW_SCHEMA)

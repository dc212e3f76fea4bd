"""Helpers for the policy tests: hand-built flow rows (pods, reserved identities, requests) and schema checks."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pyarrow as pa

from flowpipe.model import FLOW_SCHEMA

DB_NETWORK_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"""
"""A NetworkPolicy in namespace shop: pods `app: db` accept only `app: api` on TCP 5432."""


def pod(namespace: str, app: str, **labels: str) -> dict[str, Any]:
    """One end of a flow: a pod of workload `app` in `namespace`, with Cilium labels as Hubble reports them."""
    extra = [f"k8s:{k.replace('_', '-')}={v}" for k, v in labels.items()]
    return {
        "namespace": namespace,
        "pod_name": f"{app}-7d4b9c8f6-x2x9z",
        "workload_name": app,
        "workload_kind": "Deployment",
        # As in Cilium, the identity follows the label set: pods with other labels have another identity.
        "identity": 1000 + sum(map(ord, namespace + app + "".join(extra))),
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


def reserved(
    name: str, ip: str | None = None, identity: int | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """A reserved identity (`world`, `host`, `remote-node`, `kube-apiserver`, ...) at `ip`."""
    numbers = {"host": 1, "world": 2, "health": 4, "remote-node": 6, "kube-apiserver": 7}
    return {
        "identity": identity if identity is not None else numbers.get(name, 2),
        "labels": [f"reserved:{name}"],
        "ip": ip,
        "names": names or [],
    }


def flow(
    src: dict[str, Any], dst: dict[str, Any], port: int | None = 80, protocol: str = "TCP", **fields: Any
) -> dict[str, Any]:
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
        full.append(
            {
                name: row.get(name, [] if pa.types.is_list(FLOW_SCHEMA.field(name).type) else None)
                for name in FLOW_SCHEMA.names
            }
        )
    return pa.Table.from_pylist(full, schema=FLOW_SCHEMA)


KUBERNETES_VERSION = "1.30.0"

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("cidr", raises=ValueError)
def _is_cidr(value: object) -> bool:
    # The Cilium schemas mark CIDR fields with a format jsonschema does not know by itself.
    if isinstance(value, str):
        ipaddress.ip_network(value, strict=False)
    return True


def cilium_schema(schemas: Path, kind: str) -> dict[str, Any]:
    """The object schema of a Cilium kind, from its OpenAPI file (which holds the openAPIV3Schema itself).

    Patterns that Python's `re` cannot compile (Go's `\\PC` class, used only by fields flowpipe never writes)
    are dropped, so that jsonschema can run; everything else is checked as written.
    """
    data = json.loads((schemas / f"{kind.lower()}.v2.openapi.json").read_text())
    for key in ("openAPIV3Schema", "schema"):  # tolerate CRD-style wrappers
        if isinstance(data.get(key), dict):
            data = data[key]
    assert data.get("type") == "object" and "spec" in data["properties"]
    return _python_patterns(data)


def _python_patterns(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _python_patterns(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str):
            try:
                re.compile(out["pattern"])
            except re.error:
                del out["pattern"]
        return out
    if isinstance(node, list):
        return [_python_patterns(v) for v in node]
    return node


def validate_document(doc: dict[str, Any], schemas: Path) -> None:
    """Validate one rendered document: Kubernetes kinds with kubernetes-validate, Cilium kinds with jsonschema."""
    if doc["kind"] == "NetworkPolicy":
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    else:
        schema = cilium_schema(schemas, doc["kind"])
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(doc)

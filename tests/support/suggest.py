"""Helpers for the suggest tests: flows written by the real ParquetSink, suggest run through DuckDB, documents."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from flowpipe.app.suggest import SuggestConfig, Suggestion, suggest_policies
from flowpipe.query import DuckDBEngine
from support.flowdata import T0, write_dataset
from support.flowdata import flow as full_row
from support.policy import flow

ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


def dataset(root: Path, rows: list[dict[str, Any]]) -> Path:
    """The rows, a second apart from T0, as a dataset written by the ParquetSink."""
    write_dataset(root, [full_row(**{"time": T0 + timedelta(seconds=i), **r}) for i, r in enumerate(rows)])
    return root


def suggest(root: Path, rows: list[dict[str, Any]] | None = None, **config: Any) -> Suggestion:
    """Write `rows` (when given) at `root`, then run suggest over all of it."""
    if rows is not None:
        dataset(root, rows)
    with DuckDBEngine(root) as engine:
        return suggest_policies(engine, SuggestConfig(**{**ALL_TIME, **config}))


def documents(suggestion: Suggestion) -> dict[str, dict[str, Any]]:
    """Every written document by `<kind> <namespace>/<name>`."""
    out = {}
    for doc in yaml.safe_load_all(suggestion.stream()):
        out[f"{doc['kind']} {doc['metadata']['namespace']}/{doc['metadata']['name']}"] = doc
    return out


def connection(
    src: dict[str, Any], dst: dict[str, Any], port: int, sport: int, **extra: Any
) -> list[dict[str, Any]]:
    """One TCP connection as Hubble reports it at both ends: the SYN at the source's egress and the
    destination's ingress, a data packet, and the SYN-ACK reply."""
    five = {"source_port": sport, **extra}
    return [
        flow(src, dst, port, traffic_direction="EGRESS", tcp_flags="SYN", **five),
        flow(src, dst, port, traffic_direction="INGRESS", tcp_flags="SYN", **five),
        flow(src, dst, port, traffic_direction="EGRESS", tcp_flags="ACK,PSH", **five),
        flow(
            dst, src, sport, traffic_direction="INGRESS", tcp_flags="SYN,ACK", is_reply=True, source_port=port
        ),
    ]


def dns_server() -> dict[str, Any]:
    """A CoreDNS pod as Cilium describes it: `k8s-app: kube-dns` in kube-system, plus per-rollout labels."""
    return {
        "namespace": "kube-system",
        "pod_name": "coredns-5d78c9869d-x7k2p",
        "workload_name": "coredns",
        "workload_kind": "Deployment",
        "identity": 6301,
        "labels": [
            "k8s:k8s-app=kube-dns",
            "k8s:pod-template-hash=5d78c9869d",
            "k8s:io.kubernetes.pod.namespace=kube-system",
            "k8s:io.cilium.k8s.policy.serviceaccount=coredns",
        ],
        "ip": "10.0.9.9",
    }

"""Benchmark inputs: synthetic `hubble observe -o jsonpb` files of varied, realistic flows, and the naive baseline.

The synthetic cluster has a dozen namespaces, ~130 workloads with several pods each on eight nodes, ~1,500
traffic edges with skewed weights (a few busy pairs, a long tail), DNS through CoreDNS with NOERROR, NXDOMAIN
and SERVFAIL answers, HTTP calls over hundreds of paths, egress to external names, ingress from the world,
policy drops, audits and proxy redirects, with policy attribution. Each line is rendered like Hubble renders
it (proto field names, enum names, 64-bit integers as strings) and is 1-2 KB long, like the real captures.
Lines arrive roughly in time order with per-node jitter, so some flows are out of order (a relay merges nodes).

Generation is fast because each (edge, event shape) pair is rendered once into a template; per flow only the
time, uuid and ephemeral port are filled in.

`naive_ingest` is the obvious baseline the file source is measured against: `json.loads` per line, a Python
walk of the dict into flat columns, a pandas DataFrame, `to_parquet`.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NAMESPACES = (
    "shop", "payments", "catalog", "checkout", "identity", "search",
    "analytics", "monitoring", "logging", "ingress-nginx", "batch", "kube-system",
)  # fmt: skip
_WORDS = (
    "api", "web", "worker", "cart", "orders", "inventory", "gateway", "auth", "mailer", "ledger", "reports",
    "indexer", "scheduler", "pricing", "images", "reviews", "ratings", "sessions", "notifier", "exporter",
)  # fmt: skip
_BACKENDS = (("postgres", 5432), ("redis", 6379), ("kafka", 9092), ("mysql", 3306), ("mongodb", 27017))
_EXTERNAL = (
    "api.stripe.com", "hooks.slack.com", "s3.eu-west-1.amazonaws.com", "api.github.com", "sentry.io",
    "www.googleapis.com", "login.microsoftonline.com", "registry-1.docker.io", "api.sendgrid.com", "pypi.org",
)  # fmt: skip
_HTTP_PATHS = (
    "/api/v1/orders", "/api/v1/orders/{id}", "/api/v1/carts/{id}/items", "/api/v2/products", "/api/v2/products/{id}",
    "/healthz", "/readyz", "/metrics", "/login", "/api/v1/users/{id}", "/api/v1/payments/{id}/capture", "/search",
)  # fmt: skip
_NODES = tuple(f"prod/worker-{i}" for i in range(1, 9))
_TOKENS = {"@@T@@": "{t}", "@@U@@": "{u}", '"@@P@@"': "{p}"}


@dataclass(frozen=True, slots=True)
class _Pod:
    namespace: str
    workload: str
    name: str
    ip: str
    identity: int
    node: str
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Edge:
    source: _Pod | None  # None: the world
    destination: _Pod | None
    port: int
    protocol: str  # TCP or UDP
    kind: str  # l4, http, dns, external, ingress
    verdict: str  # FORWARDED, DROPPED, AUDIT
    external: str = ""


@dataclass(slots=True)
class SyntheticStats:
    """What a generated file holds: flows by verdict, lost-events records, bytes."""

    flows: int = 0
    lost_event_records: int = 0
    bytes: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)


def _cluster(rng: random.Random) -> list[_Pod]:
    pods = []
    identity = 10_000
    for n, namespace in enumerate(NAMESPACES):
        names = rng.sample(_WORDS, rng.randint(7, 13))
        if namespace == "kube-system":
            names = ["coredns", "metrics-server", "hubble-relay"]
        for w, workload in enumerate(names):
            identity += rng.randint(1, 400)
            labels = (
                f"k8s:app.kubernetes.io/name={workload}",
                f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}",
                "k8s:io.cilium.k8s.policy.cluster=prod",
                f"k8s:io.cilium.k8s.policy.serviceaccount={workload}",
                f"k8s:io.kubernetes.pod.namespace={namespace}",
                f"k8s:version=v{rng.randint(1, 3)}",
                "k8s:k8s-app=kube-dns" if workload == "coredns" else f"k8s:app={workload}",
            )
            template_hash = f"{rng.getrandbits(40):010x}"
            for p in range(rng.randint(1, 6)):
                name = f"{workload}-{template_hash}-{rng.getrandbits(20):05x}"
                ip = f"10.{n + 1}.{w}.{p + 10}"
                pods.append(_Pod(namespace, workload, name, ip, identity, rng.choice(_NODES), labels))
    return pods


def _edges(rng: random.Random, pods: list[_Pod]) -> list[tuple[_Edge, float]]:
    by_workload: dict[tuple[str, str], list[_Pod]] = {}
    for pod in pods:
        by_workload.setdefault((pod.namespace, pod.workload), []).append(pod)
    workloads = list(by_workload)
    dns = by_workload[("kube-system", "coredns")]
    edges: list[_Edge] = []
    for _ in range(1100):
        src = rng.choice(pods)
        dst_key = rng.choice(workloads[:60]) if rng.random() < 0.6 else rng.choice(workloads)
        dst = rng.choice(by_workload[dst_key])
        if rng.random() < 0.3:
            port, kind = rng.choice(_BACKENDS)[1], "l4"
        else:
            port, kind = rng.choice((80, 8080, 8443, 9090, 50051)), "http" if rng.random() < 0.5 else "l4"
        verdict = "DROPPED" if rng.random() < 0.06 else "AUDIT" if rng.random() < 0.02 else "FORWARDED"
        edges.append(_Edge(src, dst, port, "TCP", kind, verdict))
    for pod in rng.sample(pods, 250):
        edges.append(
            _Edge(pod, rng.choice(dns), 53, "UDP", "dns", "DROPPED" if rng.random() < 0.03 else "FORWARDED")
        )
    for pod in rng.sample(pods, 120):
        name = rng.choice(_EXTERNAL)
        edges.append(
            _Edge(pod, None, 443, "TCP", "external", "DROPPED" if rng.random() < 0.1 else "FORWARDED", name)
        )
    for pod in by_workload.get(("ingress-nginx", workloads[0][1]), [])[:1] or pods[:1]:
        edges.append(_Edge(None, pod, 443, "TCP", "ingress", "FORWARDED"))
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(edges))]
    rng.shuffle(weights)
    return list(zip(edges, weights, strict=True))


def _endpoint(pod: _Pod | None) -> dict[str, Any]:
    if pod is None:
        return {"identity": 2, "labels": ["reserved:world"]}
    kind = "StatefulSet" if pod.workload in {"postgres", "kafka"} else "Deployment"
    return {
        "ID": 1000 + pod.identity % 3000,
        "identity": pod.identity,
        "namespace": pod.namespace,
        "labels": list(pod.labels),
        "pod_name": pod.name,
        "workloads": [{"name": pod.workload, "kind": kind}],
    }


def _policy(pod: _Pod | None, direction: str) -> list[dict[str, Any]]:
    if pod is None:
        return []
    return [
        {
            "name": f"{pod.workload}-{direction}",
            "namespace": pod.namespace,
            "labels": [f"k8s:io.cilium.k8s.policy.name={pod.workload}-{direction}"],
            "revision": "12",
            "kind": "CiliumNetworkPolicy",
        }
    ]


def _render(edge: _Edge, shape: str, rng: random.Random) -> str:
    """One template line for an edge and event shape, with @@T@@ (time), @@U@@ (uuid), @@P@@ (port)."""
    src, dst = edge.source, edge.destination
    reply = shape in {"reply", "response"}
    ingress = shape in {"request-ingress", "reply"}
    src_ip = src.ip if src else f"203.0.113.{rng.randint(1, 250)}"
    dst_ip = dst.ip if dst else f"198.51.100.{rng.randint(1, 250)}"
    ports: dict[str, Any] = {"source_port": "@@P@@", "destination_port": edge.port}
    if reply:
        src, dst, src_ip, dst_ip = dst, src, dst_ip, src_ip
        ports = {"source_port": edge.port, "destination_port": "@@P@@"}
    observer = (dst if ingress else src) or src or dst
    node = observer.node if observer else _NODES[0]
    flow: dict[str, Any] = {"time": "@@T@@", "uuid": "@@U@@", "verdict": edge.verdict}
    if edge.verdict == "DROPPED":
        flow["drop_reason"] = 133
    mac = ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6))
    flow["ethernet"] = {"source": mac, "destination": "d6:ec:b0:4a:ff:46"}
    flow["IP"] = {"source": src_ip, "destination": dst_ip, "ipVersion": "IPv4"}
    flags = {"reply": {"SYN": True, "ACK": True}, "response": {"PSH": True, "ACK": True}}.get(
        shape, {"SYN": True}
    )
    if shape == "request-ingress" and rng.random() < 0.5:
        flags = {"ACK": True, "PSH": True}
    flow["l4"] = {"UDP": ports} if edge.protocol == "UDP" else {"TCP": {**ports, "flags": flags}}
    flow["source"], flow["destination"] = _endpoint(src), _endpoint(dst)
    if edge.kind == "external" and not reply:
        flow["destination_names"] = [edge.external]
    l7 = edge.kind in {"http", "dns"} and shape in {"request", "response"} and edge.verdict != "DROPPED"
    flow["Type"] = "L7" if l7 else "L3_L4"
    flow["node_name"] = node
    if reply:
        flow["reply"] = True
    if l7:
        flow["l7"] = _layer7(edge, shape, rng)
        flow["event_type"] = {"type": 129}
    elif edge.verdict == "DROPPED":
        flow["event_type"] = {"type": 1, "sub_type": 133}
        flow["drop_reason_desc"] = "POLICY_DENIED"
    else:
        flow["event_type"] = {"type": 4, "sub_type": 3 if reply else 0}
        flow["trace_observation_point"] = "TO_ENDPOINT" if ingress else "TO_STACK"
    flow["traffic_direction"] = "INGRESS" if ingress else "EGRESS"
    flow["is_reply"] = reply
    flow["interface"] = {"index": rng.randint(5, 60), "name": f"lxc{rng.getrandbits(32):08x}"}
    if edge.verdict == "FORWARDED" and not reply:
        flow["ingress_allowed_by" if ingress else "egress_allowed_by"] = _policy(
            dst if ingress else src, "allow"
        )
    if edge.verdict == "DROPPED" and rng.random() < 0.5:
        flow["egress_denied_by"] = _policy(src, "deny")
    flow["Summary"] = _summary(flow)
    line = json.dumps({"flow": flow, "node_name": node, "time": "@@T@@"}, separators=(",", ":"))
    line = line.replace("{", "{{").replace("}", "}}")
    for token, field_ in _TOKENS.items():
        line = line.replace(token, field_)
    return line


def _layer7(edge: _Edge, shape: str, rng: random.Random) -> dict[str, Any]:
    response = shape == "response"
    record: dict[str, Any] = {"type": "RESPONSE" if response else "REQUEST"}
    if response:
        record["latency_ns"] = str(rng.randint(200_000, 90_000_000))
    if edge.kind == "dns":
        name = rng.choice(
            [f"{w}.{ns}.svc.cluster.local." for w, ns in zip(_WORDS, NAMESPACES * 2, strict=False)]
            + [f"{host}." for host in _EXTERNAL]
            + [f"missing-{rng.randint(1, 40)}.example.internal."]
        )
        rcode = 3 if name.startswith("missing") else 2 if rng.random() < 0.02 else 0
        dns: dict[str, Any] = {
            "query": name,
            "observation_source": "proxy",
            "qtypes": [rng.choice(("A", "AAAA"))],
        }
        if response:
            dns.update(rcode=rcode, ttl=30, rrtypes=dns["qtypes"])
            if rcode == 0:
                dns["ips"] = [f"10.96.{rng.randint(0, 255)}.{rng.randint(1, 254)}"]
        record["dns"] = dns
    else:
        path = rng.choice(_HTTP_PATHS).replace("{id}", str(rng.randint(1, 5000)))
        host = edge.destination.workload if edge.destination else "upstream"
        method = rng.choice(("GET", "GET", "GET", "POST", "PUT", "DELETE"))
        http: dict[str, Any] = {
            "method": method,
            "url": f"http://{host}:{edge.port}{path}",
            "protocol": "HTTP/1.1",
        }
        if response:
            http["code"] = rng.choice((200, 200, 200, 200, 201, 204, 404, 500, 503))
        http["headers"] = [
            {"key": ":authority", "value": f"{host}:{edge.port}"},
            {"key": "user-agent", "value": "Go-http-client/1.1"},
            {"key": "x-request-id", "value": f"{rng.getrandbits(128):032x}"},
        ]
        record["http"] = http
    return record


def _summary(flow: dict[str, Any]) -> str:
    if "l7" in flow:
        l7 = flow["l7"]
        if "dns" in l7:
            return f"DNS {'Answer' if l7['type'] == 'RESPONSE' else 'Query'} {l7['dns']['query']}"
        return f"HTTP/1.1 {l7['http']['method']} {l7['http']['url']}"
    if "TCP" in flow["l4"]:
        return "TCP Flags: " + ", ".join(flow["l4"]["TCP"]["flags"])
    return "UDP"


_SHAPES = (("request", 0.40), ("request-ingress", 0.25), ("reply", 0.2), ("response", 0.15))


class _Clock:
    """RFC 3339 text with 9 fractional digits for nanosecond times, caching the seconds part."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def text(self, ns: int) -> str:
        second, fraction = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{fraction:09d}Z"


def generate_lines(
    flows: int, *, seed: int = 1, end: datetime | None = None, hours: float = 2.0
) -> Iterator[str]:
    """`flows` jsonpb flow lines (plus a lost-events line every 100,000 flows), spread over `hours` up to `end`."""
    rng = random.Random(seed)
    pods = _cluster(rng)
    templates: list[str] = []
    weights: list[float] = []
    for edge, weight in _edges(rng, pods):
        for shape, share in _SHAPES:
            if edge.protocol == "UDP" and shape == "request-ingress":
                continue
            templates.append(_render(edge, shape, rng))
            weights.append(weight * share)
    cumulative: list[float] = []
    total = 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    end_ns = int((end or datetime.now(UTC)).timestamp()) * 1_000_000_000
    start_ns = end_ns - int(hours * 3600 * 1_000_000_000)
    step = (end_ns - start_ns) // max(flows, 1)
    clock = _Clock()
    done = 0
    while done < flows:
        chunk = min(10_000, flows - done)
        for i, template in enumerate(rng.choices(templates, cum_weights=cumulative, k=chunk)):
            ns = (
                start_ns + (done + i) * step + rng.randint(-200_000_000, 200_000_000)
            )  # per-node clock jitter
            bits = f"{rng.getrandbits(128):032x}"
            uuid = f"{bits[:8]}-{bits[8:12]}-4{bits[13:16]}-a{bits[17:20]}-{bits[20:]}"
            yield template.format(t=clock.text(max(ns, start_ns)), u=uuid, p=rng.randint(32768, 60999))
        done += chunk
        if done % 100_000 == 0:
            node = rng.choice(_NODES)
            lost = {"source": "HUBBLE_RING_BUFFER", "num_events_lost": str(rng.randint(1, 500)), "cpu": 1}
            yield json.dumps(
                {"lost_events": lost, "node_name": node, "time": clock.text(start_ns + done * step)}
            )


def write_synthetic_jsonpb(
    path: Path, flows: int, *, seed: int = 1, end: datetime | None = None
) -> SyntheticStats:
    """Write `flows` synthetic flows to `path` as jsonpb lines; returns what was written."""
    stats = SyntheticStats()
    buffer: list[str] = []
    with open(path, "w", encoding="utf-8") as handle:
        for line in generate_lines(flows, seed=seed, end=end):
            if line.startswith('{"lost_events"'):
                stats.lost_event_records += 1
            else:
                stats.flows += 1
                verdict_at = line.find('"verdict":"') + 11
                stats.verdicts[line[verdict_at : line.find('"', verdict_at)]] += 1
            buffer.append(line)
            if len(buffer) >= 5000:
                handle.write("\n".join(buffer) + "\n")
                buffer.clear()
        if buffer:
            handle.write("\n".join(buffer) + "\n")
    stats.bytes = path.stat().st_size
    return stats


# -- the naive baseline -----------------------------------------------------------------------------------


def _names(items: list[dict[str, Any]] | None) -> list[str]:
    return [f"{p['namespace']}/{p['name']}" if p.get("namespace") else p.get("name", "") for p in items or []]


def _endpoint_columns(
    prefix: str, endpoint: dict[str, Any] | None, service: dict[str, Any] | None
) -> dict[str, Any]:
    endpoint = endpoint or {}
    workloads = endpoint.get("workloads") or [{}]
    return {
        f"{prefix}_namespace": endpoint.get("namespace"),
        f"{prefix}_pod_name": endpoint.get("pod_name"),
        f"{prefix}_workload_name": workloads[0].get("name"),
        f"{prefix}_workload_kind": workloads[0].get("kind"),
        f"{prefix}_identity": endpoint.get("identity"),
        f"{prefix}_labels": endpoint.get("labels", []),
        f"{prefix}_service_name": (service or {}).get("name"),
    }


def naive_row(event: dict[str, Any]) -> dict[str, Any] | None:
    """One flow as a flat dict, the obvious way (a Python dict walk); None for a record that is not a flow."""
    flow = event.get("flow", event if "verdict" in event or "IP" in event else None)
    if flow is None:
        return None
    ip, l4, l7 = flow.get("IP") or {}, flow.get("l4") or {}, flow.get("l7") or {}
    proto = next(iter(l4), None)
    l4_fields = l4.get(proto) or {} if proto else {}
    flags = l4_fields.get("flags") or {}
    dns, http = l7.get("dns") or {}, l7.get("http") or {}
    row = {
        "time": flow.get("time") or event.get("time"),
        "node_name": flow.get("node_name"),
        "uuid": flow.get("uuid"),
        "verdict": flow.get("verdict"),
        "drop_reason": flow.get("drop_reason", 0),
        "drop_reason_desc": flow.get("drop_reason_desc"),
        "flow_type": flow.get("Type"),
        "event_type": (flow.get("event_type") or {}).get("type"),
        "event_sub_type": (flow.get("event_type") or {}).get("sub_type"),
        "trace_observation_point": flow.get("trace_observation_point"),
        "traffic_direction": flow.get("traffic_direction"),
        "is_reply": flow.get("is_reply", True if flow.get("reply") else None),
        "ip_version": ip.get("ipVersion"),
        "source_ip": ip.get("source"),
        "destination_ip": ip.get("destination"),
        **_endpoint_columns("source", flow.get("source"), flow.get("source_service")),
        **_endpoint_columns("destination", flow.get("destination"), flow.get("destination_service")),
        "source_names": flow.get("source_names", []),
        "destination_names": flow.get("destination_names", []),
        "l4_protocol": proto,
        "source_port": l4_fields.get("source_port"),
        "destination_port": l4_fields.get("destination_port"),
        "tcp_flags": ",".join(k for k, v in flags.items() if v) or None,
        "l7_type": l7.get("type"),
        "latency_ns": int(l7["latency_ns"]) if "latency_ns" in l7 else None,
        "dns_query": dns.get("query"),
        "dns_rcode": dns.get("rcode"),
        "dns_qtypes": dns.get("qtypes", []),
        "dns_ips": dns.get("ips", []),
        "http_method": http.get("method"),
        "http_url": http.get("url"),
        "http_code": http.get("code"),
        "ingress_allowed_by": _names(flow.get("ingress_allowed_by")),
        "egress_allowed_by": _names(flow.get("egress_allowed_by")),
        "ingress_denied_by": _names(flow.get("ingress_denied_by")),
        "egress_denied_by": _names(flow.get("egress_denied_by")),
    }
    return row


def naive_ingest(source: Path, target: Path, *, limit: int | None = None) -> tuple[int, float]:
    """The baseline: json.loads per line, dict walk, pandas DataFrame, to_parquet. Returns (flows, seconds)."""
    import pandas as pd

    started = time.perf_counter()
    rows = []
    with open(source, encoding="utf-8") as handle:
        for line in handle:
            row = naive_row(json.loads(line))
            if row is not None:
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    frame = pd.DataFrame(rows)
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    frame.to_parquet(target)
    return len(rows), time.perf_counter() - started

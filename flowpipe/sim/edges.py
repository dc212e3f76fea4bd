"""Who talks to whom in the simulated cluster: the traffic edges, their weights, ports, L7 content and faults."""

from __future__ import annotations

from dataclasses import dataclass

from flowpipe.sim import faults as f
from flowpipe.sim.cluster import Cluster
from flowpipe.sim.faults import (
    NO_RESPONSE_QUERY,
    NXDOMAIN_QUERY,
    REFUSED_QUERY,
    SERVFAIL_NAME,
    UPSTREAM_UNSEEN_CLIENT,
    UPSTREAM_UNSEEN_NAME,
)
from flowpipe.sim.wire import MS, TCP, UDP, US

EXTERNAL_IPS: dict[str, tuple[str, ...]] = {
    "api.stripe.com": ("54.187.216.72", "54.241.31.99"),
    "s3.us-east-1.amazonaws.com": ("52.217.161.8", "52.216.8.141", "52.217.40.30"),
    "sqs.eu-west-1.amazonaws.com": ("176.32.103.205", "176.32.103.201"),
}
WORLD_CLIENTS: tuple[str, ...] = tuple(
    [f"203.0.113.{i}" for i in range(7, 250, 11)] + [f"198.51.100.{i}" for i in range(5, 250, 13)]
)
# fmt: off
PROBE_PORTS: tuple[int, ...] = (
    21, 22, 23, 25, 80, 110, 135, 139, 443, 445, 1433, 2375, 2379, 3306, 3389, 5432, 5900, 6379, 8000, 8443, 9000,
    9092, 9200, 10250, 11211, 27017,
)
# fmt: on


@dataclass(frozen=True)
class Edge:
    """One kind of connection the cluster makes, chosen with probability proportional to `weight`.

    `kind` selects how a connection becomes flows (a `_edge_<kind>` method of `traffic.Traffic`). `fault` tags
    every flow of the edge for the ground truth; `deny_fault` tags them only when policy denies the connection;
    `before_fault` tags allowed connections (the "it used to work" half of a regression). `latency` is a minimum
    plus the mean of an exponential part, in nanoseconds; `rcode` is the answer of a faulty DNS lookup (-1: none).
    """

    name: str
    kind: str
    weight: float
    src: str | None = None
    dst: str | None = None
    port: int = 0
    protocol: int = TCP
    l7: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    latency: tuple[int, int] = (200 * US, 2 * MS)
    window: tuple[float, float] = (0.0, 1.0)
    fault: str | None = None
    deny_fault: str | None = None
    before_fault: str | None = None
    rcode: int = 0


_NGINX = "ingress-nginx/ingress-nginx-controller"
_LOOKUPS = {
    "production/web": ("production/api",),
    "production/api": ("production/postgres", "production/redis"),
    "production/order-service": ("production/kafka",),
    "production/payment-service": ("production/kafka",),
    "production/report-export": ("production/postgres",),
    "monitoring/grafana": ("monitoring/prometheus",),
    "staging/web": ("staging/api",),
    "staging/api": ("staging/redis",),
}


def _service_name(cluster: Cluster, key: str) -> str:
    workload = cluster.workloads[key]
    return f"{workload.service or workload.name}.{workload.namespace}.svc.cluster.local."


def build_edges(cluster: Cluster, faults: frozenset[str]) -> list[Edge]:
    """The edges for a cluster with the given faults switched on."""

    def on(fault: str) -> str | None:
        return fault if fault in faults else None

    unselected = on(f.UNSELECTED_WORKLOAD)
    regression = on(f.POLICY_REGRESSION)
    # fmt: off
    edges = [
        Edge("world->ingress-nginx:443", "world_in", 7.0, dst=_NGINX, port=443, latency=(3 * MS, 25 * MS)),
        Edge("world->ingress-nginx:80", "world_in", 1.5, dst=_NGINX, port=80, latency=(1 * MS, 5 * MS)),
        Edge("ingress-nginx->web:8080", "tcp", 7.0, _NGINX, "production/web", 8080, latency=(2 * MS, 20 * MS)),
        Edge("ingress-nginx->web:8443", "tcp", 1.5, _NGINX, "production/web", 8443, latency=(2 * MS, 20 * MS)),
        Edge("web->api", "tcp", 10.0, "production/web", "production/api", 8080, l7=("http", "api"),
             latency=(2 * MS, 30 * MS)),
        Edge("api->postgres", "tcp", 6.0, "production/api", "production/postgres", 5432, latency=(300 * US, 4 * MS)),
        Edge("api->redis", "tcp", 7.0, "production/api", "production/redis", 6379, latency=(80 * US, 400 * US),
             deny_fault=regression, before_fault=regression),
        Edge("order-service->kafka produce", "tcp", 3.0, "production/order-service", "production/kafka", 9092,
             l7=("kafka", "produce", "orders"), latency=(1 * MS, 6 * MS)),
        Edge("payment-service->kafka fetch", "tcp", 3.0, "production/payment-service", "production/kafka", 9092,
             l7=("kafka", "fetch", "orders"), latency=(1 * MS, 20 * MS)),
        Edge("payment-service->kafka produce", "tcp", 2.0, "production/payment-service", "production/kafka", 9092,
             l7=("kafka", "produce", "payments"), latency=(1 * MS, 6 * MS)),
        Edge("order-service->kafka fetch", "tcp", 2.0, "production/order-service", "production/kafka", 9092,
             l7=("kafka", "fetch", "payments"), latency=(1 * MS, 20 * MS)),
        Edge("report-export->postgres", "tcp", 0.6, "production/report-export", "production/postgres", 5432,
             latency=(5 * MS, 60 * MS), fault=unselected),
        Edge("prometheus scrape", "scrape", 4.0, "monitoring/prometheus", latency=(3 * MS, 25 * MS)),
        Edge("grafana->prometheus", "tcp", 1.0, "monitoring/grafana", "monitoring/prometheus", 9090,
             latency=(5 * MS, 60 * MS)),
        Edge("kube-apiserver", "apiserver", 1.2, port=6443, latency=(1 * MS, 15 * MS)),
        Edge("payment-service->api.stripe.com", "external", 1.2, "production/payment-service", port=443,
             names=("api.stripe.com",), latency=(120 * MS, 250 * MS)),
        Edge("api->s3", "external", 0.8, "production/api", port=443, names=("s3.us-east-1.amazonaws.com",),
             latency=(20 * MS, 80 * MS)),
        Edge("order-service->sqs", "external", 0.8, "production/order-service", port=443, names=(SERVFAIL_NAME,),
             latency=(10 * MS, 40 * MS)),
        Edge("staging web->api", "tcp", 1.0, "staging/web", "staging/api", 8080, latency=(2 * MS, 30 * MS)),
        Edge("staging api->redis", "tcp", 1.0, "staging/api", "staging/redis", 6379, latency=(80 * US, 400 * US)),
        Edge("health", "health", 0.5, latency=(100 * US, 300 * US)),
    ]
    # fmt: on
    for client, targets in _LOOKUPS.items():
        names = tuple(_service_name(cluster, t) for t in targets)
        fault = unselected if client == "production/report-export" else None
        deny = on(f.DNS_POLICY_DROP) if client.startswith("staging/") else None
        edges.append(Edge(f"dns {client}", "dns", 0.4, client, port=53, protocol=UDP, names=names,
                          latency=(100 * US, 900 * US), fault=fault, deny_fault=deny))  # fmt: skip
    probed = [w for w in cluster.workloads.values() if w.health_port]
    for workload in probed:
        fault = unselected if workload.key == "production/report-export" else None
        edges.append(Edge(f"kubelet->{workload.key}", "kubelet", 2.0 / len(probed), dst=workload.key,
                          port=workload.health_port or 0, fault=fault))  # fmt: skip
    return edges + _fault_edges(faults)


def _fault_edges(faults: frozenset[str]) -> list[Edge]:
    def window(fault: str) -> tuple[float, float]:
        return f.fault_spec(fault).window

    # fmt: off
    candidates = {
        f.DNS_NXDOMAIN: Edge("nxdomain lookups", "dns_fault", 0.5, "production/api", port=53, protocol=UDP,
                             names=(NXDOMAIN_QUERY,), latency=(200 * US, 1 * MS), fault=f.DNS_NXDOMAIN, rcode=3),
        f.DNS_REFUSED: Edge("refused lookups", "dns_fault", 0.3, "monitoring/grafana", port=53, protocol=UDP,
                            names=(REFUSED_QUERY,), latency=(1 * MS, 5 * MS), fault=f.DNS_REFUSED, rcode=5),
        f.DNS_NO_RESPONSE: Edge("unanswered lookups", "dns_fault", 0.3, "production/order-service", port=53,
                                protocol=UDP, names=(NO_RESPONSE_QUERY,), fault=f.DNS_NO_RESPONSE, rcode=-1),
        # The retry storm while the upstream fails: more lookups of the failing name inside the window.
        f.DNS_SERVFAIL: Edge("order-service->sqs retries", "external", 3.0, "production/order-service", port=443,
                             names=(SERVFAIL_NAME,), latency=(10 * MS, 40 * MS), window=window(f.DNS_SERVFAIL)),
        f.PORT_SCAN: Edge("port scan", "probe", 12.0, "production/web", fault=f.PORT_SCAN,
                          window=window(f.PORT_SCAN)),
        f.WORLD_INGRESS: Edge("world->api", "world_in", 0.8, dst="production/api", port=8080, l7=("http", "api"),
                              latency=(2 * MS, 30 * MS), fault=f.WORLD_INGRESS),
        f.DNS_UPSTREAM_UNSEEN: Edge("lookups through node-local-dns", "upstream_unseen", 0.3,
                                    "/".join(UPSTREAM_UNSEEN_CLIENT), port=53, protocol=UDP,
                                    names=(UPSTREAM_UNSEEN_NAME,), fault=f.DNS_UPSTREAM_UNSEEN),
        f.STALE_IP: Edge("stale source address", "stale", 4.0, "production/order-service", "production/kafka", 9092,
                         fault=f.STALE_IP, window=window(f.STALE_IP)),
        f.INGRESS_DENIED: Edge("grafana->postgres", "tcp", 0.4, "monitoring/grafana", "production/postgres", 5432,
                               fault=f.INGRESS_DENIED),
    }
    # fmt: on
    return [edge for fault, edge in candidates.items() if fault in faults]

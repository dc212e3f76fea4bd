"""How the simulated pods resolve names: the search path a resolver walks, and the node-local DNS cache.

Pods resolve with `ndots:5` and the search list `<namespace>.svc.cluster.local svc.cluster.local cluster.local`
plus the nodes' own search domain. A name with fewer than five dots is asked with each search suffix first and
then as it is; a resolver stops at the first name that exists, so every name before it is answered NXDOMAIN.

node-local-dns is a DaemonSet on the host network listening on 169.254.20.10: Hubble records its pods with the
world identity while naming their namespace and pod. When it forwards a lookup to CoreDNS, the DNS proxy's L7
records show node-local-dns, not the application pod, as the client; the names outside the cluster domain go to the
node's upstream resolver, which no capture of the cluster shows.
"""

from __future__ import annotations

import hashlib

from flowpipe.sim.cluster import WORLD_IDENTITY, Cluster
from flowpipe.sim.wire import EndpointView

CLUSTER_DOMAIN = "cluster.local"
NODE_SEARCH_DOMAINS: tuple[str, ...] = ("sim.internal",)
"""The search domain every node's resolv.conf adds (on GKE e.g. `c.<project>.internal google.internal`)."""
NDOTS = 5
NODE_LOCAL_DNS = ("kube-system", "node-local-dns")

_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def search_names(name: str, namespace: str) -> tuple[str, ...]:
    """The names a pod of `namespace` asks, in order, to resolve `name` (one ending with a dot is asked alone)."""
    if name.endswith("."):
        return (name,)
    suffixes = (
        f"{namespace}.svc.{CLUSTER_DOMAIN}",
        f"svc.{CLUSTER_DOMAIN}",
        CLUSTER_DOMAIN,
        *NODE_SEARCH_DOMAINS,
    )
    expansions = tuple(f"{name}.{suffix}." for suffix in suffixes)
    if name.count(".") >= NDOTS:
        return (f"{name}.", *expansions)
    return (*expansions, f"{name}.")


def in_cluster_domain(query: str) -> bool:
    """Whether CoreDNS answers `query` itself (the cluster domain) rather than an upstream resolver."""
    return query.endswith(f".{CLUSTER_DOMAIN}.")


def node_local_dns_pods(cluster: Cluster) -> dict[str, EndpointView]:
    """node-local-dns's pod on each node, as Hubble records it when it is the client of a forwarded lookup.

    The pod runs on the host network: its address is the node's, its identity `reserved:world`, and the record
    still carries its namespace, pod name and DaemonSet. Names are derived from the cluster name, so that the same
    cluster gives the same pods without drawing from the simulator's random sequence.
    """
    digest = hashlib.sha256(f"node-local-dns:{cluster.name}".encode()).digest()
    suffix = "".join(_NAME_ALPHABET[b % len(_NAME_ALPHABET)] for b in digest[:5])
    namespace, name = NODE_LOCAL_DNS
    views = {}
    for node in cluster.nodes:
        pod = f"{name}-{suffix[:4]}{_NAME_ALPHABET[node.index % len(_NAME_ALPHABET)]}"
        views[node.name] = EndpointView(
            node.ip,
            WORLD_IDENTITY,
            ("reserved:world",),
            namespace=namespace,
            pod_name=pod,
            workload=(name, "DaemonSet"),
            cluster_name=cluster.name,
            node=node.name,
        )
    return views

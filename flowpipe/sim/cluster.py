"""The simulated cluster: namespaces, nodes, workloads, pods, identities, IPs and services, built from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Cilium's reserved security identities and their labels.
HOST_IDENTITY = 1
WORLD_IDENTITY = 2
HEALTH_IDENTITY = 4
REMOTE_NODE_IDENTITY = 6
KUBE_APISERVER_IDENTITY = 7
FIRST_CLUSTER_IDENTITY = 256

DEFAULT_CLUSTER_NAME = "sim"
POD_CIDR_PREFIX = "10.244"
NODE_IP_PREFIX = "172.18.0"

# Kubernetes generates name suffixes from this alphabet (no vowels, no look-alike characters).
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(frozen=True)
class Namespace:
    """A namespace and its labels (copied into every pod's identity as `io.cilium.k8s.namespace.labels.*`)."""

    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Node:
    """A cluster node: its name, its IP and the /24 its pods get addresses from."""

    name: str
    index: int
    ip: str
    health_ip: str


@dataclass(frozen=True, eq=False)
class Workload:
    """A Deployment or StatefulSet: its own labels, service account, ports and the service in front of it.

    Compared and hashed by identity: each workload exists once, in `WORKLOADS`.
    """

    name: str
    namespace: str
    kind: str
    replicas: int
    labels: dict[str, str]
    service_account: str
    ports: tuple[int, ...]
    service: str | None = None
    metrics_port: int | None = None
    health_port: int | None = None
    nodes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """`<namespace>/<name>`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, eq=False)
class Pod:
    """One pod: name, IP, node, Cilium endpoint id, security identity and rendered Cilium labels."""

    name: str
    workload: Workload
    ip: str
    node: Node
    endpoint_id: int
    identity: int
    labels: tuple[str, ...]

    @property
    def namespace(self) -> str:
        """The pod's namespace."""
        return self.workload.namespace


@dataclass
class Cluster:
    """The whole simulated cluster, looked up by workload key or pod name."""

    name: str
    namespaces: dict[str, Namespace]
    nodes: list[Node]
    workloads: dict[str, Workload]
    pods: dict[str, list[Pod]] = field(default_factory=dict)
    identities: dict[tuple[str, ...], int] = field(default_factory=dict)
    service_ips: dict[str, str] = field(default_factory=dict)
    apiserver_ip: str = ""

    def node_name(self, node: Node) -> str:
        """The node name as Hubble writes it: `<cluster>/<node>`, or the bare node when the cluster is `default`."""
        return node.name if self.name == "default" else f"{self.name}/{node.name}"

    def workload(self, namespace: str, name: str) -> Workload:
        """The workload `<namespace>/<name>`."""
        return self.workloads[f"{namespace}/{name}"]

    def pods_of(self, namespace: str, name: str) -> list[Pod]:
        """The pods of workload `<namespace>/<name>`."""
        return self.pods[f"{namespace}/{name}"]

    def all_pods(self) -> list[Pod]:
        """Every pod, in a stable order."""
        return [pod for key in sorted(self.pods) for pod in self.pods[key]]

    def node_by_name(self, name: str) -> Node:
        """The node called `name` (without the cluster prefix)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


# --- the fixed shape of the cluster --------------------------------------------------------------------------

NAMESPACES: tuple[Namespace, ...] = (
    Namespace("production", {"env": "production", "purpose": "customer-facing"}),
    Namespace("staging", {"env": "staging", "purpose": "pre-production"}),
    Namespace("monitoring", {"env": "shared", "purpose": "observability"}),
    Namespace("kube-system", {"purpose": "platform"}),
    Namespace("ingress-nginx", {"env": "shared", "purpose": "edge"}),
)

NODE_NAMES: tuple[str, ...] = ("control-plane", "worker-1", "worker-2", "worker-3")
WORKERS: tuple[str, ...] = NODE_NAMES[1:]


def _app(name: str, tier: str, **extra: str) -> dict[str, str]:
    return {"app": name, "app.kubernetes.io/name": name, "tier": tier, **extra}


_NGINX_LABELS = {
    "app.kubernetes.io/name": "ingress-nginx",
    "app.kubernetes.io/component": "controller",
    "app.kubernetes.io/instance": "ingress-nginx",
}
_DEPLOY, _STS = "Deployment", "StatefulSet"

# fmt: off
WORKLOADS: tuple[Workload, ...] = (
    Workload("web", "production", _DEPLOY, 3, _app("web", "frontend"), "web", (8080, 8443), service="web",
             metrics_port=8080, health_port=8080),
    Workload("api", "production", _DEPLOY, 3, _app("api", "backend"), "api", (8080,), service="api",
             metrics_port=8080, health_port=8080),
    Workload("postgres", "production", _STS, 1, _app("postgres", "database"), "postgres", (5432,),
             service="postgres", metrics_port=9187),
    Workload("redis", "production", _STS, 1, _app("redis", "cache"), "redis", (6379,), service="redis",
             metrics_port=9121),
    Workload("kafka", "production", _STS, 3, _app("kafka", "messaging"), "kafka", (9092,), service="kafka",
             metrics_port=9308),
    Workload("order-service", "production", _DEPLOY, 2, _app("order-service", "backend"), "order-service", (8080,),
             service="order-service", metrics_port=8080, health_port=8080),
    Workload("payment-service", "production", _DEPLOY, 2, _app("payment-service", "backend"), "payment-service",
             (8080,), service="payment-service", metrics_port=8080, health_port=8080),
    Workload("report-export", "production", _DEPLOY, 1, _app("report-export", "batch"), "report-export", (),
             health_port=8081),
    Workload("web", "staging", _DEPLOY, 1, _app("web", "frontend"), "web", (8080,), service="web", health_port=8080),
    Workload("api", "staging", _DEPLOY, 1, _app("api", "backend"), "api", (8080,), service="api", health_port=8080),
    Workload("redis", "staging", _STS, 1, _app("redis", "cache"), "redis", (6379,), service="redis"),
    Workload("prometheus", "monitoring", _STS, 1, _app("prometheus", "monitoring"), "prometheus", (9090,),
             service="prometheus", health_port=9090),
    Workload("grafana", "monitoring", _DEPLOY, 1, _app("grafana", "monitoring"), "grafana", (3000,),
             service="grafana", health_port=3000),
    Workload("coredns", "kube-system", _DEPLOY, 2, {"k8s-app": "kube-dns"}, "coredns", (53,), service="kube-dns",
             metrics_port=9153, health_port=8080, nodes=("control-plane", "worker-1")),
    Workload("ingress-nginx-controller", "ingress-nginx", _DEPLOY, 2, _NGINX_LABELS, "ingress-nginx", (80, 443),
             service="ingress-nginx-controller", metrics_port=10254, health_port=10254),
)
# fmt: on


def _random_name(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_NAME_ALPHABET) for _ in range(length))


def cilium_labels(
    workload: Workload, namespace: Namespace, cluster_name: str, template_hash: str | None
) -> tuple[str, ...]:
    """The security-relevant labels of a pod as Hubble shows them (`k8s:key=value`, sorted)."""
    labels = dict(workload.labels)
    if template_hash is not None:
        labels["pod-template-hash"] = template_hash
    labels["io.cilium.k8s.policy.serviceaccount"] = workload.service_account
    labels["io.cilium.k8s.policy.cluster"] = cluster_name
    labels["io.kubernetes.pod.namespace"] = workload.namespace
    ns_labels = {"kubernetes.io/metadata.name": namespace.name, **namespace.labels}
    for key, value in ns_labels.items():
        labels[f"io.cilium.k8s.namespace.labels.{key}"] = value
    return tuple(sorted(f"k8s:{key}={value}" for key, value in labels.items()))


def build_cluster(seed: int, cluster_name: str = DEFAULT_CLUSTER_NAME) -> Cluster:
    """The cluster for `seed`: same seed, same pod names, IPs, endpoint ids and identities."""
    rng = random.Random(f"cluster:{seed}")
    namespaces = {ns.name: ns for ns in NAMESPACES}
    nodes = [
        Node(name, index, f"{NODE_IP_PREFIX}.{index + 2}", f"{POD_CIDR_PREFIX}.{index}.{rng.randint(2, 9)}")
        for index, name in enumerate(NODE_NAMES)
    ]
    cluster = Cluster(
        cluster_name, namespaces, nodes, {w.key: w for w in WORKLOADS}, apiserver_ip=nodes[0].ip
    )
    next_host = {node.name: rng.randint(10, 40) for node in nodes}
    used_endpoint_ids: set[int] = set()
    identity_pool = rng.sample(range(FIRST_CLUSTER_IDENTITY + 1000, 65000), len(WORKLOADS))
    worker_cycle = rng.randrange(len(WORKERS))
    for workload in WORKLOADS:
        template_hash = _random_name(rng, rng.choice((9, 10))) if workload.kind == "Deployment" else None
        labels = cilium_labels(workload, namespaces[workload.namespace], cluster_name, template_hash)
        identity = cluster.identities.setdefault(labels, identity_pool[len(cluster.identities)])
        pods = []
        for replica in range(workload.replicas):
            if workload.nodes:
                node = cluster.node_by_name(workload.nodes[replica % len(workload.nodes)])
            else:
                node = cluster.node_by_name(WORKERS[worker_cycle % len(WORKERS)])
                worker_cycle += 1
            host = next_host[node.name]
            next_host[node.name] = host + rng.randint(1, 6)
            endpoint_id = rng.randint(100, 4000)
            while endpoint_id in used_endpoint_ids:
                endpoint_id = rng.randint(100, 4000)
            used_endpoint_ids.add(endpoint_id)
            if template_hash is not None:
                name = f"{workload.name}-{template_hash}-{_random_name(rng, 5)}"
            else:
                name = f"{workload.name}-{replica}"
            pods.append(
                Pod(
                    name,
                    workload,
                    f"{POD_CIDR_PREFIX}.{node.index}.{host}",
                    node,
                    endpoint_id,
                    identity,
                    labels,
                )
            )
        cluster.pods[workload.key] = pods
        if workload.service is not None:
            cluster.service_ips[workload.key] = f"10.96.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    return cluster


def unused_pod_ip(cluster: Cluster, node: Node) -> str:
    """An address of `node`'s pod range that no pod holds (a stale address of a replaced pod)."""
    taken = {pod.ip for pod in cluster.all_pods()} | {node.health_ip}
    for host in range(250, 10, -1):
        ip = f"{POD_CIDR_PREFIX}.{node.index}.{host}"
        if ip not in taken:
            return ip
    raise ValueError(f"no free address on node {node.name}")

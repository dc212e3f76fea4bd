"""The traffic of the simulated cluster: each chosen edge becomes a connection between concrete endpoints.

Whether it passes is decided by the policies in force, with the injected faults applied.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from flowpipe.sim import edges as e
from flowpipe.sim import faults as f
from flowpipe.sim import resolver
from flowpipe.sim.cluster import (
    HEALTH_IDENTITY,
    HOST_IDENTITY,
    KUBE_APISERVER_IDENTITY,
    REMOTE_NODE_IDENTITY,
    WORLD_IDENTITY,
    Cluster,
    Pod,
    unused_pod_ip,
)
from flowpipe.sim.edges import Edge
from flowpipe.sim.policies import EGRESS, INGRESS, NOT_ENFORCED, Decision, PeerRef, PolicySet
from flowpipe.sim.shapes import (
    CT_MAP_INSERTION_FAILED,
    EG,
    IN,
    STALE_OR_UNROUTABLE_IP,
    Conn,
    Record,
    Writer,
)
from flowpipe.sim.wire import ICMPV4, MS, TCP, UDP, US, EndpointView, L7Spec

_API_RESOURCES = ("orders", "users", "products", "carts", "invoices")
LABELS_ONLY_NODE = "worker-3"
"""The node whose pods the other nodes know only by identity and labels (records without namespace or pod)."""


class TagRegistry:
    """Ground-truth counters by (fault name, role); role `main` or `before`."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str], int] = {}

    def tag(self, fault: str | None, role: str = "main") -> int:
        """The tag number for `fault`/`role`, -1 for no fault."""
        if fault is None:
            return -1
        key = (fault, role)
        if key not in self._index:
            self._index[key] = len(self.keys)
            self.keys.append(key)
        return self._index[key]


Tags = tuple[int, int, int]
"""An edge's ground-truth tags: for all its flows, for its policy-denied flows, for its allowed flows (-1: none)."""


def _reserved(
    ip: str,
    identity: int,
    name: str,
    *,
    endpoint_id: int = 0,
    node: str | None = None,
    service: tuple[str, str] | None = None,
    names: tuple[str, ...] = (),
) -> EndpointView:
    return EndpointView(
        ip, identity, (f"reserved:{name}",), endpoint_id=endpoint_id, node=node, service=service, names=names
    )


class Traffic:
    """Turns edge choices into records; holds the endpoint views, the policy timeline and the fault set-up."""

    def __init__(
        self,
        cluster: Cluster,
        rng: random.Random,
        faults: frozenset[str],
        policy_timeline: list[tuple[int, PolicySet]],
        window: tuple[int, int],
        tags: TagRegistry,
        emit: Callable[[Record], None],
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.faults = faults
        self.timeline = policy_timeline
        self.start_ns, self.end_ns = window
        self.tags = tags
        self.writer = Writer({n.name: cluster.node_name(n) for n in cluster.nodes}, rng, emit)
        self._pods = {pod: self._pod_view(pod) for pod in cluster.all_pods()}
        nodes = cluster.nodes
        self._hosts = {n.name: _reserved(n.ip, HOST_IDENTITY, "host") for n in nodes}
        self._health = {
            n.name: _reserved(n.health_ip, HEALTH_IDENTITY, "health", endpoint_id=n.index + 1, node=n.name)
            for n in nodes
        }
        self._remote_nodes = {n.name: _reserved(n.ip, REMOTE_NODE_IDENTITY, "remote-node") for n in nodes}
        self._apiserver = _reserved(
            cluster.apiserver_ip, KUBE_APISERVER_IDENTITY, "kube-apiserver", service=("kubernetes", "default")
        )
        self._world_clients = [_reserved(ip, WORLD_IDENTITY, "world") for ip in e.WORLD_CLIENTS]
        self._external = {
            name: [_reserved(ip, WORLD_IDENTITY, "world", names=(name,)) for ip in ips]
            for name, ips in e.EXTERNAL_IPS.items()
        }
        self._service_ip = {
            f"{w.service}.{w.namespace}.svc.cluster.local.": cluster.service_ips[w.key]
            for w in cluster.workloads.values()
            if w.service
        }
        # Each Service's ClusterIP as a record names it before socket-LB translates it (no identity of its own).
        self._services = {
            key: _reserved(ip, WORLD_IDENTITY, "world", service=(w.service, w.namespace))
            for key, ip in cluster.service_ips.items()
            if (w := cluster.workloads[key]).service
        }
        self._coredns = cluster.workload("kube-system", "coredns")
        self._node_local_dns = resolver.node_local_dns_pods(cluster)
        self._correlation = rng.randint(1000, 90000)
        self._prepare_faults()

    @property
    def made(self) -> int:
        """How many records have been written so far."""
        return self.writer.made

    def template_count(self) -> int:
        """How many distinct templates the run has built."""
        return len(self.writer.factory)

    # --- set-up ---------------------------------------------------------------------------------------------

    def _pod_view(self, pod: Pod) -> EndpointView:
        workload = pod.workload
        service = (workload.service, workload.namespace) if workload.service else None
        return EndpointView(
            pod.ip,
            pod.identity,
            pod.labels,
            namespace=workload.namespace,
            pod_name=pod.name,
            workload=(workload.name, workload.kind),
            cluster_name=self.cluster.name,
            endpoint_id=pod.endpoint_id,
            node=pod.node.name,
            service=service,
            remote_labels_only=pod.node.name == LABELS_ONLY_NODE,
        )

    def _prepare_faults(self) -> None:
        cluster, faults = self.cluster, self.faults
        self.compromised = cluster.pods_of("production", "web")[0]
        # The scan only probes what the compromised pod's egress policy denies, so each probe is a policy drop.
        policies = self.timeline[0][1]
        self.scan_targets = [
            (pod, port)
            for pod in cluster.all_pods()
            if pod is not self.compromised
            for port in e.PROBE_PORTS
            if not policies.decide(
                EGRESS, self.compromised.workload, PeerRef(pod.workload), port, "TCP"
            ).allowed
        ]
        self.scan_source_port = self.rng.randint(40000, 60000)
        self.stale_pod = cluster.pods_of("production", "order-service")[0]
        view = self._pods[self.stale_pod]
        self.stale_view = EndpointView(
            unused_pod_ip(cluster, self.stale_pod.node),
            view.identity,
            view.labels,
            namespace=view.namespace,
            pod_name=view.pod_name,
            workload=view.workload,
            cluster_name=view.cluster_name,
            endpoint_id=view.endpoint_id,
            node=view.node,
            service=view.service,
        )
        self.servfail_window = self._window(f.DNS_SERVFAIL)
        self.ct_window = self._window(f.CT_MAP_FULL)
        self.tag_servfail = self.tags.tag(f.DNS_SERVFAIL if f.DNS_SERVFAIL in faults else None)
        self.tag_ct = self.tags.tag(f.CT_MAP_FULL if f.CT_MAP_FULL in faults else None)
        self.scrape_targets = [
            (w, w.metrics_port)
            for w in cluster.workloads.values()
            if w.metrics_port and w.namespace != "staging"
        ]
        self.apiserver_clients = [
            cluster.workload("monitoring", "prometheus"),
            cluster.workload("ingress-nginx", "ingress-nginx-controller"),
            self._coredns,
        ]

    def _window(self, fault: str) -> tuple[int, int]:
        if fault not in self.faults:
            return (0, -1)
        low, high = f.fault_spec(fault).window
        span = self.end_ns - self.start_ns
        return (self.start_ns + int(low * span), self.start_ns + int(high * span))

    def policies_at(self, t: int) -> PolicySet:
        """The policy set in force at time `t`."""
        current = self.timeline[0][1]
        for since, policies in self.timeline:
            if t >= since:
                current = policies
        return current

    # --- helpers ----------------------------------------------------------------------------------------------

    def _latency(self, edge: Edge) -> int:
        low, mean = edge.latency
        return low + int(self.rng.expovariate(1.0 / mean))

    def _pick(self, key: str) -> Pod:
        pods = self.cluster.pods[key]
        return pods[self.rng.randrange(len(pods))] if len(pods) > 1 else pods[0]

    def _port(self) -> int:
        return self.rng.randint(32768, 60999)

    def _ct_full(self, t0: int, src_pod: Pod) -> bool:
        start, end = self.ct_window
        return start <= t0 < end and src_pod.node.name == f.CT_FULL_NODE and self.rng.random() < 0.5

    def http_api(self, host: str, latency: int) -> tuple[L7Spec, L7Spec]:
        """A request to the API (`/api/v1/<resource>/<id>`) and its response."""
        rng = self.rng
        resource = _API_RESOURCES[rng.randrange(len(_API_RESOURCES))]
        roll = rng.random()
        if roll < 0.7:
            method, url, code = "GET", f"http://{host}/api/v1/{resource}/{rng.randint(1000, 99999)}", 200
            if rng.random() < 0.04:
                code = 404
        elif roll < 0.9:
            method, url, code = "POST", f"http://{host}/api/v1/{resource}", 201
        else:
            method, url, code = "PUT", f"http://{host}/api/v1/{resource}/{rng.randint(1000, 99999)}", 200
        return ("http", 1, 0, 0, method, url, "HTTP/1.1"), ("http", 2, latency, code, method, url, "HTTP/1.1")

    def kafka(self, api_key: str, topic: str, latency: int) -> tuple[L7Spec, L7Spec]:
        """A Kafka produce or fetch request and its response."""
        self._correlation += 1
        version = 7 if api_key == "produce" else 11
        return (
            ("kafka", 1, 0, 0, version, api_key, self._correlation, topic),
            ("kafka", 2, latency, 0, version, api_key, self._correlation, topic),
        )

    @staticmethod
    def metrics(host: str, latency: int) -> tuple[L7Spec, L7Spec]:
        """A Prometheus scrape of `/metrics` and its response."""
        url = f"http://{host}/metrics"
        return ("http", 1, 0, 0, "GET", url, "HTTP/1.1"), ("http", 2, latency, 200, "GET", url, "HTTP/1.1")

    # --- edges -------------------------------------------------------------------------------------------------

    def connect(self, t0: int, edge: Edge, tags: Tags) -> None:
        """Write the records of one connection of `edge` starting at `t0`."""
        getattr(self, "_edge_" + edge.kind)(t0, edge, tags)

    def _between_pods(
        self,
        t0: int,
        edge: Edge,
        src_pod: Pod,
        dst_pod: Pod,
        dport: int,
        tags: Tags,
        l7: tuple[L7Spec, L7Spec] | None = None,
    ) -> None:
        tag, deny_tag, before_tag = tags
        policies = self.policies_at(t0)
        conn = Conn(
            self.writer,
            self._pods[src_pod],
            self._pods[dst_pod],
            TCP,
            self._port(),
            dport,
            tag,
            policies.revision,
        )
        service = self._services.get(dst_pod.workload.key)
        if service is not None and dport in dst_pod.workload.ports:
            # The client connects to the Service; socket-LB picks the backend at connect(), then the SYN leaves.
            conn.sock_translation(t0, service)
            t0 += 1 * US
        eg = policies.decide(EGRESS, src_pod.workload, PeerRef(dst_pod.workload), dport, "TCP")
        ing = policies.decide(INGRESS, dst_pod.workload, PeerRef(src_pod.workload), dport, "TCP")
        if not eg.allowed or not ing.allowed:
            conn.tag = deny_tag if deny_tag >= 0 else tag
            conn.denied(
                t0, eg if not eg.allowed else ing, EG if not eg.allowed else IN, conn.syn_retransmits()
            )
            return
        if tag < 0 and self._ct_full(t0, src_pod):
            conn.tag = self.tag_ct
            conn.datapath_drop(t0, CT_MAP_INSERTION_FAILED)
            return
        latency = self._latency(edge)
        redirected = bool(ing.l7 or eg.l7)
        if l7 is None and edge.l7 and redirected:
            host = f"{dst_pod.workload.service}:{dport}"
            l7 = (
                self.http_api(host, latency)
                if edge.l7[0] == "http"
                else self.kafka(edge.l7[1], edge.l7[2], latency)
            )
        if before_tag >= 0 and tag < 0:
            conn.tag = before_tag
        conn.tcp(t0, eg, ing, latency, l7 if redirected else None)

    def _edge_tcp(self, t0: int, edge: Edge, tags: Tags) -> None:
        assert edge.src is not None and edge.dst is not None
        self._between_pods(t0, edge, self._pick(edge.src), self._pick(edge.dst), edge.port, tags)

    def _edge_scrape(self, t0: int, edge: Edge, tags: Tags) -> None:
        assert edge.src is not None
        workload, port = self.scrape_targets[self.rng.randrange(len(self.scrape_targets))]
        target = self._pick(workload.key)
        l7 = self.metrics(f"{target.ip}:{port}", self._latency(edge))
        self._between_pods(t0, edge, self._pick(edge.src), target, port, tags, l7)

    def lookup(
        self,
        t0: int,
        src_pod: Pod,
        query: str,
        ips: tuple[str, ...],
        rcode: int,
        latency: int,
        tag: int,
        deny_tag: int = -1,
        ttl: int = 30,
        first: bool = True,
    ) -> int:
        """One DNS query from `src_pod` through a CoreDNS pod; returns when the answer arrived (-1: none)."""
        dns_pod = self._pick(self._coredns.key)
        policies = self.policies_at(t0)
        eg = policies.decide(EGRESS, src_pod.workload, PeerRef(self._coredns), 53, "UDP")
        if not eg.allowed and deny_tag >= 0:
            tag = deny_tag
        conn = Conn(
            self.writer,
            self._pods[src_pod],
            self._pods[dns_pod],
            UDP,
            self._port(),
            53,
            tag,
            policies.revision,
        )
        return conn.lookup(t0, eg, query, ips, ttl, rcode, latency, first)

    def resolve(
        self,
        t0: int,
        src_pod: Pod,
        name: str,
        final: tuple[tuple[str, ...], int, int],
        tag: int,
        deny_tag: int = -1,
        ttl: int = 30,
    ) -> int:
        """A pod's lookup of `name` along its search path (`resolver.search_names`): each name in turn until one
        exists. A service name answers with its ClusterIP, the name itself with `final` (ips, rcode, latency), any
        other name NXDOMAIN. Returns when the answer that ended the lookup arrived (-1: none, or a failure)."""
        names = resolver.search_names(name, src_pod.namespace)
        t, first = t0, True
        for query in names:
            service_ip = self._service_ip.get(query)
            if service_ip is not None:
                ips, rcode, latency = (service_ip,), 0, final[2]
            elif query == name + "." or query == name:
                ips, rcode, latency = final
            else:
                ips, rcode, latency = (), 3, int(self.rng.uniform(0.1, 0.9) * MS)
            answered = self.lookup(t, src_pod, query, ips, rcode, latency, tag, deny_tag, ttl, first)
            if answered < 0:
                return -1
            if rcode == 0:
                return answered
            t, first = answered + 30 * US, False
        return -1

    def _edge_dns(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag, deny_tag, _ = tags
        assert edge.src is not None
        query = edge.names[self.rng.randrange(len(edge.names))]
        src_pod = self._pick(edge.src)
        # Applications ask for a service of their own namespace by its short name.
        name = query.removesuffix(f".{src_pod.namespace}.svc.{resolver.CLUSTER_DOMAIN}.")
        final = ((self._service_ip[query],), 0, self._latency(edge))
        self.resolve(t0, src_pod, name, final, tag, deny_tag)

    def _edge_dns_fault(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        assert edge.src is not None
        self.resolve(
            t0, self._pick(edge.src), edge.names[0].rstrip("."), ((), edge.rcode, self._latency(edge)), tag
        )

    def _edge_upstream_unseen(self, t0: int, edge: Edge, tags: Tags) -> None:
        """A pod's lookup of an outside name through node-local-dns on its node: the cache forwards the names in the
        cluster domain to CoreDNS (NXDOMAIN, with itself as the client); the others go upstream, unseen. The pod's
        own queries to the cache (169.254.20.10 on its node) are not among the records."""
        tag = tags[0]
        assert edge.src is not None
        src_pod = self._pick(edge.src)
        cache = self._node_local_dns[src_pod.node.name]
        forward = Decision(enforced=False, allowed=True, l7="dns")
        t, first = t0, True
        for query in resolver.search_names(edge.names[0], src_pod.namespace):
            if not resolver.in_cluster_domain(query):
                continue
            dns_pod = self._pick(self._coredns.key)
            conn = Conn(self.writer, cache, self._pods[dns_pod], UDP, self._port(), 53, tag, 0)
            latency = int(self.rng.uniform(0.1, 0.9) * MS)
            t = conn.lookup(t, forward, query, (), 0, 3, latency, first) + 30 * US
            first = False

    def _edge_external(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        assert edge.src is not None
        name = edge.names[0]
        src_pod = self._pick(edge.src)
        views = self._external[name]
        if name == f.SERVFAIL_NAME and self.servfail_window[0] <= t0 < self.servfail_window[1]:
            self.resolve(t0, src_pod, name, ((), 2, int(self.rng.uniform(2, 8) * MS)), self.tag_servfail)
            return
        ips = tuple(v.ip for v in views)
        final = (ips, 0, int(self.rng.uniform(1, 30) * MS))
        answered = self.resolve(t0, src_pod, name, final, tag, ttl=self.rng.randint(5, 60))
        if answered >= 0:
            target = views[self.rng.randrange(len(views))]
            self._outbound(answered + 50 * US, edge, src_pod, target, PeerRef(fqdn=name), tag)

    def _outbound(
        self, t0: int, edge: Edge, src_pod: Pod, dst: EndpointView, peer: PeerRef, tag: int
    ) -> None:
        policies = self.policies_at(t0)
        conn = Conn(
            self.writer, self._pods[src_pod], dst, TCP, self._port(), edge.port, tag, policies.revision
        )
        eg = policies.decide(EGRESS, src_pod.workload, peer, edge.port, "TCP")
        if not eg.allowed:
            conn.denied(t0, eg, EG)
        elif tag < 0 and self._ct_full(t0, src_pod):
            conn.tag = self.tag_ct
            conn.datapath_drop(t0, CT_MAP_INSERTION_FAILED)
        else:
            conn.tcp(t0, eg, NOT_ENFORCED, self._latency(edge), None)

    def _edge_apiserver(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        workload = self.apiserver_clients[self.rng.randrange(len(self.apiserver_clients))]
        peer = PeerRef(entity="kube-apiserver")
        self._outbound(t0, edge, self._pick(workload.key), self._apiserver, peer, tag)

    def _edge_world_in(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        assert edge.dst is not None
        dst_pod = self._pick(edge.dst)
        src = self._world_clients[self.rng.randrange(len(self._world_clients))]
        policies = self.policies_at(t0)
        conn = Conn(
            self.writer, src, self._pods[dst_pod], TCP, self._port(), edge.port, tag, policies.revision
        )
        ing = policies.decide(INGRESS, dst_pod.workload, PeerRef(entity="world"), edge.port, "TCP")
        if not ing.allowed:
            conn.denied(t0, ing, IN, conn.syn_retransmits())
            return
        latency = self._latency(edge)
        l7 = self.http_api(f"{dst_pod.workload.service}:{edge.port}", latency) if ing.l7 == "http" else None
        conn.tcp(t0, NOT_ENFORCED, ing, latency, l7)

    def _edge_kubelet(self, t0: int, edge: Edge, tags: Tags) -> None:
        # The kubelet probes from the node itself; Cilium always lets the local host in.
        tag = tags[0]
        assert edge.dst is not None
        pod = self._pick(edge.dst)
        conn = Conn(
            self.writer,
            self._hosts[pod.node.name],
            self._pods[pod],
            TCP,
            self._port(),
            edge.port,
            tag,
            self.policies_at(t0).revision,
        )
        conn.tcp(t0, NOT_ENFORCED, NOT_ENFORCED, self._latency(edge), None)

    def _edge_health(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        nodes = self.cluster.nodes
        a = self.rng.randrange(len(nodes))
        b = (a + 1 + self.rng.randrange(len(nodes) - 1)) % len(nodes)
        src, dst = self._health[nodes[a].name], self._remote_nodes[nodes[b].name]
        Conn(self.writer, src, dst, ICMPV4, 8, 0, tag, 0).echo(t0, self._latency(edge))

    def _edge_probe(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        pod, port = self.scan_targets[self.rng.randrange(len(self.scan_targets))]
        policies = self.policies_at(t0)
        decision = policies.decide(EGRESS, self.compromised.workload, PeerRef(pod.workload), port, "TCP")
        src, dst = self._pods[self.compromised], self._pods[pod]
        conn = Conn(self.writer, src, dst, TCP, self.scan_source_port, port, tag, policies.revision)
        conn.denied(t0, decision, EG)

    def _edge_stale(self, t0: int, edge: Edge, tags: Tags) -> None:
        tag = tags[0]
        assert edge.dst is not None
        dst = self._pods[self._pick(edge.dst)]
        conn = Conn(self.writer, self.stale_view, dst, TCP, self._port(), edge.port, tag, 0)
        conn.datapath_drop(t0, STALE_OR_UNROUTABLE_IP)

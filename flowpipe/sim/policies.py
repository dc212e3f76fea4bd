"""The network policies the simulated cluster has, as data: who they select, what they allow, and CNP documents."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import yaml

from flowpipe.sim.cluster import Workload

INGRESS = "ingress"
EGRESS = "egress"
CNP_KIND = "CiliumNetworkPolicy"

# Cilium's policy-verdict match kinds (Flow.policy_match_type).
MATCH_NONE = 0
MATCH_L3_ONLY = 1
MATCH_L3_L4 = 2
MATCH_L4_ONLY = 3
MATCH_ALL = 4

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: dict[str, str]) -> Labels:
    """A hashable, sorted form of a label mapping."""
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class PortRule:
    """One port and protocol (`TCP`, `UDP` or `ANY`)."""

    port: int
    protocol: str = "TCP"

    def matches(self, port: int, protocol: str) -> bool:
        """Whether traffic to `port`/`protocol` is covered."""
        return self.port == port and self.protocol in ("ANY", protocol)


@dataclass(frozen=True)
class L7Rules:
    """L7 rules of a port rule: `kind` is `http`, `kafka` or `dns`; each rule is a sorted tuple of key/value pairs."""

    kind: str
    rules: tuple[Labels, ...]


@dataclass(frozen=True)
class Peer:
    """One peer selector: pods (`labels` in `namespace`, or in any namespace), an entity, or a DNS name."""

    labels: Labels = ()
    namespace: str | None = None
    any_namespace: bool = False
    entity: str | None = None
    fqdn: str | None = None


@dataclass(frozen=True)
class PeerRef:
    """What a rule is checked against: a workload, an entity (`world`, `host`, `kube-apiserver`...) or a name."""

    workload: Workload | None = None
    entity: str | None = None
    fqdn: str | None = None


@dataclass(frozen=True)
class Rule:
    """One ingress or egress rule: any of `peers` (none = every peer) on any of `ports` (none = every port)."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PortRule, ...] = ()
    l7: L7Rules | None = None


@dataclass(frozen=True)
class Policy:
    """A CiliumNetworkPolicy. `ingress`/`egress` None: that direction is not enforced; `()`: default deny."""

    name: str
    namespace: str
    selector: Labels
    ingress: tuple[Rule, ...] | None = None
    egress: tuple[Rule, ...] | None = None
    kind: str = CNP_KIND

    @property
    def key(self) -> str:
        """`<namespace>/<name>`, the way the flow table writes policy attribution."""
        return f"{self.namespace}/{self.name}"

    def selects(self, workload: Workload) -> bool:
        """Whether this policy's endpoint selector selects the pods of `workload`."""
        return workload.namespace == self.namespace and all(
            workload.labels.get(key) == value for key, value in self.selector
        )

    def rules(self, direction: str) -> tuple[Rule, ...] | None:
        """The rules of one direction (None when the direction is not enforced)."""
        return self.ingress if direction == INGRESS else self.egress

    def is_default_deny(self, direction: str) -> bool:
        """Whether this policy only puts its endpoints into default deny for `direction`."""
        return self.rules(direction) == ()

    def to_cnp(self) -> dict[str, Any]:
        """The CiliumNetworkPolicy document (a plain dict, ready for a YAML writer)."""
        spec: dict[str, Any] = {
            "endpointSelector": {"matchLabels": dict(self.selector)} if self.selector else {}
        }
        for direction in (INGRESS, EGRESS):
            rules = self.rules(direction)
            if rules is None:
                continue
            spec[direction] = [_rule_doc(rule, direction, self.namespace) for rule in rules] or [{}]
        return {
            "apiVersion": "cilium.io/v2",
            "kind": self.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        }


def _peer_docs(peers: tuple[Peer, ...], direction: str, own_namespace: str) -> dict[str, list[Any]]:
    prefix = "from" if direction == INGRESS else "to"
    docs: dict[str, list[Any]] = {}
    for peer in peers:
        if peer.entity is not None:
            docs.setdefault(f"{prefix}Entities", []).append(peer.entity)
        elif peer.fqdn is not None:
            key = "matchPattern" if "*" in peer.fqdn else "matchName"
            docs.setdefault("toFQDNs", []).append({key: peer.fqdn})
        else:
            match = dict(peer.labels)
            if not peer.any_namespace and (peer.namespace or own_namespace) != own_namespace:
                match["k8s:io.kubernetes.pod.namespace"] = peer.namespace or own_namespace
            selector: dict[str, Any] = {"matchLabels": match}
            if peer.any_namespace:
                selector["matchExpressions"] = [
                    {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}
                ]
            docs.setdefault(f"{prefix}Endpoints", []).append(selector)
    return docs


def _rule_doc(rule: Rule, direction: str, own_namespace: str) -> dict[str, Any]:
    doc: dict[str, Any] = dict(_peer_docs(rule.peers, direction, own_namespace))
    if rule.ports:
        port_rule: dict[str, Any] = {
            "ports": [{"port": str(p.port), "protocol": p.protocol} for p in rule.ports]
        }
        if rule.l7 is not None:
            port_rule["rules"] = {rule.l7.kind: [dict(r) for r in rule.l7.rules]}
        doc["toPorts"] = [port_rule]
    return doc


def _peer_matches(peer: Peer, ref: PeerRef, own_namespace: str) -> bool:
    if peer.entity is not None:
        if peer.entity == "all":
            return True
        if ref.workload is not None:
            return peer.entity == "cluster"
        if ref.fqdn is not None:
            return peer.entity == "world"
        return peer.entity == ref.entity or (peer.entity == "cluster" and ref.entity not in (None, "world"))
    if peer.fqdn is not None:
        return ref.fqdn is not None and fnmatch.fnmatchcase(ref.fqdn, peer.fqdn)
    workload = ref.workload
    if workload is None:
        return False
    if not peer.any_namespace and (peer.namespace or own_namespace) != workload.namespace:
        return False
    return all(workload.labels.get(key) == value for key, value in peer.labels)


@dataclass(frozen=True)
class Decision:
    """The policy outcome for one direction of one connection.

    `enforced` False means no policy selects the endpoint in that direction (no verdict event, no attribution).
    `policies` are the allowing policies when `allowed`, else the denying ones. `l7` names the L7 protocol when the
    allowing rule redirects to the proxy (`http`, `kafka`, `dns`).
    """

    enforced: bool
    allowed: bool
    policies: tuple[Policy, ...] = ()
    l7: str | None = None
    match_type: int = MATCH_NONE


NOT_ENFORCED = Decision(enforced=False, allowed=True)


@dataclass(frozen=True)
class PolicySet:
    """All policies in force at one policy revision."""

    policies: tuple[Policy, ...]
    revision: int = 1
    _cache: dict[tuple[Any, ...], Decision] = field(default_factory=dict, compare=False, repr=False)

    def selecting(self, workload: Workload, direction: str) -> tuple[Policy, ...]:
        """The policies that select `workload` and enforce `direction`."""
        return tuple(p for p in self.policies if p.rules(direction) is not None and p.selects(workload))

    def selects(self, workload: Workload) -> bool:
        """Whether any policy selects `workload` (in either direction)."""
        return any(p.selects(workload) for p in self.policies)

    def decide(self, direction: str, subject: Workload, peer: PeerRef, port: int, protocol: str) -> Decision:
        """Whether `subject` may send to (egress) or receive from (ingress) `peer` on `port`/`protocol`."""
        key = (direction, subject.key, peer, port, protocol)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = self._decide(direction, subject, peer, port, protocol)
        self._cache[key] = decision
        return decision

    def _decide(self, direction: str, subject: Workload, peer: PeerRef, port: int, protocol: str) -> Decision:
        selecting = self.selecting(subject, direction)
        if not selecting:
            return NOT_ENFORCED
        allowing: list[Policy] = []
        l7: str | None = None
        match_type = MATCH_NONE
        for policy in selecting:
            for rule in policy.rules(direction) or ():
                if rule.peers and not any(_peer_matches(p, peer, policy.namespace) for p in rule.peers):
                    continue
                if rule.ports and not any(p.matches(port, protocol) for p in rule.ports):
                    continue
                if policy not in allowing:
                    allowing.append(policy)
                if rule.l7 is not None:
                    l7 = rule.l7.kind
                kind = (
                    (MATCH_L3_L4 if rule.ports else MATCH_L3_ONLY)
                    if rule.peers
                    else (MATCH_L4_ONLY if rule.ports else MATCH_ALL)
                )
                match_type = max(match_type, kind) if match_type != MATCH_NONE else kind
        if allowing:
            return Decision(True, True, tuple(allowing), l7, match_type)
        deny_all = tuple(p for p in selecting if p.is_default_deny(direction))
        return Decision(True, False, deny_all or selecting)

    def selected_workloads(self, workloads: list[Workload]) -> list[str]:
        """Keys of the workloads that at least one policy selects."""
        return [w.key for w in workloads if self.selects(w)]

    def unselected_workloads(self, workloads: list[Workload]) -> list[str]:
        """Keys of the workloads that no policy selects."""
        return [w.key for w in workloads if not self.selects(w)]

    def selection(self, workloads: list[Workload]) -> dict[str, dict[str, list[str]]]:
        """Per policy (`<namespace>/<name>`): the workloads it selects and the directions it enforces."""
        return {
            p.key: {
                "selects": [w.key for w in workloads if p.selects(w)],
                "enforces": [d for d in (INGRESS, EGRESS) if p.rules(d) is not None],
            }
            for p in self.policies
        }

    def to_documents(self) -> list[dict[str, Any]]:
        """Every policy as a CiliumNetworkPolicy document."""
        return [p.to_cnp() for p in self.policies]

    def to_yaml(self) -> str:
        """Every policy as one multi-document YAML text."""
        return str(yaml.safe_dump_all(self.to_documents(), sort_keys=False))

    def to_data(self) -> dict[str, Any]:
        """A JSON-ready summary: revision and, per policy, what it selects and the documents themselves."""
        return {"revision": self.revision, "policies": self.to_documents()}


# --- the policies of the simulated cluster ---------------------------------------------------------------------


def _app_peer(app: str, namespace: str | None = None) -> Peer:
    return Peer(labels=(("app", app),), namespace=namespace)


_DNS_PEER = Peer(labels=(("k8s-app", "kube-dns"),), namespace="kube-system")
_DNS_RULE = Rule(
    peers=(_DNS_PEER,),
    ports=(PortRule(53, "UDP"), PortRule(53, "TCP")),
    l7=L7Rules("dns", ((("matchPattern", "*"),),)),
)
_PROMETHEUS = Peer(labels=(("app", "prometheus"),), namespace="monitoring")
_API_HTTP = L7Rules(
    "http",
    (
        (("method", "GET"), ("path", "/api/v1/.*")),
        (("method", "POST"), ("path", "/api/v1/.*")),
        (("method", "PUT"), ("path", "/api/v1/.*")),
    ),
)
_METRICS_HTTP = L7Rules("http", ((("method", "GET"), ("path", "/metrics")),))
_KAFKA_TOPICS = L7Rules(
    "kafka",
    (
        (("role", "produce"), ("topic", "orders")),
        (("role", "consume"), ("topic", "orders")),
        (("role", "produce"), ("topic", "payments")),
        (("role", "consume"), ("topic", "payments")),
    ),
)


def _tcp(*ports: int) -> tuple[PortRule, ...]:
    return tuple(PortRule(p, "TCP") for p in ports)


def cluster_policies(
    *,
    dns_allowed_in_staging: bool = True,
    api_allows_redis: bool = True,
    api_allows_world: bool = False,
    report_export_selected: bool = True,
    grafana_reaches_postgres: bool = False,
    revision: int = 1,
) -> PolicySet:
    """The policy set of the simulated cluster; the switches are how injected faults change it."""
    api_ingress = [
        Rule((_app_peer("web"),), _tcp(8080), _API_HTTP),
        Rule((_PROMETHEUS,), _tcp(8080), _METRICS_HTTP),
    ]
    if api_allows_world:
        # The over-broad rule of the `world-ingress` fault: api exposed to the internet directly.
        api_ingress.append(Rule((Peer(entity="world"),), _tcp(8080), _API_HTTP))
    api_egress = [Rule((_app_peer("postgres"),), _tcp(5432))]
    if api_allows_redis:
        api_egress.append(Rule((_app_peer("redis"),), _tcp(6379)))
    api_egress += [_DNS_RULE, Rule((Peer(fqdn="s3.us-east-1.amazonaws.com"),), _tcp(443))]
    policies = [
        Policy(
            "web",
            "production",
            (("app", "web"),),
            ingress=(
                Rule(
                    (Peer(labels=(("app.kubernetes.io/name", "ingress-nginx"),), namespace="ingress-nginx"),),
                    _tcp(8080, 8443),
                ),
                Rule((_PROMETHEUS,), _tcp(8080)),
            ),
            egress=(Rule((_app_peer("api"),), _tcp(8080)), _DNS_RULE),
        ),
        Policy("api", "production", (("app", "api"),), ingress=tuple(api_ingress), egress=tuple(api_egress)),
        Policy(
            "postgres",
            "production",
            (("app", "postgres"),),
            ingress=(
                Rule((_app_peer("api"), _app_peer("report-export")), _tcp(5432)),
                Rule((_PROMETHEUS,), _tcp(9187)),
            ),
        ),
        Policy(
            "redis",
            "production",
            (("app", "redis"),),
            ingress=(Rule((_app_peer("api"),), _tcp(6379)), Rule((_PROMETHEUS,), _tcp(9121))),
        ),
        Policy(
            "kafka",
            "production",
            (("app", "kafka"),),
            ingress=(
                Rule((_app_peer("order-service"), _app_peer("payment-service")), _tcp(9092), _KAFKA_TOPICS),
                Rule((_PROMETHEUS,), _tcp(9308)),
            ),
        ),
        Policy(
            "order-service",
            "production",
            (("app", "order-service"),),
            ingress=(Rule((_PROMETHEUS,), _tcp(8080)),),
            egress=(
                Rule((_app_peer("kafka"),), _tcp(9092)),
                _DNS_RULE,
                Rule((Peer(fqdn="sqs.eu-west-1.amazonaws.com"),), _tcp(443)),
            ),
        ),
        Policy(
            "payment-service",
            "production",
            (("app", "payment-service"),),
            ingress=(Rule((_PROMETHEUS,), _tcp(8080)),),
            egress=(
                Rule((_app_peer("kafka"),), _tcp(9092)),
                _DNS_RULE,
                Rule((Peer(fqdn="api.stripe.com"),), _tcp(443)),
            ),
        ),
    ]
    if report_export_selected:
        policies.append(
            Policy(
                "report-export",
                "production",
                (("app", "report-export"),),
                ingress=(),
                egress=(Rule((_app_peer("postgres"),), _tcp(5432)), _DNS_RULE),
            )
        )
    policies += [
        Policy("default-deny", "staging", (), ingress=(), egress=()),
        Policy("web", "staging", (("app", "web"),), egress=(Rule((_app_peer("api"),), _tcp(8080)),)),
        Policy(
            "api",
            "staging",
            (("app", "api"),),
            ingress=(Rule((_app_peer("web"),), _tcp(8080)),),
            egress=(Rule((_app_peer("redis"),), _tcp(6379)),),
        ),
        Policy("redis", "staging", (("app", "redis"),), ingress=(Rule((_app_peer("api"),), _tcp(6379)),)),
    ]
    if dns_allowed_in_staging:
        policies.append(Policy("allow-dns", "staging", (), egress=(_DNS_RULE,)))
    scrape_ports = _tcp(8080, 9187, 9121, 9308)
    policies += [
        Policy(
            "prometheus",
            "monitoring",
            (("app", "prometheus"),),
            ingress=(Rule((_app_peer("grafana"),), _tcp(9090)),),
            egress=(
                Rule((Peer(namespace="production", labels=()),), scrape_ports),
                Rule((_DNS_PEER,), _tcp(9153)),
                Rule(
                    (Peer(labels=(("app.kubernetes.io/name", "ingress-nginx"),), namespace="ingress-nginx"),),
                    _tcp(10254),
                ),
                Rule((Peer(entity="kube-apiserver"),), _tcp(443, 6443)),
                _DNS_RULE,
            ),
        ),
        Policy(
            "grafana",
            "monitoring",
            (("app", "grafana"),),
            egress=(
                Rule((_app_peer("prometheus"),), _tcp(9090)),
                _DNS_RULE,
                # The `ingress-denied` fault: grafana's own policy lets it reach postgres, postgres' does not.
                *(
                    (Rule((_app_peer("postgres", "production"),), _tcp(5432)),)
                    if grafana_reaches_postgres
                    else ()
                ),
            ),
        ),
        Policy(
            "ingress-nginx-controller",
            "ingress-nginx",
            (("app.kubernetes.io/name", "ingress-nginx"),),
            ingress=(Rule((Peer(entity="world"),), _tcp(80, 443)), Rule((_PROMETHEUS,), _tcp(10254))),
            egress=(
                Rule((Peer(labels=(("app", "web"),), namespace="production"),), _tcp(8080, 8443)),
                Rule((Peer(entity="kube-apiserver"),), _tcp(443, 6443)),
                _DNS_RULE,
            ),
        ),
    ]
    return PolicySet(tuple(policies), revision)

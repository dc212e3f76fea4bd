"""Typed policy objects: Policy, Rule, Peer, PortRule, shared by the Kubernetes and Cilium flavours.

One neutral shape serves both `NetworkPolicy` and `CiliumNetworkPolicy` (and the clusterwide variant), so that
drafting, rendering, loading, replay and audit all speak the same language:

- A `Policy` selects endpoints (`selector`: podSelector / endpointSelector) and holds `rules`. `isolates` names
  the directions in which the selected endpoints become default-deny: Kubernetes `policyTypes`; for Cilium the
  directions that have rules, unless `enableDefaultDeny` turns that off.
- A `Rule` is one entry of `ingress`, `egress`, `ingressDeny` or `egressDeny`: peers (any one matches), port
  rules (any one matches; none means every port and protocol), and `action` allow or deny.
- A `Peer` is one of: endpoints (a label selector, plus a namespace selector), an entity (`world`, `host`, ...),
  a CIDR with exceptions, or an FQDN selector. `ANY_PEER` (entity `all`) stands for "every peer": a Kubernetes
  rule without `from`/`to`, a Cilium rule with ports but no L3 part. A rule with no peers at all matches
  nothing (Cilium's `ingress: [{}]`, the idiomatic default-deny).
- A `PortRule` groups ports with the L7 rules that apply to them (HTTP, Kafka, DNS). ICMP types are ports of
  protocol `ICMP` / `ICMPv6` (Cilium's `icmps`), so one list says every L4 thing a rule allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Flavour = Literal["kubernetes", "cilium"]
Direction = Literal["ingress", "egress"]
Action = Literal["allow", "deny"]
PeerKind = Literal["endpoints", "entity", "cidr", "fqdn"]

DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")

ENTITIES: tuple[str, ...] = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "health",
    "init",
    "ingress",
    "unmanaged",
    "none",
)
"""Cilium entity names accepted in `fromEntities` / `toEntities`."""

L4_PROTOCOLS: tuple[str, ...] = ("TCP", "UDP", "SCTP", "ANY")
ICMP_PROTOCOLS: tuple[str, ...] = ("ICMP", "ICMPv6")

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label Kubernetes sets on every namespace to its own name; namespaces are selected by it."""

POD_NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"
"""The Cilium label carrying an endpoint's namespace; Cilium selectors name other namespaces with it."""


@dataclass(frozen=True, slots=True)
class LabelExpression:
    """One `matchExpressions` entry: `key` `operator` (In, NotIn, Exists, DoesNotExist) `values`."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector; the empty selector selects everything in its scope.

    Keys may carry a Cilium source prefix (`k8s:app`); without one they match labels of any source.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelExpression, ...] = ()

    @classmethod
    def of(cls, labels: Mapping[str, str] | None = None, *expressions: LabelExpression) -> LabelSelector:
        """A selector from a mapping (kept in the given order) and optional expressions.

        >>> LabelSelector.of({"app": "web"}).match_labels
        (('app', 'web'),)
        """
        return cls(tuple((labels or {}).items()), tuple(expressions))

    @property
    def is_empty(self) -> bool:
        """True when the selector has no requirement (selects everything in scope)."""
        return not self.match_labels and not self.match_expressions

    @property
    def keys(self) -> tuple[str, ...]:
        """Every label key the selector mentions."""
        return tuple(k for k, _ in self.match_labels) + tuple(e.key for e in self.match_expressions)


EMPTY_SELECTOR = LabelSelector()


@dataclass(frozen=True, slots=True)
class FQDNSelector:
    """A DNS name selector: `match_name` (exact) or `match_pattern` (`*` stands for a run of name characters)."""

    match_name: str | None = None
    match_pattern: str | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    """The other end of a rule; build one with `Peer.endpoints`, `Peer.entity`, `Peer.cidr` or `Peer.fqdn`.

    Endpoints peers: `selector` selects pods (None: every pod of the selected namespaces); `namespace_selector`
    selects namespaces (None: the policy's own namespace, unless `selector` names the namespace itself with
    `k8s:io.kubernetes.pod.namespace`, as Cilium selectors do).
    """

    kind: PeerKind
    selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    entity: str | None = None
    cidr: str | None = None
    except_cidrs: tuple[str, ...] = ()
    fqdn: FQDNSelector | None = None

    @classmethod
    def endpoints(
        cls,
        selector: LabelSelector | Mapping[str, str] | None = None,
        *,
        namespace: str | None = None,
        namespace_selector: LabelSelector | None = None,
    ) -> Peer:
        """Pods matching `selector`, in `namespace` (by name) or in the namespaces `namespace_selector` picks.

        >>> Peer.endpoints({"k8s-app": "kube-dns"}, namespace="kube-system").namespace_name
        'kube-system'
        """
        if selector is not None and not isinstance(selector, LabelSelector):
            selector = LabelSelector.of(selector)
        if namespace is not None:
            namespace_selector = LabelSelector.of({NAMESPACE_NAME_LABEL: namespace})
        return cls("endpoints", selector=selector, namespace_selector=namespace_selector)

    @classmethod
    def entity_peer(cls, name: str) -> Peer:
        """A Cilium entity (`world`, `cluster`, `host`, `remote-node`, `kube-apiserver`, `all`, ...)."""
        return cls("entity", entity=name)

    @classmethod
    def cidr_peer(cls, cidr: str, except_cidrs: Iterable[str] = ()) -> Peer:
        """Addresses in `cidr` but not in any of `except_cidrs`."""
        return cls("cidr", cidr=cidr, except_cidrs=tuple(except_cidrs))

    @classmethod
    def fqdn_peer(cls, *, name: str | None = None, pattern: str | None = None) -> Peer:
        """Destinations whose DNS name is `name`, or matches `pattern` (egress only)."""
        return cls("fqdn", fqdn=FQDNSelector(match_name=name, match_pattern=pattern))

    @property
    def namespace_name(self) -> str | None:
        """The one namespace this endpoints peer names by `kubernetes.io/metadata.name`, if it does."""
        sel = self.namespace_selector
        if sel is None or sel.match_expressions or len(sel.match_labels) != 1:
            return None
        key, value = sel.match_labels[0]
        return value if key == NAMESPACE_NAME_LABEL else None


ANY_PEER = Peer("entity", entity="all")
"""Every peer: a Kubernetes rule without `from`/`to`, a Cilium rule with ports and no L3 selector."""


@dataclass(frozen=True, slots=True)
class Port:
    """One port (or range, with `end_port`) of a protocol; `port` None means every port of the protocol.

    For `ICMP` / `ICMPv6`, `port` is the ICMP type (a number, or a Cilium type name such as `EchoRequest`).
    A string `port` for TCP/UDP/SCTP is a named container port.
    """

    port: int | str | None = None
    protocol: str = "TCP"
    end_port: int | None = None

    @property
    def is_icmp(self) -> bool:
        """True for ICMP types (rendered as Cilium `icmps`)."""
        return self.protocol in ICMP_PROTOCOLS


@dataclass(frozen=True, slots=True)
class HTTPRule:
    """An HTTP rule: `method` and `path` are regular expressions matched against the whole value."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KafkaRule:
    """A Kafka rule: `role` (produce, consume) or `api_key`, optionally limited to one `topic`."""

    role: str | None = None
    api_key: str | None = None
    topic: str | None = None
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class PortRule:
    """Ports and the L7 rules that apply to them; no ports means every port and protocol."""

    ports: tuple[Port, ...] = ()
    http: tuple[HTTPRule, ...] = ()
    kafka: tuple[KafkaRule, ...] = ()
    dns: tuple[FQDNSelector, ...] = ()

    @property
    def has_l7(self) -> bool:
        """True when L7 rules restrict the traffic on these ports."""
        return bool(self.http or self.kafka or self.dns)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ingress or egress rule, allow or deny.

    `peers`: any one must match; `(ANY_PEER,)` is every peer and `()` is none (the rule then only makes the
    selected endpoints default-deny). `ports`: any one must match; empty means every port and protocol.
    `flows` is provenance: how many observed flows a drafted rule was built from.
    """

    direction: Direction
    peers: tuple[Peer, ...] = (ANY_PEER,)
    ports: tuple[PortRule, ...] = ()
    action: Action = "allow"
    flows: int | None = None

    @property
    def allows_nothing(self) -> bool:
        """True for a rule without peers: it matches no traffic (Cilium's `{}` default-deny entry)."""
        return not self.peers

    @property
    def section(self) -> str:
        """The YAML list the rule lives in: `ingress`, `egress`, `ingressDeny` or `egressDeny`."""
        return self.direction + ("Deny" if self.action == "deny" else "")


@dataclass(frozen=True, slots=True)
class PolicyOrigin:
    """Where a loaded policy came from: file path and 0-based document index."""

    path: str
    document_index: int


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy document: which endpoints it selects, where it isolates them, and its rules.

    `namespace` is None for clusterwide policies. `comments` are rendered into the document's header (what a
    flavour cannot express, provenance notes). `spec_index` tells apart the entries of a Cilium `specs` list.
    """

    name: str
    namespace: str | None
    flavour: Flavour
    selector: LabelSelector = EMPTY_SELECTOR
    rules: tuple[Rule, ...] = ()
    isolates: tuple[Direction, ...] = ()
    clusterwide: bool = False
    node_selector: LabelSelector | None = None
    description: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    comments: tuple[str, ...] = ()
    origin: PolicyOrigin | None = None
    spec_index: int | None = None

    @property
    def key(self) -> str:
        """The name flows use for the policy: `<namespace>/<name>`, or `<name>` when clusterwide."""
        return self.name if self.namespace is None else f"{self.namespace}/{self.name}"

    @property
    def kind(self) -> str:
        """The Kubernetes kind this policy is rendered as."""
        if self.flavour == "kubernetes":
            return "NetworkPolicy"
        return "CiliumClusterwideNetworkPolicy" if self.clusterwide else "CiliumNetworkPolicy"

    @property
    def file(self) -> str | None:
        """The file the policy was loaded from, if any."""
        return self.origin.path if self.origin else None

    def rule_ids(self) -> list[str]:
        """A stable id for each rule, aligned with `rules`: its section and index, e.g. `egress[2]`."""
        counters: dict[str, int] = {}
        prefix = f"specs[{self.spec_index}]." if self.spec_index is not None else ""
        ids = []
        for rule in self.rules:
            index = counters.get(rule.section, 0)
            counters[rule.section] = index + 1
            ids.append(f"{prefix}{rule.section}[{index}]")
        return ids

    def rules_for(self, direction: Direction, action: Action = "allow") -> list[Rule]:
        """The rules of one section, in order."""
        return [r for r in self.rules if r.direction == direction and r.action == action]

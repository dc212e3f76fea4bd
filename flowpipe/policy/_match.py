"""Matching the peers of a request: Cilium labels, endpoints, selectors, entities, CIDRs and FQDNs.

These follow what Cilium does when it enforces policies, because Cilium produced the flows being replayed:

- An endpoint is seen through its Cilium labels (`k8s:app=web`, `reserved:world`). Its namespace adds
  `k8s:io.kubernetes.pod.namespace=<ns>` and the namespace-name label when a flow lacks them; a flow without
  labels gets its reserved label from the numeric identity (1 host, 2 world, ...), and an endpoint Hubble knows
  nothing about is `world`, as the ipcache would classify it.
- A selector key without a source prefix (`app`) matches the key of any source; `k8s:app` only `k8s:` labels;
  `$host` is `reserved:host`.
- CIDR and FQDN peers select only addresses outside the cluster's endpoints (world, and an API server that is
  not also a node): Cilium gives pod and node addresses their own identities, which CIDR selectors do not
  select in the default `policy-cidr-match-mode`.

Ports and L7 rules are matched in `_ports`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Literal

from flowpipe.errors import PolicyError
from flowpipe.policy.model import NAMESPACE_NAME_LABEL, FQDNSelector, LabelSelector, Peer, Policy

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
Requirement = tuple[str, str, Operator, frozenset[str]]
"""(source, key, operator, values): one compiled selector requirement; source `any` matches every source."""

RESERVED_IDENTITIES: dict[int, str] = {
    1: "host",
    2: "world",
    3: "unmanaged",
    4: "health",
    5: "init",
    6: "remote-node",
    7: "kube-apiserver",
    8: "ingress",
    9: "world-ipv4",
    10: "world-ipv6",
}
WORLD = frozenset({"world", "world-ipv4", "world-ipv6"})
NODE_LIKE = frozenset({"host", "remote-node", "health", "init", "ingress", "unmanaged"})
"""Reserved identities inside the cluster that CIDR selectors do not select."""
NODES = frozenset({"host", "remote-node"})

POD_NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."


def parse_label(text: str) -> tuple[str, str, str]:
    """Split a Cilium label string into (source, key, value): `k8s:app=web` → (`k8s`, `app`, `web`).

    A label without a source (`app=web`) gets source `unspec`; `reserved:world` has the value "".
    """
    key, _, value = text.partition("=")
    source, sep, rest = key.partition(":")
    if not sep:
        return "unspec", key, value
    return source, rest, value


def parse_selector_key(key: str) -> tuple[str, str]:
    """Split a selector key into (source, key) as Cilium does: `k8s:app` → (`k8s`, `app`), `app` → (`any`, `app`)."""
    if key.startswith("$"):
        return "reserved", key[1:]
    source, sep, rest = key.partition(":")
    if not sep:
        return "any", key
    return source, rest


class Endpoint:
    """One end of a flow as policies see it: namespace, labels by key, reserved identities, address, names."""

    __slots__ = ("_hash", "index", "ip", "key", "names", "namespace", "reserved")

    def __init__(
        self,
        namespace: str | None,
        labels: Sequence[str] | None,
        identity: int | None,
        ip: str | None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.key = (namespace, tuple(labels or ()), identity, ip, tuple(names or ()))
        self._hash = hash(self.key)
        self.ip = ip
        self.names = tuple(n.lower().rstrip(".") for n in names or ())
        index: dict[str, dict[str, str]] = {}
        for label in labels or ():
            source, key, value = parse_label(label)
            index.setdefault(key, {})[source] = value
        if namespace is None and "k8s" in index.get(POD_NAMESPACE_KEY, {}):
            namespace = index[POD_NAMESPACE_KEY]["k8s"]
        self.namespace = namespace
        reserved = {key for key, by_source in index.items() if "reserved" in by_source}
        if identity is not None and identity in RESERVED_IDENTITIES and not reserved:
            reserved.add(RESERVED_IDENTITIES[identity])
        if namespace is not None:
            index.setdefault(POD_NAMESPACE_KEY, {}).setdefault("k8s", namespace)
            index.setdefault(NAMESPACE_LABELS_PREFIX + NAMESPACE_NAME_LABEL, {}).setdefault("k8s", namespace)
        elif not reserved:
            # Not a pod and no reserved identity: an address outside the cluster (CIDR or FQDN identity).
            reserved.add("world")
        for name in reserved:
            index.setdefault(name, {}).setdefault("reserved", "")
        self.index = index
        self.reserved = frozenset(reserved)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and self.key == other.key

    @property
    def is_pod(self) -> bool:
        """True for a Kubernetes pod (an endpoint with a namespace)."""
        return self.namespace is not None

    @property
    def is_world(self) -> bool:
        """True for addresses outside the cluster."""
        return not self.is_pod and bool(self.reserved & WORLD)

    @property
    def cidr_selectable(self) -> bool:
        """True when CIDR and FQDN selectors can select this endpoint (world, or an API server off the nodes)."""
        return not self.is_pod and not (self.reserved & NODE_LIKE)

    def values(self, source: str, key: str) -> tuple[str, ...]:
        """The values of label `key` from `source` (`any`: from every source)."""
        by_source = self.index.get(key)
        if not by_source:
            return ()
        if source == "any":
            return tuple(by_source.values())
        value = by_source.get(source)
        return () if value is None else (value,)


# -- selectors ----------------------------------------------------------------------------------------------


def compile_selector(selector: LabelSelector, *, key_prefix: str = "") -> tuple[Requirement, ...]:
    """The requirements of a selector; `key_prefix` maps namespace-selector keys onto endpoint labels."""
    reqs: list[Requirement] = []
    for key, value in selector.match_labels:
        source, name = parse_selector_key(key)
        reqs.append((source, key_prefix + name, "In", frozenset({str(value)})))
    for expr in selector.match_expressions:
        source, name = parse_selector_key(expr.key)
        reqs.append((source, key_prefix + name, expr.operator, frozenset(expr.values)))
    return tuple(reqs)


def compile_namespace_selector(selector: LabelSelector) -> tuple[Requirement, ...]:
    """Requirements on an endpoint's namespace labels (`io.cilium.k8s.namespace.labels.<key>`)."""
    return compile_selector(selector, key_prefix=NAMESPACE_LABELS_PREFIX)


def requirements_match(reqs: tuple[Requirement, ...], endpoint: Endpoint) -> bool:
    """True when the endpoint meets every requirement (Kubernetes semantics for NotIn and DoesNotExist)."""
    for source, key, operator, values in reqs:
        present = endpoint.values(source, key)
        if operator == "In":
            if not any(v in values for v in present):
                return False
        elif operator == "NotIn":
            if any(v in values for v in present):
                return False
        elif operator == "Exists":
            if not present:
                return False
        elif present:  # DoesNotExist
            return False
    return True


def _names_namespace(reqs: tuple[Requirement, ...]) -> bool:
    for source, key, _, _ in reqs:
        if key == POD_NAMESPACE_KEY and (source == "any" or source == "k8s"):
            return True
    return False


def _names_reserved(reqs: tuple[Requirement, ...]) -> bool:
    for source, _, _, _ in reqs:
        if source == "reserved":
            return True
    return False


_NAMESPACE_EXISTS: Requirement = ("k8s", POD_NAMESPACE_KEY, "Exists", frozenset())


def subject_requirements(policy: Policy) -> tuple[Requirement, ...] | None:
    """What an endpoint must meet to be selected by `policy`; None when the policy selects no pod at all.

    Kubernetes and namespaced Cilium policies select pods of their own namespace; a clusterwide policy selects
    pods of any namespace. Host policies (`nodeSelector`) select nodes, which flows do not show as subjects.
    """
    if policy.node_selector is not None:
        return None
    reqs = compile_selector(policy.selector)
    if policy.namespace is not None:
        return reqs + (("k8s", POD_NAMESPACE_KEY, "In", frozenset({policy.namespace})),)
    if _names_namespace(reqs):
        return reqs
    return reqs + (_NAMESPACE_EXISTS,)


def peer_requirements(peer: Peer, policy: Policy) -> tuple[Requirement, ...]:
    """The requirements an endpoints peer puts on the other end, with the namespace scoping of its flavour.

    Kubernetes: a pod selector alone means the policy's namespace; a namespace selector alone means every pod
    of those namespaces. Cilium: a selector that does not name a namespace is scoped to the policy's namespace
    (clusterwide: to pods of any namespace), unless it selects reserved labels.
    """
    reqs = compile_selector(peer.selector) if peer.selector is not None else ()
    if peer.namespace_selector is not None:
        return reqs + compile_namespace_selector(peer.namespace_selector) + (_NAMESPACE_EXISTS,)
    if policy.flavour == "kubernetes":
        assert policy.namespace is not None
        return reqs + (("k8s", POD_NAMESPACE_KEY, "In", frozenset({policy.namespace})),)
    if _names_namespace(reqs) or _names_reserved(reqs):
        return reqs
    if policy.namespace is not None:
        return reqs + (("k8s", POD_NAMESPACE_KEY, "In", frozenset({policy.namespace})),)
    return reqs + (_NAMESPACE_EXISTS,)


# -- entities, CIDRs, FQDNs ---------------------------------------------------------------------------------


def entity_matches(entity: str, endpoint: Endpoint) -> bool:
    """True when `endpoint` belongs to the Cilium entity."""
    if entity == "all":
        return True
    if entity == "none":
        return False
    if entity == "world":
        return endpoint.is_world
    if entity in ("world-ipv4", "world-ipv6"):
        if entity in endpoint.reserved:
            return True
        if not endpoint.is_world:
            return False
        if endpoint.ip is None:
            return True  # family unknown
        return (":" in endpoint.ip) == (entity == "world-ipv6")
    if entity == "cluster":
        return endpoint.is_pod or bool(endpoint.reserved & NODE_LIKE)
    return entity in endpoint.reserved


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise PolicyError(f"invalid CIDR {cidr!r}: {exc}") from exc


@lru_cache(maxsize=65536)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def cidr_matches(
    cidr: str, except_cidrs: Iterable[str], endpoint: Endpoint, *, match_nodes: bool = False
) -> bool:
    """True when the endpoint's address is in `cidr` and in none of `except_cidrs`.

    `match_nodes`: Cilium's `policy-cidr-match-mode: nodes`, where CIDR selectors also select node addresses.
    """
    nodes = match_nodes and bool(endpoint.reserved & NODES)
    if not (endpoint.cidr_selectable or nodes):
        return False
    if endpoint.ip is None:
        # A world endpoint known only by its identity (the observed-edge table keeps no address for world
        # clients): whatever its address, a whole-family block without exceptions holds it.
        return endpoint.is_world and _network(cidr).prefixlen == 0 and not any(except_cidrs)
    address = _address(endpoint.ip)
    if address is None:
        return False
    network = _network(cidr)
    if address.version != network.version or address not in network:
        return False
    for excluded in except_cidrs:
        net = _network(excluded)
        if address.version == net.version and address in net:
            return False
    return True


@lru_cache(maxsize=4096)
def fqdn_regex(selector: FQDNSelector) -> re.Pattern[str]:
    """A regex for one FQDN selector, as Cilium builds it.

    `matchName` is exact (case-insensitive, trailing dot ignored). In `matchPattern`, `*` stands for any run of
    DNS name characters within one label, a leading `**.` for one or more labels, and `*` alone for every name.
    """
    if selector.match_name is not None:
        return re.compile(re.escape(selector.match_name.lower().rstrip(".")))
    pattern = (selector.match_pattern or "").lower().rstrip(".")
    if pattern == "*":
        return re.compile(r".+")
    multi = pattern.startswith("**.")
    if multi:
        pattern = pattern[3:]
    body = re.escape(pattern).replace(r"\*", r"[-a-z0-9_]*")
    return re.compile((r"(?:[-a-z0-9_]+\.)+" if multi else "") + body)


def fqdn_matches(selector: FQDNSelector, names: Iterable[str]) -> bool:
    """True when any of `names` matches the selector."""
    regex = fqdn_regex(selector)
    return any(regex.fullmatch(name) for name in names)


def peer_matches(
    peer: Peer, reqs: tuple[Requirement, ...] | None, endpoint: Endpoint, *, match_nodes: bool = False
) -> bool:
    """True when `endpoint` is this peer; `reqs` are the peer's compiled requirements (endpoints peers)."""
    if peer.kind == "endpoints":
        # Scoping by namespace is part of `reqs` (see peer_requirements), so selectors of reserved labels
        # (`reserved:host`) can select reserved identities, as in Cilium.
        return reqs is not None and requirements_match(reqs, endpoint)
    if peer.kind == "entity":
        return entity_matches(peer.entity or "none", endpoint)
    if peer.kind == "cidr":
        return cidr_matches(peer.cidr or "", peer.except_cidrs, endpoint, match_nodes=match_nodes)
    if peer.kind == "fqdn":
        return peer.fqdn is not None and endpoint.cidr_selectable and fqdn_matches(peer.fqdn, endpoint.names)
    return False

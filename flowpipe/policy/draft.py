"""Observed edges → least-privilege Policy objects (per workload, plus per-namespace default-deny), deterministically.

The input is the observed-edge table (`flowpipe.policy.edges.OBSERVED_EDGE_SCHEMA`, produced by
`sql/observed_edges.sql`): one row per distinct request edge, replies excluded, each connection counted once.

The source gets the egress rule and the destination the ingress rule. Selectors use stable labels (never
`pod-template-hash` and the like), as few as tell the workload apart from the others observed in its
namespace. Each namespace gets `flowpipe-default-deny` (ingress and egress) with the DNS allowance (UDP and TCP
53 to the DNS server actually observed, by its real labels); `kube-system` is left alone unless asked.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa

from flowpipe.policy._l7 import http_rules, kafka_rules
from flowpipe.policy._match import parse_label
from flowpipe.policy.edges import endpoint_namespace
from flowpipe.policy.model import (
    DIRECTIONS,
    Direction,
    Flavour,
    FQDNSelector,
    LabelSelector,
    Peer,
    Policy,
    Port,
    PortRule,
    Rule,
)

PREFERRED_LABEL_KEYS = (
    "app.kubernetes.io/name",
    "app",
    "k8s-app",
    "name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "component",
    "tier",
    "role",
    "version",
)
UNSTABLE_LABEL_KEYS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "controller-uid",
        "batch.kubernetes.io/controller-uid",
        "job-name",
        "batch.kubernetes.io/job-name",
        "batch.kubernetes.io/job-completion-index",
        "app.kubernetes.io/version",
        "helm.sh/chart",
        "chart",
        "heritage",
        "security.istio.io/tlsMode",
        "service.istio.io/canonical-revision",
    }
)
"""Label keys that change with every rollout, job run or release: never used in selectors."""

_UNSTABLE_PREFIXES = ("io.kubernetes.pod.", "io.cilium.k8s.", "io.cilium.")
DNS_PORT = 53
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DEFAULT_DNS = (("kube-system", "kube-dns"), {"k8s-app": "kube-dns"})
FQDN_PATTERN_MIN_NAMES = 3
"""This many names under one parent domain (same port rules) become one `*.parent` matchPattern."""
_ICMP = {"ICMPv4": "ICMP", "ICMPv6": "ICMPv6"}


@dataclass(frozen=True, slots=True)
class LeftOut:
    """An observed edge (or one end of it) that the drafts do not allow, why, and what the user can do.

    `subjects` are the drafted ends that miss a rule for it, as (`namespace/workload`, direction, protocol,
    port): the replay of the drafts denies the edge there, as expected (see `flowpipe.policy.proof`)."""

    edge: str
    namespace: str | None
    reason: str
    action: str
    requests: int
    subjects: tuple[tuple[str, str, str | None, int | None], ...] = ()
    kind: str = "cannot be expressed"
    """Groups the left-out list: `denied`, `reserved identity`, `in-cluster address`, `cannot be expressed`,
    `invalid name`, `not proved`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "edge": self.edge,
            "namespace": self.namespace,
            "kind": self.kind,
            "reason": self.reason,
            "what_to_do": self.action,
            "requests": self.requests,
        }


@dataclass(slots=True)
class Draft:
    """Drafted policies in output order, notes for the summary, and the edges left out with their reasons."""

    policies: list[Policy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)

    def by_namespace(self) -> dict[str, list[Policy]]:
        """Policies grouped by namespace, in output order (one file each)."""
        grouped: dict[str, list[Policy]] = {}
        for policy in self.policies:
            grouped.setdefault(policy.namespace or "_cluster", []).append(policy)
        return grouped


@dataclass(frozen=True, slots=True)
class _End:
    namespace: str | None
    workload: str | None
    entity: str | None
    ip: str | None
    names: tuple[str, ...]
    held: str | None = None
    """The reserved identity a pod was recorded with (`world`, `unmanaged`): no selector matches it then."""

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None and self.workload is not None and self.entity is None

    @property
    def selectable(self) -> bool:
        """A pod that Cilium knows by its labels (not recorded with a reserved identity)."""
        return self.is_pod and self.held is None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.workload}"


@dataclass(slots=True)
class _PortUse:
    flows: int = 0
    http: dict[tuple[str, str], int] = field(default_factory=dict)
    kafka: set[tuple[str, str | None]] = field(default_factory=set)


def draft_policies(
    edges: pa.Table | Iterable[Mapping[str, Any]],
    *,
    flavour: Flavour = "cilium",
    namespaces: Sequence[str] | None = None,
    l7: bool = False,
    include_kube_system: bool = False,
    default_deny: bool = True,
    context: pa.Table | Iterable[Mapping[str, Any]] | None = None,
    sides: Sequence[Collection[Direction]] | None = None,
    cluster_ranges: Sequence[Network] = (),
) -> Draft:
    """Draft the policies that allow exactly the observed edges.

    >>> draft = draft_policies(engine.run(observed_edges_sql, params), flavour="cilium", l7=True)  # doctest: +SKIP
    >>> [p.name for p in draft.policies]
    ['flowpipe-default-deny', 'flowpipe-api', 'flowpipe-web']

    `namespaces` limits the drafted namespaces (default: every namespace with observed pods, `kube-system`
    only with `include_kube_system` or when named). Only the drafted side of an edge gets a rule.

    To draft rules for a part of the observed graph only (e.g. the edges that existing policies deny), pass
    that part as `edges` and the whole graph as `context`: selectors and DNS servers are then chosen from the
    whole graph, so that a selector still tells its workload apart from every other one observed. `sides`,
    aligned with `edges`, says which ends of each edge get a rule (`egress`: the source, `ingress`: the
    destination; default both).

    What a policy cannot express, or a peer it had to write differently, is said in that policy's `comments`
    (rendered into its header) as well as in `notes`.

    Edges a draft cannot allow are left out and listed in `Draft.left_out`, never a reason to draft nothing:
    a peer recorded with a reserved identity while it is a pod (no label selector matches it), an address
    inside `cluster_ranges` (the pod and service ranges) without labels (never a rule on one pod address),
    and traffic a flavour cannot express. A pod recorded with a reserved identity gets no policy of its own.
    """
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    if sides is not None and len(sides) != len(rows):
        raise ValueError(f"sides has {len(sides)} entries for {len(rows)} edges")
    everything = (
        rows if context is None else (context.to_pylist() if isinstance(context, pa.Table) else list(context))
    )
    draft = Draft()
    parsed = [_parse_row(r) for r in rows]
    parsed_context = parsed if context is None else [_parse_row(r) for r in everything]
    labels = _workload_labels(parsed_context)
    drafted = _drafted_namespaces(labels, namespaces, include_kube_system)
    selectors = _selectors(labels)
    dns_servers = _dns_servers(parsed_context)
    held_dns = sorted({
        f"{dst.key} (recorded with the identity {dst.held})" for _, dst, row in parsed_context
        if dst.is_pod and dst.held and row.get("destination_port") == DNS_PORT})  # fmt: skip
    deny_namespaces = drafted if default_deny else set()

    # (namespace, workload) → direction → peer → port → use
    uses: dict[tuple[str, str], dict[Direction, dict[Peer, dict[Port, _PortUse]]]] = defaultdict(
        lambda: {d: defaultdict(dict) for d in DIRECTIONS}
    )
    comments: dict[tuple[str, str], set[str]] = defaultdict(set)
    for index, (src, dst, row) in enumerate(parsed):
        port_notes: list[str] = []
        port = _port(row, port_notes)
        draft.notes.extend(port_notes)
        ends: tuple[tuple[Direction, _End, _End], ...] = (("egress", src, dst), ("ingress", dst, src))
        drafted_ends = [
            (d, subject, other)
            for d, subject, other in ends
            if subject.is_pod and subject.namespace in drafted and (sides is None or d in sides[index])
        ]
        requests = int(row.get("flows") or 0)  # (its text is made only for an edge left out)
        if port is None:
            for _, subject, _ in drafted_ends:
                comments[(str(subject.namespace), str(subject.workload))].update(port_notes)
            if drafted_ends:
                draft.left_out.append(LeftOut(
                    edge_text(row), drafted_ends[0][1].namespace, "; ".join(port_notes),
                    "allow it in a policy of your own",
                    requests, tuple(_subject(s, d, row) for d, s, _ in drafted_ends)))  # fmt: skip
            continue
        is_dns = port.port == DNS_PORT and (dst.namespace, dst.workload) in dns_servers[None]
        for direction, subject, other in drafted_ends:
            key = (str(subject.namespace), str(subject.workload))
            if subject.held is not None:
                draft.left_out.append(_held_subject(subject, direction, edge_text(row), requests, row))
                continue
            if selectors.get(key) is None:
                draft.left_out.append(LeftOut(
                    edge_text(row), subject.namespace,
                    f"{subject.key} has no stable labels to select it by, so no policy is drafted for it",
                    "give its pods a stable label (app.kubernetes.io/name or app) and draft again",
                    requests, (_subject(subject, direction, row),), kind="no stable labels"))  # fmt: skip
                continue
            if other.is_pod and other.held is not None:
                draft.left_out.append(
                    _held_peer(subject, other, direction, edge_text(row), requests, row, flavour)
                )
                continue
            if direction == "egress" and is_dns and subject.namespace in deny_namespaces:
                continue  # the namespace's DNS allowance covers it
            inside = _in_cluster(other, cluster_ranges)
            if inside is not None:
                draft.left_out.append(LeftOut(
                    edge_text(row), subject.namespace,
                    f"{other.ip} is an address inside {inside}, where the cluster's pods and services are, "
                    "recorded without labels: a rule on one pod address breaks when the pod restarts",
                    "allow it by the labels of the pod or service behind it (its records carry them once Cilium "
                    "knows it), or re-run suggest on a window where it was recorded with them",
                    requests, (_subject(subject, direction, row),), kind="in-cluster address"))  # fmt: skip
                continue
            peer_notes: list[str] = []
            peer = _peer(other, subject.namespace, direction, flavour, selectors, peer_notes)
            draft.notes.extend(peer_notes)
            comments[key].update(peer_notes)
            if peer is None:
                if not (flavour == "kubernetes" and other.entity == "host" and direction == "ingress"):
                    draft.left_out.append(LeftOut(
                        edge_text(row), subject.namespace,
                        "; ".join(peer_notes) or "no peer can be written for it",
                        "allow it in a policy of your own", requests, (_subject(subject, direction, row),)))  # fmt: skip
                continue
            if flavour == "kubernetes" and l7 and row.get("l7_protocol") in ("http", "kafka"):
                comments[key].add(
                    f"{row['l7_protocol']} calls on {port.protocol}/{port.port} are allowed at L4: "
                    "a NetworkPolicy cannot restrict L7"
                )
            for one in peer:
                by_port = uses[key][direction][one]
                use = by_port.get(port)
                if use is None:
                    use = by_port[port] = _PortUse()
                _record(use, row, direction, dst, drafted, l7 and flavour == "cilium")
    if (
        l7
        and flavour == "kubernetes"
        and any(r.get("l7_protocol") in ("http", "kafka") for _, _, r in parsed)
    ):
        draft.notes.append(
            "L7 (HTTP, Kafka) rules cannot be written in a NetworkPolicy; the drafts allow those ports at L4"
        )

    in_namespace: dict[str, list[tuple[str, Any]]] = defaultdict(list)  # workloads in order, by namespace
    for (ns, workload), by_direction in sorted(uses.items()):
        in_namespace[ns].append((workload, by_direction))
    for namespace in sorted(drafted):
        if namespace in deny_namespaces:
            draft.policies.append(
                _default_deny(namespace, flavour, dns_servers, selectors, draft.notes, held_dns)
            )
        for workload, by_direction in in_namespace.get(namespace, ()):
            rules = [rule for d in DIRECTIONS for rule in _rules(d, by_direction[d])]
            if any(p.kind == "fqdn" for r in rules for p in r.peers) and namespace not in deny_namespaces:
                rules.append(_dns_rule(namespace, flavour, dns_servers, selectors))
            selector = selectors.get((namespace, workload))
            if selector is None:
                draft.notes.append(
                    f"{namespace}/{workload}: no stable labels to select it by; no policy drafted"
                )
                continue
            draft.policies.append(
                Policy(
                    name=policy_name(workload),
                    namespace=namespace,
                    flavour=flavour,
                    selector=selector,
                    rules=tuple(rules),
                    isolates=DIRECTIONS,
                    comments=tuple(sorted(comments.get((namespace, workload), ()))),
                )
            )
    draft.notes = sorted(set(draft.notes))
    return draft


# -- rows and workloads -------------------------------------------------------------------------------------


_KEYS = {
    side: tuple(f"{side}_{c}" for c in ("entity", "namespace", "names", "workload", "ip"))
    for side in ("source", "destination")
}


def _parse_row(row: Mapping[str, Any]) -> tuple[_End, _End, Mapping[str, Any]]:
    def end(side: str) -> _End:
        entity_key, _, names_key, workload_key, ip_key = _KEYS[side]
        entity = row.get(entity_key)
        # Labels name the namespace when the record does not: such an end is a pod, never the world.
        namespace = endpoint_namespace(row, side)
        raw = row.get(names_key)
        names = tuple(sorted({n.lower().rstrip(".") for n in raw if n})) if raw else ()
        workload = row.get(workload_key) if namespace is not None else None
        if namespace is not None and workload is None:
            workload = _workload_from_labels(row.get(f"{side}_labels") or ())
        return _End(
            namespace=namespace,
            workload=workload,
            entity=entity if entity is not None or namespace is not None else "world",
            ip=row.get(ip_key),
            names=names,
            held=row.get(f"{side}_reserved_identity") if namespace is not None else None,
        )

    return end("source"), end("destination"), row


def _workload_from_labels(labels: Iterable[str]) -> str | None:
    """A workload name for a pod known by its labels only: its most telling stable label value."""
    stable = stable_labels(labels)
    return next((stable[k] for k in PREFERRED_LABEL_KEYS if k in stable), None)


def workload_selectors(
    edges: pa.Table | Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], LabelSelector | None]:
    """The selector `draft_policies` uses for each observed (namespace, workload); None: no stable labels."""
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    return _selectors(_workload_labels([_parse_row(r) for r in rows]))


def stable_labels(labels: Iterable[str]) -> dict[str, str]:
    """The labels usable in a selector: Kubernetes pod labels whose keys survive rollouts, as key → value."""
    out: dict[str, str] = {}
    for label in labels:
        source, key, value = parse_label(label)
        if (
            source not in ("k8s", "unspec")
            or key in UNSTABLE_LABEL_KEYS
            or key.startswith(_UNSTABLE_PREFIXES)
            or not valid_label(key, value)
        ):
            continue
        out[key] = value
    return out


def _workload_labels(
    parsed: Sequence[tuple[_End, _End, Mapping[str, Any]]],
) -> dict[tuple[str, str], dict[str, str]]:
    """Stable labels per workload: those every observation of the workload agrees on."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    seen: set[tuple[tuple[str, str], tuple[str, ...]]] = set()  # the same label list folds in once
    for src, dst, row in parsed:
        for end, side in ((src, "source"), (dst, "destination")):
            if not end.selectable:
                continue
            key = (str(end.namespace), str(end.workload))
            raw = tuple(row.get(f"{side}_labels") or ())
            if (key, raw) in seen:
                continue
            seen.add((key, raw))
            labels = stable_labels(raw)
            if key in found:
                found[key] = {k: v for k, v in found[key].items() if labels.get(k) == v}
            else:
                found[key] = labels
    return found


def _selectors(
    labels: Mapping[tuple[str, str], dict[str, str]],
) -> dict[tuple[str, str], LabelSelector | None]:
    """The selector of each (namespace, workload), told apart from the others of its namespace (only those)."""
    by_namespace: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in labels:
        by_namespace[key[0]].append(key)
    return {
        key: _choose_selector(labels[key], [labels[k] for k in by_namespace[key[0]] if k != key])
        for key in labels
    }


def _choose_selector(own: dict[str, str], others: Sequence[dict[str, str]]) -> LabelSelector | None:
    """The fewest preferred stable labels of `own` that tell this workload apart from `others` (the other
    workloads of its namespace)."""
    if not own:
        return None
    ordered = [k for k in PREFERRED_LABEL_KEYS if k in own] + sorted(
        k for k in own if k not in PREFERRED_LABEL_KEYS
    )
    chosen: dict[str, str] = {}
    for label_key in ordered:
        chosen[label_key] = own[label_key]
        if not any(all(o.get(k) == v for k, v in chosen.items()) for o in others):
            break
    return LabelSelector(tuple(sorted(chosen.items())))


def _drafted_namespaces(
    labels: Mapping[tuple[str, str], object], namespaces: Sequence[str] | None, include_kube_system: bool
) -> set[str]:
    if namespaces:
        return set(namespaces)
    return {ns for ns, _ in labels if ns != "kube-system" or include_kube_system}


_Servers = dict[str | None, dict[tuple[str, str], int]]


def _dns_servers(parsed: Sequence[tuple[_End, _End, Mapping[str, Any]]]) -> _Servers:
    """Pods observed answering on port 53, with the flows they served, per client namespace (None: all)."""
    servers: _Servers = defaultdict(lambda: defaultdict(int))
    for src, dst, row in parsed:
        if (
            dst.selectable
            and row.get("destination_port") == DNS_PORT
            and row.get("l4_protocol") in ("UDP", "TCP")
        ):
            key = (str(dst.namespace), str(dst.workload))
            flows = int(row.get("flows") or 0)
            servers[None][key] += flows
            if src.is_pod:
                servers[src.namespace][key] += flows
    return servers


@lru_cache(maxsize=65536)
def valid_name(name: str, *, subdomain: bool = False) -> bool:
    """True for a name Kubernetes accepts: a DNS-1123 label (namespaces), or subdomain (object names)."""
    if subdomain:
        return 0 < len(name) <= 253 and all(_DNS_LABEL.fullmatch(part) for part in name.split("."))
    return len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None


def valid_label(key: str, value: str) -> bool:
    """True for a label key (optional DNS prefix, name of up to 63 characters) and value Kubernetes accepts."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)):
        return False
    return (
        0 < len(name) <= 63
        and _LABEL_VALUE.fullmatch(name) is not None
        and len(value) <= 63
        and _LABEL_VALUE.fullmatch(value) is not None
    )


def edge_text(row: Mapping[str, Any], sides: Sequence[str] = ()) -> str:
    """`source -> destination PROTOCOL/port [L7 call]` of an observed-edge row (`(denied at ...)` with `sides`)."""

    def end(side: str) -> str:
        namespace = endpoint_namespace(row, side)
        if namespace is not None:
            workload = row.get(f"{side}_workload") or _workload_from_labels(row.get(f"{side}_labels") or ())
            return f"{namespace}/{workload}"
        names = row.get(f"{side}_names") or ()
        address = names[0] if names else row.get(f"{side}_ip")
        entity = row.get(f"{side}_entity") or "world"
        return f"{entity}:{address}" if address else str(entity)

    protocol = row.get("l4_protocol") or "?"
    port = row.get("destination_port") if protocol in ("TCP", "UDP", "SCTP") else row.get("icmp_type")
    l7 = ""
    if row.get("l7_protocol") == "http":
        l7 = f" {row.get('http_method')} {row.get('http_path')}"
    elif row.get("l7_protocol") == "kafka":
        l7 = f" kafka {row.get('kafka_role')} {row.get('kafka_topic') or ''}".rstrip()
    where = f" (denied at {'+'.join(sides)})" if sides else ""
    return f"{end('source')} -> {end('destination')} {protocol}/{port}{l7}{where}"


def _subject(
    end: _End, direction: Direction, row: Mapping[str, Any]
) -> tuple[str, str, str | None, int | None]:
    """(`namespace/workload`, direction, protocol, port) of a drafted end, as replay names a denied edge."""
    protocol = row.get("l4_protocol")
    port = row.get("destination_port") if protocol in ("TCP", "UDP", "SCTP") else row.get("icmp_type")
    return (end.key, direction, protocol, port)


def _held_subject(
    subject: _End, direction: Direction, text: str, requests: int, row: Mapping[str, Any]
) -> LeftOut:
    """The rule a pod recorded with a reserved identity would need: no policy is drafted for it."""
    return LeftOut(
        text,
        subject.namespace,
        f"{subject.key} was recorded with the identity {subject.held}: Cilium does not enforce a policy "
        "selecting it by labels while it has that identity, so none is drafted for it",
        "draft it again once Cilium manages the pod (the namespace's default-deny then isolates it)",
        requests,
        (_subject(subject, direction, row),),
        kind="reserved identity",
    )


def _held_peer(
    subject: _End,
    other: _End,
    direction: Direction,
    text: str,
    requests: int,
    row: Mapping[str, Any],
    flavour: Flavour,
) -> LeftOut:
    """An edge to or from a pod recorded with a reserved identity: no label selector matches it."""
    where = f" ({other.ip})" if other.ip else ""
    reason = (
        f"pods recorded with the {other.held} identity: {other.key}{where} is a pod, but Cilium knows it as "
        f"{other.held}, so no label selector matches it"
    )
    if other.held == "unmanaged":
        action = "allow it by label once Cilium manages it (restart the pod after Cilium runs on its node)"
    else:
        host = "toEntities: [host]" if direction == "egress" else "fromEntities: [host]"
        if flavour == "kubernetes":
            host = "an ipBlock of the node addresses (Cilium: policy-cidr-match-mode: nodes)"
        action = f"allow it by label once Cilium manages it, or with {host} if it runs on the host network"
    if direction == "egress" and row.get("destination_port") == DNS_PORT:
        action += "; the DNS allowance assumes k8s-app=kube-dns in kube-system, which selects it once managed"
    return LeftOut(text, subject.namespace, reason, action, requests, (_subject(subject, direction, row),),
                   kind="reserved identity")  # fmt: skip


def _in_cluster(other: _End, ranges: Sequence[Network]) -> Network | None:
    """The cluster range an unlabelled address (the world to Cilium) lies in, if any."""
    if other.is_pod or other.entity not in (None, "world") or not other.ip or other.names:
        return None
    try:
        address = ipaddress.ip_address(other.ip)
    except ValueError:
        return None
    return next((r for r in ranges if r.version == address.version and address in r), None)


def cluster_ranges(addresses: Iterable[str]) -> list[Network]:
    """The pod and service ranges, inferred from the addresses of known pods and services: the /16 (IPv4) or
    /64 (IPv6) around each. An unlabelled address inside them is a pod or service, never the world."""
    found: set[Network] = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        prefix = 16 if address.version == 4 else 64
        found.add(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    return sorted(found, key=lambda n: (n.version, n))


def policy_name(workload: str) -> str:
    """The stable name of a workload's drafted policy: `flowpipe-<workload>` as a valid object name."""
    name = re.sub(r"[^a-z0-9.-]+", "-", workload.lower()).strip("-.") or "workload"
    return f"flowpipe-{name}"[:253]


# -- peers, ports, L7 ---------------------------------------------------------------------------------------


def _peer(
    other: _End,
    namespace: str,
    direction: Direction,
    flavour: Flavour,
    selectors: Mapping[tuple[str, str], LabelSelector | None],
    notes: list[str],
) -> list[Peer] | None:
    if other.is_pod:
        selector = selectors.get((other.namespace, other.workload))  # type: ignore[arg-type]
        if selector is None:
            notes.append(
                f"{other.namespace}/{other.workload}: no stable labels; selected by its whole namespace"
            )
            selector = LabelSelector()
        return [Peer.endpoints(selector, namespace=other.namespace if other.namespace != namespace else None)]
    entity = other.entity or "world"
    if entity == "kube-apiserver" and flavour == "kubernetes":
        notes.append(
            "kube-apiserver is written as the API server addresses seen (NetworkPolicy has no entities): update "
            "the ipBlock if they change; Cilium applies it to an API server on the nodes only with "
            "policy-cidr-match-mode: nodes"
        )
        return _address_peer(other, notes)
    if entity == "world" and direction == "egress":
        if other.names and flavour == "cilium":
            return [Peer.fqdn_peer(name=n) for n in other.names]
        if other.names:
            notes.append(
                f"FQDN destinations ({', '.join(other.names)}) are written as their observed addresses"
            )
        return _address_peer(other, notes)
    if flavour == "cilium" or entity == "world":
        return [Peer.entity_peer(entity)]
    if entity == "host" and direction == "ingress":
        # Kubernetes lets the local node reach its pods whatever the policies (kubelet probes); Cilium agrees.
        notes.append("ingress from the local node (host: kubelet probes) needs no NetworkPolicy rule")
        return None
    note = f"entity {entity} is written as its observed address (NetworkPolicy has no entities)"
    if entity in ("host", "remote-node"):
        # Cilium gives node addresses their own identities, which ipBlocks select only in that mode.
        note += "; Cilium applies an ipBlock to node addresses only with policy-cidr-match-mode: nodes"
    notes.append(note)
    return _address_peer(other, notes)


def _address_peer(other: _End, notes: list[str]) -> list[Peer] | None:
    try:
        address = ipaddress.ip_address(other.ip or "")
    except ValueError:
        notes.append(f"a {other.entity or 'world'} peer without an address was left out")
        return None
    return [Peer.cidr_peer(f"{address}/{address.max_prefixlen}")]


def _port(row: Mapping[str, Any], notes: list[str]) -> Port | None:
    """The port of an edge; None when it cannot be expressed (and a note says so)."""
    protocol = row.get("l4_protocol")
    if protocol in _ICMP:
        icmp_type = row.get("icmp_type")
        return Port(port=icmp_type, protocol=_ICMP[protocol])
    if protocol in ("TCP", "UDP", "SCTP"):
        number = row.get("destination_port")
        if number is None:
            notes.append(f"{protocol} edges without a destination port were left out")
            return None
        return Port(port=int(number), protocol=protocol)
    notes.append(f"{protocol or 'unknown'} traffic cannot be written as a port rule and was left out")
    return None


def _record(
    use: _PortUse, row: Mapping[str, Any], direction: Direction, dst: _End, drafted: set[str], l7: bool
) -> None:
    use.flows += int(row.get("flows") or 0)
    kind = row.get("l7_protocol")
    if not l7 or kind not in ("http", "kafka"):
        return
    # L7 rules sit on the server's ingress when the server is drafted, else on the client's egress.
    server_side = dst.is_pod and dst.namespace in drafted
    if (direction == "ingress") != server_side:
        return
    if kind == "http" and row.get("http_method") and row.get("http_path"):
        key = (str(row["http_method"]), str(row["http_path"]))
        use.http[key] = use.http.get(key, 0) + int(row.get("flows") or 0)
    elif kind == "kafka" and row.get("kafka_role"):
        use.kafka.add((str(row["kafka_role"]), row.get("kafka_topic")))


# -- rules and policies -------------------------------------------------------------------------------------


def _port_key(port: Port) -> tuple[str, int]:
    return (port.protocol, port.port if isinstance(port.port, int) else -1)


def _port_rules(ports: Mapping[Port, _PortUse]) -> tuple[tuple[PortRule, ...], int]:
    plain: list[Port] = []
    with_l7: list[PortRule] = []
    flows = 0
    for port in sorted(ports, key=_port_key):
        use = ports[port]
        flows += use.flows
        if use.http or use.kafka:
            with_l7.append(PortRule((port,), http=http_rules(use.http), kafka=kafka_rules(use.kafka)))
        else:
            plain.append(port)
    rules = ((PortRule(tuple(plain)),) if plain else ()) + tuple(with_l7)
    return rules, flows


def _peer_key(peer: Peer) -> tuple[Any, ...]:
    order = {"endpoints": 0, "entity": 1, "cidr": 2, "fqdn": 3}[peer.kind]
    fqdn = peer.fqdn or FQDNSelector()
    return (
        order,
        peer.namespace_name or "",
        peer.selector.match_labels if peer.selector else (),
        peer.entity or "",
        peer.cidr or "",
        fqdn.match_name or fqdn.match_pattern or "",
    )


def _rules(direction: Direction, peers: Mapping[Peer, dict[Port, _PortUse]]) -> list[Rule]:
    """One rule per pod or entity peer; addresses and names that share the same ports share one rule."""
    rules: list[Rule] = []
    # Cilium does not combine toFQDNs with other L3 selectors in one rule, so the kind is part of the key.
    shared: dict[tuple[str, tuple[PortRule, ...]], tuple[list[Peer], int]] = {}
    for peer in sorted(peers, key=_peer_key):
        port_rules, flows = _port_rules(peers[peer])
        if peer.kind in ("endpoints", "entity"):
            rules.append(Rule(direction, (peer,), port_rules, flows=flows))
        else:
            group, total = shared.get((peer.kind, port_rules), ([], 0))
            group.append(peer)
            shared[(peer.kind, port_rules)] = (group, total + flows)
    for (_, port_rules), (group, flows) in shared.items():
        rules.append(Rule(direction, _compress_fqdns(group), port_rules, flows=flows))
    return rules


def _compress_fqdns(peers: list[Peer]) -> tuple[Peer, ...]:
    """Names sharing a parent domain, when there are many, become one `*.parent` pattern."""
    names = [p.fqdn.match_name for p in peers if p.kind == "fqdn" and p.fqdn and p.fqdn.match_name]
    parents: dict[str, int] = defaultdict(int)
    for name in names:
        if name.count(".") >= 2:
            parents[name.split(".", 1)[1]] += 1
    patterns = {parent for parent, count in parents.items() if count >= FQDN_PATTERN_MIN_NAMES}
    out: list[Peer] = [p for p in peers if p.kind != "fqdn"]
    kept = sorted({n for n in names if n.split(".", 1)[-1] not in patterns or n.count(".") < 2})
    out += [Peer.fqdn_peer(name=n) for n in kept]
    out += [Peer.fqdn_peer(pattern=f"*.{parent}") for parent in sorted(patterns)]
    return tuple(out)


def _dns_peers(
    namespace: str, dns_servers: _Servers, selectors: Mapping[tuple[str, str], LabelSelector | None]
) -> tuple[tuple[Peer, ...], int | None]:
    """The DNS servers this namespace's pods were seen using (else any seen, else the conventional kube-dns),
    as peers, with the flows behind them (None when assumed)."""
    used = dns_servers.get(namespace) or dns_servers.get(None) or {}
    peers = []
    for ns, workload in sorted(used, key=lambda k: (-used[k], k)):
        selector = selectors.get((ns, workload))
        if selector is not None:
            peers.append(Peer.endpoints(selector, namespace=ns if ns != namespace else None))
    if peers:
        return tuple(peers), sum(used.values())
    (ns, _), labels = DEFAULT_DNS
    return (Peer.endpoints(LabelSelector.of(labels), namespace=ns),), None


def _dns_rule(
    namespace: str,
    flavour: Flavour,
    dns_servers: _Servers,
    selectors: Mapping[tuple[str, str], LabelSelector | None],
) -> Rule:
    """Egress to the DNS servers on UDP and TCP 53 (the allowance a default-deny egress needs)."""
    peers, flows = _dns_peers(namespace, dns_servers, selectors)
    # Cilium's DNS proxy must see the lookups for toFQDNs to work: the `dns` rule sends them through it.
    dns = (FQDNSelector(match_pattern="*"),) if flavour == "cilium" else ()
    ports = PortRule((Port(DNS_PORT, "UDP"), Port(DNS_PORT, "TCP")), dns=dns)
    return Rule("egress", peers, (ports,), flows=flows)


def _default_deny(
    namespace: str,
    flavour: Flavour,
    dns_servers: _Servers,
    selectors: Mapping[tuple[str, str], LabelSelector | None],
    notes: list[str],
    held_dns: Sequence[str] = (),
) -> Policy:
    rule = _dns_rule(namespace, flavour, dns_servers, selectors)
    comments: tuple[str, ...] = ()
    if rule.flows is None and held_dns:
        comments = (
            (
                f"the DNS server seen, {', '.join(held_dns)}, cannot be selected by its labels: the DNS allowance "
                "assumes k8s-app=kube-dns in kube-system, which matches it once Cilium manages it"
            ),
        )
        notes.append(
            f"{namespace}: DNS server not managed by Cilium; assumed k8s-app=kube-dns in kube-system"
        )
    elif rule.flows is None:
        comments = ("no DNS traffic was observed: the DNS allowance assumes k8s-app=kube-dns in kube-system",)
        notes.append(f"{namespace}: no DNS server observed; assumed k8s-app=kube-dns in kube-system")
    return Policy(
        name="flowpipe-default-deny",
        namespace=namespace,
        flavour=flavour,
        selector=LabelSelector(),
        rules=(rule,),
        isolates=DIRECTIONS,
        comments=comments,
    )

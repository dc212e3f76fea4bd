"""Policy → NetworkPolicy / CiliumNetworkPolicy YAML, with a stable key order and a provenance header.

Each document is built as a plain dict in the order Kubernetes users read (apiVersion, kind, metadata, spec;
selector before rules; peers before ports) and written as PyYAML writes it without key sorting
(`_emit.dump_document`), so the same policies always give the same bytes. A comment header above each document
says where it came from: the observed window, the flows behind each rule, and anything the flavour cannot express (a Kubernetes NetworkPolicy has no FQDN,
L7, ICMP, deny or entity rules: such parts are left out and named in the header, never dropped silently).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flowpipe.policy._emit import dump_document, exact_document
from flowpipe.policy.model import (
    ANY_PEER,
    NAMESPACE_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    LabelExpression,
    LabelSelector,
    Peer,
    Policy,
    Port,
    PortRule,
    Rule,
)

KUBERNETES_API = "networking.k8s.io/v1"
CILIUM_API = "cilium.io/v2"
NAMESPACE_LABELS_KEY = "k8s:io.cilium.k8s.namespace.labels."
WORLD_CIDRS = ("0.0.0.0/0", "::/0")


def render_yaml(policies: Iterable[Policy], *, window: tuple[datetime, datetime] | None = None) -> str:
    """All policies as one multi-document YAML stream, each with its comment header.

    >>> print(render_yaml([Policy("deny", "shop", "kubernetes", isolates=("ingress",))]))   # doctest: +SKIP
    """
    return "---\n".join(render_policy(p, window=window) for p in policies)


@dataclass(frozen=True, slots=True)
class Rendered:
    """One policy as `render_policy` writes it (`text`), the document in it, and what its flavour could not
    express (`notes`, as `unexpressed` gives them)."""

    text: str
    document: dict[str, Any]
    notes: tuple[str, ...]
    exact: bool
    """True when the document was written by the fast path (`_emit.exact_document`): the text is comment lines
    (`comment_block`) and that path's output, which reads back as `document` itself. False: PyYAML wrote it,
    and only parsing the text says what it holds."""


def render_policy(policy: Policy, *, window: tuple[datetime, datetime] | None = None) -> str:
    """One policy as a YAML document preceded by its provenance comment header."""
    return render_parts(policy, window=window).text


def render_parts(policy: Policy, *, window: tuple[datetime, datetime] | None = None) -> Rendered:
    """One policy rendered once: its text (`render_policy`), document and notes (`unexpressed`)."""
    document, notes, provenance = _build(policy)
    header = _header(policy, notes, provenance, window)
    body = exact_document(document)
    exact = body is not None
    if body is None:
        body = dump_document(document)
    return Rendered(header + body, document, tuple(notes), exact)


def policy_document(policy: Policy) -> dict[str, Any]:
    """The Kubernetes object for `policy` as a dict (what `render_policy` writes)."""
    return _build(policy)[0]


def unexpressed(policy: Policy) -> list[str]:
    """What the policy's flavour cannot express and was left out of its document."""
    return _build(policy)[1]


def _build(policy: Policy) -> tuple[dict[str, Any], list[str], list[tuple[str, int]]]:
    notes: list[str] = []
    provenance: list[tuple[str, int]] = []
    metadata: dict[str, Any] = {"name": policy.name}
    if policy.namespace is not None:
        metadata["namespace"] = policy.namespace
    if policy.labels:
        metadata["labels"] = dict(policy.labels)
    if policy.flavour == "kubernetes":
        spec = _kubernetes_spec(policy, notes, provenance)
        api = KUBERNETES_API
    else:
        spec = _cilium_spec(policy, notes, provenance)
        api = CILIUM_API
    return {"apiVersion": api, "kind": policy.kind, "metadata": metadata, "spec": spec}, notes, provenance


def _header(
    policy: Policy,
    notes: Sequence[str],
    provenance: Sequence[tuple[str, int]],
    window: tuple[datetime, datetime] | None,
) -> str:
    lines = [f"{policy.kind} {policy.key}"]
    if window is not None:
        start, end = (t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in window)
        lines.append(f"drafted by flowpipe from flows observed {start} .. {end}")
    if provenance:
        lines.append("flows behind each rule:")
        lines.extend(f"  {rule_id}: {flows} flows" for rule_id, flows in provenance)
    lines.extend(f"note: {c}" for c in policy.comments)
    lines.extend(f"not expressible here: {n}" for n in notes)
    return comment_block(lines)


def printable(text: str) -> str:
    """`text` on one line: line breaks and other control characters escaped (`\\n`), as text from flows
    (names, labels) must never end a comment or start a YAML document."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def comment_block(lines: Iterable[str]) -> str:
    """YAML comment lines (`# ...`), each escaped with `printable`."""
    return "".join(f"# {printable(line)}\n" for line in lines)


# -- selectors ----------------------------------------------------------------------------------------------


def _selector(selector: LabelSelector | None, *, strip_source: bool = False) -> dict[str, Any]:
    if selector is None:
        return {}
    out: dict[str, Any] = {}
    if selector.match_labels:
        out["matchLabels"] = {(_strip(k) if strip_source else k): v for k, v in selector.match_labels}
    if selector.match_expressions:
        out["matchExpressions"] = [_expression(e, strip_source) for e in selector.match_expressions]
    return out


def _expression(expr: LabelExpression, strip_source: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"key": _strip(expr.key) if strip_source else expr.key, "operator": expr.operator}
    if expr.values:
        out["values"] = list(expr.values)
    return out


def _strip(key: str) -> str:
    return key.removeprefix("k8s:")


def _cilium_endpoint(peer: Peer) -> dict[str, Any]:
    """An endpoints peer as a Cilium selector: the namespace goes into the selector as a label."""
    labels = dict(peer.selector.match_labels) if peer.selector else {}
    expressions = list(peer.selector.match_expressions) if peer.selector else []
    ns_sel = peer.namespace_selector
    if ns_sel is not None:
        if peer.namespace_name is not None:
            labels[POD_NAMESPACE_LABEL] = peer.namespace_name
        else:
            # Any namespace carrying these labels: without a namespace requirement Cilium would scope the
            # selector to the policy's own namespace.
            labels.update({NAMESPACE_LABELS_KEY + k: v for k, v in ns_sel.match_labels})
            expressions.extend(
                LabelExpression(NAMESPACE_LABELS_KEY + e.key, e.operator, e.values)
                for e in ns_sel.match_expressions
            )
            expressions.append(LabelExpression(POD_NAMESPACE_LABEL, "Exists"))
    return _selector(LabelSelector(tuple(labels.items()), tuple(expressions)))


def _kubernetes_endpoint(peer: Peer, notes: list[str]) -> dict[str, Any] | None:
    """An endpoints peer as a NetworkPolicy peer (podSelector + namespaceSelector)."""
    pods = peer.selector
    namespaces = peer.namespace_selector
    if pods is not None:
        # A Cilium-style selector may name the namespace with a label; Kubernetes says it with a namespaceSelector.
        ns_labels = [
            (k, v) for k, v in pods.match_labels if k in (POD_NAMESPACE_LABEL, "io.kubernetes.pod.namespace")
        ]
        if any(e.key.endswith("io.kubernetes.pod.namespace") for e in pods.match_expressions) or any(
            k.startswith(("reserved:", "$")) for k in pods.keys
        ):
            notes.append("an endpoint selector with reserved labels or namespace expressions")
            return None
        if ns_labels:
            namespaces = LabelSelector.of({NAMESPACE_NAME_LABEL: ns_labels[0][1]})
            pods = LabelSelector(
                tuple(kv for kv in pods.match_labels if kv not in ns_labels), pods.match_expressions
            )
    out: dict[str, Any] = {}
    if pods is not None:
        out["podSelector"] = _selector(pods, strip_source=True)
    if namespaces is not None:
        out["namespaceSelector"] = _selector(namespaces, strip_source=True)
    if not out:
        out["podSelector"] = {}
    return out


# -- Kubernetes NetworkPolicy -------------------------------------------------------------------------------


def _kubernetes_spec(policy: Policy, notes: list[str], provenance: list[tuple[str, int]]) -> dict[str, Any]:
    if policy.namespace is None:
        raise ValueError(f"NetworkPolicy {policy.name} needs a namespace")
    sections: dict[str, list[dict[str, Any]]] = {"ingress": [], "egress": []}
    for rule in policy.rules:
        if rule.action == "deny":
            notes.append(f"{rule.section} rule (NetworkPolicy has no deny rules)")
            continue
        entry = _kubernetes_rule(rule, notes)
        if entry is None:
            continue
        if rule.flows is not None:
            provenance.append((f"{rule.direction}[{len(sections[rule.direction])}]", rule.flows))
        sections[rule.direction].append(entry)
    types = [d for d in ("ingress", "egress") if d in policy.isolates or sections[d]]
    spec: dict[str, Any] = {"podSelector": _selector(policy.selector, strip_source=True)}
    spec["policyTypes"] = [d.capitalize() for d in types]
    for direction in ("ingress", "egress"):
        if sections[direction]:
            spec[direction] = sections[direction]
    return spec


def _kubernetes_rule(rule: Rule, notes: list[str]) -> dict[str, Any] | None:
    peers_key = "from" if rule.direction == "ingress" else "to"
    what = f"{rule.direction} rule"
    if rule.allows_nothing:
        return None  # isolation only: policyTypes already says it
    peers: list[dict[str, Any]] = []
    any_peer = ANY_PEER in rule.peers
    if not any_peer:
        for peer in rule.peers:
            converted = _kubernetes_peers(peer, notes, what)
            peers.extend(converted)
        if not peers:
            notes.append(f"{what} left out: none of its peers can be written as a NetworkPolicy peer")
            return None
    ports: list[dict[str, Any]] = []
    all_ports = not rule.ports or any(not pr.ports and not pr.has_l7 for pr in rule.ports)
    if not all_ports:
        for port_rule in rule.ports:
            if port_rule.has_l7:
                notes.append(f"L7 rules of {what} (written as plain L4 ports)")
            for port in port_rule.ports:
                ports.extend(_kubernetes_ports(port, notes, what))
        if not ports:
            notes.append(f"{what} left out: its ports (ICMP) cannot be written in a NetworkPolicy")
            return None
    entry: dict[str, Any] = {}
    if peers:
        entry[peers_key] = peers
    if ports:
        entry["ports"] = ports
    return entry


def _kubernetes_peers(peer: Peer, notes: list[str], what: str) -> list[dict[str, Any]]:
    if peer.kind == "endpoints":
        converted = _kubernetes_endpoint(peer, notes)
        return [converted] if converted is not None else []
    if peer.kind == "cidr":
        block: dict[str, Any] = {"cidr": peer.cidr}
        if peer.except_cidrs:
            block["except"] = list(peer.except_cidrs)
        return [{"ipBlock": block}]
    if peer.kind == "entity" and peer.entity == "world":
        return [{"ipBlock": {"cidr": cidr}} for cidr in WORLD_CIDRS]
    if peer.kind == "fqdn" and peer.fqdn is not None:
        name = peer.fqdn.match_name or peer.fqdn.match_pattern
        notes.append(f"FQDN peer {name} of {what}")
        return []
    notes.append(f"entity peer {peer.entity} of {what}")
    return []


def _kubernetes_ports(port: Port, notes: list[str], what: str) -> list[dict[str, Any]]:
    if port.is_icmp:
        notes.append(f"{port.protocol} type {port.port} of {what}")
        return []
    protocols = ("TCP", "UDP", "SCTP") if port.protocol == "ANY" else (port.protocol,)
    if any(p not in ("TCP", "UDP", "SCTP") for p in protocols):
        notes.append(f"protocol {port.protocol} of {what}")
        return []
    out = []
    for protocol in protocols:
        entry: dict[str, Any] = {"protocol": protocol}
        if port.port is not None:
            entry["port"] = port.port
            if port.end_port is not None and isinstance(port.port, int) and port.end_port > port.port:
                entry["endPort"] = port.end_port
        out.append(entry)
    return out


# -- Cilium -------------------------------------------------------------------------------------------------


def _cilium_spec(policy: Policy, notes: list[str], provenance: list[tuple[str, int]]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if policy.description:
        spec["description"] = policy.description
    if policy.node_selector is not None:
        spec["nodeSelector"] = _selector(policy.node_selector)
    else:
        spec["endpointSelector"] = _selector(policy.selector)
    sections: dict[str, list[dict[str, Any]]] = {
        "ingress": [],
        "ingressDeny": [],
        "egress": [],
        "egressDeny": [],
    }
    for rule in policy.rules:
        if rule.flows is not None:
            provenance.append((f"{rule.section}[{len(sections[rule.section])}]", rule.flows))
        sections[rule.section].append(_cilium_rule(rule))
    for direction in ("ingress", "egress"):
        # A direction the policy isolates without any rule gets Cilium's idiomatic empty rule: deny all.
        if direction in policy.isolates and not sections[direction] and not sections[direction + "Deny"]:
            sections[direction].append({})
    derived = [d for d in ("ingress", "egress") if sections[d] or sections[d + "Deny"]]
    if derived != [d for d in ("ingress", "egress") if d in policy.isolates]:
        spec["enableDefaultDeny"] = {d: d in policy.isolates for d in ("ingress", "egress")}
    for name, entries in sections.items():
        if entries:
            spec[name] = entries
    if not any(sections.values()):
        spec["ingress"] = []  # the schema wants at least one rule list
    return spec


def _cilium_rule(rule: Rule) -> dict[str, Any]:
    ingress = rule.direction == "ingress"
    prefix = "from" if ingress else "to"
    entry: dict[str, Any] = {}
    if rule.allows_nothing:
        return entry
    all_ports = not rule.ports or any(not pr.ports and not pr.has_l7 for pr in rule.ports)
    any_peer = ANY_PEER in rule.peers
    if any_peer:
        if all_ports:
            entry[prefix + "Entities"] = ["all"]
    else:
        endpoints = [_cilium_endpoint(p) for p in rule.peers if p.kind == "endpoints"]
        entities = [p.entity for p in rule.peers if p.kind == "entity"]
        cidrs = [p for p in rule.peers if p.kind == "cidr"]
        fqdns = [p.fqdn for p in rule.peers if p.kind == "fqdn" and p.fqdn is not None]
        if endpoints:
            entry[prefix + "Endpoints"] = endpoints
        if entities:
            entry[prefix + "Entities"] = entities
        if cidrs and all(not c.except_cidrs for c in cidrs):
            entry[prefix + "CIDR"] = [c.cidr for c in cidrs]
        elif cidrs:
            entry[prefix + "CIDRSet"] = [
                {"cidr": c.cidr, **({"except": list(c.except_cidrs)} if c.except_cidrs else {})}
                for c in cidrs
            ]
        if fqdns and not ingress:
            entry["toFQDNs"] = [
                {"matchName": f.match_name} if f.match_name is not None else {"matchPattern": f.match_pattern}
                for f in fqdns
            ]
    if not all_ports:
        to_ports = [
            _cilium_port_rule(pr) for pr in rule.ports if any(not p.is_icmp for p in pr.ports) or not pr.ports
        ]
        icmps = [p for pr in rule.ports for p in pr.ports if p.is_icmp]
        if to_ports:
            entry["toPorts"] = to_ports
        if icmps:
            entry["icmps"] = [
                {
                    "fields": [
                        {"type": p.port, "family": "IPv4" if p.protocol == "ICMP" else "IPv6"} for p in icmps
                    ]
                }
            ]
    return entry


def _cilium_port_rule(port_rule: PortRule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ports = [p for p in port_rule.ports if not p.is_icmp]
    if ports:
        out["ports"] = [_cilium_port(p) for p in ports]
    rules: dict[str, Any] = {}
    if port_rule.http:
        rules["http"] = [
            {
                k: v
                for k, v in (
                    ("method", r.method),
                    ("path", r.path),
                    ("host", r.host),
                    ("headers", list(r.headers)),
                )
                if v
            }
            for r in port_rule.http
        ]
    if port_rule.kafka:
        rules["kafka"] = [
            {
                k: v
                for k, v in (
                    ("role", r.role),
                    ("apiKey", r.api_key),
                    ("topic", r.topic),
                    ("clientID", r.client_id),
                )
                if v
            }
            for r in port_rule.kafka
        ]
    if port_rule.dns:
        rules["dns"] = [
            {"matchName": d.match_name} if d.match_name is not None else {"matchPattern": d.match_pattern}
            for d in port_rule.dns
        ]
    if rules:
        out["rules"] = rules
    return out


def _cilium_port(port: Port) -> dict[str, Any]:
    out: dict[str, Any] = {"port": str(port.port if port.port is not None else 0), "protocol": port.protocol}
    if port.end_port is not None and isinstance(port.port, int) and port.end_port > port.port:
        out["endPort"] = port.end_port
    return out

"""Cilium policy documents (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy) → Policy objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowpipe.policy import _fields as f
from flowpipe.policy._fields import PORT_NAME, Where
from flowpipe.policy.model import (
    ANY_PEER,
    ENTITIES,
    FQDNSelector,
    HTTPRule,
    KafkaRule,
    Peer,
    Policy,
    PolicyOrigin,
    Port,
    PortRule,
    Rule,
)

CILIUM_PROTOCOLS = ("TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY")
UNEVALUATED = ("toServices", "toGroups", "fromGroups", "toNodes", "fromNodes", "toRequires", "fromRequires")
"""Rule fields replay cannot judge from flows: kept out of the peers and named in the policy's comments."""


def parse_cilium(doc: dict[str, Any], where: Where, prefix: str, *, clusterwide: bool) -> list[Policy]:
    """The policies of one Cilium document: one per entry of `spec` and `specs`."""
    name, namespace, labels = f.metadata(doc, where, prefix, namespaced=not clusterwide)
    specs: list[tuple[int | None, Any]] = []
    if doc.get("spec") is not None:
        specs.append((None, doc["spec"]))
    specs.extend((i, s) for i, s in enumerate(f.list_field(doc, "specs", where, prefix)))
    if not specs:
        where.fail(prefix + "spec", "missing field (spec or specs)")
    return [
        _cilium_spec(
            spec,
            where,
            prefix + (f"specs[{i}]" if i is not None else "spec"),
            name,
            namespace,
            labels,
            i,
            clusterwide,
        )
        for i, spec in specs
    ]


def _cilium_spec(
    spec: Any,
    where: Where,
    at: str,
    name: str,
    namespace: str | None,
    labels: tuple[tuple[str, str], ...],
    spec_index: int | None,
    clusterwide: bool,
) -> Policy:
    if not isinstance(spec, dict):
        where.fail(at, "expected a mapping")
    if "endpointSelector" not in spec and "nodeSelector" not in spec:
        where.fail(at + ".endpointSelector", "missing field (or nodeSelector for a host policy)")
    selector = f.selector(spec.get("endpointSelector"), where, at + ".endpointSelector")
    node_selector = (
        f.selector(spec["nodeSelector"], where, at + ".nodeSelector") if "nodeSelector" in spec else None
    )
    notes: list[str] = []
    rules: list[Rule] = []
    for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
        direction = "ingress" if section.startswith("ingress") else "egress"
        action = "deny" if section.endswith("Deny") else "allow"
        for i, entry in enumerate(f.list_field(spec, section, where, at + ".")):
            rules.append(_cilium_rule(entry, where, f"{at}.{section}[{i}]", direction, action, notes))
    default_deny = f.mapping(spec, "enableDefaultDeny", where, at + ".enableDefaultDeny") or {}
    isolates = []
    for direction in ("ingress", "egress"):
        has_rules = bool(spec.get(direction) or spec.get(direction + "Deny"))
        flag = default_deny.get(direction)
        if flag is not None and not isinstance(flag, bool):
            where.fail(f"{at}.enableDefaultDeny.{direction}", "expected true or false")
        if has_rules if flag is None else flag:
            isolates.append(direction)
    if node_selector is not None:
        notes.append("host policy (nodeSelector): selects nodes, which replay does not evaluate")
    description = spec.get("description")
    return Policy(
        name=name,
        namespace=namespace,
        flavour="cilium",
        selector=selector,
        rules=tuple(rules),
        isolates=tuple(isolates),  # type: ignore[arg-type]
        clusterwide=clusterwide,
        node_selector=node_selector,
        description=description if isinstance(description, str) else None,
        labels=labels,
        comments=tuple(notes),
        origin=PolicyOrigin(where.path, where.index),
        spec_index=spec_index,
    )


_L3_KEYS = {
    "ingress": ("fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet"),
    "egress": ("toEndpoints", "toEntities", "toCIDR", "toCIDRSet", "toFQDNs"),
}


_KNOWN = {
    direction: frozenset(keys)
    | {"toPorts", "icmps", "authentication"}
    | {k for k in UNEVALUATED if k.startswith("from" if direction == "ingress" else "to")}
    for direction, keys in _L3_KEYS.items()
}
"""The fields a rule of each direction may have."""


def _cilium_rule(entry: Any, where: Where, at: str, direction: str, action: str, notes: list[str]) -> Rule:
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        where.fail(at, "expected a mapping")
    unknown = entry.keys() - _KNOWN[direction]
    if unknown:
        where.fail(at, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    has_l3 = False
    peers: list[Peer] = []
    for key in _L3_KEYS[direction]:
        if key not in entry:
            continue
        has_l3 = True
        items = f.list_field(entry, key, where, at + ".")
        for j, item in enumerate(items):
            field = f"{at}.{key}[{j}]"
            if key.endswith("Endpoints"):
                peers.append(Peer("endpoints", selector=f.selector(item, where, field)))
            elif key.endswith("Entities"):
                if item not in ENTITIES:
                    where.fail(field, f"unknown entity {item!r} (one of {', '.join(ENTITIES)})")
                peers.append(Peer.entity_peer(item))
            elif key.endswith("CIDR"):
                peers.append(Peer.cidr_peer(f.cidr(item, where, field)))
            elif key.endswith("CIDRSet"):
                if not isinstance(item, dict):
                    where.fail(field, "expected a mapping with cidr and except")
                if "cidr" not in item:
                    notes.append(f"{at.rsplit('.', 1)[-1]}: CIDR groups are not evaluated")
                    continue
                excepts = [
                    f.cidr(c, where, f"{field}.except[{k}]")
                    for k, c in enumerate(f.list_field(item, "except", where, field + "."))
                ]
                peers.append(Peer.cidr_peer(f.cidr(item.get("cidr"), where, field + ".cidr"), excepts))
            else:
                peers.append(_fqdn_peer(item, where, field))
    for key in UNEVALUATED:
        if key in entry:
            has_l3 = has_l3 or not key.endswith("Requires")
            notes.append(f"{at.rsplit('.', 1)[-1]}: {key} is not evaluated")
    ports = [
        _cilium_port_rule(p, where, f"{at}.toPorts[{j}]", action, notes)
        for j, p in enumerate(f.list_field(entry, "toPorts", where, at + "."))
    ]
    icmp_ports = _icmp_ports(entry, where, at)
    if icmp_ports:
        ports.append(PortRule(ports=tuple(icmp_ports)))
    if not has_l3 and not peers:
        # No L3 part: with ports the rule applies to every peer; without, it allows nothing (default deny).
        peers = [ANY_PEER] if (ports or "toPorts" in entry or "icmps" in entry) else []
    return Rule(
        direction=direction,  # type: ignore[arg-type]
        peers=tuple(peers),
        ports=tuple(ports),
        action=action,  # type: ignore[arg-type]
    )


def _fqdn_peer(item: Any, where: Where, field: str) -> Peer:
    if not isinstance(item, dict) or not ({"matchName", "matchPattern"} & set(item)):
        where.fail(field, "expected matchName or matchPattern")
    name, pattern = item.get("matchName"), item.get("matchPattern")
    for key, value in (("matchName", name), ("matchPattern", pattern)):
        if value is not None and not isinstance(value, str):
            where.fail(f"{field}.{key}", "expected a string")
    return Peer.fqdn_peer(name=name, pattern=pattern if name is None else None)


def _cilium_port_rule(value: Any, where: Where, at: str, action: str, notes: list[str]) -> PortRule:
    if not isinstance(value, dict):
        where.fail(at, "expected a mapping with ports and rules")
    ports: list[Port] = []
    for i, port in enumerate(f.list_field(value, "ports", where, at + ".")):
        field = f"{at}.ports[{i}]"
        if not isinstance(port, dict):
            where.fail(field, "expected a mapping with port / protocol / endPort")
        protocol = port.get("protocol") or "ANY"
        if protocol not in CILIUM_PROTOCOLS:
            where.fail(field + ".protocol", f"{protocol!r} is not one of {', '.join(CILIUM_PROTOCOLS)}")
        raw = port.get("port")
        number: int | str | None
        if raw is None:
            number = None
        elif isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
            number = int(raw)
            if not 0 <= number <= 65535:
                where.fail(field + ".port", f"{raw!r} is not a port number (0-65535)")
            number = number or None
        elif isinstance(raw, str) and PORT_NAME.match(raw):
            number = raw
        else:
            where.fail(field + ".port", f"{raw!r} is neither a port number nor a port name")
        end_port = port.get("endPort")
        if end_port is not None and not isinstance(end_port, int):
            where.fail(field + ".endPort", "expected a number")
        ports.append(Port(port=number, protocol=protocol, end_port=end_port or None))
    if value.get("rules") is None:  # L4 only
        return PortRule(ports=tuple(ports))
    rules = f.mapping(value, "rules", where, at + ".rules") or {}
    if rules and action == "deny":
        where.fail(at + ".rules", "deny rules cannot have L7 rules")
    http = tuple(
        _http_rule(r, where, f"{at}.rules.http[{i}]", notes)
        for i, r in enumerate(f.list_field(rules, "http", where, at + ".rules."))
    )
    kafka = tuple(
        _kafka_rule(r, where, f"{at}.rules.kafka[{i}]")
        for i, r in enumerate(f.list_field(rules, "kafka", where, at + ".rules."))
    )
    dns = tuple(
        _fqdn_peer(r, where, f"{at}.rules.dns[{i}]").fqdn or FQDNSelector()
        for i, r in enumerate(f.list_field(rules, "dns", where, at + ".rules."))
    )
    if "l7" in rules or "l7proto" in rules:
        notes.append(f"{at}: generic L7 rules (l7proto) are not evaluated")
    return PortRule(ports=tuple(ports), http=http, kafka=kafka, dns=dns)


def _http_rule(value: Any, where: Where, at: str, notes: list[str]) -> HTTPRule:
    if not isinstance(value, dict):
        where.fail(at, "expected a mapping with method / path / host / headers")
    headers = value.get("headers") or []
    if headers or value.get("headerMatches"):
        notes.append(f"{at}: HTTP header rules are not evaluated (flows do not carry headers)")
    return HTTPRule(
        method=f.regex(value.get("method"), where, at + ".method"),
        path=f.regex(value.get("path"), where, at + ".path"),
        host=f.regex(value.get("host"), where, at + ".host"),
        headers=tuple(str(h) for h in headers),
    )


def _kafka_rule(value: Any, where: Where, at: str) -> KafkaRule:
    if not isinstance(value, dict):
        where.fail(at, "expected a mapping with role / apiKey / topic")
    role = value.get("role")
    if role is not None and str(role).lower() not in ("produce", "consume"):
        where.fail(at + ".role", f"{role!r} is not produce or consume")
    if role is not None and value.get("apiKey") is not None:
        where.fail(at, "role and apiKey cannot both be set")
    return KafkaRule(
        role=str(role).lower() if role is not None else None,
        api_key=value.get("apiKey"),
        topic=value.get("topic"),
        client_id=value.get("clientID"),
    )


def _icmp_ports(entry: dict[str, Any], where: Where, at: str) -> Sequence[Port]:
    ports: list[Port] = []
    for i, icmp in enumerate(f.list_field(entry, "icmps", where, at + ".")):
        field = f"{at}.icmps[{i}]"
        if not isinstance(icmp, dict):
            where.fail(field, "expected a mapping with fields")
        for j, item in enumerate(f.list_field(icmp, "fields", where, field + ".")):
            if not isinstance(item, dict) or not isinstance(item.get("type"), (int, str)):
                where.fail(f"{field}.fields[{j}]", "expected a mapping with type (and family)")
            family = item.get("family", "IPv4")
            if family not in ("IPv4", "IPv6"):
                where.fail(f"{field}.fields[{j}].family", f"{family!r} is not IPv4 or IPv6")
            ports.append(Port(port=item["type"], protocol="ICMP" if family == "IPv4" else "ICMPv6"))
    return ports

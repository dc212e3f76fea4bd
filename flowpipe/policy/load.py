"""YAML → Policy objects for replay and audit: files, folders, multi-document streams, `List` objects.

Understood kinds: `NetworkPolicy` (networking.k8s.io/v1), `CiliumNetworkPolicy` and
`CiliumClusterwideNetworkPolicy` (cilium.io/v2, with `spec` or `specs`). Anything else, invalid YAML and
invalid fields raise `PolicyParseError` naming the file, the document (1-based in the message) and the field,
so a typo never silently changes what a replay or audit says. Empty documents are skipped.

A namespaced policy without `metadata.namespace` is taken to live in `default`, where `kubectl apply` would
put it without `-n`. Parts that flowpipe cannot evaluate from flows (Cilium `toServices`, `toGroups`,
`fromNodes`, `*Requires`, CIDR groups, HTTP header rules) are kept out of the rule's peers and noted in the
policy's `comments`, so replay and audit can say so.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from flowpipe.errors import PolicyParseError
from flowpipe.policy.model import (
    ANY_PEER,
    ENTITIES,
    FQDNSelector,
    HTTPRule,
    KafkaRule,
    LabelExpression,
    LabelSelector,
    Peer,
    Policy,
    PolicyOrigin,
    Port,
    PortRule,
    Rule,
)

POLICY_SUFFIXES = (".yaml", ".yml", ".json")
KUBERNETES_API = "networking.k8s.io/v1"
CILIUM_API = "cilium.io/v2"
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
_CILIUM_PROTOCOLS = ("TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY")
_K8S_PROTOCOLS = ("TCP", "UDP", "SCTP")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", re.IGNORECASE)
_UNEVALUATED = ("toServices", "toGroups", "fromGroups", "toNodes", "fromNodes", "toRequires", "fromRequires")


def load_policies(paths: Iterable[str | Path]) -> list[Policy]:
    """Every policy in the given files and folders (folders: their `*.yaml`, `*.yml`, `*.json`, recursively).

    >>> load_policies(["policies/"])            # doctest: +SKIP
    [Policy(name='allow-web', namespace='shop', flavour='kubernetes', ...), ...]
    """
    policies: list[Policy] = []
    for file in policy_files(paths):
        policies.extend(load_file(file))
    return policies


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """The policy files named by `paths`, folders expanded in sorted order; a missing path is an error."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in POLICY_SUFFIXES and not p.name.startswith(".")
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise PolicyParseError("no such file or folder", path=str(path))
    return files


def load_file(path: str | Path) -> list[Policy]:
    """The policies of one YAML file (any number of documents)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyParseError(f"cannot read: {exc}", path=str(path)) from exc
    return parse_policies(text, path=str(path))


def parse_policies(text: str, *, path: str = "<string>") -> list[Policy]:
    """The policies in a YAML stream; `path` is used in error messages."""
    policies: list[Policy] = []
    for index, document in _documents(text, path):
        if document is None:
            continue
        policies.extend(_parse_document(document, _Where(path, index)))
    return policies


def _documents(text: str, path: str) -> Iterator[tuple[int, Any]]:
    index = 0
    loader = yaml.safe_load_all(text)
    while True:
        try:
            document = next(loader)
        except StopIteration:
            return
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PolicyParseError(f"invalid YAML{line}: {problem}", path=path, document_index=index) from exc
        yield index, document
        index += 1


class _Where:
    """The file and document being parsed, for error messages."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index

    def fail(self, field: str, message: str) -> NoReturn:
        raise PolicyParseError(
            f"{field}: {message}" if field else message, path=self.path, document_index=self.index
        )


def _parse_document(doc: Any, where: _Where, prefix: str = "") -> list[Policy]:
    if not isinstance(doc, dict):
        where.fail(prefix, f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        where.fail(prefix + "kind", "missing field (expected NetworkPolicy, CiliumNetworkPolicy, ...)")
    if kind == "List" or kind.endswith("List") and "items" in doc:
        items = _list(doc, "items", where, prefix)
        policies: list[Policy] = []
        for i, item in enumerate(items):
            policies.extend(_parse_document(item, where, f"{prefix}items[{i}]."))
        return policies
    api = doc.get("apiVersion")
    if kind == "NetworkPolicy":
        _check_api(api, KUBERNETES_API, where, prefix)
        return [_parse_kubernetes(doc, where, prefix)]
    if kind in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
        _check_api(api, CILIUM_API, where, prefix)
        return _parse_cilium(doc, where, prefix, clusterwide=kind == "CiliumClusterwideNetworkPolicy")
    where.fail(
        prefix + "kind",
        f"unknown kind {kind!r}: flowpipe reads NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy",
    )


def _check_api(api: Any, expected: str, where: _Where, prefix: str) -> None:
    if api != expected:
        where.fail(prefix + "apiVersion", f"expected {expected!r}, got {api!r}")


def _metadata(
    doc: dict[str, Any], where: _Where, prefix: str, *, namespaced: bool
) -> tuple[str, str | None, Any]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        where.fail(prefix + "metadata", "missing field (a mapping with at least `name`)")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        where.fail(prefix + "metadata.name", "missing field")
    namespace = meta.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        where.fail(prefix + "metadata.namespace", "must be a string")
    if not namespaced:
        namespace = None
    elif namespace is None:
        namespace = "default"
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        where.fail(prefix + "metadata.labels", "must be a mapping")
    return name, namespace, tuple((str(k), str(v)) for k, v in labels.items())


# -- generic field readers ----------------------------------------------------------------------------------


def _mapping(
    obj: dict[str, Any], key: str, where: _Where, field: str, *, required: bool = False
) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        if required:
            where.fail(field, "missing field")
        return None
    if not isinstance(value, dict):
        where.fail(field, f"expected a mapping, got {type(value).__name__}")
    return value


def _list(obj: dict[str, Any], key: str, where: _Where, prefix: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        where.fail(prefix + key, f"expected a list, got {type(value).__name__}")
    return value


def _string_list(obj: dict[str, Any], key: str, where: _Where, prefix: str) -> list[str]:
    values = _list(obj, key, where, prefix)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            where.fail(f"{prefix}{key}[{i}]", f"expected a string, got {value!r}")
    return values


def _selector(value: Any, where: _Where, field: str) -> LabelSelector:
    if value is None:
        return LabelSelector()
    if not isinstance(value, dict):
        where.fail(field, f"expected a label selector (matchLabels / matchExpressions), got {value!r}")
    unknown = set(value) - {"matchLabels", "matchExpressions"}
    if unknown:
        where.fail(field, f"unknown selector field(s) {', '.join(sorted(map(str, unknown)))}")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, dict):
        where.fail(field + ".matchLabels", "expected a mapping")
    for key, val in labels.items():
        if not isinstance(val, str):
            where.fail(f"{field}.matchLabels.{key}", f"label values are strings; quote {val!r}")
    expressions = []
    for i, expr in enumerate(value.get("matchExpressions") or []):
        at = f"{field}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str):
            where.fail(at, "expected a mapping with `key`, `operator` and `values`")
        operator = expr.get("operator")
        if operator not in _OPERATORS:
            where.fail(at + ".operator", f"{operator!r} is not one of {', '.join(_OPERATORS)}")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            where.fail(at + ".values", "expected a list of strings")
        if operator in ("In", "NotIn") and not values:
            where.fail(at + ".values", f"operator {operator} needs at least one value")
        expressions.append(LabelExpression(expr["key"], operator, tuple(values)))
    return LabelSelector(tuple((str(k), v) for k, v in labels.items()), tuple(expressions))


def _cidr(value: Any, where: _Where, field: str) -> str:
    if not isinstance(value, str):
        where.fail(field, f"expected a CIDR string, got {value!r}")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        where.fail(field, f"{value!r} is not a CIDR")
    return value


def _regex(value: Any, where: _Where, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        where.fail(field, f"expected a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        where.fail(field, f"invalid regular expression {value!r}: {exc}")
    return value


# -- Kubernetes NetworkPolicy -------------------------------------------------------------------------------


def _parse_kubernetes(doc: dict[str, Any], where: _Where, prefix: str) -> Policy:
    name, namespace, labels = _metadata(doc, where, prefix, namespaced=True)
    spec = _mapping(doc, "spec", where, prefix + "spec", required=True)
    assert spec is not None
    if "podSelector" not in spec:
        where.fail(prefix + "spec.podSelector", "missing field (use {} to select every pod of the namespace)")
    selector = _selector(spec.get("podSelector"), where, prefix + "spec.podSelector")
    rules: list[Rule] = []
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, entry in enumerate(_list(spec, direction, where, prefix + "spec.")):
            at = f"{prefix}spec.{direction}[{i}]"
            if entry is None:
                entry = {}
            if not isinstance(entry, dict):
                where.fail(at, "expected a mapping")
            peers = tuple(
                _k8s_peer(p, where, f"{at}.{peers_key}[{j}]")
                for j, p in enumerate(_list(entry, peers_key, where, at + "."))
            )
            ports = tuple(
                _k8s_port(p, where, f"{at}.ports[{j}]")
                for j, p in enumerate(_list(entry, "ports", where, at + "."))
            )
            rules.append(
                Rule(
                    direction=direction,  # type: ignore[arg-type]
                    peers=peers or (ANY_PEER,),
                    ports=(PortRule(ports=ports),) if ports else (),
                )
            )
    types = spec.get("policyTypes")
    isolates: tuple[str, ...]
    if types is None:
        isolates = ("ingress", "egress") if spec.get("egress") is not None else ("ingress",)
    else:
        if not isinstance(types, list) or any(t not in ("Ingress", "Egress") for t in types):
            where.fail(prefix + "spec.policyTypes", f"expected a list of Ingress / Egress, got {types!r}")
        isolates = tuple(d for d in ("ingress", "egress") if d.capitalize() in types)
    return Policy(
        name=name,
        namespace=namespace,
        flavour="kubernetes",
        selector=selector,
        rules=tuple(rules),
        isolates=isolates,  # type: ignore[arg-type]
        labels=labels,
        origin=PolicyOrigin(where.path, where.index),
    )


def _k8s_peer(value: Any, where: _Where, field: str) -> Peer:
    if not isinstance(value, dict) or not value:
        where.fail(field, "expected a peer with podSelector, namespaceSelector or ipBlock")
    unknown = set(value) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        where.fail(field, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "ipBlock" in value:
        if len(value) > 1:
            where.fail(field, "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = _mapping(value, "ipBlock", where, field + ".ipBlock", required=True)
        assert block is not None
        cidr = _cidr(block.get("cidr"), where, field + ".ipBlock.cidr")
        excepts = [
            _cidr(c, where, f"{field}.ipBlock.except[{i}]")
            for i, c in enumerate(_list(block, "except", where, field + ".ipBlock."))
        ]
        return Peer.cidr_peer(cidr, excepts)
    pods = _selector(value["podSelector"], where, field + ".podSelector") if "podSelector" in value else None
    namespaces = (
        _selector(value["namespaceSelector"], where, field + ".namespaceSelector")
        if "namespaceSelector" in value
        else None
    )
    return Peer("endpoints", selector=pods, namespace_selector=namespaces)


def _k8s_port(value: Any, where: _Where, field: str) -> Port:
    if not isinstance(value, dict):
        where.fail(field, "expected a mapping with port / protocol / endPort")
    protocol = value.get("protocol", "TCP")
    if protocol not in _K8S_PROTOCOLS:
        where.fail(field + ".protocol", f"{protocol!r} is not one of {', '.join(_K8S_PROTOCOLS)}")
    port = value.get("port")
    if (
        port is not None
        and not (isinstance(port, int) and 1 <= port <= 65535)
        and not (isinstance(port, str) and _PORT_NAME.match(port))
    ):
        where.fail(field + ".port", f"{port!r} is neither a port number (1-65535) nor a port name")
    end_port = value.get("endPort")
    if end_port is not None and (
        not isinstance(end_port, int) or not isinstance(port, int) or end_port < port
    ):
        where.fail(field + ".endPort", "needs a numeric port and must not be below it")
    return Port(port=port, protocol=protocol, end_port=end_port)


# -- Cilium -------------------------------------------------------------------------------------------------


def _parse_cilium(doc: dict[str, Any], where: _Where, prefix: str, *, clusterwide: bool) -> list[Policy]:
    name, namespace, labels = _metadata(doc, where, prefix, namespaced=not clusterwide)
    specs: list[tuple[int | None, Any]] = []
    if doc.get("spec") is not None:
        specs.append((None, doc["spec"]))
    specs.extend((i, s) for i, s in enumerate(_list(doc, "specs", where, prefix)))
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
    where: _Where,
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
    selector = _selector(spec.get("endpointSelector"), where, at + ".endpointSelector")
    node_selector = (
        _selector(spec["nodeSelector"], where, at + ".nodeSelector") if "nodeSelector" in spec else None
    )
    notes: list[str] = []
    rules: list[Rule] = []
    for section in ("ingress", "ingressDeny", "egress", "egressDeny"):
        direction = "ingress" if section.startswith("ingress") else "egress"
        action = "deny" if section.endswith("Deny") else "allow"
        for i, entry in enumerate(_list(spec, section, where, at + ".")):
            rules.append(_cilium_rule(entry, where, f"{at}.{section}[{i}]", direction, action, notes))
    default_deny = _mapping(spec, "enableDefaultDeny", where, at + ".enableDefaultDeny") or {}
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


def _cilium_rule(entry: Any, where: _Where, at: str, direction: str, action: str, notes: list[str]) -> Rule:
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        where.fail(at, "expected a mapping")
    known = (
        set(_L3_KEYS[direction])
        | {"toPorts", "icmps", "authentication"}
        | {k for k in _UNEVALUATED if k.startswith("from" if direction == "ingress" else "to")}
    )
    unknown = set(entry) - known
    if unknown:
        where.fail(at, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    has_l3 = False
    peers: list[Peer] = []
    for key in _L3_KEYS[direction]:
        if key not in entry:
            continue
        has_l3 = True
        items = _list(entry, key, where, at + ".")
        for j, item in enumerate(items):
            field = f"{at}.{key}[{j}]"
            if key.endswith("Endpoints"):
                peers.append(Peer("endpoints", selector=_selector(item, where, field)))
            elif key.endswith("Entities"):
                if item not in ENTITIES:
                    where.fail(field, f"unknown entity {item!r} (one of {', '.join(ENTITIES)})")
                peers.append(Peer.entity_peer(item))
            elif key.endswith("CIDR"):
                peers.append(Peer.cidr_peer(_cidr(item, where, field)))
            elif key.endswith("CIDRSet"):
                if not isinstance(item, dict):
                    where.fail(field, "expected a mapping with cidr and except")
                if "cidr" not in item:
                    notes.append(f"{at.rsplit('.', 1)[-1]}: CIDR groups are not evaluated")
                    continue
                excepts = [
                    _cidr(c, where, f"{field}.except[{k}]")
                    for k, c in enumerate(_list(item, "except", where, field + "."))
                ]
                peers.append(Peer.cidr_peer(_cidr(item.get("cidr"), where, field + ".cidr"), excepts))
            else:
                peers.append(_fqdn_peer(item, where, field))
    for key in _UNEVALUATED:
        if key in entry:
            has_l3 = has_l3 or not key.endswith("Requires")
            notes.append(f"{at.rsplit('.', 1)[-1]}: {key} is not evaluated")
    ports = [
        _cilium_port_rule(p, where, f"{at}.toPorts[{j}]", action, notes)
        for j, p in enumerate(_list(entry, "toPorts", where, at + "."))
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


def _fqdn_peer(item: Any, where: _Where, field: str) -> Peer:
    if not isinstance(item, dict) or not ({"matchName", "matchPattern"} & set(item)):
        where.fail(field, "expected matchName or matchPattern")
    name, pattern = item.get("matchName"), item.get("matchPattern")
    for key, value in (("matchName", name), ("matchPattern", pattern)):
        if value is not None and not isinstance(value, str):
            where.fail(f"{field}.{key}", "expected a string")
    return Peer.fqdn_peer(name=name, pattern=pattern if name is None else None)


def _cilium_port_rule(value: Any, where: _Where, at: str, action: str, notes: list[str]) -> PortRule:
    if not isinstance(value, dict):
        where.fail(at, "expected a mapping with ports and rules")
    ports: list[Port] = []
    for i, port in enumerate(_list(value, "ports", where, at + ".")):
        field = f"{at}.ports[{i}]"
        if not isinstance(port, dict):
            where.fail(field, "expected a mapping with port / protocol / endPort")
        protocol = port.get("protocol") or "ANY"
        if protocol not in _CILIUM_PROTOCOLS:
            where.fail(field + ".protocol", f"{protocol!r} is not one of {', '.join(_CILIUM_PROTOCOLS)}")
        raw = port.get("port")
        number: int | str | None
        if raw is None:
            number = None
        elif isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()):
            number = int(raw)
            if not 0 <= number <= 65535:
                where.fail(field + ".port", f"{raw!r} is not a port number (0-65535)")
            number = number or None
        elif isinstance(raw, str) and _PORT_NAME.match(raw):
            number = raw
        else:
            where.fail(field + ".port", f"{raw!r} is neither a port number nor a port name")
        end_port = port.get("endPort")
        if end_port is not None and not isinstance(end_port, int):
            where.fail(field + ".endPort", "expected a number")
        ports.append(Port(port=number, protocol=protocol, end_port=end_port or None))
    rules = _mapping(value, "rules", where, at + ".rules") or {}
    if rules and action == "deny":
        where.fail(at + ".rules", "deny rules cannot have L7 rules")
    http = tuple(
        _http_rule(r, where, f"{at}.rules.http[{i}]", notes)
        for i, r in enumerate(_list(rules, "http", where, at + ".rules."))
    )
    kafka = tuple(
        _kafka_rule(r, where, f"{at}.rules.kafka[{i}]")
        for i, r in enumerate(_list(rules, "kafka", where, at + ".rules."))
    )
    dns = tuple(
        _fqdn_peer(r, where, f"{at}.rules.dns[{i}]").fqdn or FQDNSelector()
        for i, r in enumerate(_list(rules, "dns", where, at + ".rules."))
    )
    if "l7" in rules or "l7proto" in rules:
        notes.append(f"{at}: generic L7 rules (l7proto) are not evaluated")
    return PortRule(ports=tuple(ports), http=http, kafka=kafka, dns=dns)


def _http_rule(value: Any, where: _Where, at: str, notes: list[str]) -> HTTPRule:
    if not isinstance(value, dict):
        where.fail(at, "expected a mapping with method / path / host / headers")
    headers = value.get("headers") or []
    if headers or value.get("headerMatches"):
        notes.append(f"{at}: HTTP header rules are not evaluated (flows do not carry headers)")
    return HTTPRule(
        method=_regex(value.get("method"), where, at + ".method"),
        path=_regex(value.get("path"), where, at + ".path"),
        host=_regex(value.get("host"), where, at + ".host"),
        headers=tuple(str(h) for h in headers),
    )


def _kafka_rule(value: Any, where: _Where, at: str) -> KafkaRule:
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


def _icmp_ports(entry: dict[str, Any], where: _Where, at: str) -> Sequence[Port]:
    ports: list[Port] = []
    for i, icmp in enumerate(_list(entry, "icmps", where, at + ".")):
        field = f"{at}.icmps[{i}]"
        if not isinstance(icmp, dict):
            where.fail(field, "expected a mapping with fields")
        for j, item in enumerate(_list(icmp, "fields", where, field + ".")):
            if not isinstance(item, dict) or not isinstance(item.get("type"), (int, str)):
                where.fail(f"{field}.fields[{j}]", "expected a mapping with type (and family)")
            family = item.get("family", "IPv4")
            if family not in ("IPv4", "IPv6"):
                where.fail(f"{field}.fields[{j}].family", f"{family!r} is not IPv4 or IPv6")
            ports.append(Port(port=item["type"], protocol="ICMP" if family == "IPv4" else "ICMPv6"))
    return ports

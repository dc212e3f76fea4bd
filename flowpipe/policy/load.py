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

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from flowpipe.errors import PolicyParseError
from flowpipe.policy import _fields as f
from flowpipe.policy._cilium_yaml import parse_cilium
from flowpipe.policy._fields import PORT_NAME, Where
from flowpipe.policy.model import ANY_PEER, Peer, Policy, PolicyOrigin, Port, PortRule, Rule

POLICY_SUFFIXES = (".yaml", ".yml", ".json")
KUBERNETES_API = "networking.k8s.io/v1"
CILIUM_API = "cilium.io/v2"
K8S_PROTOCOLS = ("TCP", "UDP", "SCTP")
_CLoader = getattr(yaml, "CSafeLoader", None)
"""PyYAML's safe loader on libyaml (several times faster than the pure-Python one), when PyYAML was built with it."""


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
    return policies_of(_stream(text, path), path=path)


def policies_of(documents: Iterable[tuple[int, Any]], *, path: str = "<string>") -> list[Policy]:
    """The policies of a stream's documents as (index, document) pairs (`load_documents`, empty ones skipped)."""
    policies: list[Policy] = []
    for index, document in documents:
        if document is None:
            continue
        policies.extend(_parse_document(document, Where(path, index)))
    return policies


def load_documents(text: str, *, path: str = "<string>") -> list[Any]:
    """Every document of a YAML stream (None for an empty one), read with PyYAML's C parser (libyaml).

    A stream the C parser refuses is read again with the pure-Python one, whose error (`PolicyParseError` with
    line, column and document) is the one raised, so messages do not depend on which parser is installed.
    """
    return [document for _, document in _stream(text, path)]


def _stream(text: str, path: str) -> Iterable[tuple[int, Any]]:
    if _CLoader is not None:
        try:
            return list(enumerate(yaml.load_all(text, Loader=_CLoader)))
        except yaml.YAMLError:
            pass  # read again, lazily, by the parser whose messages users get: the documents before it count
    return _documents(text, path)


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


def _parse_document(doc: Any, where: Where, prefix: str = "") -> list[Policy]:
    if not isinstance(doc, dict):
        where.fail(prefix, f"expected a mapping (a Kubernetes object), got {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        where.fail(prefix + "kind", "missing field (expected NetworkPolicy, CiliumNetworkPolicy, ...)")
    if kind == "List" or kind.endswith("List") and "items" in doc:
        items = f.list_field(doc, "items", where, prefix)
        policies: list[Policy] = []
        for i, item in enumerate(items):
            policies.extend(_parse_document(item, where, f"{prefix}items[{i}]."))
        return policies
    api = doc.get("apiVersion")
    if kind == "NetworkPolicy":
        f.check_api(api, KUBERNETES_API, where, prefix)
        return [_parse_kubernetes(doc, where, prefix)]
    if kind in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
        f.check_api(api, CILIUM_API, where, prefix)
        return parse_cilium(doc, where, prefix, clusterwide=kind == "CiliumClusterwideNetworkPolicy")
    where.fail(
        prefix + "kind",
        f"unknown kind {kind!r}: flowpipe reads NetworkPolicy, CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy",
    )


# -- Kubernetes NetworkPolicy -------------------------------------------------------------------------------


def _parse_kubernetes(doc: dict[str, Any], where: Where, prefix: str) -> Policy:
    name, namespace, labels = f.metadata(doc, where, prefix, namespaced=True)
    spec = f.mapping(doc, "spec", where, prefix + "spec", required=True)
    assert spec is not None
    if "podSelector" not in spec:
        where.fail(prefix + "spec.podSelector", "missing field (use {} to select every pod of the namespace)")
    selector = f.selector(spec.get("podSelector"), where, prefix + "spec.podSelector")
    rules: list[Rule] = []
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for i, entry in enumerate(f.list_field(spec, direction, where, prefix + "spec.")):
            at = f"{prefix}spec.{direction}[{i}]"
            if entry is None:
                entry = {}
            if not isinstance(entry, dict):
                where.fail(at, "expected a mapping")
            peers = tuple(
                _k8s_peer(p, where, f"{at}.{peers_key}[{j}]")
                for j, p in enumerate(f.list_field(entry, peers_key, where, at + "."))
            )
            ports = tuple(
                _k8s_port(p, where, f"{at}.ports[{j}]")
                for j, p in enumerate(f.list_field(entry, "ports", where, at + "."))
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


def _k8s_peer(value: Any, where: Where, field: str) -> Peer:
    if not isinstance(value, dict) or not value:
        where.fail(field, "expected a peer with podSelector, namespaceSelector or ipBlock")
    unknown = set(value) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        where.fail(field, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "ipBlock" in value:
        if len(value) > 1:
            where.fail(field, "ipBlock cannot be combined with podSelector or namespaceSelector")
        block = f.mapping(value, "ipBlock", where, field + ".ipBlock", required=True)
        assert block is not None
        cidr = f.cidr(block.get("cidr"), where, field + ".ipBlock.cidr")
        excepts = [
            f.cidr(c, where, f"{field}.ipBlock.except[{i}]")
            for i, c in enumerate(f.list_field(block, "except", where, field + ".ipBlock."))
        ]
        return Peer.cidr_peer(cidr, excepts)
    pods = f.selector(value["podSelector"], where, field + ".podSelector") if "podSelector" in value else None
    namespaces = (
        f.selector(value["namespaceSelector"], where, field + ".namespaceSelector")
        if "namespaceSelector" in value
        else None
    )
    return Peer("endpoints", selector=pods, namespace_selector=namespaces)


def _k8s_port(value: Any, where: Where, field: str) -> Port:
    if not isinstance(value, dict):
        where.fail(field, "expected a mapping with port / protocol / endPort")
    protocol = value.get("protocol", "TCP")
    if protocol not in K8S_PROTOCOLS:
        where.fail(field + ".protocol", f"{protocol!r} is not one of {', '.join(K8S_PROTOCOLS)}")
    port = value.get("port")
    if (
        port is not None
        and not (isinstance(port, int) and 1 <= port <= 65535)
        and not (isinstance(port, str) and PORT_NAME.match(port))
    ):
        where.fail(field + ".port", f"{port!r} is neither a port number (1-65535) nor a port name")
    end_port = value.get("endPort")
    if end_port is not None and (
        not isinstance(end_port, int) or not isinstance(port, int) or end_port < port
    ):
        where.fail(field + ".endPort", "needs a numeric port and must not be below it")
    return Port(port=port, protocol=protocol, end_port=end_port)

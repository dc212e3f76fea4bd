"""Istio `AuthorizationPolicy` drafts from observed edges: who may call each workload, by service account.

For clusters that enforce mutual TLS with Istio, a workload's callers are known by their service account, which
Cilium reports as the pod label `io.cilium.k8s.policy.serviceaccount`. Each drafted workload gets one ALLOW
policy (`security.istio.io/v1`) named `flowpipe-<workload>`, selecting it by the same stable labels as the
Cilium and Kubernetes drafts:

- one rule per caller: `from.source.principals: [cluster.local/ns/<ns>/sa/<sa>]` for a pod (its namespace when
  it has no service account label), `ipBlocks` for a node or other reserved endpoint with an address, no `from`
  at all for the world (anyone may connect, as the world already did);
- `to.operation.ports` with the observed TCP ports; with `l7`, HTTP calls add one operation per method with its
  `paths`. Istio matches paths exactly, by prefix (`/v1/items/*`) or by suffix, without the query string: a
  segment that held several ids becomes a prefix match at that segment, which may allow deeper paths too (said
  in the policy's header).
- Each namespace also gets `flowpipe-default-deny`, an ALLOW policy without rules: every workload in it refuses
  what no other policy allows.

What Istio cannot express is said in the header and the notes, never dropped silently: egress (the world, DNS
names, DNS itself), UDP, SCTP and ICMP (the proxy only sees TCP), and Kafka calls (allowed at L4).

`unallowed_requests` evaluates the drafts against the requests they were built from with Istio's rules (a
request is allowed when no policy selects its destination, or some rule of a selecting ALLOW policy matches
every field it sets), so a draft is only offered when it allows them all.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import yaml

from flowpipe.policy._l7 import ID_SEGMENT
from flowpipe.policy._match import parse_label
from flowpipe.policy.draft import policy_name, workload_selectors
from flowpipe.policy.model import LabelSelector
from flowpipe.policy.render import _Dumper

ISTIO_API = "security.istio.io/v1"
KIND = "AuthorizationPolicy"
TRUST_DOMAIN = "cluster.local"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
DEFAULT_DENY_NAME = "flowpipe-default-deny"


@dataclass(frozen=True, slots=True)
class IstioPolicy:
    """One AuthorizationPolicy document, with the flows behind each rule and header comments."""

    name: str
    namespace: str
    document: dict[str, Any]
    rule_flows: tuple[int, ...] = ()
    comments: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """`<namespace>/<name>`."""
        return f"{self.namespace}/{self.name}"


@dataclass(slots=True)
class IstioDraft:
    """Drafted AuthorizationPolicies in output order, and notes for the summary."""

    policies: list[IstioPolicy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Caller:
    flows: int = 0
    ports: set[int] = field(default_factory=set)
    http: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set))


def principal(namespace: str, labels: Iterable[str], trust_domain: str = TRUST_DOMAIN) -> str | None:
    """The mTLS identity of a pod from its Cilium labels: `<trust domain>/ns/<ns>/sa/<service account>`."""
    for label in labels:
        source, key, value = parse_label(label)
        if source in ("k8s", "unspec") and key == SERVICE_ACCOUNT_LABEL and value:
            return f"{trust_domain}/ns/{namespace}/sa/{value}"
    return None


def draft_authorization_policies(
    edges: pa.Table | Iterable[Mapping[str, Any]],
    *,
    namespaces: Sequence[str] | None = None,
    l7: bool = False,
    include_kube_system: bool = False,
    default_deny: bool = True,
    trust_domain: str = TRUST_DOMAIN,
) -> IstioDraft:
    """Draft one ALLOW AuthorizationPolicy per called workload of the drafted namespaces (see the module doc)."""
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    selectors = workload_selectors(rows)
    observed = {ns for ns, _ in selectors}
    drafted = (
        set(namespaces)
        if namespaces
        else {ns for ns in observed if ns != "kube-system" or include_kube_system}
    )
    draft = IstioDraft()
    callers: dict[tuple[str, str], dict[tuple[str, str], _Caller]] = defaultdict(dict)
    comments: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        namespace, workload = row.get("destination_namespace"), row.get("destination_workload")
        if row.get("source_namespace") in drafted and row.get("source_entity") is None:
            _note_egress(row, draft.notes)
        if row.get("destination_entity") is not None or namespace not in drafted or workload is None:
            continue
        key = (str(namespace), str(workload))
        protocol = row.get("l4_protocol")
        if protocol != "TCP":
            note = f"{protocol or 'unknown'} traffic to {namespace}/{workload} bypasses the Istio proxy"
            comments[key].add(note)
            draft.notes.append(note)
            continue
        source = _source(row, trust_domain, comments[key], draft.notes)
        caller = callers[key].setdefault(source, _Caller())
        caller.flows += int(row.get("flows") or 0)
        port = int(row.get("destination_port") or 0)
        caller.ports.add(port)
        kind = row.get("l7_protocol")
        if l7 and kind == "http" and row.get("http_method") and row.get("http_path"):
            caller.http[(port, str(row["http_method"]))].add(str(row["http_path"]).split("?", 1)[0] or "/")
        elif l7 and kind == "kafka":
            note = f"Kafka calls to {namespace}/{workload} are allowed at L4 (Istio has no Kafka rules)"
            comments[key].add(note)
            draft.notes.append(note)
    for namespace in sorted(drafted & (observed | set(namespaces or ()))):
        if default_deny:
            draft.policies.append(_default_deny(namespace))
        for (ns, workload), by_source in sorted(callers.items()):
            if ns != namespace:
                continue
            selector = selectors.get((ns, workload))
            if selector is None:
                draft.notes.append(f"{ns}/{workload}: no stable labels to select it by; no policy drafted")
                continue
            draft.policies.append(_policy(ns, workload, selector, by_source, comments[(ns, workload)]))
    draft.notes = sorted(set(draft.notes))
    return draft


def _note_egress(row: Mapping[str, Any], notes: list[str]) -> None:
    entity = row.get("destination_entity")
    if entity is not None:
        names = ", ".join(row.get("destination_names") or ()) or row.get("destination_ip") or entity
        notes.append(
            f"egress to {entity} ({names}) is not expressed: an AuthorizationPolicy controls who may call a "
            "workload; use the Cilium or Kubernetes draft for egress"
        )


def _source(
    row: Mapping[str, Any], trust_domain: str, comments: set[str], notes: list[str]
) -> tuple[str, str]:
    """The caller as (kind, value): ("principal", ...), ("namespace", ...), ("ip", ...) or ("any", "")."""
    entity = row.get("source_entity")
    if entity is None and row.get("source_namespace") is not None:
        namespace = str(row["source_namespace"])
        found = principal(namespace, row.get("source_labels") or (), trust_domain)
        if found is not None:
            return ("principal", found)
        note = (
            f"{namespace}/{row.get('source_workload')} has no service account label: allowed by its namespace"
        )
        comments.add(note)
        notes.append(note)
        return ("namespace", namespace)
    if entity in (None, "world"):
        return ("any", "")
    try:
        address = ipaddress.ip_address(row.get("source_ip") or "")
    except ValueError:
        return ("any", "")
    return ("ip", f"{address}/{address.max_prefixlen}")


def _default_deny(namespace: str) -> IstioPolicy:
    document = {"apiVersion": ISTIO_API, "kind": KIND, "metadata": {"name": DEFAULT_DENY_NAME, "namespace": namespace},
                "spec": {}}  # fmt: skip
    comment = "an ALLOW policy without rules: workloads of the namespace refuse what no other policy allows"
    return IstioPolicy(DEFAULT_DENY_NAME, namespace, document, comments=(comment,))


def _policy(
    namespace: str, workload: str, selector: LabelSelector, by_source: Mapping[tuple[str, str], _Caller],
    comments: set[str],
) -> IstioPolicy:  # fmt: skip
    rules: list[dict[str, Any]] = []
    flows: list[int] = []
    notes = set(comments)
    order = {"principal": 0, "namespace": 1, "ip": 2, "any": 3}
    for (kind, value), caller in sorted(by_source.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        operations: list[dict[str, Any]] = []
        http_ports = {port for port, _ in caller.http}
        plain = sorted(caller.ports - http_ports)
        if plain:
            operations.append({"ports": [str(p) for p in plain]})
        for (port, method), paths in sorted(caller.http.items()):
            matched, broadened = istio_paths(paths)
            if broadened:
                notes.add(
                    f"paths {', '.join(broadened)} on port {port} match deeper paths too (Istio has no regex)"
                )
            operations.append({"ports": [str(port)], "methods": [method], "paths": matched})
        rule: dict[str, Any] = {}
        if kind == "principal":
            rule["from"] = [{"source": {"principals": [value]}}]
        elif kind == "namespace":
            rule["from"] = [{"source": {"namespaces": [value]}}]
        elif kind == "ip":
            rule["from"] = [{"source": {"ipBlocks": [value]}}]
        rule["to"] = [{"operation": op} for op in operations]
        rules.append(rule)
        flows.append(caller.flows)
    name = policy_name(workload)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(_strip(selector))},
        "action": "ALLOW",
        "rules": rules,
    }
    document = {"apiVersion": ISTIO_API, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
                "spec": spec}  # fmt: skip
    return IstioPolicy(name, namespace, document, tuple(flows), tuple(sorted(notes)))


def _strip(selector: LabelSelector) -> list[tuple[str, str]]:
    return [(key.removeprefix("k8s:"), value) for key, value in selector.match_labels]


def istio_paths(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Istio `paths` for observed request paths: exact, or a prefix match where ids varied.

    >>> istio_paths(["/items/1", "/items/2", "/health"])
    (['/health', '/items/*'], [])

    An id-like segment (number, UUID, hash, long token) seen with several values cuts the path there into a
    prefix match `<before>/*`. Returns the paths, and those prefixes that cut before the last segment (they
    also allow deeper paths than any seen).
    """
    groups: dict[tuple[str | None, ...], list[list[str]]] = defaultdict(list)
    for path in paths:
        segments = path.split("/")
        groups[tuple(None if ID_SEGMENT.match(s) else s for s in segments)].append(segments)
    out: set[str] = set()
    broadened: set[str] = set()
    for template, seen in groups.items():
        varied = [
            i for i, literal in enumerate(template) if literal is None and len({s[i] for s in seen}) > 1
        ]
        if not varied:
            out.update("/".join(s) for s in seen)
            continue
        cut = varied[0]
        prefix = "/".join(seen[0][:cut]) + "/*"
        out.add(prefix)
        if cut < len(template) - 1:
            broadened.add(prefix)
    return sorted(out), sorted(broadened)


# -- rendering ----------------------------------------------------------------------------------------------


def render_istio(policies: Iterable[IstioPolicy], *, window: tuple[datetime, datetime] | None = None) -> str:
    """The policies as one multi-document YAML stream, each with a comment header (window, flows per rule)."""
    return "---\n".join(_render(p, window) for p in policies)


def _render(policy: IstioPolicy, window: tuple[datetime, datetime] | None) -> str:
    lines = [f"{KIND} {policy.key}"]
    if window is not None:
        start, end = (t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in window)
        lines.append(f"drafted by flowpipe from flows observed {start} .. {end}")
    if policy.rule_flows:
        lines.append("flows behind each rule:")
        lines.extend(f"  rules[{i}]: {flows} flows" for i, flows in enumerate(policy.rule_flows))
    lines.extend(f"note: {c}" for c in policy.comments)
    header = "".join(f"# {line}\n" for line in lines)
    body = yaml.dump(policy.document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return header + str(body)


# -- evaluation ---------------------------------------------------------------------------------------------


def unallowed_requests(
    policies: Sequence[IstioPolicy], requests: Iterable[Mapping[str, Any]], trust_domain: str = TRUST_DOMAIN
) -> list[Mapping[str, Any]]:
    """The observed-edge rows (requests) that the AuthorizationPolicies would refuse, with Istio's semantics.

    Only TCP requests to pods are judged (the proxy sees nothing else). A policy selects a pod when its
    namespace matches and its `selector` labels are among the pod's (no selector: every pod). An ALLOW policy
    without rules allows nothing. A rule matches when one of its `from` sources and one of its `to` operations
    match (a missing list matches anything); HTTP fields (methods, paths) are not judged for L4 rows, which
    stand for the connection that carries the HTTP requests judged one by one.
    """
    refused = []
    for row in requests:
        namespace = row.get("destination_namespace")
        if row.get("destination_entity") is not None or namespace is None or row.get("l4_protocol") != "TCP":
            continue
        pod = {
            (key, value)
            for source, key, value in (parse_label(x) for x in row.get("destination_labels") or ())
            if source in ("k8s", "unspec")
        }
        selecting = [p for p in policies if p.namespace == namespace and _selects(p.document, pod)]
        if selecting and not any(_allows(p.document, row, trust_domain) for p in selecting):
            refused.append(row)
    return refused


def _selects(document: Mapping[str, Any], pod: set[tuple[str, str]]) -> bool:
    labels = (document.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    return all((key, value) in pod for key, value in labels.items())


def _allows(document: Mapping[str, Any], row: Mapping[str, Any], trust_domain: str) -> bool:
    spec = document.get("spec") or {}
    if spec.get("action", "ALLOW") != "ALLOW":
        return False
    for rule in spec.get("rules") or ():
        sources = [s.get("source") or {} for s in rule.get("from") or ()]
        operations = [o.get("operation") or {} for o in rule.get("to") or ()]
        if (not sources or any(_source_matches(s, row, trust_domain) for s in sources)) and (
            not operations or any(_operation_matches(o, row) for o in operations)
        ):
            return True
    return False


def _source_matches(source: Mapping[str, Any], row: Mapping[str, Any], trust_domain: str) -> bool:
    namespace = row.get("source_namespace") if row.get("source_entity") is None else None
    if "principals" in source:
        caller = principal(namespace, row.get("source_labels") or (), trust_domain) if namespace else None
        if caller is None or not any(_string_matches(p, caller) for p in source["principals"]):
            return False
    if "namespaces" in source and (namespace is None or namespace not in source["namespaces"]):
        return False
    if "ipBlocks" in source:
        try:
            address = ipaddress.ip_address(row.get("source_ip") or "")
        except ValueError:
            return False
        if not any(address in ipaddress.ip_network(block, strict=False) for block in source["ipBlocks"]):
            return False
    return True


def _operation_matches(operation: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    if "ports" in operation and str(row.get("destination_port")) not in operation["ports"]:
        return False
    if row.get("l7_protocol") != "http":
        return True
    if "methods" in operation and row.get("http_method") not in operation["methods"]:
        return False
    path = str(row.get("http_path") or "/").split("?", 1)[0]
    return "paths" not in operation or any(_string_matches(p, path) for p in operation["paths"])


def _string_matches(pattern: str, value: str) -> bool:
    """Istio string matching: exact, `prefix*`, `*suffix`, or `*` (any non-empty value)."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern

"""Istio `AuthorizationPolicy` drafts from observed edges: who may call each workload, by service account.

For clusters that enforce mutual TLS with Istio, a workload's callers are known by their service account, which
Cilium reports as the pod label `io.cilium.k8s.policy.serviceaccount`. Each drafted workload gets one ALLOW
policy (`security.istio.io/v1`) named `flowpipe-<workload>`, selecting it by the same stable labels as the
Cilium and Kubernetes drafts:

- one rule per caller: `from.source.principals: [cluster.local/ns/<ns>/sa/<sa>]` for a pod (its namespace when
  it has no service account label), `ipBlocks` for a node or other reserved endpoint with an address, no `from`
  at all for the world (anyone may connect, as the world already did). A pod is a pod wherever Hubble saw it:
  one reported with a node address but its own labels (traffic through Cilium's L7 proxy) is named by the
  service account and namespace in those labels, never opened to everyone. A pod whose namespace is unknown
  cannot be named: its requests are left out and listed, not allowed by an open rule.
- `to.operation.ports` with the observed TCP ports; with `l7`, HTTP calls add one operation per method with its
  `paths`, as the sidecar matches them (`flowpipe.policy._istio_paths`): normalised first, exact where they can
  be, ids that varied as the one-segment template `{*}` (Istio 1.22 and later; for older Istio, prefixes that
  are wider than the traffic, said in the header and the summary).
- Each namespace also gets `flowpipe-default-deny`, an ALLOW policy without rules: every workload in it refuses
  what no other policy allows.

What Istio cannot express is said in the header and the notes, never dropped silently: egress (the world, DNS
names, DNS itself), UDP, SCTP and ICMP (the proxy only sees TCP), and Kafka calls (allowed at L4). Calls to the
sidecar's own ports (15020, 15021, 15090: probes, health and metrics) never reach AuthorizationPolicies and get
no rule. `ASSUMPTIONS` are what every draft relies on (probes, scrapers and ingress outside the mesh).

`unallowed_requests` evaluates the drafts against the requests they were built from with Istio's rules (a
request is allowed when no policy selects its destination, or some rule of a selecting ALLOW policy matches
every field it sets; paths are normalised and matched as the sidecar does; a policy istiod would refuse is not
applied), so a draft is only offered when it allows them all.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa

from flowpipe.policy._emit import dump_document
from flowpipe.policy._istio_paths import (
    draft_paths,
    istiod_refuses,
    normalize_path,
    path_matches,
    string_matches,
    supports_templates,
)
from flowpipe.policy._match import parse_label
from flowpipe.policy.draft import policy_name, workload_selectors
from flowpipe.policy.model import LabelSelector

ISTIO_API = "security.istio.io/v1"
KIND = "AuthorizationPolicy"
TRUST_DOMAIN = "cluster.local"
SERVICE_ACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SIDECAR_LABEL = ("security.istio.io/tlsMode", "istio")
"""The label Istio's injector gives every pod with a sidecar (Hubble reports it among the pod's labels)."""
DEFAULT_DENY_NAME = "flowpipe-default-deny"
DEFAULT_ISTIO_VERSION = "1.22"
"""The oldest Istio the drafts are written for by default: the first with path templates (`{*}`)."""
SIDECAR_PORTS = {15020: "the agent's probes and merged metrics", 15021: "health", 15090: "Envoy metrics"}
"""Ports the sidecar serves itself: traffic to them never reaches AuthorizationPolicies."""
ASSUMPTIONS = (
    (
        "kubelet probes are rewritten by default to the sidecar's agent (port 15020; 15021 is the sidecar's own "
        "health), which calls the application from inside the pod: these rules do not cover them; with probe "
        'rewriting off (sidecar.istio.io/rewriteAppHTTPProbers: "false") they come from the node without a '
        "principal and are refused"
    ),
    (
        "a Prometheus outside the mesh has no principal: principal rules refuse its scrapes of application "
        "ports (scrape the metrics Istio merges on 15020, or give Prometheus a sidecar)"
    ),
    (
        "an ingress controller without a sidecar has no principal: its calls are refused unless a rule names "
        "its address; use an Istio ingress gateway or inject the controller"
    ),
    (
        "paths are matched after Istio's default path normalisation (BASE); MERGE_SLASHES or "
        "DECODE_AND_MERGE_SLASHES change which requests the paths match"
    ),
)
"""What every Istio draft relies on, said in the summary."""


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
    """Drafted AuthorizationPolicies in output order, notes for the summary, and the requests left out."""

    policies: list[IstioPolicy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_out: dict[int, str] = field(default_factory=dict)
    """Index of an edge row the drafts cannot allow → why (named in the summary, not proved)."""
    wider: list[str] = field(default_factory=list)
    """Paths that allow more than the traffic seen, as `<namespace>/<policy>: <entry> ...`."""


@dataclass(slots=True)
class _Caller:
    flows: int = 0
    ports: set[int] = field(default_factory=set)
    http: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set))


def principal(namespace: str | None, labels: Iterable[str], trust_domain: str = TRUST_DOMAIN) -> str | None:
    """The mTLS identity of a pod from its Cilium labels: `<trust domain>/ns/<ns>/sa/<service account>`.

    The namespace is the pod's namespace label where the labels hold one (Hubble may report a pod's labels
    without its namespace), else `namespace`.
    """
    account = None
    for label in labels:
        source, key, value = parse_label(label)
        if source not in ("k8s", "unspec") or not value:
            continue
        if key == SERVICE_ACCOUNT_LABEL:
            account = value
        elif key == NAMESPACE_LABEL:
            namespace = value
    return f"{trust_domain}/ns/{namespace}/sa/{account}" if account and namespace else None


def pod_namespace(row: Mapping[str, Any], side: str) -> str | None:
    """The namespace of a pod end of an edge row: its namespace, else its namespace label; None for an end
    that is not a pod, or a pod whose namespace Hubble did not report."""
    labels = row.get(f"{side}_labels") or ()
    from_labels = next(
        (v for s, k, v in (parse_label(x) for x in labels) if s == "k8s" and k == NAMESPACE_LABEL and v), None
    )
    if row.get(f"{side}_entity") is not None and from_labels is None:
        return None
    return row.get(f"{side}_namespace") or from_labels


def draft_authorization_policies(
    edges: pa.Table | Iterable[Mapping[str, Any]],
    *,
    namespaces: Sequence[str] | None = None,
    l7: bool = False,
    include_kube_system: bool = False,
    default_deny: bool = True,
    trust_domain: str = TRUST_DOMAIN,
    istio_version: str = DEFAULT_ISTIO_VERSION,
) -> IstioDraft:
    """Draft one ALLOW AuthorizationPolicy per called workload of the drafted namespaces (see the module doc).

    `istio_version` is the oldest Istio the drafts must suit: from 1.22 on, ids in paths become `{*}`.
    """
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    templates = supports_templates(istio_version)
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
    outside: dict[str, set[str]] = {"source": set(), "destination": set()}
    for index, row in enumerate(rows):
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
        port = int(row.get("destination_port") or 0)
        if port in SIDECAR_PORTS:
            note = (f"calls to {namespace}/{workload} on port {port} ({SIDECAR_PORTS[port]}) are served by the "
                    "sidecar itself and never reach AuthorizationPolicies: no rule drafted")  # fmt: skip
            comments[key].add(note)
            draft.notes.append(note)
            continue
        source = _source(row, trust_domain, comments[key], draft.notes)
        if source is None:
            draft.left_out[index] = (
                "the caller is a pod whose namespace Hubble did not report (no namespace, no labels): "
                "no principal or namespace to allow it by"
            )
            continue
        for side, named in (("source", source[0] == "principal"), ("destination", True)):
            if named and not _has_sidecar(row.get(f"{side}_labels") or ()):
                outside[side].add(f"{pod_namespace(row, side)}/{row.get(f'{side}_workload')}")
        caller = callers[key].setdefault(source, _Caller())
        caller.flows += int(row.get("flows") or 0)
        caller.ports.add(port)
        kind = row.get("l7_protocol")
        if l7 and kind == "http" and row.get("http_method") and row.get("http_path"):
            path = str(row["http_path"]).split("?", 1)[0] or "/"
            if normalize_path(path) is None:
                draft.left_out[index] = f"the sidecar refuses the path {path} (%00) whatever the policy"
                continue
            caller.http[(port, str(row["http_method"]))].add(path)
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
            policy, wider, path_notes = _policy(ns, workload, selector, by_source, comments[(ns, workload)],
                                                templates)  # fmt: skip
            draft.policies.append(policy)
            draft.wider += [f"{policy.key}: {w}" for w in wider]
            draft.notes += [f"{policy.key}: {n}" for n in path_notes]
    if outside["source"]:
        draft.notes.append(
            f"callers without Istio's sidecar label ({'='.join(SIDECAR_LABEL)}) in the flows: "
            f"{_some(outside['source'])}: without a sidecar they have no principal, and these rules refuse them"
        )
    if outside["destination"]:
        draft.notes.append(
            f"workloads without Istio's sidecar label ({'='.join(SIDECAR_LABEL)}) in the flows: "
            f"{_some(outside['destination'])}: their sidecar enforces AuthorizationPolicies, so without one these "
            "drafts change nothing for them"
        )
    draft.notes = sorted(set(draft.notes))
    return draft


def _has_sidecar(labels: Iterable[str]) -> bool:
    return any(parse_label(label)[1:] == SIDECAR_LABEL for label in labels)


def _some(names: set[str], most: int = 6) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:most]) + (f" and {len(ordered) - most} more" if len(ordered) > most else "")


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
) -> tuple[str, str] | None:
    """The caller as (kind, value): ("principal", ...), ("namespace", ...), ("ip", ...) or ("any", "");
    None for a pod that cannot be named (its namespace is unknown)."""
    entity = row.get("source_entity")
    namespace = pod_namespace(row, "source")
    if namespace is not None:
        found = principal(namespace, row.get("source_labels") or (), trust_domain)
        if found is not None:
            return ("principal", found)
        note = (
            f"{namespace}/{row.get('source_workload')} has no service account label: allowed by its namespace"
        )
        comments.add(note)
        notes.append(note)
        return ("namespace", namespace)
    if entity is None:
        return None
    if entity == "world":
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
    comments: set[str], templates: bool,
) -> tuple[IstioPolicy, list[str], list[str]]:  # fmt: skip
    """The workload's policy, its `paths` entries that allow more than the traffic seen, and notes on paths."""
    rules: list[dict[str, Any]] = []
    flows: list[int] = []
    notes = set(comments)
    wider: set[str] = set()
    path_notes: set[str] = set()
    order = {"principal": 0, "namespace": 1, "ip": 2, "any": 3}
    for (kind, value), caller in sorted(by_source.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        operations: list[dict[str, Any]] = []
        http_ports = {port for port, _ in caller.http}
        plain = sorted(caller.ports - http_ports)
        if plain:
            operations.append({"ports": [str(p) for p in plain]})
        for (port, method), paths in sorted(caller.http.items()):
            drafted = draft_paths(paths, templates=templates)
            wider.update(f"{method} on port {port}: {w}" for w in drafted.wider)
            path_notes.update(drafted.notes)
            operations.append({"ports": [str(port)], "methods": [method], "paths": drafted.paths})
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
    notes.update(f"wider than the traffic: {w}" for w in wider)
    notes.update(path_notes)
    name = policy_name(workload)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(_strip(selector))},
        "action": "ALLOW",
        "rules": rules,
    }
    document = {"apiVersion": ISTIO_API, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
                "spec": spec}  # fmt: skip
    policy = IstioPolicy(name, namespace, document, tuple(flows), tuple(sorted(notes)))
    return policy, sorted(wider), sorted(path_notes)


def _strip(selector: LabelSelector) -> list[tuple[str, str]]:
    return [(key.removeprefix("k8s:"), value) for key, value in selector.match_labels]


def open_rules(policies: Iterable[IstioPolicy]) -> list[str]:
    """Rules that accept any caller (no `from`), for the summary's review: `<policy> ... on ports ...`."""
    found = []
    for policy in policies:
        for rule in policy.document["spec"].get("rules", ()):
            if "from" not in rule:
                ports = sorted({p for op in rule.get("to", ()) for p in op["operation"].get("ports", ())})
                found.append(
                    f"{policy.key} accepts calls from any source (the world was seen calling it) on ports "
                    f"{', '.join(ports) or 'every port'}: keep it only if it is meant to"
                )
    return found


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
    return header + dump_document(policy.document, allow_unicode=False)


# -- evaluation ---------------------------------------------------------------------------------------------


def unallowed_requests(
    policies: Sequence[IstioPolicy],
    requests: Iterable[Mapping[str, Any]],
    trust_domain: str = TRUST_DOMAIN,
    *,
    istio_version: str = DEFAULT_ISTIO_VERSION,
) -> list[Mapping[str, Any]]:
    """The observed-edge rows (requests) that the AuthorizationPolicies would refuse, with Istio's semantics.

    Only TCP requests to pods are judged (the proxy sees nothing else), and not those to the sidecar's own
    ports (`SIDECAR_PORTS`). A policy selects a pod when its
    namespace matches and its `selector` labels are among the pod's (no selector: every pod); a policy that
    istiod (of `istio_version`) would refuse is never applied. An ALLOW policy without rules allows nothing. A
    rule matches when one of its `from` sources and one of its `to` operations match (a missing list matches
    anything); HTTP fields (methods, paths) are not judged for L4 rows, which stand for the connection that
    carries the HTTP requests judged one by one. Paths are normalised and matched as the sidecar does
    (`flowpipe.policy._istio_paths`); a request the sidecar refuses (`%00`) is refused.
    """
    templates = supports_templates(istio_version)
    applied = [p for p in policies if not (templates and refused_paths(p.document))]
    refused = []
    for row in requests:
        namespace = row.get("destination_namespace")
        if row.get("destination_entity") is not None or namespace is None or row.get("l4_protocol") != "TCP":
            continue
        if row.get("destination_port") in SIDECAR_PORTS:
            continue  # served by the sidecar itself, before any policy
        pod = {
            (key, value)
            for source, key, value in (parse_label(x) for x in row.get("destination_labels") or ())
            if source in ("k8s", "unspec")
        }
        selecting = [p for p in applied if p.namespace == namespace and _selects(p.document, pod)]
        if selecting and not any(_allows(p.document, row, trust_domain, templates) for p in selecting):
            refused.append(row)
    return refused


def refused_paths(document: Mapping[str, Any]) -> list[str]:
    """Why istiod 1.22 or later refuses the document's `paths` and `notPaths` entries (empty: it accepts them)."""
    found = []
    for rule in (document.get("spec") or {}).get("rules") or ():
        for entry in rule.get("to") or ():
            operation = entry.get("operation") or {}
            for key in ("paths", "notPaths"):
                found += [why for why in map(istiod_refuses, operation.get(key) or ()) if why]
    return found


def _selects(document: Mapping[str, Any], pod: set[tuple[str, str]]) -> bool:
    labels = (document.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    return all((key, value) in pod for key, value in labels.items())


def _allows(document: Mapping[str, Any], row: Mapping[str, Any], trust_domain: str, templates: bool) -> bool:
    spec = document.get("spec") or {}
    if spec.get("action", "ALLOW") != "ALLOW":
        return False
    for rule in spec.get("rules") or ():
        sources = [s.get("source") or {} for s in rule.get("from") or ()]
        operations = [o.get("operation") or {} for o in rule.get("to") or ()]
        if (not sources or any(_source_matches(s, row, trust_domain) for s in sources)) and (
            not operations or any(_operation_matches(o, row, templates) for o in operations)
        ):
            return True
    return False


def _source_matches(source: Mapping[str, Any], row: Mapping[str, Any], trust_domain: str) -> bool:
    namespace = pod_namespace(row, "source")
    if "principals" in source:
        caller = principal(namespace, row.get("source_labels") or (), trust_domain) if namespace else None
        if caller is None or not any(string_matches(p, caller) for p in source["principals"]):
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


def _operation_matches(operation: Mapping[str, Any], row: Mapping[str, Any], templates: bool) -> bool:
    if "ports" in operation and str(row.get("destination_port")) not in operation["ports"]:
        return False
    if row.get("l7_protocol") != "http":
        return True
    if "methods" in operation and row.get("http_method") not in operation["methods"]:
        return False
    path = normalize_path(str(row.get("http_path") or "/"))
    if path is None:
        return False
    return "paths" not in operation or any(
        path_matches(p, path, templates=templates) for p in operation["paths"]
    )

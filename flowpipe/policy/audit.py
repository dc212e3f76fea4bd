"""Check policy sets for the pitfalls that break clusters or leave them open; each finding says what to do.

Checks (`check` names are stable, for scripts):

| check | severity | what |
|---|---|---|
| `no-default-deny` | medium | a namespace where no policy selects every pod for ingress (or egress): pods nobody selects accept (or send) anything |
| `egress-without-dns` | high | a policy isolates egress but no policy selecting those pods allows DNS (UDP 53): every lookup fails |
| `allow-all` | high / medium | a rule with empty `from`/`to` (every peer): on every port (high), or on some ports (medium) |
| `all-namespaces` | low | a peer selecting every namespace (`namespaceSelector: {}`) |
| `kube-system-default-deny` | high | default-deny in `kube-system` (or clusterwide): DNS, the API server and CNI agents break unless each is allowed |
| `unknown-namespace-selector` | medium | a namespace selector that no observed namespace matches (typo, or labels the namespaces do not carry) |
| `selector-matches-nothing` | low | a policy whose selector matches no observed workload |

The last two need observed traffic (an `Inventory` from the dataset); without one they are skipped. Namespace
labels are known from flows as `k8s:io.cilium.k8s.namespace.labels.<key>=<value>`; the namespace-name label is
implied by the namespace itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from flowpipe.policy import _match as m
from flowpipe.policy import _ports as ports
from flowpipe.policy.model import ANY_PEER, DIRECTIONS, Peer, Policy, Rule

Severity = Literal["low", "medium", "high"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high")
SYSTEM_NAMESPACE = "kube-system"

INVENTORY_SQL = """
SELECT namespace, workload, labels, sum(flows) AS flows
FROM (
    SELECT source_namespace AS namespace, coalesce(source_workload_name, source_pod_name) AS workload,
           source_labels AS labels, count(*) AS flows
    FROM flows WHERE source_namespace IS NOT NULL GROUP BY ALL
    UNION ALL
    SELECT destination_namespace, coalesce(destination_workload_name, destination_pod_name),
           destination_labels, count(*)
    FROM flows WHERE destination_namespace IS NOT NULL GROUP BY ALL
)
GROUP BY ALL
ORDER BY namespace, workload
"""
"""Every observed pod identity (namespace, workload, labels): the input of `Inventory.from_rows`."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: how bad, which check, where (namespace, file, policy, rule), what it means, what to do."""

    severity: Severity
    check: str
    message: str
    suggestion: str
    namespace: str | None = None
    file: str | None = None
    policy: str | None = None
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "severity": self.severity,
            "check": self.check,
            "namespace": self.namespace,
            "file": self.file,
            "policy": self.policy,
            "rule": self.rule,
            "message": self.message,
            "suggestion": self.suggestion,
        }


@dataclass(frozen=True, slots=True)
class Inventory:
    """What the flows show of the cluster: each observed workload with its Cilium labels."""

    workloads: tuple[tuple[str, str | None, tuple[str, ...]], ...]

    @classmethod
    def from_rows(cls, rows: pa.Table | Iterable[Mapping[str, Any]]) -> Inventory:
        """From rows with `namespace`, `workload` and `labels` (the columns of `INVENTORY_SQL`)."""
        records = rows.to_pylist() if isinstance(rows, pa.Table) else list(rows)
        return cls(tuple((r["namespace"], r.get("workload"), tuple(r.get("labels") or ())) for r in records))

    @property
    def namespaces(self) -> list[str]:
        """The observed namespaces, sorted."""
        return sorted({ns for ns, _, _ in self.workloads})

    def endpoints(self) -> list[tuple[str, str | None, m.Endpoint]]:
        """Each workload as a policy endpoint."""
        return [(ns, wl, m.Endpoint(ns, labels, None, None)) for ns, wl, labels in self.workloads]

    def namespace_endpoints(self) -> dict[str, m.Endpoint]:
        """Each namespace as an endpoint carrying only its namespace labels (for namespace selectors)."""
        labels: dict[str, set[str]] = {}
        for ns, _, workload_labels in self.workloads:
            labels.setdefault(ns, set()).update(
                lbl for lbl in workload_labels if lbl.startswith("k8s:" + m.NAMESPACE_LABELS_PREFIX)
            )
        return {ns: m.Endpoint(ns, sorted(lbls), None, None) for ns, lbls in labels.items()}


def audit_policies(policies: Sequence[Policy], inventory: Inventory | None = None) -> list[Finding]:
    """Every finding for `policies` (and, with an inventory, against the observed cluster), worst first.

    >>> [f.check for f in audit_policies(load_policies(["policies/"]))]     # doctest: +SKIP
    ['egress-without-dns', 'no-default-deny']
    """
    findings: list[Finding] = []
    namespaces = {p.namespace for p in policies if p.namespace is not None}
    if inventory is not None:
        namespaces.update(inventory.namespaces)
    findings += _default_deny_findings(policies, sorted(namespaces))
    findings += _dns_findings(policies)
    findings += _rule_findings(policies)
    if inventory is not None:
        findings += _observed_findings(policies, inventory)
    return sorted(
        findings,
        key=lambda f: (
            -SEVERITIES.index(f.severity),
            f.check,
            f.namespace or "",
            f.file or "",
            f.policy or "",
            f.rule or "",
        ),
    )


def at_or_above(findings: Iterable[Finding], severity: Severity) -> list[Finding]:
    """The findings at or above `severity` (what `--fail-on` counts)."""
    floor = SEVERITIES.index(severity)
    return [f for f in findings if SEVERITIES.index(f.severity) >= floor]


# -- namespace-wide isolation -------------------------------------------------------------------------------


def _selects_whole_namespace(policy: Policy, namespace: str) -> bool:
    if policy.node_selector is not None or not policy.selector.is_empty:
        return False
    return policy.namespace == namespace or policy.namespace is None


def _where(policy: Policy) -> dict[str, Any]:
    return {"namespace": policy.namespace, "file": policy.file, "policy": policy.key}


def _default_deny_findings(policies: Sequence[Policy], namespaces: Sequence[str]) -> list[Finding]:
    findings = []
    for namespace in namespaces:
        if namespace == SYSTEM_NAMESPACE:
            continue
        missing = [
            d
            for d in DIRECTIONS
            if not any(d in p.isolates and _selects_whole_namespace(p, namespace) for p in policies)
        ]
        if missing:
            what = " and ".join(missing)
            findings.append(
                Finding(
                    "medium",
                    "no-default-deny",
                    f"namespace {namespace} has no default-deny for {what}: pods that no policy selects "
                    f"accept{'/send' if len(missing) == 2 else ''} any traffic in that direction",
                    f"add a policy selecting every pod of {namespace} (podSelector: {{}}) that isolates {what}, "
                    "with a DNS allowance for egress; `flowpipe suggest` drafts one",
                    namespace=namespace,
                )
            )
    for policy in policies:
        if (
            any(d in policy.isolates for d in DIRECTIONS)
            and policy.selector.is_empty
            and policy.node_selector is None
        ) and (policy.namespace == SYSTEM_NAMESPACE or policy.namespace is None):
            scope = "kube-system" if policy.namespace else "every namespace, kube-system included"
            findings.append(
                Finding(
                    "high",
                    "kube-system-default-deny",
                    f"{policy.kind} {policy.key} isolates every pod of {scope}: cluster DNS, the API "
                    "server, CNI and monitoring agents break unless every one of their peers is allowed",
                    "select only the workloads you mean (non-empty selector), or exclude kube-system",
                    **_where(policy),
                )
            )
    return findings


def _allows_dns(rule: Rule) -> bool:
    if rule.action != "allow" or rule.direction != "egress" or rule.allows_nothing:
        return False
    if not rule.ports:
        return True
    dns = ports.Traffic(protocol="UDP", port=53)
    return any(any(ports.port_matches(p, dns) for p in pr.ports) or not pr.ports for pr in rule.ports)


def _dns_findings(policies: Sequence[Policy]) -> list[Finding]:
    findings = []
    for policy in policies:
        if "egress" not in policy.isolates or policy.node_selector is not None:
            continue
        # Policies that certainly select the same pods: itself, those with the same selector, namespace-wide ones.
        covering = [
            p
            for p in policies
            if p.node_selector is None
            and (p.namespace == policy.namespace or p.namespace is None)
            and (p.selector.is_empty or p.selector == policy.selector)
        ]
        if any(_allows_dns(r) for p in covering for r in p.rules):
            continue
        findings.append(
            Finding(
                "high",
                "egress-without-dns",
                f"{policy.kind} {policy.key} isolates egress and no policy selecting the same pods allows DNS: "
                "every name lookup of those pods fails",
                "allow egress to the cluster DNS on UDP and TCP 53 (e.g. k8s-app: kube-dns in kube-system)",
                **_where(policy),
            )
        )
    return findings


# -- rules --------------------------------------------------------------------------------------------------


def _rule_findings(policies: Sequence[Policy]) -> list[Finding]:
    findings = []
    for policy in policies:
        for rule_id, rule in zip(policy.rule_ids(), policy.rules, strict=True):
            if rule.action != "allow":
                continue
            side = "from" if rule.direction == "ingress" else "to"
            if ANY_PEER in rule.peers:
                every_port = not rule.ports or any(not pr.ports and not pr.has_l7 for pr in rule.ports)
                findings.append(
                    Finding(
                        "high" if every_port else "medium",
                        "allow-all",
                        f"{rule_id} of {policy.key} has an empty `{side}`: it allows every peer"
                        + (" on every port" if every_port else " on its ports"),
                        f"name the peers in `{side}` (pods, namespaces or CIDRs); `flowpipe suggest` lists the observed ones",
                        rule=rule_id,
                        **_where(policy),
                    )
                )
            elif any(_all_namespaces(p) for p in rule.peers):
                findings.append(
                    Finding(
                        "low",
                        "all-namespaces",
                        f"{rule_id} of {policy.key} selects pods of every namespace",
                        "select the namespaces that need access, by kubernetes.io/metadata.name",
                        rule=rule_id,
                        **_where(policy),
                    )
                )
    return findings


def _all_namespaces(peer: Peer) -> bool:
    return (
        peer.kind == "endpoints"
        and peer.namespace_selector is not None
        and peer.namespace_selector.is_empty
        and (peer.selector is None or peer.selector.is_empty)
    )


# -- against the observed cluster ---------------------------------------------------------------------------


def _namespace_requirements(peer: Peer) -> tuple[m.Requirement, ...]:
    """The requirements of an endpoints peer that concern namespaces only."""
    if peer.namespace_selector is not None:
        return m.compile_namespace_selector(peer.namespace_selector)
    if peer.selector is None:
        return ()
    return tuple(
        r
        for r in m.compile_selector(peer.selector)
        if r[1] == m.POD_NAMESPACE_KEY or r[1].startswith(m.NAMESPACE_LABELS_PREFIX)
    )


def _observed_findings(policies: Sequence[Policy], inventory: Inventory) -> list[Finding]:
    findings = []
    namespaces = inventory.namespace_endpoints()
    workloads = inventory.endpoints()
    for policy in policies:
        for rule_id, rule in zip(policy.rule_ids(), policy.rules, strict=True):
            for peer in rule.peers:
                reqs = _namespace_requirements(peer) if peer.kind == "endpoints" else ()
                if reqs and not any(m.requirements_match(reqs, ep) for ep in namespaces.values()):
                    findings.append(
                        Finding(
                            "medium",
                            "unknown-namespace-selector",
                            f"{rule_id} of {policy.key} selects namespaces by labels no observed namespace carries "
                            f"({_describe(reqs)})",
                            "check the namespace labels (`kubectl get ns --show-labels`); select namespaces by "
                            "kubernetes.io/metadata.name",
                            rule=rule_id,
                            **_where(policy),
                        )
                    )
        subject = m.subject_requirements(policy)
        if subject is None:
            continue
        if policy.namespace is not None and policy.namespace not in namespaces:
            message = f"{policy.kind} {policy.key}: no flows were observed in namespace {policy.namespace}"
        elif not any(m.requirements_match(subject, ep) for _, _, ep in workloads):
            message = f"{policy.kind} {policy.key} selects no observed workload"
        else:
            continue
        findings.append(
            Finding(
                "low",
                "selector-matches-nothing",
                message,
                "check the selector's labels against the pods' (`kubectl get pods --show-labels`), or remove the policy",
                **_where(policy),
            )
        )
    return findings


def _describe(reqs: Sequence[m.Requirement]) -> str:
    parts = []
    for _, key, operator, values in reqs:
        key = key.removeprefix(m.NAMESPACE_LABELS_PREFIX)
        if key == m.POD_NAMESPACE_KEY:
            key = "namespace"
        parts.append(
            f"{key}={','.join(sorted(values))}" if operator == "In" else f"{key} {operator} {sorted(values)}"
        )
    return "; ".join(parts)

"""Audit findings on hand-written policy sets, with and without the observed cluster."""

from __future__ import annotations

from support.policy import pod

from flowpipe.policy.audit import Finding, Inventory, at_or_above, audit_policies
from flowpipe.policy.load import parse_policies

DEFAULT_DENY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"""
DNS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
"""


def audit(text: str, inventory: Inventory | None = None) -> list[Finding]:
    return audit_policies(parse_policies(text, path="policies/shop.yaml"), inventory)


def checks(findings: list[Finding]) -> list[tuple[str, str | None]]:
    return [(f.check, f.policy or f.namespace) for f in findings]


def test_a_sound_namespace_has_no_findings() -> None:
    assert audit(DEFAULT_DENY + "---" + DNS) == []


def test_default_deny_egress_without_dns_is_high() -> None:
    [finding] = audit(DEFAULT_DENY)
    assert (finding.severity, finding.check, finding.policy, finding.file) == (
        "high",
        "egress-without-dns",
        "shop/default-deny",
        "policies/shop.yaml",
    )
    assert "53" in finding.suggestion


def test_namespaces_without_default_deny_per_direction() -> None:
    ingress_only = DEFAULT_DENY.replace("[Ingress, Egress]", "[Ingress]")
    [finding] = audit(ingress_only)
    assert (finding.check, finding.namespace, finding.severity) == ("no-default-deny", "shop", "medium")
    assert "for egress" in finding.message
    # a policy selecting some pods is not a default-deny; an observed namespace without policies is reported too
    inventory = Inventory.from_rows(
        [{"namespace": "billing", "workload": "api", "labels": pod("billing", "api")["labels"]}]
    )
    some_pods = DEFAULT_DENY.replace("podSelector: {}", "podSelector: {matchLabels: {app: web}}")
    found = checks(audit(some_pods + "---" + DNS, inventory))
    assert ("no-default-deny", "billing") in found and ("no-default-deny", "shop") in found


def test_cilium_clusterwide_default_deny_covers_namespaces_but_hits_kube_system() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {}
  ingress: [{}]
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}]}]
"""
    findings = audit(text)
    assert checks(findings) == [("kube-system-default-deny", "lockdown")]
    assert findings[0].severity == "high" and "kube-system included" in findings[0].message


def test_default_deny_in_kube_system() -> None:
    text = (
        DEFAULT_DENY.replace("namespace: shop", "namespace: kube-system")
        + "---"
        + DNS.replace("namespace: shop", "namespace: kube-system")
    )
    # both isolate every pod of kube-system (the DNS policy for egress)
    assert checks(audit(text)) == [
        ("kube-system-default-deny", "kube-system/default-deny"),
        ("kube-system-default-deny", "kube-system/dns"),
    ]


def test_empty_from_or_to_allows_everyone() -> None:
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - {}
  - ports: [{port: 443}]
  - from: [{namespaceSelector: {}}]
"""
    findings = [f for f in audit(DEFAULT_DENY + "---" + DNS + "---" + text) if f.policy == "shop/open"]
    assert [(f.severity, f.check, f.rule) for f in findings] == [
        ("high", "allow-all", "ingress[0]"),
        ("medium", "allow-all", "ingress[1]"),
        ("low", "all-namespaces", "ingress[2]"),
    ]


def test_cilium_empty_rule_is_deny_not_allow_all() -> None:
    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny, namespace: shop}
spec:
  endpointSelector: {}
  ingress: [{}]
  egress: [{toEntities: [all]}]
"""
    assert checks(audit(text)) == [("allow-all", "shop/deny")]


def test_observed_checks_namespace_selectors_and_pod_selectors() -> None:
    mon = pod("monitoring", "prometheus")
    mon["labels"].append("k8s:io.cilium.k8s.namespace.labels.team=ops")
    inventory = Inventory.from_rows(
        [
            {"namespace": "shop", "workload": "web", "labels": pod("shop", "web")["labels"]},
            {"namespace": "monitoring", "workload": "prometheus", "labels": mon["labels"]},
            {
                "namespace": "kube-system",
                "workload": "coredns",
                "labels": pod("kube-system", "coredns")["labels"],
            },
        ]
    )
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
  - from: [{namespaceSelector: {matchLabels: {team: opps}}}]
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ghost, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: ghost}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: monitorin}}]
"""
    findings = [
        f for f in audit(DEFAULT_DENY + "---" + DNS + "---" + text, inventory) if f.check != "no-default-deny"
    ]
    assert [(f.check, f.policy, f.rule) for f in findings] == [
        ("unknown-namespace-selector", "shop/ghost", "ingress[0]"),
        ("unknown-namespace-selector", "shop/web", "ingress[1]"),
        ("selector-matches-nothing", "shop/ghost", None),
    ]
    assert "team=opps" in findings[1].message


def test_policies_in_unobserved_namespaces() -> None:
    inventory = Inventory.from_rows(
        [{"namespace": "other", "workload": "x", "labels": pod("other", "x")["labels"]}]
    )
    found = {(f.check, f.policy) for f in audit(DEFAULT_DENY + "---" + DNS, inventory)}
    assert ("selector-matches-nothing", "shop/default-deny") in found


def test_fail_on_threshold() -> None:
    findings = audit(DEFAULT_DENY.replace("[Ingress, Egress]", "[Ingress]"))
    assert at_or_above(findings, "high") == []
    assert len(at_or_above(findings, "medium")) == 1 and len(at_or_above(findings, "low")) == 1

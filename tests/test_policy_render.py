"""Rendering policies to YAML: every document validates against the real schemas; stable, annotated output."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support.policy import KUBERNETES_VERSION, validate_document

from flowpipe.policy.load import parse_policies
from flowpipe.policy.model import (
    ANY_PEER,
    FQDNSelector,
    HTTPRule,
    KafkaRule,
    LabelExpression,
    LabelSelector,
    Peer,
    Policy,
    Port,
    PortRule,
    Rule,
)
from flowpipe.policy.render import policy_document, render_policy, render_yaml

DNS_PEER = Peer.endpoints({"k8s-app": "kube-dns"}, namespace="kube-system")
DNS_PORTS = PortRule(ports=(Port(53, "UDP"), Port(53, "TCP")), dns=(FQDNSelector(match_pattern="*"),))


def sample_rules() -> tuple[Rule, ...]:
    """Rules using every kind of peer, port and L7 rule the model has."""
    return (
        Rule(
            "ingress",
            (Peer.endpoints({"app": "web"}),),
            (PortRule((Port(8080),), http=(HTTPRule("GET", "^/v1/items$"),)),),
            flows=12,
        ),
        Rule(
            "ingress",
            (Peer.endpoints({"app": "prometheus"}, namespace="monitoring"),),
            (PortRule((Port(9090),)),),
            flows=3,
        ),
        Rule(
            "ingress",
            (Peer("endpoints", selector=None, namespace_selector=LabelSelector.of({"team": "ops"})),),
            (PortRule((Port(22, "TCP"),)),),
        ),
        Rule("ingress", (Peer.entity_peer("world"),), (PortRule((Port(443),)),)),
        Rule("ingress", (ANY_PEER,), (PortRule((Port(8, "ICMP"),)),)),
        Rule("egress", (DNS_PEER,), (DNS_PORTS,), flows=40),
        Rule(
            "egress",
            (Peer.fqdn_peer(name="api.stripe.com"), Peer.fqdn_peer(pattern="*.s3.amazonaws.com")),
            (PortRule((Port(443),)),),
        ),
        Rule(
            "egress",
            (Peer.cidr_peer("198.51.100.0/24", ["198.51.100.128/25"]),),
            (PortRule((Port(5432), Port(6000, "UDP", 6010))),),
        ),
        Rule("egress", (Peer.cidr_peer("203.0.113.7/32"),), (PortRule((Port(9000, "SCTP"),)),)),
        Rule("egress", (Peer.entity_peer("kube-apiserver"),), (PortRule((Port(443),)),)),
        Rule(
            "egress",
            (Peer.endpoints({"app": "kafka"}),),
            (PortRule((Port(9092),), kafka=(KafkaRule(role="produce", topic="orders"),)),),
        ),
        Rule("egress", (Peer.cidr_peer("10.0.0.0/8"),), (), action="deny"),
    )


def sample_policies() -> list[Policy]:
    selector = LabelSelector.of({"app": "api"}, LabelExpression("tier", "NotIn", ("legacy",)))
    policies = []
    for flavour in ("kubernetes", "cilium"):
        policies += [
            Policy("flowpipe-api", "shop", flavour, selector, sample_rules(), ("ingress", "egress")),
            Policy(
                "flowpipe-default-deny",
                "shop",
                flavour,
                LabelSelector(),
                (Rule("egress", (DNS_PEER,), (DNS_PORTS,)),),
                ("ingress", "egress"),
            ),
            Policy("deny-all", "shop", flavour, isolates=("ingress", "egress")),
            Policy(
                "open",
                "shop",
                flavour,
                rules=(Rule("ingress"), Rule("egress")),
                isolates=("ingress", "egress"),
            ),
        ]
    policies.append(
        Policy(
            "cluster-dns",
            None,
            "cilium",
            LabelSelector(),
            (Rule("egress", (DNS_PEER,), (DNS_PORTS,)),),
            ("egress",),
            clusterwide=True,
        )
    )
    policies.append(
        Policy(
            "audit-only",
            "shop",
            "cilium",
            rules=(Rule("ingress", (Peer.entity_peer("world"),), action="deny"),),
        )
    )
    return policies


@pytest.mark.parametrize("policy", sample_policies(), ids=lambda p: f"{p.flavour}-{p.name}")
def test_every_rendered_document_validates(policy: Policy, cilium_schemas: Path) -> None:
    [doc] = list(yaml.safe_load_all(render_policy(policy)))
    validate_document(doc, cilium_schemas)


def test_invalid_documents_are_rejected_by_the_validators(cilium_schemas: Path) -> None:
    # The checks above could not pass by accident: broken documents fail them.
    bad_k8s = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "x"},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "TCP", "bogus": 1}]}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_k8s, KUBERNETES_VERSION, strict=True)
    no_rules = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "x"},
        "spec": {"endpointSelector": {}},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_document(no_rules, cilium_schemas)
    bad_entity = {**no_rules, "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["world-ipv9"]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_document(bad_entity, cilium_schemas)
    bad_cidr = {**no_rules, "spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/99"]}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate_document(bad_cidr, cilium_schemas)


def test_loaded_user_policies_render_to_valid_documents(cilium_schemas: Path) -> None:
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}, {ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}}]
    ports: [{port: 5432}, {port: metrics}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: web, app: web}}]
    toPorts: [{ports: [{port: "8080"}], rules: {http: [{method: GET, path: "/v1/.*"}]}}]
  egress:
  - toFQDNs: [{matchPattern: "*.example.com"}]
  - icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]
"""
    for policy in parse_policies(text, path="user.yaml"):
        validate_document(policy_document(policy), cilium_schemas)


def test_render_then_load_gives_the_same_policy() -> None:
    for policy in sample_policies():
        if policy.flavour == "kubernetes":
            continue  # NetworkPolicy cannot hold everything the sample has; checked separately below
        [loaded] = parse_policies(render_policy(policy), path="x.yaml")
        assert loaded.selector == policy.selector
        assert loaded.isolates == policy.isolates
        # an isolated direction without rules comes back as Cilium's empty deny-all entry
        got_rules = [r for r in loaded.rules if not r.allows_nothing]
        assert [r.section for r in got_rules] == [r.section for r in policy.rules]
        for got, want in zip(got_rules, policy.rules, strict=True):
            assert got.ports == want.ports or (not got.ports and not want.ports)
            if want.peers and want.peers[0].kind != "endpoints":
                assert got.peers == want.peers


def test_output_is_stable_and_keys_keep_kubernetes_order() -> None:
    policies = sample_policies()
    first = render_yaml(policies)
    assert render_yaml(sample_policies()) == first
    doc = policy_document(policies[0])
    assert list(doc) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(doc["spec"]) == ["podSelector", "policyTypes", "ingress", "egress"]
    cilium = policy_document(policies[4])
    assert list(cilium["spec"]) == ["endpointSelector", "ingress", "egress", "egressDeny"]
    assert list(cilium["spec"]["ingress"][0]) == ["fromEndpoints", "toPorts"]


def test_header_carries_window_and_flows_behind_each_rule() -> None:
    window = (datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 8, tzinfo=UTC))
    text = render_policy(sample_policies()[4], window=window)
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "# drafted by flowpipe from flows observed 2024-05-01T00:00:00Z .. 2024-05-08T00:00:00Z" in header
    assert "#   ingress[0]: 12 flows" in header
    assert "#   ingress[1]: 3 flows" in header
    assert "#   egress[0]: 40 flows" in header


def test_kubernetes_flavour_says_what_it_cannot_express() -> None:
    policy = sample_policies()[0]
    text = render_policy(policy)
    doc = yaml.safe_load(text)
    notes = "\n".join(line for line in text.splitlines() if line.startswith("# not expressible"))
    for fragment in (
        "FQDN peer api.stripe.com",
        "ICMP type 8",
        "entity peer kube-apiserver",
        "egressDeny",
        "L7 rules",
    ):
        assert fragment in notes
    # The ICMP-only rule is left out instead of becoming "every port"; the world becomes ipBlocks.
    ingress = doc["spec"]["ingress"]
    assert all("ports" in entry for entry in ingress)
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in ingress[3]["from"]
    # Another namespace is selected by its name label; a namespace selector alone stays alone.
    assert ingress[1]["from"][0] == {
        "podSelector": {"matchLabels": {"app": "prometheus"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    }
    assert ingress[2]["from"][0] == {"namespaceSelector": {"matchLabels": {"team": "ops"}}}


def test_cilium_flavour_writes_namespaces_into_selectors() -> None:
    doc = policy_document(sample_policies()[4])
    ingress = doc["spec"]["ingress"]
    assert ingress[1]["fromEndpoints"] == [
        {"matchLabels": {"app": "prometheus", "k8s:io.kubernetes.pod.namespace": "monitoring"}}
    ]
    # a namespace chosen by labels: the labels plus "some namespace", so Cilium does not scope it to shop
    assert ingress[2]["fromEndpoints"] == [
        {
            "matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "ops"},
            "matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}],
        }
    ]
    assert ingress[4] == {"icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]}
    assert doc["spec"]["egress"][0]["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}


def test_isolation_without_rules_and_rules_without_isolation() -> None:
    policies = {p.name: p for p in sample_policies() if p.flavour == "cilium"}
    deny_all = policy_document(policies["deny-all"])["spec"]
    assert deny_all["ingress"] == [{}] and deny_all["egress"] == [{}]
    audit_only = policy_document(policies["audit-only"])["spec"]
    assert audit_only["enableDefaultDeny"] == {"ingress": False, "egress": False}
    k8s_deny = policy_document(next(p for p in sample_policies() if p.name == "deny-all"))["spec"]
    assert k8s_deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

"""Drafting policies from hand-built observed-edge tables: the semantics peers get wrong, one test each."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from support.draft import API, DB, DNS, PROM, WEB, edge, edges, ent, policy, wl
from support.policy import validate_document

from flowpipe.policy._l7 import http_rules
from flowpipe.policy.draft import draft_policies
from flowpipe.policy.edges import learned_requests
from flowpipe.policy.model import HTTPRule, KafkaRule, LabelSelector, Peer, Policy, Port, Rule
from flowpipe.policy.render import policy_document, render_yaml
from flowpipe.policy.replay import replay_edges


def rules(p: Policy, direction: str) -> list[Rule]:
    return [r for r in p.rules if r.direction == direction]


def test_source_gets_egress_and_destination_gets_ingress() -> None:
    draft = draft_policies(edges(edge(WEB, API, 8080, flows=7)), default_deny=False)
    web, api = policy(draft, "shop", "flowpipe-web"), policy(draft, "shop", "flowpipe-api")
    [egress] = web.rules
    assert egress.direction == "egress" and egress.peers == (Peer.endpoints({"app": "api"}),)
    assert egress.ports[0].ports == (Port(8080, "TCP"),) and egress.flows == 7
    [ingress] = api.rules
    assert ingress.direction == "ingress" and ingress.peers == (Peer.endpoints({"app": "web"}),)
    assert web.isolates == api.isolates == ("ingress", "egress")


def test_selectors_never_use_per_rollout_labels() -> None:
    draft = draft_policies(edges(edge(WEB, API, 8080)), flavour="kubernetes")
    text = render_yaml(draft.policies)
    for unstable in ("pod-template-hash", "controller-revision-hash", "serviceaccount"):
        assert unstable not in text
    assert policy(draft, "shop", "flowpipe-api").selector == LabelSelector.of({"app": "api"})


def test_selectors_add_labels_only_to_tell_workloads_apart() -> None:
    v1 = wl("bookinfo", "reviews-v1", version="v1")
    v2 = wl("bookinfo", "reviews-v2", version="v2")
    for end in (v1, v2):
        end["labels"] = [
            lbl.replace("app=reviews-v1", "app=reviews").replace("app=reviews-v2", "app=reviews")
            for lbl in end["labels"]
        ]
    page = wl("bookinfo", "productpage")
    draft = draft_policies(edges(edge(page, v1, 9080), edge(page, v2, 9080)), default_deny=False)
    assert policy(draft, "bookinfo", "flowpipe-reviews-v1").selector == LabelSelector.of(
        {"app": "reviews", "version": "v1"}
    )
    assert policy(draft, "bookinfo", "flowpipe-productpage").selector == LabelSelector.of(
        {"app": "productpage"}
    )


def test_preferred_label_keys_come_first() -> None:
    deathstar = wl(
        "default", "deathstar", {"app.kubernetes.io/name": "deathstar", "org": "empire", "class": "deathstar"}
    )
    deathstar["labels"] = [lbl for lbl in deathstar["labels"] if lbl != "k8s:app=deathstar"]
    draft = draft_policies(edges(edge(wl("default", "tiefighter"), deathstar, 80)), default_deny=False)
    assert policy(draft, "default", "flowpipe-deathstar").selector == LabelSelector.of(
        {"app.kubernetes.io/name": "deathstar"}
    )


def test_other_namespaces_are_named_by_their_name_label() -> None:
    draft = draft_policies(edges(edge(PROM, API, 9090)), namespaces=["shop"])
    [rule] = policy(draft, "shop", "flowpipe-api").rules
    assert rule.peers == (Peer.endpoints({"app": "prometheus"}, namespace="monitoring"),)
    assert not any(p.namespace == "monitoring" for p in draft.policies)  # only the drafted side gets a rule
    cilium = policy_document(policy(draft, "shop", "flowpipe-api"))
    assert cilium["spec"]["ingress"][0]["fromEndpoints"] == [
        {"matchLabels": {"app": "prometheus", "k8s:io.kubernetes.pod.namespace": "monitoring"}}
    ]
    k8s = draft_policies(edges(edge(PROM, API, 9090)), namespaces=["shop"], flavour="kubernetes")
    doc = policy_document(policy(k8s, "shop", "flowpipe-api"))
    assert doc["spec"]["ingress"][0]["from"] == [
        {
            "podSelector": {"matchLabels": {"app": "prometheus"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        }
    ]


def test_default_deny_allows_the_observed_dns_server() -> None:
    node_dns = wl("kube-system", "node-local-dns", k8s_app="node-local-dns")
    node_dns["labels"].remove("k8s:app=node-local-dns")
    rows = edges(
        edge(WEB, DNS, 53, "UDP", flows=30),
        edge(WEB, DNS, 53, "TCP", flows=2),
        edge(API, node_dns, 53, "UDP", flows=5),
        edge(WEB, API, 8080),
    )
    draft = draft_policies(rows)
    deny = policy(draft, "shop", "flowpipe-default-deny")
    assert deny.selector.is_empty and deny.isolates == ("ingress", "egress")
    [dns_rule] = deny.rules
    assert dns_rule.peers == (
        Peer.endpoints({"k8s-app": "kube-dns"}, namespace="kube-system"),
        Peer.endpoints({"k8s-app": "node-local-dns"}, namespace="kube-system"),
    )
    assert dns_rule.ports[0].ports == (Port(53, "UDP"), Port(53, "TCP")) and dns_rule.flows == 37
    assert dns_rule.ports[0].dns  # the DNS proxy sees the lookups (what toFQDNs needs)
    # the workloads' own policies do not repeat the DNS allowance, and kube-system is not touched
    assert all(
        53 not in [p.port for pr in r.ports for p in pr.ports]
        for r in policy(draft, "shop", "flowpipe-web").rules
    )
    assert {p.namespace for p in draft.policies} == {"shop"}


def test_kube_system_only_when_asked() -> None:
    rows = edges(edge(WEB, DNS, 53, "UDP"))
    assert not any(p.namespace == "kube-system" for p in draft_policies(rows).policies)
    asked = draft_policies(rows, include_kube_system=True)
    coredns = policy(asked, "kube-system", "flowpipe-coredns")
    assert coredns.selector == LabelSelector.of({"k8s-app": "kube-dns"})
    assert rules(coredns, "ingress")[0].peers == (Peer.endpoints({"app": "web"}, namespace="shop"),)


def test_without_observed_dns_the_conventional_kube_dns_is_assumed_and_said() -> None:
    draft = draft_policies(edges(edge(WEB, API, 8080)))
    deny = policy(draft, "shop", "flowpipe-default-deny")
    assert deny.rules[0].peers == (Peer.endpoints({"k8s-app": "kube-dns"}, namespace="kube-system"),)
    assert deny.comments and any("no DNS server observed" in n for n in draft.notes)


def test_entities_fqdns_and_cidrs() -> None:
    names = ["a.s3.amazonaws.com", "b.s3.amazonaws.com", "c.s3.amazonaws.com"]
    rows = edges(
        edge(WEB, ent("kube-apiserver", "172.18.0.10"), 6443),
        edge(WEB, ent("world", "198.51.100.1", ["api.stripe.com."]), 443),
        *(edge(WEB, ent("world", f"198.51.100.{i + 2}", [n]), 443) for i, n in enumerate(names)),
        edge(WEB, ent("world", "203.0.113.9"), 443),
        edge(WEB, ent("world", "203.0.113.10"), 22),
        edge(ent("world", "192.0.2.1"), WEB, 80),
        edge(ent("host", "172.18.0.2"), WEB, 8080),
    )
    web = policy(draft_policies(rows), "shop", "flowpipe-web")
    ingress = [r.peers for r in rules(web, "ingress")]
    assert ingress == [(Peer.entity_peer("host"),), (Peer.entity_peer("world"),)]
    egress = {tuple(r.peers): r for r in rules(web, "egress")}
    assert (Peer.entity_peer("kube-apiserver"),) in egress
    fqdn = egress[(Peer.fqdn_peer(name="api.stripe.com"), Peer.fqdn_peer(pattern="*.s3.amazonaws.com"))]
    assert fqdn.ports[0].ports == (Port(443, "TCP"),) and fqdn.flows == 40
    # addresses without names are CIDRs, in rules of their own (Cilium does not mix them with toFQDNs)
    assert (Peer.cidr_peer("203.0.113.9/32"),) in egress
    assert (Peer.cidr_peer("203.0.113.10/32"),) in egress


def test_kubernetes_flavour_writes_addresses_and_says_so() -> None:
    rows = edges(
        edge(WEB, ent("kube-apiserver", "172.18.0.10"), 6443),
        edge(WEB, ent("world", "198.51.100.1", ["api.stripe.com"]), 443),
    )
    draft = draft_policies(rows, flavour="kubernetes")
    peers = [r.peers for r in rules(policy(draft, "shop", "flowpipe-web"), "egress")]
    assert peers == [(Peer.cidr_peer("172.18.0.10/32"),), (Peer.cidr_peer("198.51.100.1/32"),)]
    assert any("api.stripe.com" in n for n in draft.notes) and any("kube-apiserver" in n for n in draft.notes)


def test_icmp_and_sctp_become_the_right_rules() -> None:
    rows = edges(
        edge(WEB, DB, None, "ICMPv4", icmp_type=8),
        edge(WEB, DB, None, "ICMPv6", icmp_type=128),
        edge(WEB, DB, 3868, "SCTP"),
    )
    [rule] = rules(policy(draft_policies(rows), "shop", "flowpipe-web"), "egress")
    assert rule.ports[0].ports == (Port(8, "ICMP"), Port(128, "ICMPv6"), Port(3868, "SCTP"))
    doc = policy_document(policy(draft_policies(rows), "shop", "flowpipe-web"))
    entry = doc["spec"]["egress"][0]
    assert entry["toPorts"] == [{"ports": [{"port": "3868", "protocol": "SCTP"}]}]
    assert entry["icmps"] == [{"fields": [{"type": 8, "family": "IPv4"}, {"type": 128, "family": "IPv6"}]}]
    assert "'0'" not in yaml.safe_dump(doc)  # never port 0


def http_edge(method: str, path: str, flows: int = 1) -> dict[str, Any]:
    return edge(WEB, API, 8080, flows=flows, l7_protocol="http", http_method=method, http_path=path)


def test_http_rules_sit_on_the_port_rule_with_generalized_paths() -> None:
    rows = edges(
        edge(WEB, API, 8080, flows=5),
        http_edge("GET", "/v1/items/1"),
        http_edge("GET", "/v1/items/2"),
        http_edge("GET", "/v1/users/6f1c2a4e-3b7d-4c1a-9e2f-0a1b2c3d4e5f"),
        http_edge("POST", "/v1/orders?dry=1"),
        http_edge("GET", "/healthz", flows=100),
    )
    draft = draft_policies(rows, l7=True)
    [ingress] = policy(draft, "shop", "flowpipe-api").rules
    [port_rule] = ingress.ports
    assert port_rule.ports == (Port(8080, "TCP"),)
    assert port_rule.http == (
        HTTPRule("GET", "^/healthz$"),
        HTTPRule("GET", "^/v1/items/[^/]+$"),
        HTTPRule("POST", r"^/v1/orders(\?.*)?$"),
        HTTPRule("GET", "^/v1/users/6f1c2a4e\\-3b7d\\-4c1a\\-9e2f\\-0a1b2c3d4e5f$"),  # seen once: kept exact
    )
    # the client's egress stays L4: the server-side proxy enforces the calls
    assert not any(pr.has_l7 for r in policy(draft, "shop", "flowpipe-web").rules for pr in r.ports)
    assert not any(
        pr.has_l7 for p in draft_policies(rows).policies for r in p.rules for pr in r.ports if not pr.dns
    )


def test_http_rule_regexes_allow_exactly_what_was_seen() -> None:
    [rule] = http_rules({("GET", "/a/12"): 1, ("GET", "/a/13"): 1})
    assert rule.path == "^/a/[^/]+$"
    assert http_rules({("GET", "/"): 1}) == (HTTPRule("GET", "^/$"),)


def test_kafka_rules_by_role_and_topic() -> None:
    kafka = wl("shop", "kafka")
    rows = edges(
        edge(API, kafka, 9092, l7_protocol="kafka", kafka_role="produce", kafka_topic="orders"),
        edge(API, kafka, 9092, l7_protocol="kafka", kafka_role="produce", kafka_topic=None),
        edge(DB, kafka, 9092, l7_protocol="kafka", kafka_role="consume", kafka_topic="orders"),
    )
    draft = draft_policies(rows, l7=True)
    by_peer = {r.peers[0].selector.match_labels: r for r in policy(draft, "shop", "flowpipe-kafka").rules}  # type: ignore[union-attr]
    assert by_peer[(("app", "api"),)].ports[0].kafka == (KafkaRule(role="produce", topic="orders"),)
    assert by_peer[(("app", "db"),)].ports[0].kafka == (KafkaRule(role="consume", topic="orders"),)


def test_kubernetes_flavour_notes_l7_it_cannot_write() -> None:
    draft = draft_policies(edges(http_edge("GET", "/x")), flavour="kubernetes", l7=True)
    assert any("L7" in n for n in draft.notes)
    assert policy(draft, "shop", "flowpipe-api").rules[0].ports[0].ports == (Port(8080, "TCP"),)


def test_output_is_deterministic() -> None:
    rows = [
        edge(WEB, API, 8080),
        edge(API, DB, 5432),
        edge(PROM, API, 9090),
        edge(WEB, DNS, 53, "UDP"),
        edge(WEB, ent("world", "198.51.100.1", ["x.example.com"]), 443),
        http_edge("GET", "/a/1"),
        http_edge("GET", "/a/2"),
    ]
    first = render_yaml(draft_policies(edges(*rows), l7=True).policies)
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert render_yaml(draft_policies(edges(*shuffled), l7=True).policies) == first
    names = [(p.namespace, p.name) for p in draft_policies(edges(*rows)).policies]
    assert names[:2] == [("monitoring", "flowpipe-default-deny"), ("monitoring", "flowpipe-prometheus")]


def all_rows() -> pa.Table:
    kafka = wl("shop", "kafka")
    return edges(
        edge(WEB, API, 8080, flows=5),
        http_edge("GET", "/v1/items/1"),
        http_edge("GET", "/v1/items/2"),
        http_edge("GET", "/v1/search?q=x"),
        edge(API, DB, 5432),
        edge(API, kafka, 9092, l7_protocol="kafka", kafka_role="produce", kafka_topic="orders"),
        edge(PROM, API, 9090),
        edge(WEB, DNS, 53, "UDP"),
        edge(API, ent("kube-apiserver", "172.18.0.10"), 6443),
        edge(WEB, ent("world", "198.51.100.1", ["api.stripe.com"]), 443),
        edge(WEB, ent("world", "203.0.113.9"), 22),
        edge(ent("world", "192.0.2.1"), WEB, 80),
        edge(WEB, DB, None, "ICMPv4", icmp_type=8),
    )


@pytest.mark.parametrize("flavour", ["cilium", "kubernetes"])
def test_replay_of_the_draft_allows_every_learned_request_and_no_probe(flavour: str) -> None:
    rows = all_rows()
    draft = draft_policies(rows, flavour=flavour, l7=True, include_kube_system=True)  # type: ignore[arg-type]
    learned = learned_requests(rows)
    report = replay_edges(draft.policies, learned)
    assert report.flows_evaluated > 0
    if flavour == "kubernetes":
        # ICMP cannot be written in a NetworkPolicy: that one edge is named in the notes instead
        assert any("ICMP" in n for n in draft.notes) or report.would_break == 0
        learned = [r for r in learned if r["l4_protocol"] != "ICMPv4"]
        report = replay_edges(draft.policies, learned)
    assert report.would_break == 0, report.denied_edges
    probe = edge(WEB, DB, 5432) | {"flows": 3}
    other_path = http_edge("DELETE", "/v1/items/1")
    denied = replay_edges(draft.policies, learned_requests(edges(probe, other_path)))
    assert denied.denied == (3 if flavour == "kubernetes" else 4)


@pytest.mark.parametrize("flavour", ["cilium", "kubernetes"])
def test_every_drafted_document_validates(flavour: str, cilium_schemas: Path) -> None:
    draft = draft_policies(all_rows(), flavour=flavour, l7=True, include_kube_system=True)  # type: ignore[arg-type]
    assert draft.policies
    for doc in yaml.safe_load_all(render_yaml(draft.policies)):
        validate_document(doc, cilium_schemas)

"""`suggest` semantics, one per test, through the real path: flows → ParquetSink → DuckDB question → draft →
replay proof → YAML. The draft-level tests (test_draft.py) check the same rules on hand-built edge tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.policy import flow, pod, reserved, validate_document
from support.suggest import connection, dns_server, documents, suggest

from flowpipe.policy.draft import Draft, draft_policies

WEB = pod("shop", "web")
API = pod("shop", "api")
DB = pod("shop", "db")
PROM = pod("monitoring", "prometheus")
CNP = "CiliumNetworkPolicy"
NP = "NetworkPolicy"


def rollout_labels(end: dict[str, Any]) -> dict[str, Any]:
    """The pod with the labels a Deployment, a DaemonSet and a StatefulSet add per rollout."""
    extra = [
        "k8s:pod-template-hash=7d4b9c8f6",
        "k8s:controller-revision-hash=5f6d8b",
        "k8s:pod-template-generation=3",
    ]
    return {**end, "labels": end["labels"] + extra}


def http(
    src: dict[str, Any], dst: dict[str, Any], method: str, path: str, port: int = 8080
) -> dict[str, Any]:
    return flow(src, dst, port, flow_type="L7", l7_type="REQUEST", l7_protocol="http", tcp_flags=None,
                traffic_direction="INGRESS", http_method=method, http_url=f"http://{dst['pod_name']}:{port}{path}")  # fmt: skip


def test_reply_flows_never_become_rules(tmp_path: Path) -> None:
    rows = connection(WEB, API, 8080, 40001) + [
        # a reply without is_reply (old agents): SYN-ACK from the server
        flow(API, WEB, 40002, is_reply=None, tcp_flags="SYN,ACK", source_port=8080),
        # an HTTP response record
        flow(API, WEB, 40003, flow_type="L7", l7_type="RESPONSE", l7_protocol="http", tcp_flags=None),
    ]
    docs = documents(suggest(tmp_path, rows))
    web, api = docs[f"{CNP} shop/flowpipe-web"], docs[f"{CNP} shop/flowpipe-api"]
    assert web["spec"]["ingress"] == [{}]  # isolated, nothing allowed in: the replies made no rule
    assert [e["toEndpoints"] for e in web["spec"]["egress"]] == [[{"matchLabels": {"app": "api"}}]]
    assert "egress" not in api["spec"] or api["spec"]["egress"] == [{}]
    assert not any(port in yaml.safe_dump(docs) for port in ("40001", "40002", "40003"))


def test_each_connection_counts_once_although_seen_at_both_ends(tmp_path: Path) -> None:
    rows = [r for sport in (40001, 40002, 40003) for r in connection(WEB, API, 8080, sport)]
    suggestion = suggest(tmp_path, rows)
    text = suggestion.stream()
    web_header = text.split("# CiliumNetworkPolicy shop/flowpipe-web")[1].split("apiVersion")[0]
    api_header = text.split("# CiliumNetworkPolicy shop/flowpipe-api")[1].split("apiVersion")[0]
    assert "egress[0]: 3 flows" in web_header and "ingress[0]: 3 flows" in api_header
    assert suggestion.requests == 3


def test_source_gets_egress_and_destination_gets_ingress(tmp_path: Path) -> None:
    docs = documents(suggest(tmp_path, connection(API, DB, 5432, 40001)))
    api, db = docs[f"{CNP} shop/flowpipe-api"]["spec"], docs[f"{CNP} shop/flowpipe-db"]["spec"]
    assert api["egress"] == [
        {
            "toEndpoints": [{"matchLabels": {"app": "db"}}],
            "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}],
        }
    ]
    assert api["ingress"] == [{}]
    assert db["ingress"] == [
        {
            "fromEndpoints": [{"matchLabels": {"app": "api"}}],
            "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}],
        }
    ]
    assert db["egress"] == [{}]


def test_selectors_use_the_stable_labels_pods_carry(tmp_path: Path) -> None:
    web = rollout_labels(pod("shop", "web", **{"app.kubernetes.io/name": "web-frontend"}))
    api = rollout_labels(API)
    for flavour in ("cilium", "kubernetes"):
        suggestion = suggest(tmp_path / flavour, connection(web, api, 8080, 40001), formats=(flavour,))
        text = suggestion.stream()
        for unstable in (
            "pod-template-hash",
            "controller-revision-hash",
            "pod-template-generation",
            "serviceaccount",
        ):
            assert unstable not in text
        docs = documents(suggestion)
        kind = CNP if flavour == "cilium" else NP
        selector = "endpointSelector" if flavour == "cilium" else "podSelector"
        # app.kubernetes.io/name comes before app: the recommended label, as the pod carries it
        assert docs[f"{kind} shop/flowpipe-web"]["spec"][selector] == {
            "matchLabels": {"app.kubernetes.io/name": "web-frontend"}
        }
        assert docs[f"{kind} shop/flowpipe-api"]["spec"][selector] == {"matchLabels": {"app": "api"}}


def test_default_deny_allows_dns_to_the_observed_server_by_its_real_labels(tmp_path: Path) -> None:
    rows = connection(WEB, API, 8080, 40001) + [
        flow(WEB, dns_server(), 53, "UDP", l7_protocol=None, source_port=51000),
        flow(WEB, dns_server(), 53, "TCP", source_port=51001),
    ]
    cilium = documents(suggest(tmp_path / "a", rows))
    deny = cilium[f"{CNP} shop/flowpipe-default-deny"]["spec"]
    assert deny["endpointSelector"] == {} and deny["ingress"] == [{}]
    [dns] = deny["egress"]
    assert dns["toEndpoints"] == [
        {"matchLabels": {"k8s-app": "kube-dns", "k8s:io.kubernetes.pod.namespace": "kube-system"}}
    ]
    assert dns["toPorts"][0]["ports"] == [
        {"port": "53", "protocol": "UDP"},
        {"port": "53", "protocol": "TCP"},
    ]
    # kube-system is left alone unless asked
    assert not any("kube-system/" in key for key in cilium)
    k8s = documents(suggest(tmp_path / "a", formats=("kubernetes",)))
    spec = k8s[f"{NP} shop/flowpipe-default-deny"]["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == [
        {
            "to": [
                {
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                }
            ],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        }
    ]
    asked = documents(suggest(tmp_path / "a", include_kube_system=True))
    assert f"{CNP} kube-system/flowpipe-default-deny" in asked
    assert asked[f"{CNP} kube-system/flowpipe-coredns"]["spec"]["endpointSelector"] == {
        "matchLabels": {"k8s-app": "kube-dns"}
    }


def test_dropped_flows_are_learned_only_when_asked(tmp_path: Path) -> None:
    rows = connection(WEB, API, 8080, 40001) + [
        flow(WEB, DB, 5432, verdict="DROPPED", drop_reason_desc="POLICY_DENIED", source_port=40010),
        flow(WEB, DB, 6379, verdict="DROPPED", drop_reason_desc="CT_MAP_INSERTION_FAILED", source_port=40011),
    ]
    default = suggest(tmp_path, rows)
    assert "flowpipe-db" not in default.stream() and "5432" not in default.stream()
    learned = documents(suggest(tmp_path, learn_from_drops=True))
    db = learned[f"{CNP} shop/flowpipe-db"]["spec"]
    assert db["ingress"][0]["toPorts"] == [{"ports": [{"port": "5432", "protocol": "TCP"}]}]
    assert "6379" not in yaml.safe_dump(learned)  # not a policy decision: never learned


def test_icmp_and_sctp_become_their_own_rules(tmp_path: Path) -> None:
    rows = [
        flow(WEB, DB, None, "ICMPv4", icmp_type=8, icmp_code=0),
        flow(WEB, DB, None, "ICMPv6", icmp_type=128, icmp_code=0),
        flow(WEB, DB, 3868, "SCTP", source_port=40001),
    ]
    cilium = suggest(tmp_path, rows)
    [egress] = documents(cilium)[f"{CNP} shop/flowpipe-web"]["spec"]["egress"]
    assert egress["toPorts"] == [{"ports": [{"port": "3868", "protocol": "SCTP"}]}]
    assert egress["icmps"] == [{"fields": [{"type": 8, "family": "IPv4"}, {"type": 128, "family": "IPv6"}]}]
    docs = documents(cilium)
    text = yaml.safe_dump([docs[f"{CNP} shop/flowpipe-web"], docs[f"{CNP} shop/flowpipe-db"]])
    assert "'0'" not in text and "UDP" not in text  # never port 0/UDP for what has no port
    k8s = suggest(tmp_path, formats=("kubernetes",))
    [rule] = documents(k8s)[f"{NP} shop/flowpipe-web"]["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "SCTP", "port": 3868}]
    # ICMP cannot be written in a NetworkPolicy: said in the file and the summary, not dropped silently
    assert any("ICMPv4" in n for n in k8s.results[0].not_allowed)
    assert (
        "# left out: shop/web -> shop/db ICMPv4/8: a NetworkPolicy cannot allow ICMPv4 alone" in k8s.stream()
    )
    assert k8s.partial and not cilium.partial
    assert any("ICMPv4" in line for line in k8s.summary())


def test_l7_rules_sit_on_the_port_rule_they_belong_to(tmp_path: Path) -> None:
    rows = (
        connection(WEB, API, 8080, 40001)
        + connection(PROM, API, 9090, 40002)
        + [
            http(WEB, API, "GET", "/v1/items/1"),
            http(WEB, API, "GET", "/v1/items/2"),
        ]
    )
    docs = documents(suggest(tmp_path, rows, l7=True))
    by_port = {
        rule["toPorts"][0]["ports"][0]["port"]: rule["toPorts"][0]
        for rule in docs[f"{CNP} shop/flowpipe-api"]["spec"]["ingress"]
    }
    assert by_port["8080"]["rules"] == {"http": [{"method": "GET", "path": "^/v1/items/[^/]+$"}]}
    assert "rules" not in by_port["9090"]
    # the client's egress stays at L4: the server's proxy judges the calls
    assert "rules" not in yaml.safe_dump(docs[f"{CNP} shop/flowpipe-web"]["spec"]["egress"])


def test_other_namespaces_are_selected_by_their_namespace_label(tmp_path: Path) -> None:
    rows = connection(PROM, API, 9090, 40001)
    cilium = documents(suggest(tmp_path, rows))
    [ingress] = cilium[f"{CNP} shop/flowpipe-api"]["spec"]["ingress"]
    assert ingress["fromEndpoints"] == [
        {"matchLabels": {"app": "prometheus", "k8s:io.kubernetes.pod.namespace": "monitoring"}}
    ]
    [egress] = cilium[f"{CNP} monitoring/flowpipe-prometheus"]["spec"]["egress"]
    assert egress["toEndpoints"] == [
        {"matchLabels": {"app": "api", "k8s:io.kubernetes.pod.namespace": "shop"}}
    ]
    k8s = documents(suggest(tmp_path, formats=("kubernetes",)))
    [rule] = k8s[f"{NP} shop/flowpipe-api"]["spec"]["ingress"]
    assert rule["from"] == [
        {
            "podSelector": {"matchLabels": {"app": "prometheus"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        }
    ]


def test_reserved_peers_become_entities(tmp_path: Path) -> None:
    rows = [
        flow(WEB, reserved("kube-apiserver", "172.18.0.10", identity=7), 6443, source_port=40001),
        flow(reserved("host", "172.18.0.2"), WEB, 8080, source_port=40002),
        flow(reserved("remote-node", "172.18.0.3"), WEB, 8080, source_port=40003),
        flow(reserved("world", "192.0.2.1"), WEB, 443, source_port=40004),
    ]
    suggestion = suggest(tmp_path, rows)
    spec = documents(suggestion)[f"{CNP} shop/flowpipe-web"]["spec"]
    assert sorted(e for rule in spec["ingress"] for e in rule.get("fromEntities", ())) == [
        "host",
        "remote-node",
        "world",
    ]
    assert spec["egress"][0]["toEntities"] == ["kube-apiserver"]
    # allowed because it was forwarded, but worth a look
    assert any(
        "shop/flowpipe-web accepts ingress from the world on TCP/443" in r for r in suggestion.summary()
    )


def test_names_become_fqdn_rules_with_the_dns_rule_the_proxy_needs(tmp_path: Path) -> None:
    buckets = ["a.s3.amazonaws.com", "b.s3.amazonaws.com", "c.s3.amazonaws.com"]
    rows = [
        flow(WEB, reserved("world", "198.51.100.1", names=["api.stripe.com."]), 443, source_port=40001)
    ] + [
        flow(WEB, reserved("world", f"198.51.100.{i + 2}", names=[name]), 443, source_port=40002 + i)
        for i, name in enumerate(buckets)
    ]
    docs = documents(suggest(tmp_path, rows))
    [fqdn] = [r for r in docs[f"{CNP} shop/flowpipe-web"]["spec"]["egress"] if "toFQDNs" in r]
    assert fqdn["toFQDNs"] == [{"matchName": "api.stripe.com"}, {"matchPattern": "*.s3.amazonaws.com"}]
    assert fqdn["toPorts"] == [{"ports": [{"port": "443", "protocol": "TCP"}]}]
    # the DNS proxy must see the lookups for toFQDNs to learn the addresses
    [dns] = docs[f"{CNP} shop/flowpipe-default-deny"]["spec"]["egress"]
    assert dns["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}


def test_world_without_names_becomes_cidr_rules(tmp_path: Path) -> None:
    rows = [flow(WEB, reserved("world", "203.0.113.9"), 22, source_port=40001)]
    docs = documents(suggest(tmp_path, rows))
    [rule] = docs[f"{CNP} shop/flowpipe-web"]["spec"]["egress"]
    assert rule["toCIDR"] == ["203.0.113.9/32"] and rule["toPorts"][0]["ports"][0]["port"] == "22"


def test_http_paths_are_anchored_and_ids_generalized_only_when_several_were_seen(tmp_path: Path) -> None:
    uuid = "6f1c2a4e-3b7d-4c1a-9e2f-0a1b2c3d4e5f"
    rows = connection(WEB, API, 8080, 40001) + [
        http(WEB, API, "GET", "/v1/items/17"),
        http(WEB, API, "GET", "/v1/items/4711"),
        http(WEB, API, "GET", f"/v1/users/{uuid}"),
        http(WEB, API, "GET", "/v1/blobs/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        http(WEB, API, "GET", "/v1/blobs/60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"),
        http(WEB, API, "POST", "/v1/orders?dry=1"),
    ]
    docs = documents(suggest(tmp_path, rows, l7=True))
    [ingress] = docs[f"{CNP} shop/flowpipe-api"]["spec"]["ingress"]
    assert ingress["toPorts"][0]["rules"]["http"] == [
        {"method": "GET", "path": "^/v1/blobs/[^/]+$"},
        {"method": "GET", "path": "^/v1/items/[^/]+$"},
        {"method": "POST", "path": r"^/v1/orders(\?.*)?$"},
        {
            "method": "GET",
            "path": r"^/v1/users/6f1c2a4e\-3b7d\-4c1a\-9e2f\-0a1b2c3d4e5f$",
        },  # seen once: exact
    ]


def test_kafka_rules_by_role_and_topic(tmp_path: Path) -> None:
    kafka = pod("shop", "kafka")

    def call(src: dict[str, Any], api_key: str, topic: str) -> dict[str, Any]:
        return flow(src, kafka, 9092, flow_type="L7", l7_type="REQUEST", l7_protocol="kafka", tcp_flags=None,
                    kafka_api_key=api_key, kafka_topic=topic)  # fmt: skip

    rows = connection(API, kafka, 9092, 40001) + connection(DB, kafka, 9092, 40002)
    rows += [call(API, "produce", "orders"), call(DB, "fetch", "orders"), call(DB, "offset_commit", "orders")]
    docs = documents(suggest(tmp_path, rows, l7=True))
    rules = {
        rule["fromEndpoints"][0]["matchLabels"]["app"]: rule["toPorts"][0]["rules"]["kafka"]
        for rule in docs[f"{CNP} shop/flowpipe-kafka"]["spec"]["ingress"]
    }
    assert rules == {
        "api": [{"role": "produce", "topic": "orders"}],
        "db": [{"role": "consume", "topic": "orders"}],
    }


def test_network_policy_shape_and_what_it_cannot_express(tmp_path: Path) -> None:
    rows = connection(PROM, API, 9090, 40001) + [
        flow(API, reserved("world", "198.51.100.1", names=["api.stripe.com"]), 443, source_port=40002),
        flow(API, reserved("kube-apiserver", "172.18.0.10", identity=7), 6443, source_port=40003),
        http(PROM, API, "GET", "/metrics", port=9090),
    ]
    suggestion = suggest(tmp_path, rows, formats=("kubernetes",), l7=True)
    spec = documents(suggestion)[f"{NP} shop/flowpipe-api"]["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": "api"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert [r["to"] for r in spec["egress"]] == [
        [{"ipBlock": {"cidr": "172.18.0.10/32"}}],
        [{"ipBlock": {"cidr": "198.51.100.1/32"}}],
    ]
    assert spec["ingress"][0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    # FQDN and L7 cannot be written in a NetworkPolicy: said in the file and in the summary
    text, summary = suggestion.stream(), "\n".join(suggestion.summary())
    assert "FQDN destinations (api.stripe.com) are written as their observed addresses" in text
    assert "FQDN destinations (api.stripe.com) are written as their observed addresses" in summary
    assert "http calls on TCP/9090 are allowed at L4: a NetworkPolicy cannot restrict L7" in text
    assert "L7 (HTTP, Kafka) rules cannot be written in a NetworkPolicy" in summary


def test_a_namespace_whose_draft_would_deny_a_request_is_withheld_and_the_rest_offered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof's safety net: a draft that denies a request nothing explains (here a rule taken out of the
    draft) withholds that namespace's drafts, lists the request, and offers every other namespace."""

    def without_api_ingress(*args: Any, **kwargs: Any) -> Draft:
        draft = draft_policies(*args, **kwargs)
        draft.policies = [
            dataclasses.replace(p, rules=tuple(r for r in p.rules if r.direction != "ingress"))
            if p.name == "flowpipe-api" else p
            for p in draft.policies
        ]  # fmt: skip
        return draft

    monkeypatch.setattr("flowpipe.app.suggest.draft_policies", without_api_ingress)
    rows = connection(WEB, API, 8080, 40001) + connection(PROM, WEB, 9090, 40002)
    suggestion = suggest(tmp_path, rows)
    assert suggestion.partial
    assert {p.key for p in suggestion.results[0].policies} == {
        "monitoring/flowpipe-default-deny", "monitoring/flowpipe-prometheus"}  # fmt: skip
    left_out = suggestion.results[0].left_out
    assert {(lo.edge, lo.kind, lo.namespace) for lo in left_out} == {
        ("shop/web -> shop/api TCP/8080", "not proved", "shop")}  # fmt: skip
    assert all("drafts of namespace shop are not offered" in lo.reason for lo in left_out)
    assert any("requests the drafts were learned from denies it" in lo.reason for lo in left_out)


def test_every_document_validates(tmp_path: Path, cilium_schemas: Path) -> None:
    rows = (
        connection(PROM, API, 9090, 40001)
        + connection(WEB, API, 8080, 40002)
        + [
            flow(WEB, dns_server(), 53, "UDP", source_port=51000),
            flow(API, reserved("world", "198.51.100.1", names=["api.stripe.com"]), 443, source_port=40003),
            flow(API, reserved("world", "203.0.113.5"), 22, source_port=40004),
            flow(reserved("world", "192.0.2.1"), WEB, 443, source_port=40005),
            flow(WEB, DB, None, "ICMPv4", icmp_type=8, icmp_code=0),
            http(WEB, API, "GET", "/v1/items/1"),
            http(WEB, API, "GET", "/v1/items/2"),
        ]
    )
    drafts = [suggest(tmp_path, rows, formats=("cilium", "kubernetes"), l7=True)]
    drafts.append(suggest(tmp_path, formats=("istio",), l7=True))
    kinds = set()
    for suggestion in drafts:
        for doc in yaml.safe_load_all(suggestion.stream()):
            validate_document(doc, cilium_schemas)
            kinds.add(doc["kind"])
    assert kinds == {CNP, NP, "AuthorizationPolicy"}

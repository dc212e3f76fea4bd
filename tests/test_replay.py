"""Replay semantics, one by one, on hand-built flow tables: what Kubernetes and Cilium would allow or deny."""

from __future__ import annotations

import random
import textwrap

import pytest
from support.policy import DB_NETWORK_POLICY, flow, pod, reserved, table

from flowpipe.policy._match import Endpoint, compile_selector, requirements_match
from flowpipe.policy.load import parse_policies
from flowpipe.policy.model import LabelExpression, LabelSelector
from flowpipe.policy.replay import ReplayConfig, ReplayReport, _LabelIndex, replay_edges, replay_flows

WEB = pod("shop", "web")
API = pod("shop", "api")
DB = pod("shop", "db")
MON = pod("monitoring", "prometheus")
DNS = pod("kube-system", "coredns", k8s_app="kube-dns")
WORLD = reserved("world", "203.0.113.7")


def cnp(name: str, spec: str) -> str:
    """A CiliumNetworkPolicy in namespace shop with the given spec (YAML, not indented)."""
    body = textwrap.indent(spec.lstrip("\n"), "  ")
    return f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{body}"


def replay(policies_yaml: str, *rows: dict[str, object]) -> ReplayReport:
    return replay_flows(parse_policies(policies_yaml, path="test.yaml"), table(*rows))


def rule_counts(report: ReplayReport) -> dict[str, int]:
    return {f"{r.policy} {r.rule}": r.matched_flows for r in report.rules}


K8S_DB = DB_NETWORK_POLICY


def test_pods_no_policy_selects_allow_everything() -> None:
    report = replay(K8S_DB, flow(WEB, API, 8080), flow(API, WEB, 80))
    assert report.flows_evaluated == 2
    assert report.denied == 0 and report.would_break == 0


def test_isolation_only_in_the_policy_types_direction() -> None:
    # The db policy isolates db for ingress only: db's own egress stays open.
    report = replay(K8S_DB, flow(DB, WORLD, 443), flow(WEB, DB, 5432))
    assert report.allowed == 1 and report.denied == 1
    [edge] = report.denied_edges
    assert (edge.source, edge.destination, edge.port) == ("shop/web", "shop/db", 5432)
    assert "isolated by shop/db" in edge.reason
    assert report.would_break == 1


def test_rule_needs_matching_peer_and_port() -> None:
    report = replay(K8S_DB, flow(API, DB, 5432), flow(API, DB, 5433), flow(API, DB, 5432, protocol="UDP"))
    assert report.allowed == 1 and report.denied == 2
    assert rule_counts(report) == {"shop/db ingress[0]": 1}


def test_allow_rules_are_additive_across_policies() -> None:
    second = """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
"""
    report = replay(K8S_DB + second, flow(API, DB, 5432), flow(WEB, DB, 9999), flow(MON, DB, 5432))
    assert report.allowed == 2 and report.denied == 1
    assert rule_counts(report) == {"shop/db ingress[0]": 1, "shop/db-from-web ingress[0]": 1}
    assert report.denied_edges[0].source == "monitoring/prometheus"


def test_unused_rules_are_reported() -> None:
    report = replay(K8S_DB, flow(WEB, API, 80))
    assert [(r.policy, r.rule) for r in report.unused_rules] == [("shop/db", "ingress[0]")]


def test_namespace_selector_and_pod_selector_in_one_peer() -> None:
    policy = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: metrics, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
      podSelector: {matchLabels: {app: prometheus}}
    ports: [{port: 9090}]
"""
    other = pod("monitoring", "grafana")
    report = replay(policy, flow(MON, API, 9090), flow(other, API, 9090), flow(WEB, API, 9090))
    assert report.allowed == 1 and report.denied == 2


def test_pod_selector_alone_means_the_policy_namespace() -> None:
    policy = K8S_DB.replace("app: api", "app: prometheus")
    report = replay(policy, flow(MON, DB, 5432))
    assert report.denied == 1


def test_namespace_selector_on_namespace_labels_from_flows() -> None:
    policy = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: team, namespace: shop}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
"""
    ops = pod("tools", "runner")
    ops["labels"] = [*ops["labels"], "k8s:io.cilium.k8s.namespace.labels.team=ops"]
    report = replay(policy, flow(ops, WEB, 80), flow(MON, WEB, 80))
    assert report.allowed == 1 and report.denied == 1


def test_match_expressions() -> None:
    policy = K8S_DB.replace(
        "podSelector: {matchLabels: {app: api}}",
        "podSelector: {matchExpressions: [{key: app, operator: In, values: [api, web]}, {key: tier, operator: DoesNotExist}]}",
    )
    tiered = pod("shop", "web", tier="front")
    report = replay(policy, flow(API, DB, 5432), flow(WEB, DB, 5432), flow(tiered, DB, 5432))
    assert report.allowed == 2 and report.denied == 1


def test_ip_block_with_except_matches_only_the_world() -> None:
    policy = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]
"""
    inside = reserved("world", "203.0.113.7")
    excepted = reserved("world", "203.0.113.200")
    pod_in_range = dict(API, ip="203.0.113.9")  # a pod address in the block is still a pod, not a CIDR peer
    report = replay(policy, flow(WEB, inside, 443), flow(WEB, excepted, 443), flow(WEB, pod_in_range, 443))
    assert report.allowed == 1 and report.denied == 2


def test_port_ranges_with_end_port() -> None:
    policy = K8S_DB.replace("ports: [{port: 5432}]", "ports: [{port: 5000, endPort: 5010}]")
    report = replay(policy, flow(API, DB, 5005), flow(API, DB, 5011))
    assert report.allowed == 1 and report.denied == 1


def test_replies_are_always_allowed() -> None:
    deny_all = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""
    rows = [
        flow(DB, API, 40000, is_reply=True),
        flow(DB, API, 40000, is_reply=None, tcp_flags="SYN,ACK"),
        flow(WEB, API, 80, flow_type="L7", l7_type="RESPONSE", l7_protocol="http", is_reply=None),
        flow(WEB, API, 80),
    ]
    report = replay(deny_all, *rows)
    assert report.replies_skipped == 3
    assert report.flows_evaluated == 1 and report.denied == 1


def test_every_request_is_judged_at_both_ends_wherever_it_was_observed() -> None:
    # web may send (no egress policy) but db does not accept: a record from either end is a request db denies.
    rows = [flow(WEB, DB, 5432, traffic_direction="EGRESS"), flow(WEB, DB, 5432, traffic_direction="INGRESS")]
    report = replay(K8S_DB, *rows)
    assert report.allowed == 0 and report.would_break == report.denied == report.flows_evaluated
    assert {e.direction for e in report.denied_edges} == {"ingress"}


def test_a_request_seen_only_at_the_source_meets_the_destinations_ingress_policy() -> None:
    # Cross-node traffic reported only by the source's node (FORWARDED EGRESS TO_OVERLAY): db receives 5432
    # while its hand-written policy lets it receive 80 only, so every such request would break.
    port_80 = cnp(
        "db",
        """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: api}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
    )
    rows = [
        flow(API, DB, 5432, traffic_direction="EGRESS", trace_observation_point="TO_OVERLAY", source_port=p)
        for p in range(41000, 41012)
    ]
    report = replay(port_80, *rows)
    assert report.would_break == 12 and report.allowed == 0
    [edge] = report.denied_edges
    assert (edge.source, edge.destination, edge.port, edge.direction) == (
        "shop/api",
        "shop/db",
        5432,
        "ingress",
    )
    # The sender's own egress policy is judged as well, from the same record.
    deny_egress = cnp("api", "endpointSelector: {matchLabels: {app: api}}\negress: [{}]\n")
    report = replay(deny_egress, *rows[:1])
    assert report.would_break == 1 and report.denied_edges[0].direction == "egress"


def test_would_allow_dropped_counts_policy_drops_only() -> None:
    rows = [
        flow(API, DB, 5432, verdict="DROPPED", drop_reason_desc="POLICY_DENIED"),
        flow(API, DB, 5432, verdict="DROPPED", drop_reason_desc="CT_MAP_INSERTION_FAILED"),
        flow(WEB, DB, 5432, verdict="DROPPED", drop_reason_desc="POLICY_DENIED"),
    ]
    report = replay(K8S_DB, *rows)
    assert report.would_allow_dropped == 1
    assert report.would_break == 0
    assert report.denied_edges[0].dropped == 1


# -- Cilium ---------------------------------------------------------------------------------------------------

CNP_DB = cnp(
    "db",
    """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: api}}]
  toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
""",
)


def test_cilium_endpoints_scoped_to_policy_namespace_unless_named() -> None:
    other_api = pod("staging", "api")
    report = replay(CNP_DB, flow(API, DB, 5432), flow(other_api, DB, 5432))
    assert report.allowed == 1 and report.denied == 1
    cross = CNP_DB.replace("{app: api}", "{app: api, k8s:io.kubernetes.pod.namespace: staging}")
    report = replay(cross, flow(API, DB, 5432), flow(other_api, DB, 5432))
    assert report.allowed == 1 and report.denied_edges[0].source == "shop/api"


def test_cilium_selector_keys_with_and_without_source_prefix() -> None:
    report = replay(CNP_DB.replace("{app: api}", "{k8s:app: api}"), flow(API, DB, 5432))
    assert report.denied == 0
    report = replay(CNP_DB.replace("{app: api}", "{container:app: api}"), flow(API, DB, 5432))
    assert report.denied == 1


def test_cilium_empty_rule_is_default_deny_and_ports_without_peers_allow_everyone() -> None:
    policy = cnp(
        "lockdown",
        """
endpointSelector: {}
ingress:
- {}
- toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
    )
    report = replay(policy, flow(MON, WEB, 80), flow(WORLD, WEB, 80), flow(API, WEB, 81))
    assert report.allowed == 2 and report.denied == 1
    # the empty entry allows nothing by design and is not listed as unused
    assert [r.rule for r in report.rules] == ["ingress[1]"]


def test_cilium_enable_default_deny_false_does_not_isolate() -> None:
    policy = CNP_DB + "  enableDefaultDeny: {ingress: false}\n"
    report = replay(policy, flow(WEB, DB, 5432), flow(API, DB, 5432))
    assert report.denied == 0
    assert rule_counts(report) == {"shop/db ingress[0]": 1}


def test_cilium_deny_rules_win_over_allows() -> None:
    policy = cnp(
        "web",
        """
endpointSelector: {matchLabels: {app: web}}
egress:
- toEntities: [all]
egressDeny:
- toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.7/32]}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""",
    )
    bad = reserved("world", "203.0.113.9")
    report = replay(policy, flow(WEB, bad, 443), flow(WEB, bad, 80), flow(WEB, WORLD, 443))
    assert report.allowed == 2 and report.denied == 1
    assert "egressDeny[0]" in report.denied_edges[0].reason
    assert rule_counts(report) == {"shop/web egress[0]": 3, "shop/web egressDeny[0]": 1}


def test_cilium_deny_only_policy_still_allows_the_rest_when_allow_all_added() -> None:
    deny_only = cnp(
        "no-mon",
        """
endpointSelector: {}
ingressDeny:
- fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: monitoring}}]
""",
    )
    # A deny-only policy makes the endpoint default-deny for ingress, as Cilium does.
    report = replay(deny_only, flow(MON, WEB, 80), flow(API, WEB, 80))
    assert report.denied == 2
    allow_rest = deny_only + "  ingress:\n  - fromEntities: [all]\n"
    report = replay(allow_rest, flow(MON, WEB, 80), flow(API, WEB, 80))
    assert report.denied == 1 and report.denied_edges[0].source == "monitoring/prometheus"


@pytest.mark.parametrize(
    ("entity", "peer", "allowed"),
    [
        ("world", reserved("world", "198.51.100.1"), True),
        ("world", reserved("host", "172.18.0.2"), False),
        ("cluster", reserved("host", "172.18.0.2"), True),
        ("cluster", reserved("remote-node", "172.18.0.3"), True),
        ("cluster", pod("other", "thing"), True),
        ("cluster", reserved("world", "198.51.100.1"), False),
        ("host", reserved("host", "172.18.0.2"), True),
        ("remote-node", reserved("host", "172.18.0.2"), False),
        ("kube-apiserver", reserved("kube-apiserver", "172.18.0.10"), True),
        ("health", reserved("health", "10.0.0.9"), True),
        ("all", reserved("world", "198.51.100.1"), True),
    ],
)
def test_cilium_entities(entity: str, peer: dict[str, object], allowed: bool) -> None:
    policy = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: web, namespace: shop}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  egress:
  - toEntities: [{entity}]
"""
    report = replay(policy, flow(WEB, peer, 443))
    assert (report.denied == 0) is allowed


def test_reserved_identity_from_number_when_labels_are_missing() -> None:
    policy = cnp(
        "web",
        """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEntities: [host]
""",
    )
    host_without_labels = {"identity": 1, "labels": [], "ip": "172.18.0.2"}
    unknown = {"identity": None, "labels": [], "ip": "198.51.100.1"}
    report = replay(policy, flow(host_without_labels, WEB, 80), flow(unknown, WEB, 80))
    assert report.allowed == 1 and report.denied_edges[0].source == "world:198.51.100.1"


def test_cilium_fqdn_rules_match_destination_names() -> None:
    policy = cnp(
        "web",
        """
endpointSelector: {matchLabels: {app: web}}
egress:
- toFQDNs: [{matchName: api.stripe.com}, {matchPattern: "*.s3.amazonaws.com"}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""",
    )
    stripe = reserved("world", "198.51.100.1", names=["api.stripe.com."])
    bucket = reserved("world", "198.51.100.2", names=["Logs.S3.amazonaws.com"])
    deep = reserved("world", "198.51.100.3", names=["a.b.s3.amazonaws.com"])
    nameless = reserved("world", "198.51.100.4")
    report = replay(policy, *(flow(WEB, d, 443) for d in (stripe, bucket, deep, nameless)))
    assert report.allowed == 2 and report.denied == 2
    assert {e.destination for e in report.denied_edges} == {
        "world:a.b.s3.amazonaws.com",
        "world:198.51.100.4",
    }


def test_cilium_to_cidr_and_world_v4_v6() -> None:
    policy = cnp(
        "web",
        """
endpointSelector: {matchLabels: {app: web}}
egress:
- toCIDR: [198.51.100.0/24]
""",
    )
    v6 = reserved("world", "2001:db8::1")
    report = replay(policy, flow(WEB, reserved("world", "198.51.100.200"), 22), flow(WEB, v6, 22))
    assert report.allowed == 1 and report.denied == 1


HTTP_POLICY = cnp(
    "api",
    """
endpointSelector: {matchLabels: {app: api}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts:
  - ports: [{port: "8080", protocol: TCP}]
    rules:
      http:
      - {method: GET, path: "/v1/items(/[0-9]+)?"}
      - {method: "POST|PUT", path: "/v1/orders"}
""",
)


def http(method: str, url: str) -> dict[str, object]:
    return flow(
        WEB,
        API,
        8080,
        flow_type="L7",
        l7_type="REQUEST",
        l7_protocol="http",
        http_method=method,
        http_url=url,
    )


def test_cilium_http_rules_match_method_and_whole_path() -> None:
    rows = [
        http("GET", "http://api.shop:8080/v1/items/42"),
        http("PUT", "http://api.shop:8080/v1/orders"),
        http("DELETE", "http://api.shop:8080/v1/orders"),
        http("GET", "http://api.shop:8080/v1/items/42/secret"),
        http("GET", "http://api.shop:8080/v1/items?page=2"),  # the query string is part of the path matched
        flow(WEB, API, 8080),  # the L3/L4 connection itself is allowed (redirected to the proxy)
    ]
    report = replay(HTTP_POLICY, *rows)
    assert report.allowed == 3 and report.denied == 3
    assert {e.l7 for e in report.denied_edges} == {
        "DELETE /v1/orders",
        "GET /v1/items/42/secret",
        "GET /v1/items",
    }


def test_cilium_kafka_rules_by_role_and_topic() -> None:
    policy = cnp(
        "kafka",
        """
endpointSelector: {matchLabels: {app: kafka}}
ingress:
- fromEndpoints: [{matchLabels: {app: api}}]
  toPorts:
  - ports: [{port: "9092", protocol: TCP}]
    rules:
      kafka: [{role: produce, topic: orders}]
""",
    )
    kafka = pod("shop", "kafka")

    def request(api_key: str, topic: str | None) -> dict[str, object]:
        return flow(
            API,
            kafka,
            9092,
            flow_type="L7",
            l7_type="REQUEST",
            l7_protocol="kafka",
            kafka_api_key=api_key,
            kafka_topic=topic,
        )

    rows = [
        request("produce", "orders"),
        request("metadata", None),
        request("produce", "payments"),
        request("fetch", "orders"),
    ]
    report = replay(policy, *rows)
    assert report.allowed == 2 and report.denied == 2
    assert {e.l7 for e in report.denied_edges} == {"kafka produce payments", "kafka fetch orders"}


def test_cilium_dns_rules_on_port_53() -> None:
    policy = cnp(
        "dns",
        """
endpointSelector: {}
egress:
- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
  toPorts:
  - ports: [{port: "53", protocol: UDP}]
    rules: {dns: [{matchPattern: "*.shop.svc.cluster.local"}]}
""",
    )

    def query(name: str) -> dict[str, object]:
        return flow(WEB, DNS, 53, "UDP", flow_type="L7", l7_type="REQUEST", l7_protocol="dns", dns_query=name)

    report = replay(
        policy, query("api.shop.svc.cluster.local."), query("evil.example.com."), flow(WEB, DNS, 53, "UDP")
    )
    assert report.allowed == 2 and report.denied == 1


def test_cilium_icmp_rules() -> None:
    policy = cnp(
        "ping",
        """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{}]
  icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]
""",
    )
    report = replay(
        policy,
        flow(API, DB, None, "ICMPv4", icmp_type=8),
        flow(API, DB, None, "ICMPv4", icmp_type=13),
        flow(API, DB, 5432),
    )
    assert report.allowed == 1 and report.denied == 2


def test_clusterwide_policy_selects_every_namespace() -> None:
    policy = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-world-ingress}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [cluster]
"""
    report = replay(policy, flow(WORLD, WEB, 80), flow(WORLD, MON, 9090), flow(API, MON, 9090))
    assert report.denied == 2 and report.allowed == 1
    assert {r.policy for r in report.rules} == {"no-world-ingress"}


def test_kubernetes_and_cilium_policies_combine() -> None:
    report = replay(
        K8S_DB + "---\n" + CNP_DB.replace("app: api", "app: web").replace("name: db", "name: db-web"),
        flow(API, DB, 5432),
        flow(WEB, DB, 5432),
        flow(MON, DB, 5432),
    )
    assert report.allowed == 2 and report.denied == 1


def test_replay_edges_accepts_distinct_edges_with_counts() -> None:
    policies = parse_policies(K8S_DB, path="x.yaml")
    edge = {
        "verdict": "FORWARDED",
        "source_namespace": "shop",
        "source_labels": ["k8s:app=web"],
        "destination_namespace": "shop",
        "destination_workload": "db",
        "destination_labels": ["k8s:app=db"],
        "l4_protocol": "TCP",
        "destination_port": 5432,
        "flows": 250,
    }
    report = replay_edges(policies, [edge])
    assert report.flows_evaluated == 250 and report.would_break == 250
    assert report.to_dict()["denied_edges"][0]["flows"] == 250


def test_json_shape() -> None:
    report = replay(K8S_DB, flow(API, DB, 5432), flow(WEB, DB, 5432))
    data = report.to_dict()
    for key in (
        "flows_evaluated",
        "would_break",
        "would_allow_dropped",
        "denied_edges",
        "rules",
        "unused_rules",
    ):
        assert key in data
    assert data["rules"] == [
        {
            "policy": "shop/db",
            "rule": "ingress[0]",
            "action": "allow",
            "matched_flows": 1,
            "file": "test.yaml",
        }
    ]


def test_local_host_ingress_is_allowed_unless_configured() -> None:
    host = reserved("host", "172.18.0.2")
    policies = parse_policies(K8S_DB, path="x.yaml")
    report = replay_flows(policies, table(flow(host, DB, 8080)))
    assert report.denied == 0  # kubelet probes pass, as with allow-localhost: auto
    strict = replay_flows(policies, table(flow(host, DB, 8080)), config=ReplayConfig(allow_localhost=False))
    assert strict.denied == 1


def test_ip_blocks_select_nodes_only_in_the_nodes_mode() -> None:
    policy = K8S_DB.replace(
        "[{podSelector: {matchLabels: {app: api}}}]", "[{ipBlock: {cidr: 172.18.0.0/16}}]"
    )
    policies = parse_policies(policy, path="x.yaml")
    node = reserved("remote-node", "172.18.0.3")
    assert replay_flows(policies, table(flow(node, DB, 5432))).denied == 1
    assert (
        replay_flows(policies, table(flow(node, DB, 5432)), config=ReplayConfig(cidr_match_nodes=True)).denied
        == 0
    )


def test_tcp_packets_of_unknown_direction_are_not_judged() -> None:
    rows = [
        flow(WEB, DB, 5432, is_reply=None, tcp_flags="SYN"),  # opens a connection: a request
        flow(DB, WEB, 40000, is_reply=None, tcp_flags="ACK,PSH"),  # could be either way: not judged
    ]
    report = replay(K8S_DB, *rows)
    assert report.flows_evaluated == 1 and report.replies_skipped == 1 and report.denied == 1


def test_pods_named_without_labels_get_the_labels_seen_elsewhere() -> None:
    # Older agents report egress-proxy L7 records with the world identity but the pod's name.
    unresolved = {
        "namespace": "shop",
        "pod_name": DB["pod_name"],
        "identity": 2,
        "labels": ["reserved:world"],
    }
    rows = [
        flow(API, DB, 5432),
        flow(
            API,
            unresolved,
            5432,
            flow_type="L7",
            l7_type="REQUEST",
            l7_protocol="http",
            http_method="GET",
            http_url="/x",
        ),
    ]
    report = replay(CNP_DB, *rows)
    assert report.denied == 0 and report.flows_evaluated == 2


def test_cilium_endpoint_selectors_of_reserved_labels() -> None:
    policy = CNP_DB.replace("{matchLabels: {app: api}}", '{matchLabels: {"reserved:remote-node": ""}}')
    node = reserved("remote-node", "172.18.0.3")
    report = replay(policy, flow(node, DB, 5432), flow(API, DB, 5432))
    assert report.allowed == 1 and report.denied_edges[0].source == "shop/api"


def test_a_pod_recorded_with_a_reserved_identity_is_judged_as_that_identity() -> None:
    # kube-dns on the host network: the record names its pod, but Cilium knows it as the world.
    host_dns = {**DNS, "labels": ["reserved:world"], "identity": 2, "ip": "10.156.0.10"}
    kube_system_deny = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: kube-system}\n"
        "spec: {podSelector: {}, policyTypes: [Ingress]}\n"
    )
    by_label = cnp(
        "web",
        """
endpointSelector: {matchLabels: {app: web}}
egress:
- toEndpoints: [{matchLabels: {k8s-app: kube-dns, k8s:io.kubernetes.pod.namespace: kube-system}}]
""",
    )
    rows = [flow(WEB, host_dns, 53, "UDP")]
    assert replay(kube_system_deny, *rows).denied == 0  # no policy selects it while it has that identity
    assert replay(by_label, *rows).would_break == 1  # its labels do not match


def test_the_label_index_offers_every_policy_or_rule_that_can_match_in_order() -> None:
    """Policies and rules are looked up by a label they require: whatever matches an endpoint is among the ones
    offered (offered in order, once), whatever the selector's operators, sources and namespace."""
    rng = random.Random(5)
    keys = ["app", "k8s:app", "tier", "container:tier", "io.kubernetes.pod.namespace", "$host"]
    values = ["web", "api", "db", "shop", ""]

    def selector() -> tuple:
        labels = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 2))}
        expressions = [
            LabelExpression(
                rng.choice(keys), op, tuple(rng.sample(values, 2)) if op in ("In", "NotIn") else ()
            )
            for op in rng.sample(["In", "NotIn", "Exists", "DoesNotExist"], rng.randint(0, 2))
        ]
        return compile_selector(LabelSelector.of(labels, *expressions))

    def endpoint() -> Endpoint:
        labels = [f"{rng.choice(['k8s', 'container'])}:{rng.choice(['app', 'tier'])}={rng.choice(values)}"
                  for _ in range(rng.randint(0, 3))] + (["reserved:host"] if rng.random() < 0.1 else [])  # fmt: skip
        return Endpoint(
            rng.choice(["shop", "web", None]), labels, rng.choice([None, 1, 2, 12345]), "10.0.0.1"
        )

    for _ in range(300):
        items = [(i, None if rng.random() < 0.1 else [selector() for _ in range(rng.randint(1, 2))])
                 for i in range(rng.randint(0, 8))]  # fmt: skip
        index = _LabelIndex(items)
        for _ in range(20):
            ep = endpoint()
            offered = index.candidates(ep)
            assert offered == sorted(set(offered))
            matching = [i for i, alternatives in items
                        if alternatives is None or any(requirements_match(r, ep) for r in alternatives)]  # fmt: skip
            assert set(matching) <= set(offered), (items, ep.key)

"""FlowFilter matching of the built-in Observer server (whitelist/blacklist semantics, each filter field)."""

from __future__ import annotations

from typing import Any

import pytest

from flowpipe._proto.flow import flow_pb2
from flowpipe.errors import ConfigError
from flowpipe.server.buffer import build_entry
from flowpipe.server.fieldmask import apply_field_mask, compile_field_mask
from flowpipe.server.filters import FlowMatcher, parse_pod_filter
from flowpipe.server.selectors import parse_label_selector, selector_matches


def web_to_api(**changes: Any) -> flow_pb2.Flow:
    """An HTTP request from production/web to production/api observed on kind-worker."""
    flow = flow_pb2.Flow(
        node_name="kind-worker",
        verdict=flow_pb2.FORWARDED,
        uuid="11111111-0000-0000-0000-000000000001",
        traffic_direction=flow_pb2.EGRESS,
        Type=flow_pb2.L7,
        destination_names=["api.production.svc.cluster.local"],
    )
    flow.time.FromSeconds(1_700_000_000)
    flow.IP.source, flow.IP.destination, flow.IP.ipVersion = "10.0.1.5", "10.0.2.7", flow_pb2.IPv4
    flow.l4.TCP.source_port, flow.l4.TCP.destination_port = 43210, 8080
    flow.l4.TCP.flags.SYN = True
    flow.l4.TCP.flags.ACK = True
    flow.source.namespace, flow.source.pod_name, flow.source.identity = (
        "production",
        "web-7d9f8b6c4-x2k8p",
        1001,
    )
    flow.source.labels.extend(
        ["k8s:app=web", "k8s:tier=frontend", "k8s:io.kubernetes.pod.namespace=production"]
    )
    flow.source.workloads.add(name="web", kind="Deployment")
    flow.destination.namespace, flow.destination.pod_name, flow.destination.identity = (
        "production",
        "api-5f6d-abcde",
        1002,
    )
    flow.destination.labels.extend(["k8s:app=api", "k8s:tier=backend"])
    flow.destination.workloads.add(name="api", kind="Deployment")
    flow.event_type.type, flow.event_type.sub_type = 129, 0
    flow.is_reply.value = False
    flow.l7.http.code, flow.l7.http.method = 503, "GET"
    flow.l7.http.url = "http://api.production:8080/api/v1/orders/42?x=1"
    for key, value in changes.items():
        setattr(flow, key, value)
    return flow


def dropped_dns() -> flow_pb2.Flow:
    """A DNS lookup from staging/worker dropped by policy on kind-worker2, without is_reply."""
    flow = flow_pb2.Flow(
        node_name="prod-cluster/kind-worker2",
        verdict=flow_pb2.DROPPED,
        drop_reason_desc=flow_pb2.POLICY_DENIED,
        traffic_direction=flow_pb2.EGRESS,
        uuid="22222222-0000-0000-0000-000000000002",
    )
    flow.IP.source, flow.IP.destination = "10.0.3.9", "10.96.0.10"
    flow.l4.UDP.source_port, flow.l4.UDP.destination_port = 53000, 53
    flow.source.namespace, flow.source.pod_name = "staging", "worker-0"
    flow.source.labels.extend(["k8s:app=worker", "reserved:init"])
    flow.destination.namespace, flow.destination.pod_name = "kube-system", "coredns-abc"
    flow.destination.labels.append("k8s:k8s-app=kube-dns")
    flow.l7.dns.query = "api.stripe.com."
    return flow


FLOWS = {"web": web_to_api(), "dns": dropped_dns()}


def passing(
    whitelist: list[dict[str, Any]] | None = None, blacklist: list[dict[str, Any]] | None = None
) -> set[str]:
    """Names of FLOWS that pass the given filters (given as FlowFilter keyword dicts)."""
    matcher = FlowMatcher(
        [flow_pb2.FlowFilter(**f) for f in whitelist or []],
        [flow_pb2.FlowFilter(**f) for f in blacklist or []],
    )
    return {name for name, flow in FLOWS.items() if matcher.matches(flow)}


def test_no_filters_pass_everything() -> None:
    assert passing() == {"web", "dns"}
    assert FlowMatcher().accepts_all


def test_whitelist_filters_are_ored() -> None:
    assert passing([{"source_pod": ["production/"]}]) == {"web"}
    assert passing([{"source_pod": ["production/"]}, {"verdict": [flow_pb2.DROPPED]}]) == {"web", "dns"}


def test_fields_inside_one_filter_are_anded() -> None:
    assert passing([{"source_pod": ["production/"], "verdict": [flow_pb2.DROPPED]}]) == set()
    assert passing([{"source_pod": ["staging/"], "verdict": [flow_pb2.DROPPED]}]) == {"dns"}


def test_values_inside_one_field_are_ored() -> None:
    assert passing([{"source_pod": ["staging/", "production/"]}]) == {"web", "dns"}


def test_blacklist_drops_on_any_match() -> None:
    assert passing(blacklist=[{"verdict": [flow_pb2.DROPPED]}]) == {"web"}
    assert passing(
        [{"protocol": ["tcp", "udp"]}], [{"destination_port": ["53"]}, {"http_method": ["post"]}]
    ) == {"web"}
    assert passing(blacklist=[{}]) == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("production/web", ("production", "web")),
        ("production/", ("production", "")),
        ("/web", ("", "web")),
        ("web", ("default", "web")),
    ],
)
def test_pod_filter_syntax(text: str, expected: tuple[str, str]) -> None:
    assert parse_pod_filter(text) == expected


@pytest.mark.parametrize(
    ("field", "values", "expected"),
    [
        ("source_pod", ["production/web-"], {"web"}),
        ("source_pod", ["production/api"], set()),
        ("source_pod", ["/worker"], {"dns"}),
        ("destination_pod", ["kube-system/"], {"dns"}),
        ("source_ip", ["10.0.1.5"], {"web"}),
        ("source_ip", ["10.0.0.0/16"], {"web", "dns"}),
        ("destination_ip", ["10.96.0.0/12"], {"dns"}),
        ("destination_ip", ["fd00::/8"], set()),
        ("source_port", ["43210"], {"web"}),
        ("destination_port", ["53", "8080"], {"web", "dns"}),
        ("verdict", [flow_pb2.FORWARDED], {"web"}),
        ("protocol", ["TCP"], {"web"}),
        ("protocol", ["udp"], {"dns"}),
        ("protocol", ["http"], {"web"}),
        ("protocol", ["dns"], {"dns"}),
        ("protocol", ["icmp"], set()),
        ("node_name", ["kind-worker"], {"web"}),
        ("node_name", ["kind-*"], {"web", "dns"}),
        ("node_name", ["prod-cluster/*"], {"dns"}),
        ("node_name", ["default/kind-worker"], {"web"}),
        ("event_type", [flow_pb2.EventTypeFilter(type=129)], {"web"}),
        ("event_type", [flow_pb2.EventTypeFilter(type=129, match_sub_type=True, sub_type=3)], set()),
        ("traffic_direction", [flow_pb2.EGRESS], {"web", "dns"}),
        ("traffic_direction", [flow_pb2.INGRESS], set()),
        ("reply", [False], {"web", "dns"}),
        ("reply", [True], set()),
        ("uuid", ["22222222-0000-0000-0000-000000000002"], {"dns"}),
        ("dns_query", [r"stripe\.com"], {"dns"}),
        ("dns_query", ["^google"], set()),
        ("drop_reason_desc", [flow_pb2.POLICY_DENIED], {"dns"}),
        ("http_status_code", ["503"], {"web"}),
        ("http_status_code", ["5+"], {"web"}),
        ("http_status_code", ["4+"], set()),
        ("http_method", ["get"], {"web"}),
        ("http_path", ["^/api/v1/orders/[0-9]+$"], {"web"}),
        ("http_url", ["x=1"], {"web"}),
        ("destination_fqdn", ["*.production.svc.cluster.local"], {"web"}),
        ("destination_fqdn", ["*.local"], set()),
        ("source_identity", [1001], {"web"}),
        ("destination_identity", [1001], set()),
        ("source_workload", [flow_pb2.Workload(name="web")], {"web"}),
        ("source_workload", [flow_pb2.Workload(kind="Deployment")], {"web"}),
        ("destination_workload", [flow_pb2.Workload(name="web", kind="Deployment")], set()),
        ("ip_version", [flow_pb2.IPv4], {"web"}),
        ("tcp_flags", [flow_pb2.TCPFlags(SYN=True)], {"web"}),
        ("tcp_flags", [flow_pb2.TCPFlags(SYN=True, FIN=True)], set()),
    ],
)
def test_each_filter_field(field: str, values: list[Any], expected: set[str]) -> None:
    assert passing([{field: values}]) == expected


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", {"web"}),
        ("k8s:app=web", {"web"}),
        ("any:app=web", {"web"}),
        ("reserved:app=web", set()),
        ("app in (web, worker)", {"web", "dns"}),
        ("app notin (web)", {"dns"}),
        ("app!=web", {"dns"}),
        ("tier", {"web"}),
        ("!tier", {"dns"}),
        ("app=web,tier=frontend", {"web"}),
        ("app=web,tier=backend", set()),
        ("reserved:init", {"dns"}),
    ],
)
def test_source_label_selectors(selector: str, expected: set[str]) -> None:
    assert passing([{"source_label": [selector]}]) == expected


def test_destination_label_selector() -> None:
    assert passing([{"destination_label": ["k8s-app=kube-dns"]}]) == {"dns"}


def test_label_selector_numeric_comparison() -> None:
    requirements = parse_label_selector("replicas>2")
    assert selector_matches(requirements, ["k8s:replicas=3"])
    assert not selector_matches(requirements, ["k8s:replicas=1"])


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        ({"source_ip": ["10.0.0.300"]}, "source_ip"),
        ({"destination_port": ["http"]}, "destination_port"),
        ({"protocol": ["quic"]}, "unknown protocol"),
        ({"dns_query": ["(unclosed"]}, "dns_query"),
        ({"http_status_code": ["five hundred"]}, "http_status_code"),
        ({"source_label": ["app in (web"]}, "label selector"),
        ({"source_label": ["a=b=c"]}, "label selector"),
    ],
)
def test_invalid_filters_raise_config_error(flt: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FlowMatcher([flow_pb2.FlowFilter(**flt)])


def test_cel_expressions_are_refused() -> None:
    flt = flow_pb2.FlowFilter()
    flt.experimental.cel_expression.append("_flow.verdict == 1")
    with pytest.raises(ConfigError, match="CEL"):
        FlowMatcher([flt])


def test_node_specialisation_skips_whole_nodes() -> None:
    matcher = FlowMatcher([flow_pb2.FlowFilter(node_name=["kind-worker"])])
    assert matcher.for_node("kind-worker2") is None
    node_matcher = matcher.for_node("kind-worker")
    assert node_matcher is not None and node_matcher.accepts_all
    blacklisted = FlowMatcher(blacklist=[flow_pb2.FlowFilter(node_name=["kind-worker"])])
    assert blacklisted.for_node("kind-worker") is None
    assert blacklisted.for_node("other") is not None


def test_stored_flows_match_like_decoded_ones() -> None:
    matcher = FlowMatcher([flow_pb2.FlowFilter(source_pod=["production/web"], destination_port=["8080"])])
    for flow in FLOWS.values():
        entry = build_entry(0, flow)
        node_matcher = matcher.for_node(flow.node_name)
        assert node_matcher is not None
        assert node_matcher(entry) == matcher.matches(flow)


def test_field_mask_keeps_only_the_given_paths() -> None:
    flow = web_to_api()
    mask = compile_field_mask(["time", "source.identity", "l4", "IP.source"])
    assert mask is not None
    apply_field_mask(flow, mask)
    assert flow.time.seconds == 1_700_000_000
    assert flow.source.identity == 1001 and not flow.source.pod_name and not flow.source.labels
    assert flow.l4.TCP.destination_port == 8080
    assert flow.IP.source == "10.0.1.5" and not flow.IP.destination
    assert not flow.HasField("destination") and not flow.HasField("l7") and not flow.uuid


@pytest.mark.parametrize("path", ["nope", "source.nope", "source.labels.x", "verdict.x", ""])
def test_field_mask_rejects_invalid_paths(path: str) -> None:
    with pytest.raises(ConfigError, match="field_mask"):
        compile_field_mask([path])

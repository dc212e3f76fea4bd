"""The built-in simulator: determinism, flow shapes, exact ground truth of every fault, the jsonpb output.

The jsonpb file output is also checked against the protobuf path (identical rows).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.cli import cli
from flowpipe.errors import ConfigError
from flowpipe.sim import FAULT_NAMES, GroundTruth, Simulator, SimulatorConfig, parse_faults, resolver
from flowpipe.sim import edges as e
from flowpipe.sim import faults as f

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DURATION = 60.0
RATE = 400.0

Flow = flow_pb2.Flow


BASE = SimulatorConfig(seed=11, start=START, duration_seconds=DURATION, rate_flows_per_second=RATE)
Run = tuple[Simulator, list[observer_pb2.GetFlowsResponse], GroundTruth]


def run(**overrides: Any) -> tuple[Simulator, list[observer_pb2.GetFlowsResponse]]:
    sim = Simulator(replace(BASE, **overrides))
    return sim, list(sim.responses())


@pytest.fixture(scope="module")
def faulty() -> Run:
    sim, responses = run()
    return sim, responses, sim.ground_truth()


@pytest.fixture(scope="module")
def flows(faulty: Run) -> list[Flow]:
    return [r.flow for r in faulty[1]]


@pytest.fixture(scope="module")
def truth(faulty: Run) -> GroundTruth:
    return faulty[2]


def ns(value: str) -> int:
    stamp = Timestamp()
    stamp.FromJsonString(value)
    return stamp.ToNanoseconds()


def t_ns(flow: Flow) -> int:
    return flow.time.ToNanoseconds()


def workload(endpoint: flow_pb2.Endpoint) -> str | None:
    if endpoint.workloads:
        return f"{endpoint.namespace}/{endpoint.workloads[0].name}"
    # A remote pod known only by identity and labels: its namespace and app labels still name it.
    labels = dict(label.split("=", 1) for label in endpoint.labels if "=" in label)
    namespace, app = labels.get("k8s:io.kubernetes.pod.namespace"), labels.get("k8s:app")
    return f"{namespace}/{app}" if namespace and app else None


def is_dns(flow: Flow) -> bool:
    return flow.Type == flow_pb2.L7 and flow.l7.WhichOneof("record") == "dns"


def dns_responses(flows: list[Flow], rcode: int) -> list[Flow]:
    return [x for x in flows if is_dns(x) and x.l7.type == flow_pb2.RESPONSE and x.l7.dns.rcode == rcode]


def in_window(flows: list[Flow], fault: f.FaultTruth) -> bool:
    assert fault.window_start is not None and fault.window_end is not None
    low, high = ns(fault.window_start), ns(fault.window_end) + 10**9  # connections may end after the window
    return all(low <= t_ns(x) < high for x in flows)


# --- determinism, order, identity ---------------------------------------------------------------------------


def test_same_seed_same_flows_and_another_seed_differs() -> None:
    def serialized(seed: int) -> list[bytes]:
        sim = Simulator(
            SimulatorConfig(seed=seed, start=START, duration_seconds=10, rate_flows_per_second=300)
        )
        return [x.SerializeToString(deterministic=True) for x in sim.flows()]

    first, again, other = serialized(3), serialized(3), serialized(4)
    assert len(first) > 1000
    assert first == again
    assert first != other


def test_flows_are_time_ordered_with_unique_uuids_inside_the_window(flows: list[Flow]) -> None:
    times = [t_ns(x) for x in flows]
    assert times == sorted(times)
    start = int(START.timestamp()) * 10**9
    assert start <= times[0] and times[-1] < start + int(DURATION * 1e9)
    uuids = [x.uuid for x in flows]
    assert all(len(u) == 36 and u[14] == "4" for u in uuids)
    assert len(set(uuids)) == len(uuids)


def test_rate_and_max_flows() -> None:
    _, responses = run(duration_seconds=20, rate_flows_per_second=500)
    assert 0.8 * 10_000 < len(responses) < 1.2 * 10_000
    limited = Simulator(SimulatorConfig(seed=11, start=START, duration_seconds=20, max_flows=777))
    assert sum(1 for _ in limited.flows()) == 777
    assert limited.ground_truth().totals["flows"] == 777


def test_node_names_carry_the_cluster_unless_it_is_default() -> None:
    nodes = ["control-plane", "worker-1", "worker-2", "worker-3"]
    named = Simulator(SimulatorConfig(cluster_name="eu-prod", duration_seconds=1, rate_flows_per_second=50))
    assert {x.node_name for x in named.flows()} <= {f"eu-prod/{n}" for n in nodes}
    default = Simulator(SimulatorConfig(cluster_name="default", duration_seconds=1, rate_flows_per_second=50))
    assert {x.node_name for x in default.flows()} <= set(nodes)
    assert default.node_names == nodes


def test_envelopes_copy_node_and_time(faulty: Run) -> None:
    sim, responses, _ = faulty
    assert {r.node_name for r in responses} == set(sim.node_names)
    assert all(r.node_name == r.flow.node_name and r.time == r.flow.time for r in responses)
    assert all(name.startswith("sim/") for name in sim.node_names)


# --- what Cilium would show ---------------------------------------------------------------------------------


def test_connections_are_seen_at_both_ends_with_replies_and_tcp_flags(flows: list[Flow]) -> None:
    traces = [x for x in flows if x.event_type.type == 4]
    web_api = [
        x
        for x in traces
        if workload(x.source) == "production/web" and workload(x.destination) == "production/api"
    ]
    egress = {x.node_name for x in web_api if x.traffic_direction == flow_pb2.EGRESS}
    ingress = {x.node_name for x in web_api if x.traffic_direction == flow_pb2.INGRESS}
    assert egress and ingress
    # The egress trace is taken on the client's node, the ingress trace on the server's node.
    for x in web_api:
        local = x.source if x.traffic_direction == flow_pb2.EGRESS else x.destination
        assert local.ID != 0
    replies = [x for x in traces if x.is_reply.value]
    assert replies and all(x.reply for x in replies)
    assert all(x.HasField("is_reply") for x in traces)
    flags = Counter(
        json_format.MessageToJson(x.l4.TCP.flags, indent=None) for x in traces if x.l4.HasField("TCP")
    )
    for combo in (
        '{"SYN": true}',
        '{"SYN": true, "ACK": true}',
        '{"ACK": true}',
        '{"FIN": true, "ACK": true}',
    ):
        assert flags[combo] > 0
    points = {x.trace_observation_point for x in traces}
    assert {flow_pb2.TO_ENDPOINT, flow_pb2.TO_OVERLAY, flow_pb2.TO_STACK, flow_pb2.TO_PROXY} <= points


def test_l7_records_dns_http_kafka(flows: list[Flow]) -> None:
    l7 = [x for x in flows if x.Type == flow_pb2.L7]
    assert all(x.event_type.type == 129 for x in l7)
    kinds = Counter((x.l7.WhichOneof("record"), x.l7.type) for x in l7)
    for kind in ("dns", "http", "kafka"):
        assert kinds[(kind, flow_pb2.REQUEST)] > 0 and kinds[(kind, flow_pb2.RESPONSE)] > 0
    responses = [x for x in l7 if x.l7.type == flow_pb2.RESPONSE]
    assert all(x.l7.latency_ns > 0 and x.is_reply.value for x in responses)
    http = [x.l7.http for x in l7 if x.l7.WhichOneof("record") == "http"]
    assert {"GET", "POST", "PUT"} <= {h.method for h in http}
    assert any("/api/v1/" in h.url and h.url.rsplit("/", 1)[-1].isdigit() for h in http)
    assert any(h.url.endswith("/metrics") for h in http)
    dns = [x.l7.dns for x in l7 if is_dns(x)]
    assert all(d.query.endswith(".") and list(d.qtypes) == ["A"] for d in dns)
    answered = [d for d in dns if d.ips]
    assert answered and all(d.ttl > 0 and d.rcode == 0 for d in answered)
    assert {t.topic for t in (x.l7.kafka for x in l7 if x.l7.WhichOneof("record") == "kafka")} == {
        "orders",
        "payments",
    }


def test_world_flows_carry_dns_names_and_reserved_identities(flows: list[Flow]) -> None:
    # (Socket-LB events name a Service's ClusterIP with the world identity, and hostNetwork pods such as
    # node-local-dns are recorded with the world identity and their pod name: checked apart.)
    to_world = [
        x
        for x in flows
        if x.destination.identity == 2 and x.Type != flow_pb2.SOCK and not x.destination.pod_name
    ]
    external = {ip for ips in e.EXTERNAL_IPS.values() for ip in ips}
    assert to_world
    for x in to_world:
        assert list(x.destination.labels) == ["reserved:world"]
        if x.IP.destination in external:
            assert list(x.destination_names) == [
                n for n, ips in e.EXTERNAL_IPS.items() if x.IP.destination in ips
            ]
        else:
            assert x.IP.destination in e.WORLD_CLIENTS and not x.destination_names
    names = {n for x in to_world for n in x.destination_names}
    assert names == set(e.EXTERNAL_IPS)
    reserved = {
        (ep.identity, tuple(ep.labels))
        for x in flows
        for ep in (x.source, x.destination)
        if ep.identity < 256
    }
    assert (1, ("reserved:host",)) in reserved
    assert (4, ("reserved:health",)) in reserved
    assert (6, ("reserved:remote-node",)) in reserved
    assert (7, ("reserved:kube-apiserver",)) in reserved
    apiserver = [x for x in flows if x.destination.identity == 7]
    assert {x.l4.TCP.destination_port for x in apiserver} == {6443}


def test_pod_labels_always_name_their_namespace(flows: list[Flow]) -> None:
    identities: dict[tuple[str, ...], set[int]] = {}
    for x in flows:
        for ep in (x.source, x.destination):
            if ep.pod_name and ep.identity != 2:  # not a hostNetwork pod recorded with the world identity
                assert f"k8s:io.kubernetes.pod.namespace={ep.namespace}" in ep.labels
                assert (
                    f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ep.namespace}"
                    in ep.labels
                )
                assert "k8s:io.cilium.k8s.policy.cluster=sim" in ep.labels
                assert ep.identity >= 256 and ep.workloads and ep.cluster_name == "sim"
                identities.setdefault(tuple(ep.labels), set()).add(ep.identity)
    assert all(len(ids) == 1 for ids in identities.values())
    assert len({next(iter(ids)) for ids in identities.values()}) == len(identities)


def test_policy_attribution_only_on_verdict_events(flows: list[Flow]) -> None:
    verdicts = [x for x in flows if x.event_type.type == 5]
    allowed = [x for x in verdicts if x.verdict in (flow_pb2.FORWARDED, flow_pb2.REDIRECTED)]
    assert allowed and all(list(x.egress_allowed_by) or list(x.ingress_allowed_by) for x in allowed)
    attributed = [p for x in allowed for p in (*x.egress_allowed_by, *x.ingress_allowed_by)]
    assert all(p.kind == "CiliumNetworkPolicy" and p.namespace and p.revision > 0 for p in attributed)
    assert not any(x.egress_allowed_by or x.ingress_allowed_by for x in flows if x.event_type.type == 4)


# --- a clean run ------------------------------------------------------------------------------------------


def test_clean_run_has_no_drops_and_no_failed_lookups() -> None:
    sim, responses = run(faults=frozenset(), duration_seconds=30)
    flows = [r.flow for r in responses]
    assert flows
    assert not [x for x in flows if x.verdict == flow_pb2.DROPPED]
    # The only error answers are NXDOMAIN to search-path expansions, never to the name a lookup ends with.
    failed = [x for x in flows if is_dns(x) and x.l7.dns.rcode != 0]
    assert failed and {x.l7.dns.rcode for x in failed} == {3}
    assert all(
        x.l7.dns.query in resolver.search_names(n, x.destination.namespace)[:-1]
        for x in failed
        for n in [next(n for n in e.EXTERNAL_IPS if x.l7.dns.query.startswith(n + "."))]
    )
    requests = Counter(
        (x.IP.source, x.l4.UDP.source_port) for x in flows if is_dns(x) and x.l7.type == flow_pb2.REQUEST
    )
    answers = Counter(
        (x.IP.destination, x.l4.UDP.destination_port)
        for x in flows
        if is_dns(x) and x.l7.type == flow_pb2.RESPONSE
    )
    end = int(START.timestamp() + 29) * 10**9
    late = {(x.IP.source, x.l4.UDP.source_port) for x in flows if is_dns(x) and t_ns(x) >= end}
    assert {k for k in requests if k not in answers} <= late
    truth = sim.ground_truth()
    assert truth.faults == {} and truth.totals["dropped"] == 0
    assert truth.unselected_workloads == ["kube-system/coredns"]
    assert not sim.policies.unselected_workloads(
        [w for w in sim.cluster.workloads.values() if w.namespace not in ("kube-system",)]
    )


# --- every injected fault, counted independently --------------------------------------------------------------


def test_ground_truth_lists_every_fault(truth: GroundTruth) -> None:
    assert truth.faults_enabled == list(FAULT_NAMES)
    assert set(truth.faults) == set(FAULT_NAMES)
    for fault in truth.faults.values():
        assert fault.counts["flows"] > 0 and fault.counts["attempts"] > 0, fault.name
    assert GroundTruth.from_json(truth.to_json()) == truth


@pytest.mark.parametrize(("name", "rcode"), [(f.DNS_NXDOMAIN, 3), (f.DNS_SERVFAIL, 2), (f.DNS_REFUSED, 5)])
def test_failed_lookups(flows: list[Flow], truth: GroundTruth, name: str, rcode: int) -> None:
    fault = truth.faults[name]
    client = f"{fault.source_namespace}/{fault.source_workload}"
    # The application asks the name without a dot: its search path first (each NXDOMAIN), the name itself last.
    names = fault.details["names"]
    assert names == list(resolver.search_names(fault.destination_name, fault.source_namespace))
    assert names[-1] == fault.destination_name + "." and len(names) == 5
    failed = [x for x in dns_responses(flows, rcode) if x.l7.dns.query == names[-1]]
    assert failed and {workload(x.destination) for x in failed} == {client}
    assert all(not x.l7.dns.ips and x.traffic_direction == flow_pb2.EGRESS for x in failed)
    assert in_window(failed, fault)
    # a lookup started just before the end may not have reached its last name yet
    assert 0 <= fault.counts["attempts"] - len(failed) <= 1
    assert len(names) * len(failed) <= fault.counts["l7_response"] < len(names) * (len(failed) + 1)
    # Only this fault asks these names (the SQS name also resolves outside the burst).
    if name != f.DNS_SERVFAIL:
        answers = [
            x for x in flows if is_dns(x) and x.l7.type == flow_pb2.RESPONSE and x.l7.dns.query in names
        ]
        assert len(answers) == fault.counts["l7_response"]
        assert {x.l7.dns.rcode for x in answers if x.l7.dns.query != names[-1]} == {3}
        requests = [
            x for x in flows if is_dns(x) and x.l7.type == flow_pb2.REQUEST and x.l7.dns.query in names
        ]
        assert len(requests) == fault.counts["l7_request"]
        first = [x for x in requests if x.l7.dns.query == names[0]]
        assert len(first) == fault.counts["attempts"]


def test_lookups_of_outside_names_resolve_after_their_search_path(flows: list[Flow]) -> None:
    # Every NXDOMAIN answer outside the injected faults is a search-path expansion of a name that then resolved.
    dns_faults = (f.DNS_NXDOMAIN, f.DNS_REFUSED, f.DNS_NO_RESPONSE, f.DNS_UPSTREAM_UNSEEN)
    injected = {n for name in dns_faults for n in dict(f.fault_spec(name).details)["names"]}
    expansions = [x for x in dns_responses(flows, 3) if x.l7.dns.query not in injected]
    assert expansions
    resolved = {x.l7.dns.query for x in dns_responses(flows, 0)}
    for name in e.EXTERNAL_IPS:
        assert name + "." in resolved
    for x in expansions:
        stem = next(n for n in e.EXTERNAL_IPS if x.l7.dns.query.startswith(n + "."))
        assert x.l7.dns.query in resolver.search_names(stem, x.destination.namespace)[:-1]


def test_node_local_dns_is_the_client_of_forwarded_lookups(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.DNS_UPSTREAM_UNSEEN]
    names = fault.details["names"]
    # Only the cluster-domain names of the search path reach CoreDNS; the others go upstream, unseen.
    assert names == [
        n for n in resolver.search_names(fault.destination_name, "production") if n.endswith(".local.")
    ]
    assert fault.details["names_unseen"] == [
        f"{fault.destination_name}.sim.internal.",
        f"{fault.destination_name}.",
    ]
    records = [x for x in flows if is_dns(x) and x.l7.dns.query.startswith(fault.destination_name + ".")]
    assert {x.l7.dns.query for x in records} == set(names)
    assert len(records) == fault.counts["l7_request"] + fault.counts["l7_response"]
    clients = [x.source if x.l7.type == flow_pb2.REQUEST else x.destination for x in records]
    # hostNetwork pods: the node's address, the world identity, yet their namespace, pod name and DaemonSet
    assert {(c.namespace, c.identity, tuple(c.labels)) for c in clients} == {
        ("kube-system", 2, ("reserved:world",))
    }
    assert all(
        c.pod_name.startswith("node-local-dns-") and c.workloads[0].kind == "DaemonSet" for c in clients
    )
    assert {x.l7.dns.rcode for x in records if x.l7.type == flow_pb2.RESPONSE} == {3}
    first = [x for x in records if x.l7.type == flow_pb2.REQUEST and x.l7.dns.query == names[0]]
    assert len(first) == fault.counts["attempts"]


def test_servfail_burst_stays_in_its_window_and_blocks_the_connections(
    flows: list[Flow], truth: GroundTruth
) -> None:
    fault = truth.faults[f.DNS_SERVFAIL]
    assert fault.window_start is not None and fault.window_end is not None
    low, high = ns(fault.window_start), ns(fault.window_end)
    sqs = [x for x in flows if f.SERVFAIL_NAME in x.destination_names and x.event_type.type == 4]
    assert sqs and not [x for x in sqs if low + 10**9 <= t_ns(x) < high]


def test_lookups_without_answer(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.DNS_NO_RESPONSE]
    dns = [x for x in flows if is_dns(x)]
    requests = {(x.IP.source, x.l4.UDP.source_port): x for x in dns if x.l7.type == flow_pb2.REQUEST}
    answered = {(x.IP.destination, x.l4.UDP.destination_port) for x in dns if x.l7.type == flow_pb2.RESPONSE}
    end = int(START.timestamp() + DURATION - 1) * 10**9
    unanswered = [x for key, x in requests.items() if key not in answered and t_ns(x) < end]
    assert {x.l7.dns.query for x in unanswered} == {f.NO_RESPONSE_QUERY}
    all_for_query = [x for x in requests.values() if x.l7.dns.query == f.NO_RESPONSE_QUERY]
    # Its search path is answered NXDOMAIN first: one request per name, the final one never answered.
    names = fault.details["names"]
    assert names[-1] == f.NO_RESPONSE_QUERY
    assert len(all_for_query) == fault.counts["attempts"]
    assert fault.counts["l7_request"] == len(names) * fault.counts["attempts"]
    assert fault.counts["l7_response"] == (len(names) - 1) * fault.counts["attempts"]


def test_dns_dropped_by_default_deny(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.DNS_POLICY_DROP]
    drops = [x for x in flows if x.verdict == flow_pb2.DROPPED and x.l4.UDP.destination_port == 53]
    assert len(drops) == fault.counts["dropped"] == fault.counts["flows"]
    assert (
        len([x for x in drops if x.event_type.type == 1]) == fault.counts["drop"] == fault.counts["attempts"]
    )
    assert {x.source.namespace for x in drops} == {"staging"}
    assert {workload(x.destination) for x in drops} == {"kube-system/coredns"}
    assert all(
        x.drop_reason_desc == flow_pb2.POLICY_DENIED and x.traffic_direction == flow_pb2.EGRESS for x in drops
    )
    assert {(p.namespace, p.name) for x in drops for p in x.egress_denied_by} == {("staging", "default-deny")}


def test_port_scan(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.PORT_SCAN]
    probes = [x for x in flows if x.source.pod_name == fault.source_pod and x.verdict == flow_pb2.DROPPED]
    assert len(probes) == fault.counts["dropped"] == fault.counts["flows"]
    drops = [x for x in probes if x.event_type.type == 1]
    assert len(drops) == fault.counts["drop"] == fault.counts["attempts"]
    assert all(x.drop_reason_desc == flow_pb2.POLICY_DENIED for x in drops)
    assert len({x.l4.TCP.destination_port for x in drops}) >= 8
    assert len({x.destination.pod_name for x in drops}) >= 8
    assert in_window(probes, fault)


def test_policy_regression(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.POLICY_REGRESSION]
    assert fault.changed_at is not None
    changed = ns(fault.changed_at)
    api_redis = [
        x
        for x in flows
        if {workload(x.source), workload(x.destination)} == {"production/api", "production/redis"}
        and x.Type != flow_pb2.SOCK
    ]
    dropped = [
        x for x in api_redis if x.verdict == flow_pb2.DROPPED and x.drop_reason_desc == flow_pb2.POLICY_DENIED
    ]
    assert len(dropped) == fault.counts["dropped"] == fault.counts["flows"]
    assert all(t_ns(x) >= changed for x in dropped)
    assert {p.revision for x in dropped for p in x.egress_denied_by} == {fault.details["revision_after"]}
    passed = [x for x in api_redis if x.verdict != flow_pb2.DROPPED]
    assert len(passed) == fault.details["forwarded_before"]["flows"] > 0
    assert all(t_ns(x) < changed + 10**9 for x in passed)


@pytest.mark.parametrize(
    ("name", "reason"),
    [(f.CT_MAP_FULL, flow_pb2.CT_MAP_INSERTION_FAILED), (f.STALE_IP, flow_pb2.STALE_OR_UNROUTABLE_IP)],
)
def test_datapath_drops(flows: list[Flow], truth: GroundTruth, name: str, reason: int) -> None:
    fault = truth.faults[name]
    drops = [x for x in flows if x.drop_reason_desc == reason]
    assert len(drops) == fault.counts["drop"] == fault.counts["flows"]
    assert all(x.drop_reason == reason and x.event_type.sub_type == reason for x in drops)
    assert in_window(drops, fault)
    if name == f.CT_MAP_FULL:
        assert {x.node_name for x in drops} == {fault.details["node"]}
    else:
        assert {x.IP.source for x in drops} == {fault.details["stale_ip"]}


def test_unselected_workload_has_no_attribution(flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.UNSELECTED_WORKLOAD]
    scanner = truth.faults[f.PORT_SCAN].source_pod
    key = f"{fault.source_namespace}/{fault.source_workload}"
    involved = [
        x
        for x in flows
        if key in (workload(x.source), workload(x.destination))
        and x.source.pod_name != scanner
        and x.Type != flow_pb2.SOCK
    ]
    assert len(involved) == fault.counts["flows"]
    assert not [x for x in involved if workload(x.source) == key and x.egress_allowed_by]
    assert not [x for x in involved if workload(x.destination) == key and x.ingress_allowed_by]
    # Its DNS lookups are not proxied (no L7 records), while other workloads' lookups are.
    assert not [x for x in involved if x.Type == flow_pb2.L7]
    assert truth.unselected_workloads == ["production/report-export", "kube-system/coredns"]
    assert truth.policy_selection["production/api"] == {
        "selects": ["production/api"],
        "enforces": ["ingress", "egress"],
    }


def test_world_ingress(faulty: Run, flows: list[Flow], truth: GroundTruth) -> None:
    fault = truth.faults[f.WORLD_INGRESS]
    clients = set(e.WORLD_CLIENTS)
    api = [
        x
        for x in flows
        if (x.IP.source in clients and workload(x.destination) == "production/api")
        or (x.IP.destination in clients and workload(x.source) == "production/api")
    ]
    assert len(api) == fault.counts["flows"]
    assert all(x.traffic_direction == flow_pb2.INGRESS for x in api)
    verdicts = [x for x in api if x.event_type.type == 5]
    assert len(verdicts) == fault.counts["attempts"]
    assert all(
        {(p.namespace, p.name) for p in x.ingress_allowed_by} == {("production", "api")} for x in verdicts
    )
    policy = next(p for p in faulty[0].policies.policies if p.key == "production/api").to_cnp()
    assert {"fromEntities": ["world"]}.items() <= next(
        r for r in policy["spec"]["ingress"] if "fromEntities" in r
    ).items()


# --- the jsonpb file ------------------------------------------------------------------------------------------


def test_json_lines_are_exactly_what_json_format_writes() -> None:
    sim = Simulator(SimulatorConfig(seed=2, start=START, duration_seconds=5, rate_flows_per_second=300))
    lines = list(sim.json_lines())
    responses = list(sim.responses())
    assert len(lines) == len(responses) > 1000
    for line, response in zip(lines, responses, strict=True):
        expected = json_format.MessageToDict(response, preserving_proto_field_name=True)
        assert line == json.dumps(expected, separators=(",", ":"))
        assert json_format.Parse(line, observer_pb2.GetFlowsResponse()) == response


def test_cli_writes_jsonpb_and_ground_truth(tmp_path: Path) -> None:
    out, truth_path = tmp_path / "flows.jsonl.gz", tmp_path / "truth.json"
    args = f"simulate --out {out} --seed 4 --rate 200 --duration 8s --start 2025-03-01T12:00:00Z"
    args += f" --fault dns-nxdomain --fault port-scan --ground-truth {truth_path}"
    result = CliRunner().invoke(cli, args.split())
    assert result.exit_code == 0, result.output
    lines = gzip.decompress(out.read_bytes()).decode().splitlines()
    parsed = [json_format.Parse(line, observer_pb2.GetFlowsResponse()) for line in lines]
    faults = frozenset({f.DNS_NXDOMAIN, f.PORT_SCAN})
    config = SimulatorConfig(
        seed=4, start=START, duration_seconds=8, rate_flows_per_second=200, faults=faults
    )
    assert parsed == list(Simulator(config).responses())
    truth = GroundTruth.from_json(truth_path.read_text())
    assert set(truth.faults) == faults
    assert truth.totals["flows"] == len(lines)
    typo = truth.faults[f.DNS_NXDOMAIN].details["names"]
    nxdomain = sum(1 for p in parsed if p.flow.l7.dns.rcode == 3 and p.flow.l7.dns.query in typo)
    assert truth.faults[f.DNS_NXDOMAIN].counts["l7_response"] == nxdomain > 0
    to_stdout = args.split()[:-2]  # without --ground-truth
    to_stdout[2] = "-"
    stdout = CliRunner().invoke(cli, to_stdout)
    assert stdout.exit_code == 0 and stdout.stdout.splitlines() == lines


def test_cli_rejects_bad_fault_flags(tmp_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "x.jsonl")
    conflict = runner.invoke(cli, ["simulate", "--out", out, "--no-faults", "--fault", "port-scan"])
    assert conflict.exit_code == 2 and "--no-faults" in conflict.output
    unknown = runner.invoke(cli, ["simulate", "--out", out, "--fault", "port-scna"])
    assert unknown.exit_code == 2 and "port-scna" in unknown.output
    bad = runner.invoke(cli, ["simulate", "--out", out, "--duration", "ten"])
    assert bad.exit_code == 2 and "duration" in bad.output
    assert not (tmp_path / "x.jsonl").exists()


def test_config_validation_and_fault_parsing() -> None:
    with pytest.raises(ConfigError):
        SimulatorConfig(rate_flows_per_second=0)
    with pytest.raises(ConfigError):
        SimulatorConfig(start=datetime(2025, 1, 1))
    with pytest.raises(ConfigError):
        SimulatorConfig(faults=frozenset({"nope"}))
    assert parse_faults(["all"]) == frozenset(FAULT_NAMES)
    assert parse_faults(["none"]) == frozenset()
    assert parse_faults(["dns-nxdomain,port-scan"]) == {f.DNS_NXDOMAIN, f.PORT_SCAN}


# --- agreement with the rest of flowpipe ---------------------------------------------------------------------


def test_file_and_protobuf_paths_give_identical_rows() -> None:
    from flowpipe.transforms.normalize import normalize_json_lines, normalize_responses

    sim = Simulator(SimulatorConfig(seed=8, start=START, duration_seconds=10, rate_flows_per_second=300))
    from_proto = normalize_responses(list(sim.responses())).flows
    decoded = normalize_json_lines("".join(line + "\n" for line in sim.json_lines()).encode())
    assert not decoded.errors
    assert from_proto.num_rows > 2000
    assert decoded.flows.equals(from_proto)
    rows = from_proto.to_pylist()
    assert {r["cluster_name"] for r in rows} == {"sim"}
    assert {"TRACE" if r["event_type"] == 4 else r["l7_protocol"] for r in rows} >= {
        "TRACE",
        "dns",
        "http",
        "kafka",
    }


def test_replaying_the_cluster_policies_reproduces_the_policy_drops() -> None:
    import pyarrow.compute as pc

    from flowpipe.policy.load import parse_policies
    from flowpipe.policy.replay import replay_flows
    from flowpipe.transforms.normalize import normalize_responses

    sim, responses = run(
        duration_seconds=20, faults=frozenset({f.DNS_POLICY_DROP, f.PORT_SCAN, f.WORLD_INGRESS})
    )
    table = normalize_responses(responses).flows
    # The kubelet's probes come from the local host, which Cilium lets in whatever the policies say.
    table = table.filter(pc.not_equal(table["source_identity"], 1))
    report = replay_flows(parse_policies(sim.policies.to_yaml()), table)
    assert report.flows_evaluated > 1000
    assert report.would_break == 0
    assert report.would_allow_dropped == 0
    assert report.denied == sum(e.dropped for e in report.denied_edges) > 0
    sources = {edge.source for edge in report.denied_edges}
    assert sources == {"staging/web", "staging/api", "production/web"}


def test_cluster_policies_are_valid_cilium_documents(cilium_schemas: Path) -> None:
    from support.policy import validate_document

    for faults in (frozenset(), frozenset(FAULT_NAMES)):
        sim = Simulator(SimulatorConfig(faults=faults))
        for doc in sim.policies.to_documents():
            validate_document(doc, cilium_schemas)
    history = Simulator().policy_history()
    assert [p.revision for _, p in history] == [history[0][1].revision, history[0][1].revision + 1]


def test_remote_pods_are_known_by_identity_and_labels_only(flows: list[Flow]) -> None:
    # Pods of one node reach the other nodes' records with their identity and labels only, as in real captures.
    partial = [
        x
        for x in flows
        for end in (x.source, x.destination)
        if end.identity >= 256 and end.labels and not end.namespace
    ]
    assert partial
    for x in partial[:200]:
        for end in (x.source, x.destination):
            if end.identity >= 256 and not end.namespace:
                assert not end.pod_name and not end.workloads
                assert any(label.startswith("k8s:io.kubernetes.pod.namespace=") for label in end.labels)
    # The same pod is described fully on its own node.
    assert any(x.source.namespace and x.source.identity == partial[0].source.identity for x in flows) or any(
        x.destination.namespace and x.destination.identity == partial[0].destination.identity for x in flows
    )


def test_denied_syns_are_retransmitted_and_seen_at_both_ends(flows: list[Flow]) -> None:
    # An ingress denial across nodes: the SYN forwarded at the source's egress (to the overlay) and dropped at
    # the destination, as a drop notification and a policy-verdict event; retried with the same 5-tuple.
    def key(x: Flow) -> tuple[object, ...]:
        return (x.IP.source, x.l4.TCP.source_port, x.IP.destination, x.l4.TCP.destination_port)

    denied_in = [
        x
        for x in flows
        if x.verdict == flow_pb2.DROPPED and x.traffic_direction == flow_pb2.INGRESS and x.l4.HasField("TCP")
        and x.drop_reason_desc == flow_pb2.POLICY_DENIED
    ]  # fmt: skip
    assert denied_in
    by_key: dict[tuple[object, ...], list[Flow]] = {}
    for x in flows:
        if x.l4.HasField("TCP"):
            by_key.setdefault(key(x), []).append(x)
    retried = 0
    for drop in denied_in:
        records = by_key[key(drop)]
        sent = [
            x for x in records if x.verdict == flow_pb2.FORWARDED and x.traffic_direction == flow_pb2.EGRESS
        ]
        drops = [x for x in records if x.event_type.type == 1]
        verdicts = [x for x in records if x.event_type.type == 5]
        if drop.node_name != sent[0].node_name if sent else False:
            assert sent[0].trace_observation_point == flow_pb2.TO_OVERLAY
        assert len(drops) == len(verdicts) >= 1
        retried += len(drops) > 1
    assert retried > 0


def test_socket_lb_events_at_connect_to_a_service(flows: list[Flow], truth: GroundTruth) -> None:
    sock = [x for x in flows if x.Type == flow_pb2.SOCK]
    assert len(sock) == truth.totals["sock"] > 0
    assert all(
        x.event_type.type == 7 and not x.HasField("is_reply") and not x.traffic_direction for x in sock
    )
    assert all(x.socket_cookie and x.cgroup_id and not x.l4.TCP.HasField("flags") for x in sock)
    pre = [x for x in sock if x.sock_xlate_point == flow_pb2.SOCK_XLATE_POINT_PRE_DIRECTION_FWD]
    post = [x for x in sock if x.sock_xlate_point == flow_pb2.SOCK_XLATE_POINT_POST_DIRECTION_FWD]
    assert len(pre) == len(post) == len(sock) // 2
    # Before translation the destination is the Service's ClusterIP, which has no identity of its own.
    assert all(x.IP.destination.startswith("10.96.") and x.destination.identity == 2 for x in pre)
    assert all(x.verdict == flow_pb2.TRACED and x.destination_service.name for x in pre)
    # After it, the backend pod.
    assert all(x.verdict == flow_pb2.TRANSLATED and x.destination.identity >= 256 for x in post)

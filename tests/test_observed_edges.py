"""The observed_edges question on hand-built flows: requests only, each connection once, the edge contract."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from support.flowdata import T0, write_dataset
from support.flowdata import flow as full_row
from support.policy import flow, pod, reserved

from flowpipe.policy.edges import OBSERVED_EDGE_SCHEMA
from flowpipe.query import DuckDBEngine, load_questions, run_question

WEB = pod("shop", "web")
API = pod("shop", "api")
KAFKA = pod("shop", "kafka")


def edges(tmp_path: Path, *rows: dict[str, Any], **params: object) -> list[dict[str, Any]]:
    write_dataset(tmp_path, [full_row(**{"time": T0, **r}) for r in rows])
    values = {"since": "2000-01-01", "until": "2100-01-01", **params}
    with DuckDBEngine(tmp_path) as engine:
        result = run_question(engine, load_questions().question("observed_edges"), values)
    return result.table.to_pylist()


def connection(
    src: dict[str, Any], dst: dict[str, Any], port: int, sport: int, **extra: Any
) -> list[dict[str, Any]]:
    """One TCP connection as Hubble reports it: SYN at the source's egress and the destination's ingress,
    then an ACK packet, and the replies."""
    five = {"source_port": sport}
    return [
        flow(src, dst, port, traffic_direction="EGRESS", tcp_flags="SYN", **five, **extra),
        flow(src, dst, port, traffic_direction="INGRESS", tcp_flags="SYN", **five, **extra),
        flow(src, dst, port, traffic_direction="EGRESS", tcp_flags="ACK", **five, **extra),
        flow(
            dst, src, sport, traffic_direction="INGRESS", tcp_flags="SYN,ACK", is_reply=True, source_port=port
        ),
    ]


def test_each_connection_counts_once_and_replies_never(tmp_path: Path) -> None:
    rows = connection(WEB, API, 8080, 40001) + connection(WEB, API, 8080, 40002)
    [edge] = edges(tmp_path, *rows)
    assert set(OBSERVED_EDGE_SCHEMA.names) <= set(edge)
    assert (edge["source_workload"], edge["destination_workload"], edge["destination_port"]) == (
        "web",
        "api",
        8080,
    )
    assert edge["flows"] == 2
    assert "k8s:app=web" in edge["source_labels"] and edge["source_entity"] is None


def test_without_is_reply_only_syn_opens_a_connection(tmp_path: Path) -> None:
    rows = [
        flow(WEB, API, 8080, is_reply=None, tcp_flags="SYN", source_port=40001),
        flow(API, WEB, 40001, is_reply=None, tcp_flags="ACK,PSH", source_port=8080),
    ]
    assert [(e["source_workload"], e["destination_port"]) for e in edges(tmp_path, *rows)] == [("web", 8080)]


def test_drops_are_learned_only_when_asked_and_only_policy_drops(tmp_path: Path) -> None:
    rows = [
        flow(WEB, API, 9000, verdict="DROPPED", drop_reason_desc="POLICY_DENIED"),
        flow(WEB, API, 9001, verdict="DROPPED", drop_reason_desc="CT_MAP_INSERTION_FAILED"),
        flow(WEB, API, 8080, verdict="AUDIT"),
    ]
    # Policy drops are edges the current policy denies; other drops are no edge at all.
    assert [(e["destination_port"], e["status"]) for e in edges(tmp_path / "a", *rows)] == [
        (8080, "delivered"),
        (9000, "denied"),
    ]
    assert [
        (e["destination_port"], e["status"]) for e in edges(tmp_path / "b", *rows, learn_from_drops="true")
    ] == [
        (8080, "delivered"),
        (9000, "delivered"),
    ]


def test_a_connection_forwarded_at_the_source_and_denied_at_the_destination_is_one_denied_edge(
    tmp_path: Path,
) -> None:
    # Real Hubble: the source node reports each SYN FORWARDED at egress (to the overlay); the destination node
    # reports a drop notification and a policy-verdict event for it; the SYN is retransmitted twice.
    rows = []
    for retry, offset in enumerate((0, 1, 3)):
        at = T0 + timedelta(seconds=offset)
        rows += [
            flow(WEB, API, 8080, source_port=41000, time=at, trace_observation_point="TO_OVERLAY",
                 traffic_direction="EGRESS", tcp_flags="SYN", node_name="node-a"),
            flow(WEB, API, 8080, source_port=41000, time=at + timedelta(microseconds=80), verdict="DROPPED",
                 drop_reason_desc="POLICY_DENIED", traffic_direction="INGRESS", event_type=1,
                 tcp_flags="SYN", node_name="node-b"),
            flow(WEB, API, 8080, source_port=41000, time=at + timedelta(microseconds=79), verdict="DROPPED",
                 drop_reason_desc="POLICY_DENIED", traffic_direction="INGRESS", event_type=5,
                 tcp_flags="SYN", node_name="node-b"),
        ]  # fmt: skip
    (edge,) = edges(tmp_path, *rows)
    assert (edge["destination_port"], edge["status"], edge["flows"]) == (8080, "denied", 1)


def test_world_and_entities(tmp_path: Path) -> None:
    rows = [
        flow(reserved("world", "192.0.2.1"), WEB, 443, source_port=1),
        flow(reserved("world", "192.0.2.2"), WEB, 443, source_port=2),
        flow(WEB, reserved("world", "198.51.100.7", names=["api.example.com."]), 443),
        flow(WEB, reserved("kube-apiserver", "172.18.0.10", identity=7), 6443),
        flow(WEB, API, None, "ICMPv4", icmp_type=8, traffic_direction="EGRESS"),
        flow(WEB, API, None, "ICMPv4", icmp_type=8, traffic_direction="INGRESS"),
    ]
    found = {
        (e["source_entity"], e["destination_entity"], e["destination_port"], e["icmp_type"]): e
        for e in edges(tmp_path, *rows)
    }
    world_in = found[("world", None, 443, None)]
    assert world_in["source_ip"] is None and world_in["flows"] == 2  # clients by entity, not one edge each
    world_out = found[(None, "world", 443, None)]
    assert world_out["destination_ip"] == "198.51.100.7" and world_out["destination_names"] == [
        "api.example.com."
    ]
    assert found[(None, "kube-apiserver", 6443, None)]["destination_ip"] == "172.18.0.10"
    assert found[(None, None, None, 8)]["flows"] == 1  # seen at both ends: counted once


def test_l7_requests(tmp_path: Path) -> None:
    def l7(dst: dict[str, Any], port: int, **fields: Any) -> dict[str, Any]:
        return flow(WEB, dst, port, flow_type="L7", l7_type="REQUEST", tcp_flags=None, **fields)

    rows = [
        l7(API, 8080, l7_protocol="http", http_method="GET", http_url="http://api.shop:8080/v1/items?page=2"),
        l7(API, 8080, l7_protocol="http", http_method="GET", http_url="http://api.shop:8080/v1/items?page=2"),
        flow(
            API,
            WEB,
            40000,
            flow_type="L7",
            l7_type="RESPONSE",
            l7_protocol="http",
            is_reply=True,
            http_url="http://x/",
        ),
        l7(KAFKA, 9092, l7_protocol="kafka", kafka_api_key="fetch", kafka_topic="orders"),
        l7(KAFKA, 9092, l7_protocol="kafka", kafka_api_key="produce", kafka_topic="orders"),
    ]
    found = edges(tmp_path, *rows)
    http = [e for e in found if e["l7_protocol"] == "http"]
    assert [(e["http_method"], e["http_path"], e["flows"]) for e in http] == [("GET", "/v1/items?page=2", 2)]
    kafka = sorted((e["kafka_role"], e["kafka_topic"]) for e in found if e["l7_protocol"] == "kafka")
    assert kafka == [("consume", "orders"), ("produce", "orders")]


def test_pods_named_without_labels_are_resolved_by_pod_name(tmp_path: Path) -> None:
    unresolved = {
        "namespace": "shop",
        "pod_name": API["pod_name"],
        "identity": 2,
        "labels": ["reserved:world"],
    }
    rows = [
        flow(WEB, API, 8080),
        flow(
            WEB,
            unresolved,
            8080,
            flow_type="L7",
            l7_type="REQUEST",
            l7_protocol="http",
            http_method="GET",
            http_url="/",
        ),
    ]
    found = edges(tmp_path, *rows)
    assert {(e["destination_entity"], e["destination_workload"]) for e in found} == {(None, "api")}
    assert all("k8s:app=api" in e["destination_labels"] for e in found)

"""How real Hubble reports traffic (hubble-behaviour.md), each shape in a small dataset, through the questions:
remote pods known only by identity and labels, pods recorded with a reserved identity, socket-LB events, a
denied connection reported at both ends with retransmits, and in-cluster addresses with the world identity."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from support.flowdata import T0, write_dataset
from support.flowdata import flow as full_row
from support.policy import flow, pod, reserved

from flowpipe.query import DuckDBEngine, load_questions, run_question

WINDOW = {"since": "2000-01-01", "until": "2100-01-01", "limit": "1000"}
WEB = pod("shop", "web")
API = pod("shop", "api")


def ask(root: Path, rows: list[dict[str, Any]], name: str, **params: object) -> list[dict[str, Any]]:
    write_dataset(root, [full_row(**{"time": T0, **r}) for r in rows])
    with DuckDBEngine(root) as engine:
        question = load_questions().question(name)
        values = {k: v for k, v in {**WINDOW, **params}.items() if question.parameter(k) is not None}
        return run_question(engine, question, values).table.to_pylist()


def labels_only(end: dict[str, Any]) -> dict[str, Any]:
    """The same pod as a remote node's IP cache knows it: identity and labels, no namespace, pod or workload."""
    return {"identity": end["identity"], "labels": end["labels"], "ip": end["ip"]}


def test_a_remote_pod_known_only_by_its_labels_is_the_same_pod(tmp_path: Path) -> None:
    rows = [
        # The client's node knows both ends; the server's node knows the client only by identity and labels.
        flow(WEB, API, 8080, source_port=41000, traffic_direction="EGRESS", node_name="a"),
        flow(labels_only(WEB), API, 8080, source_port=41000, traffic_direction="INGRESS", node_name="b"),
        flow(labels_only(WEB), API, 8080, source_port=41001, traffic_direction="INGRESS", node_name="b"),
    ]
    talkers = ask(tmp_path / "t", rows, "top_talkers")
    assert [(r["source_namespace"], r["source_workload"], r["connections"]) for r in talkers] == [
        ("shop", "web", 2)
    ]
    (edge,) = ask(tmp_path / "e", rows, "observed_edges")
    assert (edge["source_namespace"], edge["source_workload"], edge["source_entity"]) == ("shop", "web", None)
    assert "k8s:app=web" in edge["source_labels"] and edge["flows"] == 2
    # A namespace filter finds it from either side.
    assert ask(tmp_path / "n", rows, "top_talkers", namespace="shop")


def test_a_pod_recorded_with_the_world_identity_is_named_by_its_pod(tmp_path: Path) -> None:
    # node-local-dns runs on the host network: Hubble gives it the world identity, its namespace and pod name.
    local_dns = {
        "namespace": "kube-system",
        "pod_name": "node-local-dns-x7k2p",
        "identity": 2,
        "labels": ["reserved:world"],
        "ip": "169.254.20.10",
    }
    internet = reserved("world", "203.0.113.9")
    rows = [
        flow(WEB, local_dns, 53, "UDP", source_port=50000, traffic_direction="EGRESS"),
        flow(WEB, internet, 443, source_port=50001, traffic_direction="EGRESS"),
    ]
    talkers = {
        (r["destination_namespace"], r["destination_workload"])
        for r in ask(tmp_path / "t", rows, "top_talkers")
    }
    assert talkers == {("kube-system", "node-local-dns"), (None, "world")}
    edges = {
        e["destination_workload"] or e["destination_entity"]: e
        for e in ask(tmp_path / "e", rows, "observed_edges")
    }
    assert edges["node-local-dns"]["destination_reserved_identity"] == "world"
    assert edges["node-local-dns"]["destination_entity"] is None
    assert edges["world"]["destination_reserved_identity"] is None
    egress = ask(tmp_path / "w", rows, "world_egress")
    assert [r["destination"] for r in egress] == ["203.0.113.9"]


def test_socket_lb_events_are_not_traffic(tmp_path: Path) -> None:
    coredns = pod("kube-system", "coredns")
    sock = {
        "flow_type": "SOCK",
        "event_type": 7,
        "is_reply": None,
        "tcp_flags": None,
        "traffic_direction": None,
    }
    rows = [
        # connect() to the kube-dns ClusterIP: translated to a backend; the REV events swap the addresses.
        flow(WEB, reserved("world", "10.96.0.10"), 53, "UDP", verdict="TRACED", source_port=50000,
             sock_xlate_point="SOCK_XLATE_POINT_PRE_DIRECTION_FWD", **sock),
        flow(WEB, coredns, 53, "UDP", verdict="TRANSLATED", source_port=50000,
             sock_xlate_point="SOCK_XLATE_POINT_POST_DIRECTION_FWD", **sock),
        flow(coredns, WEB, 50000, "UDP", verdict="TRANSLATED", source_port=53,
             sock_xlate_point="SOCK_XLATE_POINT_PRE_DIRECTION_REV", **sock),
        flow(reserved("world", "10.96.0.10"), WEB, 50000, "UDP", verdict="TRACED", source_port=53,
             sock_xlate_point="SOCK_XLATE_POINT_POST_DIRECTION_REV", **sock),
        # the packet itself
        flow(WEB, coredns, 53, "UDP", source_port=50000, traffic_direction="EGRESS"),
    ]  # fmt: skip
    talkers = [
        (r["source_workload"], r["destination_workload"], r["flows"])
        for r in ask(tmp_path / "t", rows, "top_talkers")
    ]
    assert talkers == [("web", "coredns", 1)]
    edges = ask(tmp_path / "e", rows, "observed_edges")
    assert [(e["source_workload"], e["destination_workload"]) for e in edges] == [("web", "coredns")]
    assert ask(tmp_path / "w", rows, "world_egress") == []


def test_a_denied_connection_seen_at_both_ends_is_counted_once_per_packet(tmp_path: Path) -> None:
    rows = []
    for offset in (0, 1, 3):  # the SYN and two retransmits
        at = T0 + timedelta(seconds=offset)
        rows += [
            flow(WEB, API, 5432, source_port=41000, time=at, traffic_direction="EGRESS",
                 trace_observation_point="TO_OVERLAY", event_type=4, node_name="a"),
            flow(WEB, API, 5432, source_port=41000, time=at + timedelta(microseconds=60), verdict="DROPPED",
                 drop_reason=133, drop_reason_desc="POLICY_DENIED", traffic_direction="INGRESS", event_type=5,
                 node_name="b"),
            flow(WEB, API, 5432, source_port=41000, time=at + timedelta(microseconds=61), verdict="DROPPED",
                 drop_reason=133, drop_reason_desc="POLICY_DENIED", traffic_direction="INGRESS", event_type=1,
                 event_sub_type=133, node_name="b"),
        ]  # fmt: skip
    (talker,) = ask(tmp_path / "t", rows, "top_talkers")
    assert (talker["flows"], talker["dropped"], talker["forwarded"], talker["connections"]) == (3, 3, 0, 1)
    drops = ask(tmp_path / "d", rows, "unexpected_drops", show_expected="true")
    assert sum(r["flows"] for r in drops) == talker["dropped"]
    assert {r["why"] for r in drops} == {"expected"}  # never delivered: a denial, not a regression
    (edge,) = ask(tmp_path / "e", rows, "observed_edges")
    assert (edge["status"], edge["flows"]) == ("denied", 1)
    (new,) = ask(tmp_path / "n", rows, "new_connections", baseline_since="2000-01-01")
    assert (new["flows"], new["dropped"]) == (3, 3)


def test_in_cluster_addresses_are_never_the_world(tmp_path: Path) -> None:
    # A pod of the cluster's range that the record gives the world identity (a node Cilium does not manage).
    stranger = reserved("world", "10.0.5.77")
    rows = [
        flow(WEB, API, 8080, source_port=1, traffic_direction="EGRESS"),
        flow(WEB, stranger, 9090, source_port=2, traffic_direction="EGRESS"),
        flow(WEB, reserved("world", "198.51.100.4", names=["api.example.com"]), 443, source_port=3),
    ]
    egress = ask(tmp_path, rows, "world_egress")
    assert [r["destination"] for r in egress] == ["api.example.com"]


def test_service_connections_name_the_service_and_its_backend(tmp_path: Path) -> None:
    coredns = pod("kube-system", "coredns")
    service = {**reserved("world", "10.96.0.10"), "service_name": "kube-dns"}
    sock = {
        "flow_type": "SOCK",
        "event_type": 7,
        "is_reply": None,
        "tcp_flags": None,
        "traffic_direction": None,
    }
    rows = []
    for n, cookie in enumerate((11, 12)):
        at = T0 + timedelta(seconds=n)
        rows += [
            flow(WEB, service, 53, "UDP", verdict="TRACED", source_port=50000 + n, time=at, socket_cookie=cookie,
                 sock_xlate_point="SOCK_XLATE_POINT_PRE_DIRECTION_FWD", node_name="a", **sock),
            flow(WEB, coredns, 53, "UDP", verdict="TRANSLATED", source_port=50000 + n, socket_cookie=cookie,
                 time=at + timedelta(microseconds=1), sock_xlate_point="SOCK_XLATE_POINT_POST_DIRECTION_FWD",
                 node_name="a", **sock),
        ]  # fmt: skip
    (row,) = ask(tmp_path, rows, "service_connections")
    assert (row["source_workload"], row["service"], row["service_ip"], row["service_port"]) == (
        "web",
        "kube-dns",
        "10.96.0.10",
        53,
    )
    assert (row["connects"], row["backends"]) == (2, ["kube-system/coredns"])

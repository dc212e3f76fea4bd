"""normalize: Hubble JSON and protobuf flows give the same flow-table rows, following the row conventions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from google.protobuf import json_format

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.model import FLOW_SCHEMA
from flowpipe.transforms import (
    normalize_flows,
    normalize_json_lines,
    normalize_json_objects,
    normalize_json_texts,
    normalize_responses,
)

ENVELOPE_KEYS = {"flow", "lost_events", "node_status", "agent_event", "debug_event"}


def proto_table(lines: list[str], *, cluster_name: str | None = None) -> pa.Table:
    """JSON lines → protobuf (json_format, unknown fields ignored) → rows through the protobuf path."""
    flows, node_names, times = [], [], []
    for line in lines:
        if ENVELOPE_KEYS & set(json.loads(line)):
            event = json_format.Parse(line, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)
            if event.WhichOneof("response_types") != "flow":
                continue
            flows.append(event.flow)
            node_names.append(event.node_name)
            times.append(event.time if event.HasField("time") else None)
        else:
            flows.append(json_format.Parse(line, flow_pb2.Flow(), ignore_unknown_fields=True))
            node_names.append("")
            times.append(None)
    return normalize_flows(flows, node_names=node_names, times=times, cluster_name=cluster_name)


def json_tables(lines: list[str], *, cluster_name: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Rows of the vectorized block path and of the per-line path (both must be clean)."""
    block = normalize_json_lines("\n".join(lines).encode() + b"\n", path="t.json", cluster_name=cluster_name)
    per_line = normalize_json_texts(list(enumerate(lines, 1)), path="t.json", cluster_name=cluster_name)
    assert block.errors == [] and per_line.errors == []
    return block.flows, per_line.flows


def rows(
    *flows: dict[str, Any], envelope: bool = True, proto: bool = True, **kw: Any
) -> list[dict[str, Any]]:
    """Rows for flow objects through every path (JSON block, JSON per line, protobuf), asserted identical."""
    lines = [json.dumps({"flow": f, "node_name": f.get("node_name", "")} if envelope else f) for f in flows]
    block, per_line = json_tables(lines, **kw)
    assert block.schema == FLOW_SCHEMA
    assert block.equals(per_line)
    if proto:
        assert block.equals(proto_table(lines, **kw))
    return block.to_pylist()


def row(flow: dict[str, Any], **kw: Any) -> dict[str, Any]:
    (result,) = rows(flow, **kw)
    return result


def flow_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# -- every real capture, every flow ---------------------------------------------------------------------------


def test_json_and_protobuf_paths_give_identical_rows_for_every_captured_flow(
    capture_files: list[Path],
) -> None:
    total = 0
    for path in capture_files:
        lines = flow_lines(path)
        block = normalize_json_lines(path.read_bytes(), path=str(path))
        per_line = normalize_json_texts(list(enumerate(lines, 1)), path=str(path))
        via_proto = proto_table(lines)
        assert block.errors == [] and per_line.errors == [], path
        assert block.flows.num_rows == len(lines), path
        for name in FLOW_SCHEMA.names:
            assert block.flows[name].equals(per_line.flows[name]), (path, name)
            assert block.flows[name].equals(via_proto[name]), (path, name)
        total += len(lines)
    assert total > 1000


def test_real_captures_take_the_vectorized_path(
    capture_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flowpipe.transforms._json as json_path

    def no_fallback(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the per-line fallback was used")

    monkeypatch.setattr(json_path, "decode_texts", no_fallback)
    for path in capture_files:
        assert normalize_json_lines(path.read_bytes(), path=str(path)).flows.num_rows > 0


def test_captures_keep_verdicts_and_old_spellings(capture_files: list[Path]) -> None:
    starwars = next(p for p in capture_files if p.name == "testdata1.jsonl")
    table = normalize_json_lines(starwars.read_bytes(), path=str(starwars)).flows
    verdicts = table.group_by("verdict").aggregate([("verdict", "count")]).to_pylist()
    assert {v["verdict"]: v["verdict_count"] for v in verdicts} == {
        "FORWARDED": 56,
        "DROPPED": 2,
        "REDIRECTED": 2,
    }
    assert set(table["flow_type"].to_pylist()) == {"L3_L4"}  # from the old key `Type`


# -- every column -------------------------------------------------------------------------------------------

RICH_FLOW: dict[str, Any] = {
    "time": "2024-05-01T10:00:00.123456789Z",
    "uuid": "0b3c5a9e-1111-4222-8333-944455556666",
    "verdict": "DROPPED",
    "drop_reason": 133,
    "drop_reason_desc": "POLICY_DENIED",
    "policy_match_type": 3,
    "auth_type": "SPIRE",
    "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4", "encrypted": True},
    "l4": {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True, "ACK": True}}},
    "source": {
        "ID": 12,
        "identity": 5001,
        "namespace": "shop",
        "labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
        "pod_name": "web-7d9f-abcde",
        "workloads": [{"name": "web", "kind": "Deployment"}, {"name": "other", "kind": "ReplicaSet"}],
    },
    "destination": {
        "identity": 2,
        "labels": ["reserved:world"],
        "workloads": [],
    },
    "Type": "L3_L4",
    "node_name": "prod-eu/worker-1",
    "source_names": ["web.shop.svc.cluster.local"],
    "destination_names": ["api.example.com", "example.com"],
    "reply": False,
    "event_type": {"type": 5, "sub_type": 0},
    "source_service": {"name": "web", "namespace": "shop"},
    "destination_service": {"name": "", "namespace": ""},
    "traffic_direction": "EGRESS",
    "trace_observation_point": "TO_NETWORK",
    "is_reply": False,
    "egress_allowed_by": [{"name": "allow-web", "namespace": "shop", "labels": ["x"], "revision": "7"}],
    "ingress_allowed_by": [{"name": "cluster-wide", "kind": "CiliumClusterwideNetworkPolicy"}],
    "egress_denied_by": [{"name": "deny-all", "namespace": "shop"}, {"name": "deny-2", "namespace": "ops"}],
    "Summary": "TCP Flags: SYN, ACK",
}


def test_every_column_of_a_rich_flow() -> None:
    got = row(RICH_FLOW)
    assert got == {
        "time": got["time"],
        "node_name": "prod-eu/worker-1",
        "cluster_name": "prod-eu",
        "uuid": "0b3c5a9e-1111-4222-8333-944455556666",
        "verdict": "DROPPED",
        "drop_reason": 133,
        "drop_reason_desc": "POLICY_DENIED",
        "policy_match_type": 3,
        "auth_type": "SPIRE",
        "flow_type": "L3_L4",
        "event_type": 5,
        "event_sub_type": 0,
        "trace_observation_point": "TO_NETWORK",
        "traffic_direction": "EGRESS",
        "is_reply": False,
        "sock_xlate_point": None,
        "socket_cookie": None,
        "cgroup_id": None,
        "ip_version": "IPv4",
        "source_ip": "10.0.0.1",
        "destination_ip": "10.0.0.2",
        "encrypted": True,
        "source_namespace": "shop",
        "source_pod_name": "web-7d9f-abcde",
        "source_workload_name": "web",
        "source_workload_kind": "Deployment",
        "source_identity": 5001,
        "source_labels": ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"],
        "source_service_name": "web",
        "source_names": ["web.shop.svc.cluster.local"],
        "destination_namespace": None,
        "destination_pod_name": None,
        "destination_workload_name": None,
        "destination_workload_kind": None,
        "destination_identity": 2,
        "destination_labels": ["reserved:world"],
        "destination_service_name": None,
        "destination_names": ["api.example.com", "example.com"],
        "l4_protocol": "TCP",
        "source_port": 40000,
        "destination_port": 8080,
        "tcp_flags": "SYN,ACK",
        "icmp_type": None,
        "icmp_code": None,
        "l7_type": None,
        "l7_protocol": None,
        "latency_ns": None,
        "dns_query": None,
        "dns_rcode": None,
        "dns_qtypes": [],
        "dns_ips": [],
        "dns_ttl": None,
        "http_method": None,
        "http_url": None,
        "http_code": None,
        "http_protocol": None,
        "kafka_api_key": None,
        "kafka_topic": None,
        "kafka_error_code": None,
        "ingress_allowed_by": ["cluster-wide"],
        "egress_allowed_by": ["shop/allow-web"],
        "ingress_denied_by": [],
        "egress_denied_by": ["shop/deny-all", "ops/deny-2"],
    }
    assert got["time"].isoformat() == "2024-05-01T10:00:00.123456789+00:00"


def test_an_empty_flow_has_nulls_empty_lists_and_zero_top_level_numbers() -> None:
    got = row({})
    assert got["drop_reason"] == 0 and got["policy_match_type"] == 0
    assert {k for k, v in got.items() if v == []} == {
        name for name in FLOW_SCHEMA.names if pa.types.is_list(FLOW_SCHEMA.field(name).type)
    }
    assert all(v is None for k, v in got.items() if k not in {"drop_reason", "policy_match_type"} and v != [])


# -- L4 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("l4", "expected"),
    [
        (
            {
                "TCP": {
                    "source_port": 1,
                    "destination_port": 443,
                    "flags": {"FIN": True, "ACK": True, "NS": True},
                }
            },
            ("TCP", 1, 443, "FIN,ACK,NS", None, None),
        ),
        ({"TCP": {"destination_port": 80}}, ("TCP", 0, 80, None, None, None)),
        ({"TCP": {"source_port": 5, "destination_port": 6, "flags": {}}}, ("TCP", 5, 6, None, None, None)),
        ({"UDP": {"source_port": 53000, "destination_port": 53}}, ("UDP", 53000, 53, None, None, None)),
        ({"ICMPv4": {}}, ("ICMPv4", None, None, None, 0, 0)),
        ({"ICMPv4": {"type": 3, "code": 13}}, ("ICMPv4", None, None, None, 3, 13)),
        ({"ICMPv6": {"type": 133}}, ("ICMPv6", None, None, None, 133, 0)),
        (
            {"SCTP": {"source_port": 36412, "destination_port": 38412}},
            ("SCTP", 36412, 38412, None, None, None),
        ),
        ({"VRRP": {"type": 1, "vrid": 7}}, ("VRRP", None, None, None, None, None)),
        ({"IGMP": {"type": 22}}, ("IGMP", None, None, None, None, None)),
        ({}, (None, None, None, None, None, None)),
    ],
)
def test_l4_kinds(l4: dict[str, Any], expected: tuple[Any, ...]) -> None:
    got = row({"l4": l4})
    columns = ("l4_protocol", "source_port", "destination_port", "tcp_flags", "icmp_type", "icmp_code")
    assert tuple(got[c] for c in columns) == expected


def test_every_tcp_flag_in_field_order() -> None:
    flags = {name: True for name in ("NS", "CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN")}
    got = row({"l4": {"TCP": {"flags": flags}}})
    assert got["tcp_flags"] == "FIN,SYN,RST,PSH,ACK,URG,ECE,CWR,NS"


def test_no_l4_message_means_null_ports() -> None:
    got = row({"verdict": "FORWARDED"})
    assert (got["l4_protocol"], got["source_port"], got["icmp_type"]) == (None, None, None)


# -- L7 -----------------------------------------------------------------------------------------------------


def test_dns_request_and_response() -> None:
    request, response = rows(
        {"Type": "L7", "l7": {"type": "REQUEST", "dns": {"query": "api.example.com.", "qtypes": ["A"]}}},
        {
            "Type": "L7",
            "l7": {
                "type": "RESPONSE",
                "latency_ns": "1500000",
                "dns": {
                    "query": "nope.example.com.",
                    "ips": ["1.2.3.4", "5.6.7.8"],
                    "ttl": 30,
                    "rcode": 3,
                    "qtypes": ["AAAA"],
                    "rrtypes": ["A"],
                    "cnames": ["x."],
                    "observation_source": "proxy",
                },
            },
        },
    )
    assert (request["flow_type"], request["l7_type"], request["l7_protocol"]) == ("L7", "REQUEST", "dns")
    assert (request["dns_query"], request["dns_qtypes"], request["dns_rcode"]) == (
        "api.example.com.",
        ["A"],
        0,
    )
    assert (request["dns_ips"], request["dns_ttl"], request["latency_ns"]) == ([], 0, 0)
    assert response["l7_type"] == "RESPONSE" and response["latency_ns"] == 1_500_000
    assert (response["dns_rcode"], response["dns_ips"], response["dns_ttl"]) == (
        3,
        ["1.2.3.4", "5.6.7.8"],
        30,
    )


def test_http_request_and_response() -> None:
    request, response = rows(
        {"l7": {"type": "REQUEST", "http": {"method": "GET", "url": "http://api/v1/x", "protocol": "HTTP/1.1",
                                            "headers": [{"key": "a", "value": "b"}]}}},
        {"l7": {"type": "RESPONSE", "latency_ns": "2000", "http": {"code": 503, "method": "GET",
                                                                   "url": "http://api/v1/x", "protocol": "HTTP/2"}}},
    )  # fmt: skip
    assert request["l7_protocol"] == "http" and request["http_code"] == 0
    assert (request["http_method"], request["http_url"], request["http_protocol"]) == (
        "GET",
        "http://api/v1/x",
        "HTTP/1.1",
    )
    assert (response["http_code"], response["http_protocol"], response["latency_ns"]) == (503, "HTTP/2", 2000)
    assert request["dns_query"] is None and request["kafka_topic"] is None


def test_kafka() -> None:
    got = row({"l7": {"type": "REQUEST", "kafka": {"api_key": "produce", "topic": "orders", "error_code": 3,
                                                    "api_version": 2, "correlation_id": 9}}})  # fmt: skip
    assert (got["l7_protocol"], got["kafka_api_key"], got["kafka_topic"], got["kafka_error_code"]) == (
        "kafka",
        "produce",
        "orders",
        3,
    )
    assert got["http_code"] is None


def test_latency_as_json_number_or_string() -> None:
    as_string, as_number = rows({"l7": {"latency_ns": "42"}}, {"l7": {"latency_ns": 42}})
    assert as_string["latency_ns"] == as_number["latency_ns"] == 42


# -- replies, direction, time, node --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"is_reply": True}, True),
        ({"is_reply": False}, False),
        ({"is_reply": False, "reply": True}, False),  # the wrapper wins
        ({"reply": True}, True),  # legacy flag only (2021 captures)
        ({"reply": False}, None),
        ({}, None),
    ],
)
def test_is_reply(fields: dict[str, Any], expected: bool | None) -> None:
    assert row({"verdict": "FORWARDED", **fields})["is_reply"] is expected


def test_missing_traffic_direction_is_null() -> None:
    got = row({"verdict": "FORWARDED", "trace_observation_point": "TO_STACK"})
    assert got["traffic_direction"] is None and got["trace_observation_point"] == "TO_STACK"


def test_zero_enum_values_become_null() -> None:
    got = row(
        {
            "verdict": "VERDICT_UNKNOWN",
            "Type": "UNKNOWN_TYPE",
            "traffic_direction": "TRAFFIC_DIRECTION_UNKNOWN",
            "auth_type": "DISABLED",
            "drop_reason_desc": "DROP_REASON_UNKNOWN",
            "IP": {"ipVersion": "IP_NOT_USED"},
            "l7": {"type": "UNKNOWN_L7_TYPE"},
        }
    )
    for column in ("verdict", "flow_type", "traffic_direction", "auth_type", "drop_reason_desc", "ip_version",
                   "l7_type"):  # fmt: skip
        assert got[column] is None, column
    assert got["encrypted"] is False  # IP present: its scalars take their value


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2021-11-10T10:41:26Z", "2021-11-10T10:41:26+00:00"),
        ("2021-11-10T10:41:26.095Z", "2021-11-10T10:41:26.095000+00:00"),
        ("2021-11-10T10:41:26.095357Z", "2021-11-10T10:41:26.095357+00:00"),
        ("2021-11-10T10:41:26.095336300Z", "2021-11-10T10:41:26.095336300+00:00"),
        ("2021-11-10T10:41:26.1Z", "2021-11-10T10:41:26.100000+00:00"),
    ],
)
def test_timestamps_with_any_fraction_digits(stamp: str, expected: str) -> None:
    assert row({"time": stamp})["time"].isoformat() == expected


def test_envelope_time_and_node_name_fill_in_for_the_flow() -> None:
    line = json.dumps(
        {"flow": {"verdict": "FORWARDED"}, "node_name": "c1/n1", "time": "2024-01-01T00:00:01Z"}
    )
    block, per_line = json_tables([line])
    assert block.equals(per_line) and block.equals(proto_table([line]))
    got = block.to_pylist()[0]
    assert (got["node_name"], got["cluster_name"]) == ("c1/n1", "c1")
    assert got["time"] == datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_flow_time_wins_over_the_envelope_time() -> None:
    line = json.dumps({"flow": {"time": "2024-01-01T00:00:02Z"}, "time": "2024-01-01T00:00:09Z"})
    block, _ = json_tables([line])
    assert block["time"][0].as_py() == datetime(2024, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert proto_table([line]).equals(block)


@pytest.mark.parametrize(
    ("node", "override", "expected"),
    [("kind-kind/worker", None, "kind-kind"), ("worker", None, None), ("worker", "prod", "prod"),
     ("east/worker", "prod", "east"), ("", "prod", "prod")],
)  # fmt: skip
def test_cluster_name_from_node_name_or_override(
    node: str, override: str | None, expected: str | None
) -> None:
    got = row({"node_name": node, "verdict": "FORWARDED"}, cluster_name=override)
    assert got["cluster_name"] == expected
    assert got["node_name"] == (node or None)


def test_empty_strings_become_null() -> None:
    got = row({"uuid": "", "node_name": "", "IP": {"source": "", "destination": "10.0.0.9"},
               "source": {"namespace": "", "pod_name": "", "workloads": [{"name": "", "kind": ""}]}})  # fmt: skip
    assert (got["uuid"], got["node_name"], got["source_ip"], got["destination_ip"]) == (
        None,
        None,
        None,
        "10.0.0.9",
    )
    assert (got["source_namespace"], got["source_pod_name"], got["source_workload_name"]) == (
        None,
        None,
        None,
    )
    assert got["source_identity"] == 0  # present endpoint, identity omitted as zero


def test_policy_attribution_lists() -> None:
    got = row(
        {
            "ingress_allowed_by": [{"name": "a", "namespace": "ns1"}, {"name": "ccnp"}],
            "egress_allowed_by": [],
            "ingress_denied_by": [{"name": "deny", "namespace": "ns2", "kind": "CiliumNetworkPolicy"}],
        }
    )
    assert got["ingress_allowed_by"] == ["ns1/a", "ccnp"]
    assert got["egress_allowed_by"] == [] and got["egress_denied_by"] == []
    assert got["ingress_denied_by"] == ["ns2/deny"]


def test_legacy_bare_flow_lines() -> None:
    bare = {"time": "1970-01-01T00:20:34.567800Z", "verdict": "DROPPED", "node_name": "k8s1",
            "l4": {"TCP": {"source_port": 31793, "destination_port": 8080}}, "is_reply": False}  # fmt: skip
    (got,) = rows(bare, envelope=False)
    assert (got["verdict"], got["node_name"], got["destination_port"], got["is_reply"]) == (
        "DROPPED",
        "k8s1",
        8080,
        False,
    )


def test_envelope_and_bare_lines_mixed_in_one_block() -> None:
    lines = [
        json.dumps({"flow": {"verdict": "FORWARDED", "uuid": "a"}, "node_name": "n"}),
        json.dumps({"verdict": "DROPPED", "uuid": "b"}),
        json.dumps({"flow": {"verdict": "AUDIT", "uuid": "c"}}),
    ]
    block, per_line = json_tables(lines)
    assert block.equals(per_line) and block.equals(proto_table(lines))
    assert block["uuid"].to_pylist() == ["a", "b", "c"]
    assert block["verdict"].to_pylist() == ["FORWARDED", "DROPPED", "AUDIT"]


# -- newer and older Cilium -----------------------------------------------------------------------------------


def test_unknown_enum_name_is_kept() -> None:
    # json_format drops unknown enum names, so only the JSON paths can keep them.
    got = row({"verdict": "QUARANTINED", "drop_reason_desc": "SOME_FUTURE_REASON"}, proto=False)
    assert (got["verdict"], got["drop_reason_desc"]) == ("QUARANTINED", "SOME_FUTURE_REASON")


def test_unknown_enum_number_becomes_its_decimal_string() -> None:
    lines = [json.dumps({"flow": {"verdict": 42, "drop_reason_desc": 133, "traffic_direction": 0}})]
    block = normalize_json_lines(lines[0].encode() + b"\n")
    assert block.errors == []
    got = block.flows.to_pylist()[0]
    assert (got["verdict"], got["drop_reason_desc"], got["traffic_direction"]) == (
        "42",
        "POLICY_DENIED",
        None,
    )
    message = flow_pb2.Flow(verdict=42, drop_reason_desc=133)  # open enums keep unknown numbers
    via_proto = normalize_flows([message]).to_pylist()[0]
    assert (via_proto["verdict"], via_proto["drop_reason_desc"]) == ("42", "POLICY_DENIED")


def test_unknown_fields_are_ignored() -> None:
    flow = {
        "verdict": "FORWARDED",
        "future_field": {"nested": [1, 2, {"x": None}]},
        "IP": {"source": "10.0.0.1", "future": True},
        "l4": {"TCP": {"destination_port": 80, "future": "x"}},
    }
    line = json.dumps({"flow": flow, "future_envelope_key": 1})
    got = normalize_json_lines(line.encode() + b"\n")
    assert got.errors == [] and got.flows["destination_port"].to_pylist() == [80]
    assert got.flows.equals(proto_table([line]))


def test_camel_case_keys_give_the_same_rows() -> None:
    message = json_format.Parse(json.dumps({"flow": RICH_FLOW, "node_name": "prod-eu/worker-1"}),
                                observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)  # fmt: skip
    camel = json_format.MessageToJson(message, indent=None)
    proto_names = json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)
    assert "nodeName" in camel and "sourcePort" in camel
    block_camel = normalize_json_lines(camel.encode() + b"\n")
    per_line_camel = normalize_json_texts([(1, camel)])
    expected = normalize_json_lines(proto_names.encode() + b"\n").flows
    assert block_camel.errors == []
    assert block_camel.flows.equals(expected) and per_line_camel.flows.equals(expected)
    assert expected["source_port"].to_pylist() == [40000]


def test_a_camel_case_line_inside_a_proto_named_block() -> None:
    lines = [
        json.dumps({"flow": {"node_name": "a", "traffic_direction": "INGRESS"}}),
        json.dumps({"flow": {"nodeName": "b", "trafficDirection": "EGRESS", "isReply": True}}),
    ]
    block, per_line = json_tables(lines)
    assert block.equals(per_line)
    assert block["node_name"].to_pylist() == ["a", "b"]
    assert block["traffic_direction"].to_pylist() == ["INGRESS", "EGRESS"]


# -- events that are not flows, and bad lines ----------------------------------------------------------------


def test_lost_events_node_status_agent_and_debug_events_are_counted_not_flows() -> None:
    data = "\n".join(
        [
            json.dumps({"flow": {"verdict": "FORWARDED"}}),
            json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "17", "cpu": 5,
                                        "first": "2024-01-01T00:00:00Z"},
                        "node_name": "n1", "time": "2024-01-01T00:00:03.5Z"}),
            json.dumps({"lost_events": {"source": 1, "num_events_lost": 2}}),
            json.dumps({"node_status": {"state_change": "NODE_CONNECTED", "node_names": ["a"]}}),
            json.dumps({"agent_event": {"type": "AGENT_STARTED"}, "node_name": "n1"}),
            json.dumps({"debug_event": {"type": "DBG_CT_LOOKUP"}}),
            json.dumps({"some_future_event": {"x": 1}, "node_name": "n1", "time": "2024-01-01T00:00:00Z"}),
        ]
    ).encode()  # fmt: skip
    for events in (normalize_json_lines(data + b"\n"),
                   normalize_json_texts(list(enumerate(data.split(b"\n"), 1)))):  # fmt: skip
        assert events.errors == []
        assert events.flows.num_rows == 1
        assert (events.node_status, events.agent_events, events.debug_events, events.unknown_events) == (
            1,
            1,
            1,
            1,
        )
        first, second = events.lost_events
        assert (first.source, first.num_events_lost, first.cpu, first.node_name) == (
            "HUBBLE_RING_BUFFER",
            17,
            5,
            "n1",
        )
        assert first.time == datetime(2024, 1, 1, 0, 0, 3, 500000, tzinfo=UTC)
        assert first.first == datetime(2024, 1, 1, tzinfo=UTC) and first.last is None
        assert (second.source, second.num_events_lost, second.cpu) == ("PERF_EVENT_RING_BUFFER", 2, None)


def test_bad_lines_are_reported_with_line_numbers_and_the_rest_is_kept() -> None:
    lines = [
        json.dumps({"flow": {"uuid": "1"}}),
        '{"flow": {"uuid": "2"',  # cut short
        "",
        "[1, 2]",
        json.dumps({"flow": {"uuid": "3", "l4": {"TCP": {"source_port": "not a number"}}}}),
        json.dumps({"flow": {"uuid": "4", "verdict": 2}}),  # enum number: fine
        json.dumps({"flow": {"uuid": "5", "time": "yesterday"}}),
        json.dumps({"flow": {"uuid": "6", "time": "2024-02-30T00:00:00Z"}}),  # not a date
        json.dumps({"flow": {"uuid": "7", "IP": "10.0.0.1"}}),
        json.dumps({"flow": {"uuid": "8"}}),
    ]
    events = normalize_json_lines("\n".join(lines).encode() + b"\n", path="x.json", first_line=10)
    assert events.flows["uuid"].to_pylist() == ["1", "4", "8"]
    assert events.flows["verdict"].to_pylist() == [None, "DROPPED", None]
    found = [(e.line_number, e.reason) for e in events.errors]
    assert found == [
        (11, "invalid_json"),
        (13, "not_an_object"),
        (14, "invalid_value"),
        (16, "invalid_value"),
        (17, "invalid_value"),
        (18, "invalid_value"),
    ]
    assert all(str(e).startswith(f"x.json:{e.line_number}: ") for e in events.errors)
    assert "l4.TCP.source_port" in str(events.errors[2])
    assert str(events.errors[4]) == "x.json:17: flow.time: not an RFC 3339 timestamp: '2024-02-30T00:00:00Z'"


@pytest.mark.parametrize("stamp", ["2024-05-01T25:00:00Z", "2024-13-01T00:00:00Z", "2024-05-01T10:61:00Z"])
def test_an_impossible_time_is_named_with_its_field(stamp: str) -> None:
    for line in (json.dumps({"flow": {"time": stamp}}), json.dumps({"flow": {}, "time": stamp})):
        (error,) = normalize_json_lines(line.encode() + b"\n", path="x.json").errors
        field = "flow.time" if '"flow": {"time"' in line else "time"
        assert str(error) == f"x.json:1: {field}: not an RFC 3339 timestamp: {stamp!r}"


def test_lower_case_t_and_z_are_read_as_in_rfc_3339() -> None:
    got = row({"time": "2024-05-01t10:00:00.5z"}, proto=False)
    assert got["time"] == datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)


def test_a_large_block_with_a_few_odd_lines_gives_the_same_rows_as_a_clean_one() -> None:
    clean = [
        json.dumps({"flow": {**RICH_FLOW, "uuid": f"u{i}", "verdict": "FORWARDED", "Type": "L3_L4"}})
        for i in range(600)
    ]
    odd = list(clean)
    for i in (5, 300, 301, 599):  # enum numbers, ports as strings: pyarrow rejects, json_format accepts
        odd[i] = (
            odd[i].replace('"verdict": "FORWARDED"', '"verdict": 1').replace('"Type": "L3_L4"', '"Type": 1')
        )
    odd[450] = odd[450].replace('"destination_port": 8080', '"destination_port": "8080"')
    odd.insert(200, "{broken")
    expected = normalize_json_lines(("\n".join(clean) + "\n").encode()).flows
    got = normalize_json_lines(("\n".join(odd) + "\n").encode(), path="odd.json")
    assert [(e.line_number, e.reason) for e in got.errors] == [(201, "invalid_json")]
    assert got.flows.equals(expected)


def test_json_array_elements_through_the_object_path() -> None:
    objects = [(1, {"flow": {"uuid": "a"}}), (3, {"uuid": "b", "verdict": "DROPPED"}), (5, "nope")]
    events = normalize_json_objects(objects, path="arr.json")
    assert events.flows["uuid"].to_pylist() == ["a", "b"]
    assert [(e.line_number, e.reason) for e in events.errors] == [(5, "not_an_object")]


# -- protobuf envelopes --------------------------------------------------------------------------------------


def test_normalize_responses_splits_flows_lost_events_and_node_status() -> None:
    responses = [
        json_format.Parse(json.dumps(doc), observer_pb2.GetFlowsResponse())
        for doc in (
            {"flow": {"verdict": "FORWARDED", "node_name": "n1"}, "node_name": "n1", "time": "2024-01-01T00:00:00Z"},
            {"lost_events": {"source": "OBSERVER_EVENTS_QUEUE", "num_events_lost": "9"}, "node_name": "n2",
             "time": "2024-01-01T00:00:01.25Z"},
            {"node_status": {"state_change": "NODE_CONNECTED", "node_names": ["n1", "n2"]}},
        )
    ]  # fmt: skip
    batch = normalize_responses(responses, cluster_name="lab")
    assert batch.flows.schema == FLOW_SCHEMA
    assert batch.flows.to_pylist()[0]["cluster_name"] == "lab"
    assert batch.flows.to_pylist()[0]["time"] == datetime(2024, 1, 1, tzinfo=UTC)
    assert batch.node_status == 1
    (lost,) = batch.lost_events
    assert (lost.source, lost.num_events_lost, lost.node_name) == ("OBSERVER_EVENTS_QUEUE", 9, "n2")
    assert lost.time == datetime(2024, 1, 1, 0, 0, 1, 250000, tzinfo=UTC)


def test_protobuf_values_beyond_the_column_range_become_null() -> None:
    flow = flow_pb2.Flow(drop_reason=4_000_000_000, l7=flow_pb2.Layer7(latency_ns=(1 << 64) - 1))
    got = normalize_flows([flow]).to_pylist()[0]
    assert got["drop_reason"] is None and got["latency_ns"] is None


def test_normalize_flows_of_nothing_is_an_empty_table() -> None:
    table = normalize_flows([])
    assert table.num_rows == 0 and table.schema == FLOW_SCHEMA


def test_unsigned_values_beyond_an_int32_column_give_the_same_null_through_json() -> None:
    # Valid uint32 wire values that do not fit the int32 columns: NULL on every path, and the line is kept.
    flow = {
        "time": "2024-05-01T10:00:00Z",
        "drop_reason": 4_000_000_000,
        "l4": {"TCP": {"source_port": 3_000_000_000, "destination_port": 80}},
        "policy_match_type": 4294967295,
        "event_type": {"type": 5, "sub_type": 2},
    }
    got = row(flow)
    assert (got["drop_reason"], got["source_port"], got["policy_match_type"]) == (None, None, None)
    assert (got["destination_port"], got["event_type"], got["event_sub_type"]) == (80, 5, 2)


def test_socket_lb_events_keep_their_translation_point_cookie_and_cgroup() -> None:
    # A socket-LB translation as Hubble prints it: uint64 fields are JSON strings; no TCP flags, no direction.
    sock = {
        "time": "2024-05-01T10:00:00Z",
        "verdict": "TRANSLATED",
        "IP": {"source": "10.244.1.5", "destination": "10.244.2.9", "ipVersion": "IPv4"},
        "l4": {"UDP": {"source_port": 40000, "destination_port": 53}},
        "Type": "SOCK",
        "event_type": {"type": 7, "sub_type": 2},
        "sock_xlate_point": "SOCK_XLATE_POINT_POST_DIRECTION_FWD",
        "socket_cookie": "9223372036854775000",
        "cgroup_id": "5283",
    }
    got = row(sock)
    assert (got["flow_type"], got["event_type"], got["verdict"]) == ("SOCK", 7, "TRANSLATED")
    assert got["sock_xlate_point"] == "SOCK_XLATE_POINT_POST_DIRECTION_FWD"
    assert (got["socket_cookie"], got["cgroup_id"]) == (9223372036854775000, 5283)
    # The numeric enum spelling and an unknown point from a newer Cilium are read, not rejected.
    assert row({**sock, "sock_xlate_point": 3})["sock_xlate_point"] == "SOCK_XLATE_POINT_PRE_DIRECTION_REV"
    assert row({**sock, "sock_xlate_point": 9}, proto=False)["sock_xlate_point"] == "9"

"""The column-at-a-time encoder of served flows gives the same messages as the row-at-a-time one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from flowpipe._proto.observer import observer_pb2
from flowpipe.model import FLOW_SCHEMA
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.transforms.flow_responses import (
    encode_framed,
    encode_responses,
    frame_responses,
    served_node_names,
)
from flowpipe.transforms.normalize import normalize_flows, normalize_json_lines
from flowpipe.transforms.to_flow import served_node_name, table_to_flows


def _served(table: pa.Table, chunk: int) -> list[tuple[int, str, observer_pb2.GetFlowsResponse]]:
    """(time, node, response) of each row, read back from the framed buffers of `chunk`-row batches."""
    out = []
    for batch in table.to_batches(max_chunksize=chunk):
        encoded = encode_responses(batch)
        data, starts = frame_responses(encoded.messages)
        buffer = data.to_pybytes()
        assert len(buffer) == starts[-1]
        # What is sent: the same frames, encoded framed in one go.
        framed = encode_framed(batch)
        assert framed.data.to_pybytes() == buffer and list(framed.starts) == list(starts)
        assert list(framed.times) == list(encoded.times) and framed.nodes.equals(encoded.nodes)
        for i in range(batch.num_rows):
            frame = buffer[starts[i] : starts[i + 1]]
            assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
            response = observer_pb2.GetFlowsResponse.FromString(frame[5:])
            out.append((int(encoded.times[i]), encoded.nodes[i].as_py(), response))
    return out


def _check(table: pa.Table, chunk: int = 500) -> int:
    expected = list(table_to_flows(table))
    clusters = table.column("cluster_name").to_pylist()
    served = _served(table, chunk)
    assert len(served) == len(expected)
    for (time_ns, node, response), flow, cluster in zip(served, expected, clusters, strict=True):
        flow.node_name = served_node_name(flow.node_name, cluster)
        assert response.flow == flow
        assert response.node_name == node == flow.node_name
        assert response.time == flow.time and time_ns == flow.time.ToNanoseconds()
    return len(served)


def test_simulated_flows_encode_as_the_reference() -> None:
    simulator = Simulator(SimulatorConfig(seed=11, duration_seconds=60, rate_flows_per_second=100))
    assert _check(normalize_flows(list(simulator.flows()))) > 3000


def test_captures_encode_as_the_reference(capture_files: list[Path]) -> None:
    checked = 0
    for path in capture_files:
        events = normalize_json_lines(path.read_bytes(), path=str(path))
        if events.flows.num_rows:
            table = events.flows.filter(pa.compute.is_valid(events.flows.column("time")))
            checked += _check(table, chunk=97)
    assert checked >= 1200


def test_every_kind_of_row_value() -> None:
    """Values the simulator and the captures do not have: clusters, unknown enum numbers, policies, ICMP."""
    rows = [
        {"time": 1, "node_name": "n1", "cluster_name": "prod", "verdict": "42", "l4_protocol": "ICMPv6",
         "icmp_type": 128, "icmp_code": 0, "ingress_denied_by": ["ns/deny/x", "ccnp"], "is_reply": False},
        {"time": 2_000_000_001, "node_name": "east/n2", "cluster_name": "east", "l4_protocol": "VRRP",
         "l7_protocol": "kafka", "kafka_topic": "t", "kafka_error_code": -1, "source_identity": 0,
         "source_workload_kind": "Deployment", "tcp_flags": "SYN"},
        {"time": 3, "node_name": None, "cluster_name": "prod", "l4_protocol": "TCP", "tcp_flags": "SYN,ACK,NS",
         "source_port": 65535, "encrypted": False, "destination_service_name": "", "latency_ns": 0},
        {"time": 4, "node_name": "n4", "cluster_name": "default", "l7_protocol": "http", "http_code": 0,
         "source_ip": "", "destination_ip": "10.0.0.1", "drop_reason_desc": "POLICY_DENIED"},
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)
    assert _check(table, chunk=3) == 4


def test_a_flow_longer_than_two_varint_bytes_say() -> None:
    """A flow of more than 16,383 bytes: its length takes three bytes before it in the response."""
    labels = [f"k8s:label-{i:05d}=value" for i in range(1200)]
    rows = [{"time": 5, "node_name": "n", "source_identity": 7, "source_labels": labels}]
    table = pa.Table.from_pylist(rows, schema=FLOW_SCHEMA)
    assert _check(table) == 1
    assert len(encode_responses(table.to_batches()[0]).messages[0].as_py()) > 1 << 14


def test_served_node_names_column() -> None:
    names = pa.array(["n", "c/n", "n", "n", "", None])
    clusters = pa.array(["prod", "prod", "default", None, "prod", "prod"])
    assert served_node_names(names, clusters).to_pylist() == [
        served_node_name(n, c) for n, c in zip(names.to_pylist(), clusters.to_pylist(), strict=True)
    ]


def test_a_name_no_decoder_writes_is_refused() -> None:
    table = pa.Table.from_pylist([{"time": 1, "verdict": "NOT_A_VERDICT"}], schema=FLOW_SCHEMA)
    with pytest.raises(ValueError, match="flow.Verdict"):
        encode_responses(table.to_batches()[0])

"""The flow table back to Flow messages: what was received comes back, for every field the table keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format
from support.kept_fields import kept, kept_line

from flowpipe._proto.flow import flow_pb2
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.transforms.normalize import normalize_flows, normalize_json_lines
from flowpipe.transforms.to_flow import enum_number, served_node_name, table_to_flows


def _lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def test_captures_come_back_line_for_line(capture_files: list[Path]) -> None:
    checked = 0
    for path in capture_files:
        lines = _lines(path)
        events = normalize_json_lines(b"\n".join(lines) + b"\n", path=str(path))
        if events.errors or events.flows.num_rows != len(lines):
            continue  # a pretty-printed or mixed file: the line-for-line comparison does not apply
        flows = list(table_to_flows(events.flows))
        for number, (line, flow) in enumerate(zip(lines, flows, strict=True), start=1):
            served = json_format.MessageToDict(flow, preserving_proto_field_name=True)
            assert served == kept_line(line), f"{path.name}:{number}"
            checked += 1
        # and decoding the served flows again gives the stored rows
        assert normalize_flows(flows).equals(events.flows), path.name
    assert checked >= 1200


def test_simulated_flows_come_back() -> None:
    simulator = Simulator(SimulatorConfig(seed=7, duration_seconds=120, rate_flows_per_second=100))
    received = list(simulator.flows())
    table = normalize_flows(received)
    served = list(table_to_flows(table))
    assert len(served) == len(received) > 5000
    for original, back in zip(received, served, strict=True):
        assert back == kept(original)
    assert normalize_flows(served).equals(table)


def test_enum_values_back_to_numbers() -> None:
    assert enum_number("Verdict", "DROPPED") == flow_pb2.DROPPED
    assert enum_number("Verdict", None) == 0
    assert enum_number("Verdict", "42") == 42  # a number a newer Cilium sent, stored as its decimal string
    with pytest.raises(ValueError, match="flow.Verdict"):
        enum_number("Verdict", "NOT_A_VERDICT")


def test_served_node_names_carry_their_cluster() -> None:
    assert served_node_name("kind-worker", None) == "kind-worker"
    assert served_node_name("prod/kind-worker", "prod") == "prod/kind-worker"
    assert served_node_name("kind-worker", "prod") == "prod/kind-worker"
    assert served_node_name("kind-worker", "default") == "kind-worker"

"""The JSON fast path (the block parser) gives exactly what the per-line path gives, odd values included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowpipe.transforms import normalize_json_lines, normalize_json_texts

CLEAN: dict[str, Any] = {
    "time": "2024-05-01T10:00:00.123456789Z",
    "uuid": "0b3c5a9e-1111-4222-8333-944455556666",
    "verdict": "FORWARDED",
    "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4", "encrypted": False},
    "l4": {"TCP": {"source_port": 40000, "destination_port": 8080, "flags": {"SYN": True}}},
    "source": {"identity": 5001, "namespace": "shop", "labels": ["k8s:app=web"], "pod_name": "web-1",
               "workloads": [{"name": "web", "kind": "Deployment"}]},
    "destination": {"identity": 2, "labels": ["reserved:world"]},
    "Type": "L3_L4",
    "node_name": "prod/worker-1",
    "event_type": {"type": 4, "sub_type": 0},
    "traffic_direction": "EGRESS",
    "is_reply": False,
    "l7": {"type": "REQUEST", "latency_ns": "1200", "http": {"code": 200, "method": "GET", "url": "/x"}},
    "egress_allowed_by": [{"name": "allow-web", "namespace": "shop"}],
}  # fmt: skip


def _with(path: str, value: Any) -> str:
    """A clean envelope line with the value at a dotted path inside `flow` replaced."""
    flow = json.loads(json.dumps(CLEAN))
    *parents, last = path.split(".")
    node = flow
    for name in parents:
        node = node[name]
    node[last] = value
    return json.dumps({"flow": flow, "node_name": "prod/worker-1"})


# Values DuckDB's reader would coerce (or read as text) where protobuf's JSON mapping is strict or different.
ODD_LINES = [
    _with("is_reply", 1),
    _with("is_reply", "true"),
    _with("IP.encrypted", "false"),
    _with("l4.TCP.flags.SYN", 0),
    _with("l4.TCP.source_port", 1.5),
    _with("l4.TCP.source_port", 1.0),
    _with("l4.TCP.source_port", "7"),
    _with("l4.TCP.source_port", " 7"),
    _with("l4.TCP.source_port", "+7"),
    _with("l4.TCP.source_port", True),
    _with("l4.TCP.source_port", 99999999999999999999),
    _with("source.identity", "1e3"),
    _with("verdict", 2),
    _with("verdict", "2"),
    _with("Type", 1.0),
    _with("uuid", 5),
    _with("uuid", True),
    _with("uuid", {"a": 1}),
    _with("uuid", [1]),
    _with("source.pod_name", "12345"),
    _with("source.labels", ["k8s:a=b", 5]),
    _with("source.labels", ["true"]),
    _with("source.workloads", [{"name": 7, "kind": "Deployment"}]),
    _with("l7.latency_ns", 1.0),
    _with("l7.latency_ns", "+5"),
    _with("l7.latency_ns", 17),
    _with("l7.type", 1),
    _with("time", 1700000000),
    _with("time", "2024-05-01t10:00:00z"),
    _with("IP", "10.0.0.1"),
    _with("source.labels", "k8s:a=b"),
    _with("egress_allowed_by", [{"name": "a"}, "b"]),
    json.dumps({"node_status": 5}),
    json.dumps({"node_status": {}, "node_name": "n"}),
    json.dumps({"lost_events": {"source": 3, "num_events_lost": 1.5}}),
    "null",
    "{}",
    '{"flow": {"uuid": "dup", "uuid": "dup2"}}',
    '{"flow": {"uuid": "x"}} {"flow": {}}',
    '{"flow": {"uuid": NaN}}',
    '{"flow": {"uuid": nan}}',
    '{"flow": {"uuid": "x"}, "extra": Infinity}',
    '{"flow": {"uuid": "x"},}',
    '{"flow": {"uuid": "x", "source": {"labels": ["a",]}}}',
    '{"flow": {"uuid": "x"}, "extra": inf}',
]


def _compare(lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode()
    block = normalize_json_lines(data, path="odd.json")
    per_line = normalize_json_texts(list(enumerate(lines, 1)), path="odd.json")
    assert [(e.line_number, e.reason) for e in block.errors] == [
        (e.line_number, e.reason) for e in per_line.errors
    ]
    assert block.flows.equals(per_line.flows)
    assert (block.node_status, block.unknown_events, len(block.lost_events)) == (
        per_line.node_status,
        per_line.unknown_events,
        len(per_line.lost_events),
    )


@pytest.mark.parametrize("odd", ODD_LINES)
def test_an_odd_line_among_clean_ones_gives_what_the_per_line_path_gives(odd: str) -> None:
    clean = _with("uuid", "clean")
    _compare([clean] * 100 + [odd] + [clean] * 100)


def test_every_odd_line_in_one_block() -> None:
    clean = _with("uuid", "clean")
    lines = [clean]
    for odd in ODD_LINES:
        lines += [odd, clean]
    _compare(lines)


def test_flows_lost_events_and_node_status_in_one_block_take_the_vectorized_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flowpipe.transforms._json as json_path

    lines = [_with("uuid", f"u{i}") for i in range(20)]
    lines.insert(5, json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "3"}}))
    lines.insert(9, json.dumps({"node_status": {"state_change": "NODE_CONNECTED"}, "node_name": "n1"}))
    expected = normalize_json_texts(list(enumerate(lines, 1)), path="x")

    def no_fallback(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the per-line path was used")

    monkeypatch.setattr(json_path, "decode_texts", no_fallback)
    block = normalize_json_lines(("\n".join(lines) + "\n").encode(), path="x")
    assert block.flows.equals(expected.flows) and block.flows.num_rows == 20
    assert [(e.source, e.num_events_lost) for e in block.lost_events] == [("HUBBLE_RING_BUFFER", 3)]
    assert block.node_status == 1

"""from_proto, the one protobuf decoder: odd but valid flows give the rows the JSON decoder gives, and decoding
them over and over (alone, from several threads beside gRPC's, after a fork, first calls from several threads)
finishes, as does decoding garbled messages (each reported, the others kept)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.decoders import assert_same_as_json, odd_flows, odd_responses
from support.env import ROOT

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.errors import FlowDecodeError
from flowpipe.transforms.from_proto import decode_messages, flow_response
from flowpipe.transforms.normalize import normalize_flows, normalize_responses


def test_odd_flows_give_the_rows_of_the_json_decoder() -> None:
    messages = odd_responses()
    assert len(messages) > 80
    decoded = assert_same_as_json(messages, cluster_name="lab")
    rows = decoded.flows.to_pylist()
    empty_l4 = rows[[f.HasField("l4") and not f.l4.WhichOneof("protocol") for f in odd_flows()].index(True)]
    assert (empty_l4["l4_protocol"], empty_l4["source_port"], empty_l4["tcp_flags"]) == (None, None, None)
    assert {"77", "2147483647", "-1", "-2147483648"} <= {row["verdict"] for row in rows}


def test_odd_flows_in_one_large_batch_give_the_rows_of_each_alone() -> None:
    messages = odd_responses()
    alone = [decode_messages([message]).flows for message in messages]
    together = decode_messages(messages * 500).flows
    assert together.num_rows == len(messages) * 500
    for index, table in enumerate(alone):
        assert together.slice(index, 1).equals(table), index
        assert together.slice(len(messages) * 499 + index, 1).equals(table), index


def test_messages_keep_their_envelope_when_given_as_messages() -> None:
    flow = flow_pb2.Flow(uuid="u1")
    flow.l4.SetInParent()
    stamp = observer_pb2.GetFlowsResponse().time
    stamp.FromNanoseconds(1_700_000_000_123_456_789)
    via_flows = normalize_flows([flow], node_names=["kind/n1"], times=[stamp])
    response = observer_pb2.GetFlowsResponse(flow=flow, node_name="kind/n1", time=stamp)
    assert flow_response(flow.SerializeToString(), "kind/n1", stamp.SerializeToString()) == (
        response.SerializeToString()
    )
    assert via_flows.equals(normalize_responses([response]).flows)
    row = via_flows.to_pylist()[0]
    assert (row["node_name"], row["cluster_name"], row["time"].value) == (
        "kind/n1",
        "kind",
        1_700_000_000_123_456_789,
    )


def test_a_latency_beyond_the_int64_column_becomes_null() -> None:
    """(The JSON decoder refuses such a line instead: it names the field and the range.)"""
    flow = flow_pb2.Flow(uuid="u1")
    flow.l7.latency_ns = (1 << 64) - 1
    flow.l7.dns.query = "example.com."
    row = normalize_flows([flow]).to_pylist()[0]
    assert (row["latency_ns"], row["dns_query"], row["l7_protocol"]) == (None, "example.com.", "dns")


def test_a_message_the_caller_serialised_badly_is_an_error_naming_it() -> None:
    good = flow_response(flow_pb2.Flow(uuid="u1").SerializeToString())
    with pytest.raises(FlowDecodeError, match="protobuf message 2 could not be decoded"):
        decode_messages([good, b"\x0a\xff\xff\xff\x0f\x01"])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("mode", ["alone", "threads", "fork", "first", "garbage"])
def test_decoding_odd_flows_again_and_again_finishes(mode: str) -> None:
    """In a child process with a timeout: a hang fails this test instead of stopping the run."""
    environment = dict(os.environ)
    paths = [str(ROOT / "tests"), str(ROOT), environment.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "support.decoders", mode, "10"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"decoding did not finish ({mode}): {exc.stderr!r}")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr

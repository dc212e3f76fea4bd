"""The relay source against the built-in Observer server on loopback.

Bulk decoding equals the JSON decoder, the whole buffer on first start, resume from the checkpoint, server-side
filters, node shards and lost events.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format
from support.collect import (
    background_collect,
    chunks,
    dataset_table,
    dataset_uuids,
    fast_collect_config,
    sim_flow_bytes,
    uuids_of,
)
from support.decoders import assert_same_as_json
from support.sim_dataset import ask
from support.wait import WAIT_SECONDS, wait_until

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe._proto.relay import relay_pb2
from flowpipe.errors import ConfigError
from flowpipe.query import DuckDBEngine
from flowpipe.server import ObserverServer
from flowpipe.sources.relay import node_shard_of, parse_node_shard
from flowpipe.sources.relay._config import backoff_seconds, node_name_matches
from flowpipe.sources.relay._connect import StreamReceiver, library_call, open_channel
from flowpipe.transforms.from_proto import decode_responses

ENVELOPE_KEYS = {"flow", "lost_events", "node_status", "agent_event", "debug_event"}


# -- decoding -------------------------------------------------------------------------------------------------


def test_bulk_decoding_gives_the_rows_of_the_json_decoder_for_simulated_responses() -> None:
    messages = [
        observer_pb2.GetFlowsResponse(flow=flow_pb2.Flow.FromString(f), node_name="n").SerializeToString()
        for f in sim_flow_bytes()[:3000]
    ]
    odd = observer_pb2.GetFlowsResponse(node_name="kind/worker")
    odd.time.FromNanoseconds(1_700_000_000_123_456_789)  # a flow without time, uuid or node: the envelope's
    odd.flow.verdict = 77  # an enum number from a newer Cilium
    odd.flow.drop_reason = 4_000_000_000  # beyond int32: NULL, as through JSON
    odd.flow.l7.latency_ns = (1 << 63) - 1  # the largest the column holds
    odd.flow.l7.dns.query = "example.com."
    lost = observer_pb2.GetFlowsResponse(
        lost_events=flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=42),
        node_name="kind/n2",
    )
    lost.time.FromNanoseconds(1_700_000_001_000_000_000)
    lost.lost_events.cpu.value = 3
    status = observer_pb2.GetFlowsResponse(
        node_status=relay_pb2.NodeStatusEvent(
            state_change=relay_pb2.NODE_ERROR, node_names=["a"], message="boom"
        )
    )
    assert_same_as_json(
        [status.SerializeToString(), *messages, odd.SerializeToString(), lost.SerializeToString()]
    )
    decoded = decode_responses([status.SerializeToString(), lost.SerializeToString()])
    assert decoded.node_status == [("NODE_ERROR", ["a"], "boom")]
    assert decoded.lost_events[0].num_events_lost == 42 and decoded.lost_events[0].node_name == "kind/n2"


def test_bulk_decoding_gives_the_rows_of_the_json_decoder_for_every_real_capture(
    capture_files: list[Path],
) -> None:
    messages: list[bytes] = []
    for path in capture_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip().startswith("{"):
                continue
            try:
                keys = set(json.loads(line))
            except ValueError:
                continue
            if ENVELOPE_KEYS & keys:
                if not {"flow", "lost_events", "node_status"} & keys:
                    continue
                event = json_format.Parse(line, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)
            else:
                event = observer_pb2.GetFlowsResponse()
                json_format.Parse(line, event.flow, ignore_unknown_fields=True)
            messages.append(event.SerializeToString())
    assert len(messages) > 1000
    assert_same_as_json(messages)


def test_an_undecodable_message_is_reported_and_the_others_kept() -> None:
    good = [
        observer_pb2.GetFlowsResponse(flow=flow_pb2.Flow.FromString(f)).SerializeToString()
        for f in sim_flow_bytes()[:5]
    ]
    decoded = decode_responses([good[0], b"\x0a\xff\xff\xff\x0f\x01", *good[1:]])
    assert [index for index, _ in decoded.bad_messages] == [1]
    assert decoded.flows.column("uuid").to_pylist() == uuids_of(sim_flow_bytes()[:5])


# -- shards ---------------------------------------------------------------------------------------------------


def test_node_shards_are_stable_and_cover_every_node_once() -> None:
    names = [f"prod/node-{i}" for i in range(200)]
    for count in (1, 2, 3, 7):
        shards = [node_shard_of(n, count) for n in names]
        assert set(shards) == set(range(count)) and shards == [node_shard_of(n, count) for n in names]
    assert parse_node_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="I/N"):
            parse_node_shard(bad)


def test_reconnect_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    longest = [backoff_seconds(a, 0.5, 30.0, uniform=lambda low, high: high) for a in range(1, 10)]
    assert longest == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_seconds(10_000, 0.5, 30.0, uniform=lambda low, high: high) == 30.0  # no overflow, forever
    rng = random.Random(7)
    waits = [backoff_seconds(8, 0.5, 30.0, uniform=rng.uniform) for _ in range(50)]
    assert all(15.0 <= w <= 30.0 for w in waits)
    assert len(set(waits)) == len(waits), "jittered: collectors cut off together do not retry in step"


# -- following the built-in relay ------------------------------------------------------------------------------


def test_first_start_takes_the_whole_buffer_then_follows(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:2000]
    before, after = flows[:1500], flows[1500:]
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(before)
        with background_collect(fast_collect_config(server.address, tmp_path)) as running:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(before), what="the buffered flows")
            server.publish(after)
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(flows), what="the new flows")
            result = running.stop()
    assert sorted(dataset_uuids(tmp_path)) == sorted(uuids_of(flows))
    assert result.pipeline.node_status >= 1
    state = json.loads((tmp_path / "_state" / "relay.json").read_text())
    assert state["uuid"] in uuids_of(flows) and state["resume_ns"] < state["newest_ns"]


def test_a_restart_resumes_from_the_checkpoint_and_writes_nothing_twice(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:3000]
    first, second = flows[:2000], flows[2000:]
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(first)
        with background_collect(
            fast_collect_config(server.address, tmp_path, resume_overlap_seconds=2.0)
        ) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(first), what="the first flows")
            run.stop()
        server.publish(second)
        config = fast_collect_config(server.address, tmp_path, writer_id="again", resume_overlap_seconds=2.0)
        with background_collect(config) as run:
            wait_until(
                lambda: len(dataset_uuids(tmp_path)) == len(flows), what="the flows after the checkpoint"
            )
            result = run.stop()
    assert sorted(dataset_uuids(tmp_path)) == sorted(uuids_of(flows))
    # The relay was asked from the checkpoint (minus 2 s), not for its whole buffer: only the flows since the
    # oldest of the nodes' newest flows, minus 2 s, came back.
    newest: dict[str, int] = {}
    for flow in map(flow_pb2.Flow.FromString, first):
        newest[flow.node_name] = max(newest.get(flow.node_name, 0), flow.time.ToNanoseconds())
    resume = min(newest.values()) - 2 * 10**9
    since = sum(1 for flow in map(flow_pb2.Flow.FromString, first) if flow.time.ToNanoseconds() >= resume)
    assert 0 < result.repeats_skipped == since < len(first) // 3
    assert result.flows_received == len(second)


def test_a_restart_with_nothing_new_keeps_the_checkpoints_newest_flow_and_nodes(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:1500]
    state_path = tmp_path / "_state" / "relay.json"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        with background_collect(fast_collect_config(server.address, tmp_path)) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(flows), what="the flows")
            run.stop()
        before = json.loads(state_path.read_text())
        assert before["uuid"] and before["nodes"]
        # The relay sends only node status and the overlap's repeats: the batches hold no new flow.
        with background_collect(fast_collect_config(server.address, tmp_path, writer_id="again")) as run:
            wait_until(
                lambda: json.loads(state_path.read_text())["saved_at"] != before["saved_at"],
                what="a checkpoint saved by the second run",
            )
            run.stop()
    after = json.loads(state_path.read_text())
    for key in ("resume_ns", "newest_ns", "uuid", "nodes"):
        assert after[key] == before[key], key
    assert len(dataset_uuids(tmp_path)) == len(flows)


def test_server_side_filters_select_namespaces_and_verdicts(tmp_path: Path) -> None:
    flows = [flow_pb2.Flow.FromString(f) for f in sim_flow_bytes()[:3000]]
    namespaces = {f.source.namespace for f in flows} | {f.destination.namespace for f in flows}
    wanted_ns = sorted(n for n in namespaces if n)[:2]
    expected = sorted(
        f.uuid
        for f in flows
        if (f.source.namespace in wanted_ns or f.destination.namespace in wanted_ns)
        and f.verdict in (flow_pb2.DROPPED, flow_pb2.FORWARDED)
    )
    assert 0 < len(expected) < len(flows)
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        config = fast_collect_config(
            server.address, tmp_path, namespaces=tuple(wanted_ns), verdicts=("dropped", "FORWARDED")
        )
        with background_collect(config) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(expected), what="the filtered flows")
            run.stop()
    assert sorted(dataset_uuids(tmp_path)) == expected


def test_node_patterns_match_like_the_relays_node_name_filter() -> None:
    assert node_name_matches("prod/worker-1", ["prod/worker-*"])
    assert node_name_matches("prod/worker-1", ["worker-1"])  # no cluster in the pattern: any cluster
    assert node_name_matches("worker-1", ["default/worker-1"])  # no cluster in the name: the default one
    assert not node_name_matches("prod/worker-1", ["prod*1"])  # `*` stays within one part
    assert not node_name_matches("prod/worker-10", ["prod/worker-1"])
    assert not node_name_matches("prod/worker-1", [])


@pytest.mark.parametrize("shard", [None, (0, 1)], ids=["unsharded", "sharded"])
def test_node_filter_selects_the_nodes_named_with_or_without_their_cluster(
    tmp_path: Path, shard: tuple[int, int] | None
) -> None:
    flows = [flow_pb2.Flow.FromString(f) for f in sim_flow_bytes()[:2000]]
    wanted = {"sim/worker-1", "sim/control-plane"}
    expected = sorted(f.uuid for f in flows if f.node_name in wanted)
    assert {f.node_name for f in flows} > wanted and expected
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        config = fast_collect_config(
            server.address, tmp_path, nodes=("sim/worker-1", "control-plane"), node_shard=shard
        )
        with background_collect(config) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) >= len(expected), what="the chosen nodes' flows")
            run.stop()
    assert sorted(dataset_uuids(tmp_path)) == expected


@pytest.mark.parametrize("shards", [2, 3])
def test_node_shards_together_write_every_flow_once(tmp_path: Path, shards: int) -> None:
    flows = sim_flow_bytes()[:3000]
    nodes = {flow_pb2.Flow.FromString(f).node_name for f in flows}
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows[:1000])
        runs = [
            background_collect(
                # each shard's stream read by a receiving process of its own (whatever the CPUs)
                fast_collect_config(
                    server.address, tmp_path, writer_id=f"s{i}", node_shard=(i, shards), workers=2
                )
            )
            for i in range(shards)
        ]
        running = [r.__enter__() for r in runs]
        try:
            for part in chunks(flows[1000:], 4):
                server.publish(part)
            wait_until(lambda: len(dataset_uuids(tmp_path)) >= len(flows), what="every flow from the shards")
        finally:
            for r in running:
                r.stop()
    assert sorted(dataset_uuids(tmp_path)) == sorted(uuids_of(flows))
    table = dataset_table(tmp_path, columns=["node_name", "uuid"])
    writers = {path.name.split("-")[2] for path in (tmp_path / "flows").rglob("*.parquet")}
    assert writers <= {f"s{i}" for i in range(shards)}
    by_shard: dict[int, set[str]] = {}
    for node in nodes:
        by_shard.setdefault(node_shard_of(node, shards), set()).add(node)
    # every node's flows were written by the shard that owns the node
    for path in (tmp_path / "flows").rglob("*.parquet"):
        shard = int(path.name.split("-")[2][1:])
        written_nodes = set(pq.read_table(path, columns=["node_name"]).column("node_name").to_pylist())
        assert written_nodes <= by_shard.get(shard, set()), (path.name, written_nodes)
    assert set(table.column("node_name").to_pylist()) == nodes


def test_a_new_node_restarts_a_sharded_stream_without_counting_a_reconnect(tmp_path: Path) -> None:
    flows = [flow_pb2.Flow.FromString(f) for f in sim_flow_bytes()[:1200]]
    later = flows[600:]
    for flow in later:  # a node that joins the cluster while the collector runs
        flow.node_name = "kind/worker-joined"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows[:600])
        config = fast_collect_config(server.address, tmp_path, node_shard=(0, 1))
        with background_collect(config) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == 600, what="the first nodes' flows")
            server.publish(later)  # the stream asks for the known nodes only: these need a new stream
            wait_until(lambda: len(dataset_uuids(tmp_path)) == len(flows), what="the new node's flows")
            result = run.stop()
    assert sorted(dataset_uuids(tmp_path)) == sorted(f.uuid for f in flows)
    assert result.reconnects == 0  # asking again for a new node list is not a failure of the relay


def test_lost_events_are_recorded_in_the_dataset(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:3000]
    # The first batch holds a flow of every node: a node the stream has not read yet reports no loss.
    nodes = [flow_pb2.Flow.FromString(f).node_name for f in flows]
    first = max(nodes.index(node) for node in set(nodes)) + 1
    with ObserverServer(buffer_size=20) as server:
        server.publish(flows[:first])
        with background_collect(fast_collect_config(server.address, tmp_path)) as run:
            assert server.wait_for_streams(1)
            wait_until(lambda: len(dataset_uuids(tmp_path)) > 0, what="the first flows")
            server.stall(1.0)  # the stream stops while the ring buffers overwrite what it has not read
            server.publish(flows[first:])
            wait_until(
                lambda: dataset_table(tmp_path, "lost_events").num_rows > 0, what="lost events in the dataset"
            )
            result = run.stop()
    lost = dataset_table(tmp_path, "lost_events")
    assert set(lost.column("source").to_pylist()) == {"HUBBLE_RING_BUFFER"}
    nodes = {flow_pb2.Flow.FromString(f).node_name for f in flows}
    assert set(lost.column("node_name").to_pylist()) <= nodes
    total_lost = pc.sum(lost.column("num_events_lost")).as_py()
    assert total_lost == result.pipeline.events_lost > 0
    buffered_at_start = len(dataset_uuids(tmp_path)) - (len(flows) - first - total_lost)
    assert 0 < buffered_at_start <= first, "every later flow was either written or reported lost"
    # The lost_events question says how many events Hubble lost on which node, and when.
    by_node: dict[str, int] = {}
    for node, count in zip(lost.column("node_name").to_pylist(), lost.column("num_events_lost").to_pylist()):
        by_node[node] = by_node.get(node, 0) + count
    with DuckDBEngine(tmp_path) as engine:
        answer = ask(engine, "lost_events")
    assert {r["node_name"]: r["events_lost"] for r in answer} == by_node
    assert {r["source"] for r in answer} == {"HUBBLE_RING_BUFFER"}
    assert all(r["first_seen"] is not None and r["flows"] > 0 for r in answer)


def get_flows_call(channel: grpc.Channel, request: observer_pb2.GetFlowsRequest) -> Any:
    """A GetFlows call whose responses arrive as raw bytes, as the relay source reads them with grpcio."""
    return library_call(channel, "/observer.Observer/GetFlows", request.SerializeToString())


def test_the_stream_receiver_holds_at_most_max_pending_and_hands_over_every_flow_in_order() -> None:
    flows = sim_flow_bytes()[:3000]
    stop = threading.Event()
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        channel = open_channel(server.address, None)
        # the whole buffer, then the call ends
        call = get_flows_call(channel, observer_pb2.GetFlowsRequest(number=len(flows)))
        connected = threading.Event()
        receiver = StreamReceiver(call, max_pending=200, on_first=connected.set)
        receiver.start()
        try:
            wait_until(lambda: len(receiver.queue) >= 200, what="the receiver to fill its queue")
            assert connected.is_set()
            held = []
            for _ in range(20):  # the relay has 2,800 more to send meanwhile
                held.append(len(receiver.queue))
                time.sleep(0.02)
            assert max(held) == 200  # backpressure: the rest waits in the relay, not in memory
            received: list[bytes] = []
            over = False
            while not over:
                taken, over = receiver.take(count=150, wait_seconds=5.0, stop=stop)
                assert len(taken) <= 150
                received += taken
        finally:
            receiver.stop()
            receiver.join(5.0)
            channel.close()
    got = [observer_pb2.GetFlowsResponse.FromString(m) for m in received]
    assert [r.flow.uuid for r in got if r.HasField("flow")] == [
        flow_pb2.Flow.FromString(f).uuid for f in flows
    ]
    assert not receiver.is_alive() and receiver.error is None


def test_the_stream_receiver_hands_over_a_full_queue_when_a_batch_is_bigger_than_it_can_hold() -> None:
    # batch_max_flows above max_pending_flows: the queue stops growing at max_pending, so take() must not wait
    # for more (it would sit out batch_max_seconds on every batch while the relay's stream is paused)
    flows = sim_flow_bytes()[:300]
    guard = threading.Event()  # only ends the wait if take() waits for what can never come
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        channel = open_channel(server.address, None)
        # the call stays open
        call = get_flows_call(channel, observer_pb2.GetFlowsRequest(number=len(flows), follow=True))
        receiver = StreamReceiver(call, max_pending=50, on_first=lambda: None)
        receiver.start()
        timer = threading.Timer(WAIT_SECONDS, guard.set)
        timer.start()
        try:
            taken, over = receiver.take(count=200, wait_seconds=3600.0, stop=guard)
        finally:
            timer.cancel()
            receiver.stop()
            receiver.join(5.0)
            channel.close()
    assert not guard.is_set(), "take() waited for more than the queue can hold"
    assert len(taken) == 50 and not over
    responses = [observer_pb2.GetFlowsResponse.FromString(m) for m in taken]
    got = [r.flow.uuid for r in responses if r.HasField("flow")]
    assert got and got == [flow_pb2.Flow.FromString(f).uuid for f in flows[: len(got)]]

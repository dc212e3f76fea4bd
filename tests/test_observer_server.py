"""The built-in Observer server over real gRPC on 127.0.0.1: GetFlows semantics, unary calls and faults."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
from click.testing import CliRunner
from support.processes import start_simulate_relay, stop_process

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
from flowpipe._proto.relay import relay_pb2
from flowpipe.cli import cli
from flowpipe.errors import ObserverServerError
from flowpipe.server import FlowFeeder, ObserverServer
from flowpipe.server.observer import DEFAULT_RELAY_NAME

NODES = ("node-a", "node-b", "node-c")
T0 = 1_700_000_000


def make_flow(node: str, second: int, index: int, namespace: str = "production") -> flow_pb2.Flow:
    """A small TCP flow on `node` at T0 + second."""
    flow = flow_pb2.Flow(
        node_name=node, verdict=flow_pb2.FORWARDED, uuid=f"{node}-{index}", Type=flow_pb2.L3_L4
    )
    flow.time.FromSeconds(T0 + second)
    flow.source.namespace, flow.source.pod_name = namespace, f"client-{index}"
    flow.destination.namespace, flow.destination.pod_name = "production", "api-0"
    flow.l4.TCP.destination_port = 8080
    return flow


def ten_per_node() -> list[flow_pb2.Flow]:
    """Ten flows per node at seconds 0..9 (uuid `<node>-<second>`), interleaved like a live cluster."""
    return [make_flow(node, second, second) for second in range(10) for node in NODES]


@pytest.fixture
def server() -> Iterator[ObserverServer]:
    with ObserverServer(buffer_size=100) as srv:
        srv.publish(ten_per_node())
        yield srv


@pytest.fixture
def stub(server: ObserverServer) -> Iterator[observer_pb2_grpc.ObserverStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield observer_pb2_grpc.ObserverStub(channel)


def flows_of(responses: Iterator[observer_pb2.GetFlowsResponse]) -> list[flow_pb2.Flow]:
    return [r.flow for r in responses if r.HasField("flow")]


def uuids(stub: observer_pb2_grpc.ObserverStub, **request: object) -> list[str]:
    return [f.uuid for f in flows_of(stub.GetFlows(observer_pb2.GetFlowsRequest(**request), timeout=10))]


def test_node_status_comes_first_with_every_node_and_the_relay_version(
    stub: observer_pb2_grpc.ObserverStub,
) -> None:
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(number=1), timeout=10)
    responses = list(call)
    first = responses[0]
    assert first.WhichOneof("response_types") == "node_status"
    assert first.node_status.state_change == relay_pb2.NODE_CONNECTED
    assert list(first.node_status.node_names) == list(NODES)
    assert first.node_name == DEFAULT_RELAY_NAME and first.time.seconds > T0
    assert all(r.HasField("flow") for r in responses[1:])
    assert dict(call.initial_metadata())["hubble-relay-version"]


def test_number_applies_per_node_and_returns_the_newest_in_time_order(
    stub: observer_pb2_grpc.ObserverStub,
) -> None:
    got = uuids(stub, number=2)
    assert sorted(got) == sorted(f"{node}-{s}" for node in NODES for s in (8, 9))
    flows = flows_of(stub.GetFlows(observer_pb2.GetFlowsRequest(number=2), timeout=10))
    times = [f.time.seconds for f in flows]
    assert times == sorted(times)


def test_number_zero_without_follow_returns_the_whole_buffer(stub: observer_pb2_grpc.ObserverStub) -> None:
    assert len(uuids(stub)) == 30


def test_first_returns_the_oldest_per_node(stub: observer_pb2_grpc.ObserverStub) -> None:
    assert sorted(uuids(stub, number=2, first=True)) == sorted(f"{n}-{s}" for n in NODES for s in (0, 1))


def test_first_with_follow_is_invalid(stub: observer_pb2_grpc.ObserverStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetFlows(observer_pb2.GetFlowsRequest(first=True, follow=True), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first cannot be specified with follow" in (info.value.details() or "")


def test_since_and_until_bound_the_time_range(stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest()
    request.since.FromSeconds(T0 + 3)
    request.until.FromSeconds(T0 + 5)
    flows = flows_of(stub.GetFlows(request, timeout=10))
    assert sorted({f.time.seconds - T0 for f in flows}) == [3, 4, 5]
    assert len(flows) == 9


def test_since_wins_over_number_for_the_start(stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest(number=1)
    request.since.FromSeconds(T0 + 4)
    assert sorted(f.uuid for f in flows_of(stub.GetFlows(request, timeout=10))) == [f"{n}-4" for n in NODES]


def test_until_alone_returns_flows_up_to_it(stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest()
    request.until.FromSeconds(T0 + 1)
    assert sorted(f.uuid for f in flows_of(stub.GetFlows(request, timeout=10))) == sorted(
        f"{n}-{s}" for n in NODES for s in (0, 1)
    )


def test_whitelist_and_blacklist_over_grpc(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    server.publish(
        [make_flow("node-a", 20, 20, namespace="staging"), make_flow("node-b", 21, 21, namespace="dev")]
    )
    staging_or_dev = [flow_pb2.FlowFilter(source_pod=["staging/"]), flow_pb2.FlowFilter(source_pod=["dev/"])]
    assert sorted(uuids(stub, whitelist=staging_or_dev)) == ["node-a-20", "node-b-21"]
    anded = [flow_pb2.FlowFilter(source_pod=["staging/", "dev/"], node_name=["node-b"])]
    assert uuids(stub, whitelist=anded) == ["node-b-21"]
    not_production = [flow_pb2.FlowFilter(source_pod=["production/"])]
    assert sorted(uuids(stub, blacklist=not_production)) == ["node-a-20", "node-b-21"]
    assert uuids(stub, whitelist=[flow_pb2.FlowFilter(node_name=["node-c"])], number=1) == ["node-c-9"]


def test_invalid_filter_is_invalid_argument(stub: observer_pb2_grpc.ObserverStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        uuids(stub, whitelist=[flow_pb2.FlowFilter(source_ip=["not-an-ip"])])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "whitelist[0].source_ip" in (info.value.details() or "")


def test_field_mask_returns_only_the_requested_fields(stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest(number=1)
    request.field_mask.paths.extend(["uuid", "source.namespace"])
    responses = [r for r in stub.GetFlows(request, timeout=10) if r.HasField("flow")]
    assert len(responses) == 3
    for response in responses:
        assert response.flow.uuid and response.flow.source.namespace == "production"
        assert not response.flow.source.pod_name and not response.flow.HasField("destination")
        assert not response.flow.HasField("time") and response.time.seconds == T0 + 9  # the envelope keeps it
        assert response.node_name in NODES


def test_invalid_field_mask_is_invalid_argument(stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest()
    request.field_mask.paths.append("source.no_such_field")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetFlows(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_served_envelope_matches_the_published_flow(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    published = make_flow("node-a", 30, 30)
    published.time.nanos = 123_456_789
    server.publish([published.SerializeToString()])  # pre-serialised input is served as is
    response = [
        r for r in stub.GetFlows(observer_pb2.GetFlowsRequest(number=1), timeout=10) if r.HasField("flow")
    ]
    newest = next(r for r in response if r.node_name == "node-a")
    assert newest.flow == published
    assert newest.time == published.time


def test_follow_gets_the_backlog_then_newly_published_flows(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(number=1, follow=True), timeout=20)
    try:
        assert next(call).HasField("node_status")
        backlog = sorted(next(call).flow.uuid for _ in NODES)
        assert backlog == [f"{n}-9" for n in NODES]
        server.publish([make_flow("node-b", 40, 40), make_flow("node-d", 41, 41)])
        assert next(call).flow.uuid == "node-b-40"
        assert next(call).flow.uuid == "node-d-41"  # a node that appears later is followed too
    finally:
        call.cancel()


def test_follow_without_number_starts_at_now(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=20)
    try:
        assert next(call).HasField("node_status")
        server.publish([make_flow("node-c", 50, 50)])
        assert next(call).flow.uuid == "node-c-50"
    finally:
        call.cancel()


def test_follow_ends_at_until(server: ObserverServer, stub: observer_pb2_grpc.ObserverStub) -> None:
    request = observer_pb2.GetFlowsRequest(follow=True)
    request.until.FromSeconds(T0 + 60)
    call = stub.GetFlows(request, timeout=20)
    assert next(call).HasField("node_status")
    server.publish([make_flow("node-a", 59, 59), make_flow("node-a", 61, 61), make_flow("node-a", 62, 62)])
    assert [f.uuid for f in flows_of(call)] == ["node-a-59"]
    assert call.code() == grpc.StatusCode.OK


def test_slow_follower_gets_lost_events_and_continues() -> None:
    with ObserverServer(buffer_size=10) as server, grpc.insecure_channel(server.address) as channel:
        server.add_nodes(["node-a"])
        call = observer_pb2_grpc.ObserverStub(channel).GetFlows(
            observer_pb2.GetFlowsRequest(follow=True), timeout=20
        )
        try:
            assert next(call).HasField("node_status")
            server.stall()  # the stream stops sending: from here on it falls behind
            server.publish([make_flow("node-a", i, i) for i in range(31)])
            server.resume()
            lost, received = 0, []
            while len(received) < 10 or received[-1] != "node-a-30":
                response = next(call)
                if response.HasField("lost_events"):
                    assert response.lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
                    assert response.node_name == "node-a"
                    lost += response.lost_events.num_events_lost
                else:
                    received.append(response.flow.uuid)
            assert lost > 0 and lost + len(received) == 31
            assert received[-10:] == [f"node-a-{i}" for i in range(21, 31)]
            server.publish([make_flow("node-a", 40, 40)])
            assert next(call).flow.uuid == "node-a-40"
        finally:
            call.cancel()


def test_ring_buffer_keeps_the_newest_per_node_and_counts_seen_flows() -> None:
    with ObserverServer(buffer_size=4) as server, grpc.insecure_channel(server.address) as channel:
        server.publish(ten_per_node())
        stub = observer_pb2_grpc.ObserverStub(channel)
        status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        assert (status.num_flows, status.max_flows, status.seen_flows) == (12, 12, 30)
        assert status.num_connected_nodes.value == 3 and status.num_unavailable_nodes.value == 0
        assert status.version and status.uptime_ns > 0
        assert sorted(uuids(stub, first=True, number=1)) == [f"{n}-6" for n in NODES]


def test_get_nodes_and_namespaces(server: ObserverServer, stub: observer_pb2_grpc.ObserverStub) -> None:
    server.publish([make_flow("node-a", 70, 70, namespace="staging")])
    nodes = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert [n.name for n in nodes] == list(NODES)
    assert all(n.state == relay_pb2.NODE_CONNECTED and n.max_flows == 100 for n in nodes)
    assert [n.num_flows for n in nodes] == [11, 10, 10]
    namespaces = stub.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=10).namespaces
    assert [n.namespace for n in namespaces] == ["production", "staging"]


@pytest.mark.parametrize("method", ["GetAgentEvents", "GetDebugEvents"])
def test_agent_and_debug_events_are_unimplemented_like_the_relay(
    stub: observer_pb2_grpc.ObserverStub, method: str
) -> None:
    request_type = getattr(observer_pb2, f"{method}Request")
    with pytest.raises(grpc.RpcError) as info:
        list(getattr(stub, method)(request_type(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_method_is_unimplemented(server: ObserverServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/observer.Observer/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_restart_ends_streams_with_unavailable_and_keeps_the_buffer(server: ObserverServer) -> None:
    port = server.port
    with grpc.insecure_channel(server.address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=20)
        assert next(call).HasField("node_status")
        server.restart()
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.port == port
    with grpc.insecure_channel(server.address) as channel:
        assert len(uuids(observer_pb2_grpc.ObserverStub(channel))) == 30


def test_close_streams_ends_them_with_unavailable_and_keeps_serving(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=20)
    assert next(call).HasField("node_status")
    assert server.wait_for_streams(1)
    assert server.close_streams() == 1
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(uuids(stub, number=1)) == 3


def test_cancelled_client_stream_is_released(
    server: ObserverServer, stub: observer_pb2_grpc.ObserverStub
) -> None:
    call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=20)
    assert next(call).HasField("node_status")
    assert server.wait_for_streams(1)
    call.cancel()
    assert server.wait_for_streams(0)


def test_feeder_publishes_everything_and_retimes() -> None:
    with ObserverServer(buffer_size=1000) as server:
        feeder = FlowFeeder(server, ten_per_node(), rate_per_second=None, retime=True).start()
        assert feeder.wait(10) and feeder.error is None
        assert feeder.published == 30
        with grpc.insecure_channel(server.address) as channel:
            flows = flows_of(
                observer_pb2_grpc.ObserverStub(channel).GetFlows(observer_pb2.GetFlowsRequest(), timeout=10)
            )
        assert len(flows) == 30 and all(f.time.seconds > T0 + 3600 for f in flows)


def test_publishing_something_else_is_refused(server: ObserverServer) -> None:
    with pytest.raises(ObserverServerError, match="item 1"):
        server.publish([make_flow("node-a", 0, 0), "not a flow"])  # type: ignore[list-item]
    with pytest.raises(ObserverServerError, match="not a serialised flow"):
        server.publish([b"\xff\xff\xff"])


def test_port_in_use_is_a_clear_error(server: ObserverServer) -> None:
    with pytest.raises(ObserverServerError, match=f"127.0.0.1:{server.port}"):
        ObserverServer(port=server.port).start()


def test_simulate_relay_serves_the_simulator_and_stops_on_ctrl_c() -> None:
    process, address = start_simulate_relay(
        "--backlog", "20s", "--rate", "50", "--seed", "3", "--buffer-size", "500"
    )
    try:
        with grpc.insecure_channel(address) as channel:
            stub = observer_pb2_grpc.ObserverStub(channel)
            status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
            assert status.num_connected_nodes.value == 4 and status.max_flows == 4 * 500
            assert status.seen_flows > 0
            responses = list(stub.GetFlows(observer_pb2.GetFlowsRequest(number=5), timeout=10))
            assert responses[0].HasField("node_status")
            flows = flows_of(iter(responses))
            assert flows and all(f.node_name.startswith("sim/") for f in flows)
            assert {
                n.namespace
                for n in stub.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=10).namespaces
            }
    finally:
        code = stop_process(process, signal.SIGINT)
    assert code == 0
    assert process.stdout is not None and f"grpcurl -plaintext {address} list" in process.stdout.read()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "4245"], "HOST:PORT"),
        (["--tls-cert", "server.crt"], "--tls-key"),
        (["--tls-client-ca", "ca.crt"], "--tls-cert"),
        (["--buffer-size", "0"], "buffer-size"),
    ],
)
def test_simulate_relay_rejects_bad_options(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["simulate-relay", *args])
    assert result.exit_code == 2 and message in result.output


def test_since_with_follow_hands_over_from_backlog_to_live_without_gap_or_duplicate() -> None:
    with ObserverServer(buffer_size=1000) as server, grpc.insecure_channel(server.address) as channel:
        server.publish([make_flow("node-a", i, i) for i in range(100)])
        request = observer_pb2.GetFlowsRequest(follow=True)
        request.since.FromSeconds(T0)
        call = observer_pb2_grpc.ObserverStub(channel).GetFlows(request, timeout=30)

        def publish_from(node: str) -> None:
            for start in range(100, 300, 20):
                server.publish([make_flow(node, i, i) for i in range(start, start + 20)])

        publishers = [threading.Thread(target=publish_from, args=(node,)) for node in ("node-a", "node-b")]
        try:
            for thread in publishers:
                thread.start()
            received: list[str] = []
            while len(received) < 500:
                response = next(call)
                assert not response.HasField("lost_events")
                if response.HasField("flow"):
                    received.append(response.flow.uuid)
        finally:
            for thread in publishers:
                thread.join()
            call.cancel()
    expected = {f"node-a-{i}" for i in range(300)} | {f"node-b-{i}" for i in range(100, 300)}
    assert len(received) == len(set(received)) == 500
    assert set(received) == expected

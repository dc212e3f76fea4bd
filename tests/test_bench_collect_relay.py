"""The relay of `flowpipe bench --only collect`: a pool of simulated flows repeated, each repeat later by the
pool's span, each flow with a fresh uuid, served over the built-in server's transport."""

from __future__ import annotations

import uuid

from support.collect import sim_flow_bytes

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.bench.collect_relay import RepeatedPool, start_relay
from flowpipe.sources.relay._h2call import FlowsCall
from flowpipe.sources.relay._receiver import GET_FLOWS


def pool(count: int = 500) -> list[flow_pb2.Flow]:
    return [flow_pb2.Flow.FromString(data) for data in sim_flow_bytes()[:count]]


def framed(data: bytes) -> list[observer_pb2.GetFlowsResponse]:
    out, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at + 1 : at + 5], "big")
        out.append(observer_pb2.GetFlowsResponse.FromString(data[at + 5 : at + 5 + size]))
        at += 5 + size
    return out


def test_each_flow_is_its_pool_flow_later_by_whole_spans_with_a_fresh_uuid() -> None:
    flows = pool()
    repeated = RepeatedPool(flows, 1234, seed=1)
    responses = framed(b"".join(bytes(run) for run in repeated.runs(0)))
    assert len(responses) == 1234
    for index, response in enumerate(responses):
        expected = flow_pb2.Flow()
        expected.CopyFrom(flows[index % len(flows)])
        expected.uuid = response.flow.uuid
        expected.time.FromNanoseconds(repeated.time_ns(index))
        assert response.flow == expected, index
        assert response.time == expected.time and response.node_name == expected.node_name
        assert (
            uuid.UUID(response.flow.uuid).version == 4 and str(uuid.UUID(response.flow.uuid)) == expected.uuid
        )
    times = [r.flow.time.ToNanoseconds() for r in responses]
    assert times == sorted(times), "in time order across repeats"
    assert len({r.flow.uuid for r in responses}) == len(responses)
    middle = times[700]
    assert times[repeated.first_since(middle)] == middle and repeated.first_since(middle - 1) <= 700
    assert repeated.first_since(times[-1] + 1) == 1234


def test_the_relay_serves_the_stream_from_the_start_or_since_a_time() -> None:
    flows = pool()
    server = start_relay(flows, 1500, seed=2)
    try:
        whole = FlowsCall(
            server.address,
            None,
            GET_FLOWS,
            observer_pb2.GetFlowsRequest(number=2**64 - 1).SerializeToString(),
        )
        messages: list[bytes] = []
        while whole.status is None:
            messages += whole.read(1.0)
        responses = [observer_pb2.GetFlowsResponse.FromString(m) for m in messages]
        assert whole.status == ("OK", "")
        assert responses[0].HasField("node_status") and len(responses) == 1501
        since = responses[1000].flow.time
        late = FlowsCall(
            server.address, None, GET_FLOWS, observer_pb2.GetFlowsRequest(since=since).SerializeToString()
        )
        later: list[bytes] = []
        while late.status is None:
            later += late.read(1.0)
        got = [observer_pb2.GetFlowsResponse.FromString(m).flow for m in later[1:]]
        assert len(got) == 501 and all(flow.time.ToNanoseconds() >= since.ToNanoseconds() for flow in got)
    finally:
        server.stop()

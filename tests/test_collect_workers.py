"""`flowpipe collect` on two processes: the stream read by a receiving process, decoded and written by the
collector. Either one killed with SIGKILL: every flow stored exactly once once it runs again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from support.collect import (
    chunks,
    dataset_uuids,
    fast_collect_config,
    fast_source,
    sim_flow_bytes,
    start_collector,
    uuids_of,
)
from support.processes import child_pids, process_gone, stop_process
from support.wait import wait_until

from flowpipe._proto.observer import observer_pb2
from flowpipe._resources import available_cpus
from flowpipe.app.collect import CollectConfig, collect, default_workers
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import ConfigError
from flowpipe.server import ObserverServer
from flowpipe.sources.relay import RelaySource
from flowpipe.sources.relay._connect import (
    CallMessages,
    StreamReceiver,
    library_call,
    open_channel,
    status_code,
    status_details,
)
from flowpipe.sources.relay._h2call import FlowsCall
from flowpipe.sources.relay._handoff import wait_readable
from flowpipe.sources.relay._receiver import GET_FLOWS
from flowpipe.sources.relay._worker import ReceivingProcess

FAST = ["--reconnect-backoff-initial-seconds", "0.05", "--reconnect-backoff-max-seconds", "0.5"]


def test_the_decoding_process_killed_mid_batch_then_restarted_stores_every_flow_once(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:6000]
    parts = chunks(flows, 3)
    dataset = tmp_path / "data"
    log_path = tmp_path / "collect.log"
    # part files of 700 flows, flushed at once: the kill falls while batches are received, decoded and written
    args = ["--dataset", str(dataset), "--flush-interval-seconds", "0.01", "--max-batch-rows", "700",
            "--metrics-address", "off", "--workers", "2", *FAST]  # fmt: skip
    with ObserverServer(buffer_size=10_000) as server:
        args = ["--relay", server.address, *args]
        for kill, part in enumerate(parts[:2]):
            server.publish(part)
            before = len(dataset_uuids(dataset))
            process = start_collector(args, log_path)
            receivers = wait_until(lambda p=process: child_pids(p.pid), what="the receiving process")
            wait_until(
                lambda b=before: len(dataset_uuids(dataset)) > b, what=f"progress before kill {kill + 1}"
            )
            assert stop_process(process, signal.SIGKILL) == -signal.SIGKILL
            # the receiving process sees the collector's end of the socket close, and exits
            wait_until(lambda r=receivers: all(process_gone(pid) for pid in r), what="the receiver's exit")
        server.publish(parts[2])
        process = start_collector(args, log_path)
        try:
            wait_until(lambda: len(dataset_uuids(dataset)) >= len(flows), what="every flow after the kills")
        finally:
            assert stop_process(process, signal.SIGTERM) == 0, log_path.read_text()[-3000:]
    written = dataset_uuids(dataset)
    assert len(written) == len(set(written)), "no flow written twice"
    assert sorted(written) == sorted(uuids_of(flows)), "no flow missing"


def test_the_receiving_process_killed_is_replaced_and_nothing_is_lost_or_repeated(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:4000]
    parts = chunks(flows, 4)
    sources: list[RelaySource] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(parts[0])
        config = fast_collect_config(server.address, tmp_path, workers=2, resume_overlap_seconds=5.0)

        def run() -> None:
            try:
                collect(config, stop=stop, on_started=lambda source, _: sources.append(source))
            except BaseException as exc:  # noqa: BLE001  (asserted below)
                errors.append(exc)

        thread = threading.Thread(target=run, name="test-collect", daemon=True)
        thread.start()
        try:
            killed: list[int] = []
            for part in parts[1:]:
                pid = wait_until(lambda: sources and sources[0].receiver_pid, what="a receiving process")
                wait_until(lambda: sources[0].connected, what="the stream open")
                server.publish(part)  # flows on their way while the receiving process dies
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                wait_until(
                    lambda p=pid: sources[0].receiver_pid not in (None, p), what="a new receiving process"
                )
            wait_until(lambda: len(dataset_uuids(tmp_path)) >= len(flows), what="every flow after the kills")
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive() and errors == []
    assert sources[0].reconnects >= len(killed)
    written = dataset_uuids(tmp_path)
    assert len(written) == len(set(written)), "no flow written twice"
    assert sorted(written) == sorted(uuids_of(flows)), "no flow missing"


def test_the_receiving_process_hands_over_every_flow_in_order_and_the_stream_waits_while_nobody_reads() -> (
    None
):
    # ~44 MB: several times what the socket, the queue and the HTTP/2 window hold together
    flows = sim_flow_bytes(40_000)
    with ObserverServer(buffer_size=50_000) as server:
        server.publish(flows)
        config = fast_source(server.address, max_pending_flows=500, batch_max_flows=300)
        process = ReceivingProcess(config)
        try:
            request = observer_pb2.GetFlowsRequest(number=len(flows))  # the whole buffer, then the call ends
            stream = process.follow(request.SerializeToString(), on_first=lambda: None)
            wait_until(lambda: wait_readable(process.sock, 0.0), what="the first batch")
            time.sleep(1.0)  # nobody reads meanwhile
            arrived: list[bytes] = []
            while wait_readable(process.sock, 0.0) and not stream.done:
                arrived += stream._read().to_pylist()
            assert len(arrived) < len(flows) / 2, "the relay's stream waited for the reader"
            over = False
            stop = threading.Event()
            while not over:
                taken, over = stream.take(300, 5.0, stop)
                arrived += list(taken.to_pylist() if len(taken) else [])
            assert stream.error is None
        finally:
            process.close()
    got = [observer_pb2.GetFlowsResponse.FromString(m) for m in arrived]
    assert [r.flow.uuid for r in got if r.HasField("flow")] == uuids_of(flows), "every flow, in order"
    assert process_gone(process.pid), "closing the socket ends the receiving process"


def read_all(call: FlowsCall, until: int | None = None) -> list[bytes]:
    """The messages of a call until it ends (or `until` of them arrived)."""
    messages: list[bytes] = []
    deadline = time.monotonic() + 30
    while call.status is None and (until is None or len(messages) < until) and time.monotonic() < deadline:
        messages += call.read(0.1)
    return messages


def test_a_call_read_over_http2_gives_every_response_and_ends_with_the_relays_status() -> None:
    flows = sim_flow_bytes()[:2000]
    with ObserverServer(buffer_size=5000) as server:
        server.publish(flows)
        whole = FlowsCall(
            server.address, None, GET_FLOWS, observer_pb2.GetFlowsRequest(number=5000).SerializeToString()
        )
        responses = [observer_pb2.GetFlowsResponse.FromString(m) for m in read_all(whole)]
        assert whole.status == ("OK", "")
        assert responses[0].HasField("node_status")
        assert [r.flow.uuid for r in responses[1:]] == uuids_of(flows), "every flow, in order"

        wrong = observer_pb2.GetFlowsRequest(first=1, follow=True).SerializeToString()
        refused = FlowsCall(server.address, None, GET_FLOWS, wrong)
        assert read_all(refused) == []
        assert refused.status == ("INVALID_ARGUMENT", "first cannot be specified with follow")

        following = observer_pb2.GetFlowsRequest(number=5000, follow=True).SerializeToString()
        broken = FlowsCall(server.address, None, GET_FLOWS, following)
        assert len(read_all(broken, until=len(flows) + 1)) == len(flows) + 1
        server.restart()
        read_all(broken)
        assert broken.status is not None and broken.status[0] == "UNAVAILABLE"

        cancelled = FlowsCall(server.address, None, GET_FLOWS, following)
        read_all(cancelled, until=1)
        cancelled.cancel()
        assert cancelled.status is not None and cancelled.status[0] == "CANCELLED"
        assert cancelled.read(0.1) == []
        wait_until(lambda: server.active_streams() == 0, what="the relay to see the cancelled call end")
        address = server.address
    nobody = FlowsCall(address, None, GET_FLOWS, following)
    assert nobody.status is not None and nobody.status[0] == "UNAVAILABLE" and address in nobody.status[1]


def test_a_call_read_over_http2_reads_a_grpcio_server_too() -> None:
    """Another gRPC implementation on the other end (grpcio's server: 16 KiB frames, its own window updates)."""
    responses = [
        observer_pb2.GetFlowsResponse(
            flow={"uuid": f"u{i}", "node_name": "n" * (i % 3000)}
        ).SerializeToString()
        for i in range(3000)
    ]

    def get_flows(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if observer_pb2.GetFlowsRequest.FromString(request).first:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no first here: 100% sure")
        yield from responses

    handler = grpc.method_handlers_generic_handler(
        "observer.Observer", {"GetFlows": grpc.unary_stream_rpc_method_handler(get_flows)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        whole = FlowsCall(address, None, GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        assert read_all(whole) == responses and whole.status == ("OK", "")
        refused = FlowsCall(
            address, None, GET_FLOWS, observer_pb2.GetFlowsRequest(first=1).SerializeToString()
        )
        assert read_all(refused) == []
        assert refused.status == ("FAILED_PRECONDITION", "no first here: 100% sure")
    finally:
        server.stop(None)


@pytest.mark.parametrize("receiver", ["http2", "grpcio"])
def test_each_receiver_hands_over_every_response_and_ends_with_grpcios_status_codes(receiver: str) -> None:
    """`collect --receiver`: the HTTP/2 reader and the library client, read by the stream receiver thread as
    `collect --workers 1` reads them, give the same responses and end with the same status codes."""
    flows = sim_flow_bytes()[:2000]
    stop = threading.Event()
    with ObserverServer(buffer_size=5000) as server:
        server.publish(flows)
        channel = open_channel(server.address, None)

        def start(request: observer_pb2.GetFlowsRequest) -> StreamReceiver:
            data = request.SerializeToString()
            if receiver == "grpcio":
                call = library_call(channel, GET_FLOWS, data)
            else:
                call = CallMessages(server.address, None, GET_FLOWS, data)
            stream = StreamReceiver(call, 10_000, lambda: None)
            stream.start()
            return stream

        def drain(stream: StreamReceiver, until: int | None = None) -> list[bytes]:
            messages: list[bytes] = []
            over, deadline = False, time.monotonic() + 30
            while not over and (until is None or len(messages) < until) and time.monotonic() < deadline:
                taken, over = stream.take(10_000, 0.1, stop)
                messages += taken
            return messages

        try:
            whole = start(observer_pb2.GetFlowsRequest(number=5000))
            responses = [observer_pb2.GetFlowsResponse.FromString(m) for m in drain(whole)]
            assert whole.done and whole.error is None
            assert [r.flow.uuid for r in responses[1:]] == uuids_of(flows), "every flow, in order"

            refused = start(observer_pb2.GetFlowsRequest(first=1, follow=True))
            assert drain(refused) == [] and isinstance(refused.error, grpc.RpcError)
            assert status_code(refused.error) == grpc.StatusCode.INVALID_ARGUMENT
            assert status_details(refused.error) == "first cannot be specified with follow"

            following = observer_pb2.GetFlowsRequest(number=5000, follow=True)
            broken = start(following)
            assert len(drain(broken, until=len(flows) + 1)) == len(flows) + 1
            server.restart()
            drain(broken)
            assert isinstance(broken.error, grpc.RpcError)
            assert status_code(broken.error) == grpc.StatusCode.UNAVAILABLE

            cancelled = start(following)
            assert drain(cancelled, until=1)
            cancelled.stop()  # from this thread, as the source does
            cancelled.join(5.0)
            assert not cancelled.is_alive() and isinstance(cancelled.error, grpc.RpcError)
            assert status_code(cancelled.error) == grpc.StatusCode.CANCELLED
            wait_until(lambda: server.active_streams() == 0, what="the relay to see the cancelled call end")
        finally:
            channel.close()


def test_the_grpcio_receiver_runs_in_one_process(tmp_path: Path) -> None:
    source = fast_source("127.0.0.1:4245", receiver="grpcio")
    assert CollectConfig(source=source).processes == 1, "whatever the CPUs"
    assert CollectConfig(source=fast_source("127.0.0.1:4245")).processes == default_workers()
    with pytest.raises(ConfigError, match="--receiver grpcio .* --workers 1"):
        CollectConfig(source=source, workers=2)
    with pytest.raises(ConfigError, match="one worker"):
        RelaySource(source, dataset=Dataset(tmp_path), receive_process=True)
    with pytest.raises(ConfigError, match="receiver must be one of http2, grpcio, got 'h3'"):
        fast_source("127.0.0.1:4245", receiver="h3")


def test_without_its_receiving_process_the_source_is_not_receiving(tmp_path: Path) -> None:
    # /readyz needs `receiving`: a collector whose receiving process is gone (not yet replaced) is not ready
    config = fast_collect_config("127.0.0.1:4245", tmp_path).source
    assert RelaySource(config, dataset=Dataset(tmp_path)).receiving, "one process: the stream's thread"
    assert not RelaySource(config, dataset=Dataset(tmp_path), receive_process=True).receiving


def write_cgroup(root: Path, quota: str) -> Path:
    (root / "cpu.max").write_text(f"{quota} 100000\n")
    return root


def test_the_receiving_process_loads_no_data_library_and_no_grpcio() -> None:
    """The receiving process is started with `python -m`: its module and package must not import Arrow & co."""
    code = (
        "import sys, flowpipe.sources.relay._receiver; "
        "print(sorted(m for m in ('pyarrow', 'duckdb', 'numpy', 'pandas', 'ptars', 'grpc') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_default_number_of_workers_follows_the_container_cpu_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(write_cgroup(tmp_path, "max")) == affinity, "no quota: the CPUs it may run on"
    assert available_cpus(write_cgroup(tmp_path, "50000")) == min(affinity, 0.5)
    assert available_cpus(write_cgroup(tmp_path, "800000000")) == affinity, "a quota above the affinity"
    assert [default_workers(cpus) for cpus in (0.5, 1.0, 1.4, 1.5, 2.0, 64.0)] == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("workers", [0, 3])
def test_workers_other_than_one_or_two_are_refused(workers: int) -> None:
    source = fast_collect_config("127.0.0.1:4245", Path("unused")).source
    with pytest.raises(ConfigError, match="workers must be 1 or 2"):
        CollectConfig(source=source, workers=workers)

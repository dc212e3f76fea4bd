"""`flowpipe collect` on two processes: the stream read and decoded by a receiving process, deduplicated and
written by the collector. Either one killed with SIGKILL: every flow stored exactly once once it runs again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import pyarrow as pa
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

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe._resources import available_cpus
from flowpipe.app.collect import CollectConfig, collect, default_workers
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import ConfigError
from flowpipe.model import FLOW_SCHEMA
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
from flowpipe.sources.relay._h2call import FlowsCall, MessageRun
from flowpipe.sources.relay._handoff import (
    BATCH,
    DECODED,
    FRAME_MAX_BYTES,
    batch_messages,
    decoded_rows,
    read_frame,
    send_batch,
    send_table,
    socket_pair,
    wait_readable,
)
from flowpipe.sources.relay._receiver import GET_FLOWS, _Decoder
from flowpipe.sources.relay._worker import ReceivingProcess
from flowpipe.transforms.from_proto import decode_responses, flow_response

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


def kill_receiving_processes(
    config: CollectConfig, steps: list[Callable[[], object]], flows: Sequence[bytes]
) -> None:
    """Collect on a thread; at each step (once a receiving process reads an open stream) run it, then kill that
    process with SIGKILL and wait for its replacement. Then every flow must be stored once, and collect stop
    cleanly."""
    sources: list[RelaySource] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            collect(config, stop=stop, on_started=lambda source, _: sources.append(source))
        except BaseException as exc:  # noqa: BLE001  (asserted below)
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-collect", daemon=True)
    thread.start()
    dataset = Path(config.sink.path)
    try:
        for step in steps:
            pid = wait_until(lambda: sources and sources[0].receiver_pid, what="a receiving process")
            wait_until(lambda: sources[0].connected, what="the stream open")
            step()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: sources[0].receiver_pid not in (None, p), what="a new receiving process")
        wait_until(lambda: len(dataset_uuids(dataset)) >= len(flows), what="every flow after the kills")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and errors == []
    assert sources[0].reconnects >= len(steps)
    written = dataset_uuids(dataset)
    assert len(written) == len(set(written)), "no flow written twice"
    assert sorted(written) == sorted(uuids_of(flows)), "no flow missing"


def test_the_receiving_process_killed_is_replaced_and_nothing_is_lost_or_repeated(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:4000]
    parts = chunks(flows, 4)
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(parts[0])
        config = fast_collect_config(server.address, tmp_path, workers=2, resume_overlap_seconds=5.0)
        # flows on their way while the receiving process dies
        kill_receiving_processes(config, [lambda p=part: server.publish(p) for part in parts[1:]], flows)


def flow_uuids(batch: pa.BinaryArray | pa.Table) -> list[str]:
    """The uuids of the flows in a batch handed over: decoded rows, or serialised responses."""
    if isinstance(batch, pa.Table):
        return list(batch.column("uuid").to_pylist())
    responses = [observer_pb2.GetFlowsResponse.FromString(m) for m in batch.to_pylist()]
    return [r.flow.uuid for r in responses if r.HasField("flow")]


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "messages"])
def test_the_receiving_process_hands_over_every_flow_in_order_and_the_stream_waits_while_nobody_reads(
    decode: bool,
) -> None:
    # ~44 MB: several times what the socket, the queue and the HTTP/2 window hold together
    flows = sim_flow_bytes(40_000)
    with ObserverServer(buffer_size=50_000) as server:
        server.publish(flows)
        config = fast_source(server.address, max_pending_flows=500, batch_max_flows=300)
        process = ReceivingProcess(config, decode=decode)
        try:
            request = observer_pb2.GetFlowsRequest(number=len(flows))  # the whole buffer, then the call ends
            stream = process.follow(request.SerializeToString(), on_first=lambda: None)
            wait_until(lambda: wait_readable(process.sock, 0.0), what="the first batch")
            time.sleep(1.0)  # nobody reads meanwhile
            batches: list[pa.BinaryArray | pa.Table] = []
            while wait_readable(process.sock, 0.0) and not stream.done:
                batch = (
                    stream._read()
                )  # (read as fast as it can: the process sends more as the socket empties)
                if batch is not None:
                    batches.append(batch)
            waiting = sum(len(batch) for batch in batches)
            assert waiting < len(flows) / 2, "the relay's stream waited for the reader"
            over = False
            stop = threading.Event()
            while not over:
                taken, over = stream.take(300, 5.0, stop)
                if len(taken):
                    batches.append(taken)
            assert stream.error is None
        finally:
            process.close()
    arrived = [uuid for batch in batches for uuid in flow_uuids(batch)]
    assert arrived == uuids_of(flows), "every flow, in order"
    assert process_gone(process.pid), "closing the socket ends the receiving process"


def test_the_receiving_process_decodes_every_flow_and_hands_the_rows_over_in_order() -> None:
    flows = sim_flow_bytes(6000)
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        config = fast_source(server.address, batch_max_flows=1000, cluster_name="prod")
        process = ReceivingProcess(config)
        try:
            request = observer_pb2.GetFlowsRequest(number=len(flows))  # the whole buffer, then the call ends
            stream = process.follow(request.SerializeToString(), on_first=lambda: None)
            stop, over = threading.Event(), False
            tables: list[pa.Table] = []
            messages: list[bytes] = []
            while not over:
                taken, over = stream.take(1000, 5.0, stop)
                if isinstance(taken, pa.Table):
                    tables.append(taken)
                elif len(taken):
                    messages += taken.to_pylist()
            assert stream.error is None
            with open(f"/proc/{process.pid}/maps") as maps:
                libraries = maps.read()
            assert "pyarrow" in libraries and "ptars" in libraries, "the decoder runs there"
            assert "pandas" not in libraries and "grpc" not in libraries, (
                "neither pandas nor grpcio is loaded"
            )
        finally:
            process.close()
    assert len(tables) > 1 and all(table.num_rows for table in tables), "batches of rows, a frame each"
    rows = pa.concat_tables(tables)
    assert rows.schema == FLOW_SCHEMA
    assert rows.column("uuid").to_pylist() == uuids_of(flows), "every flow, decoded here, in order"
    expected = decode_responses([flow_response(flow) for flow in flows], cluster_name="prod").flows
    assert rows.equals(expected), "the same rows as decoding in the collector"
    # the relay's node_status response is no flow: it crosses as it came, and the collector decodes it
    assert decode_responses(messages).node_status, "node status handed over as a message"
    assert stream.decode_seconds > 0, "the receiving process tells its decoding time at the end of the call"


def test_frames_small_and_large_cross_whole_whatever_the_socket_buffer_holds() -> None:
    """A frame larger than the socket's buffer is read in pieces into one buffer: messages and rows come whole."""
    messages = [flow_response(flow) for flow in sim_flow_bytes()[:2000]]
    rows = decode_responses(messages).flows
    assert 1024 * 1024 < sum(map(len, messages)) < FRAME_MAX_BYTES and rows.nbytes > 1024 * 1024
    ours, theirs = socket_pair()
    frames: list[tuple[bytes, int, object]] = []
    reader = threading.Thread(target=lambda: frames.extend(read_frame(ours) for _ in range(4)))
    reader.start()
    try:
        send_batch(theirs, messages[:3])
        send_batch(theirs, messages)  # one frame of all of them (under FRAME_MAX_BYTES)
        send_table(theirs, rows.slice(0, 2))
        send_table(theirs, rows)
        reader.join(30)
    finally:
        ours.close()
        theirs.close()
    assert [kind for kind, _, _ in frames] == [BATCH, BATCH, DECODED, DECODED]
    small, large, few, many = [payload for _, _, payload in frames]
    assert batch_messages(3, small).to_pylist() == messages[:3]  # type: ignore[arg-type]
    assert batch_messages(len(messages), large).to_pylist() == messages  # type: ignore[arg-type]
    assert decoded_rows(few).equals(rows.slice(0, 2))  # type: ignore[arg-type]
    assert decoded_rows(many).equals(rows)  # type: ignore[arg-type]


def message_run(messages: Sequence[bytes]) -> MessageRun:
    """Messages as they arrive in a stream (each behind its gRPC prefix), as one run."""
    buffer, starts = bytearray(), []
    for message in messages:
        starts.append(len(buffer))
        buffer += b"\x00" + len(message).to_bytes(4, "big") + message
    return MessageRun(buffer, starts, len(buffer))


def test_responses_that_are_no_flows_and_batches_that_do_not_decode_cross_as_messages() -> None:
    good = [flow_response(flow) for flow in sim_flow_bytes()[:20]]
    lost = observer_pb2.GetFlowsResponse(
        lost_events=flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=7), node_name="n1"
    )
    lost.time.FromNanoseconds(1_700_000_001_000_000_123)
    bad = b"\x0a\xff\xff\xff\x0f\x01"
    ours, theirs = socket_pair()
    try:
        decoder = _Decoder(cluster_name=None)
        decoder.send(theirs, message_run([*good[:10], lost.SerializeToString(), *good[10:]]))
        kind, count, payload = read_frame(ours)
        assert (kind, count) == (DECODED, 20)
        assert decoded_rows(payload).column("uuid").to_pylist() == uuids_of(sim_flow_bytes()[:20])
        kind, count, payload = read_frame(ours)
        assert (kind, count) == (BATCH, 1)
        (event,) = decode_responses(batch_messages(count, payload)).lost_events
        assert (event.num_events_lost, event.node_name) == (7, "n1")

        decoder.send(
            theirs, message_run([good[0], bad, good[1]])
        )  # the collector finds the bad message and reports it
        kind, count, payload = read_frame(ours)
        assert (kind, count) == (BATCH, 3)
        assert batch_messages(count, payload).to_pylist() == [good[0], bad, good[1]]
        assert not wait_readable(ours, 0.0), "nothing else"
    finally:
        ours.close()
        theirs.close()


def test_the_receiving_process_killed_while_it_decodes_and_hands_over_loses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    # a backlog of 20,000 flows in batches of 4,000: each kill falls while the receiving process reads, decodes
    # a batch or is in the middle of handing its rows over (a frame of several MB)
    flows = sim_flow_bytes(20_000)
    with ObserverServer(buffer_size=30_000) as server:
        server.publish(flows)
        config = fast_collect_config(
            server.address, tmp_path, workers=2, batch_max_flows=4000, max_pending_flows=4000
        )
        waits = [lambda d=delay: time.sleep(d) for delay in (0.0, 0.05, 0.2, 0.5)]
        kill_receiving_processes(config, waits, flows)


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


@contextlib.contextmanager
def grpcio_relay(get_flows: Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]) -> Iterator[str]:
    """A GetFlows of grpcio's server (16 KiB frames, its own window updates) on 127.0.0.1: its address."""
    handler = grpc.method_handlers_generic_handler(
        "observer.Observer", {"GetFlows": grpc.unary_stream_rpc_method_handler(get_flows)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def take_all(call: FlowsCall) -> list[MessageRun]:
    """The runs of messages of a call until it ends (taken whenever some are held)."""
    runs: list[MessageRun] = []
    deadline = time.monotonic() + 30
    while call.status is None and time.monotonic() < deadline:
        call.receive(0.1)
        if call.held >= 700:
            runs.append(call.take())  # type: ignore[arg-type]
    last = call.take()
    return [*runs, last] if last is not None else runs


def test_runs_of_messages_taken_from_a_call_are_its_responses_and_decode_as_they_do() -> None:
    """What the receiving process takes: runs over the buffers the messages arrived in, cut anywhere in a
    message (grpcio's server sends 16 KiB frames), as bytes and as Arrow arrays that decode as the messages."""
    responses = [
        observer_pb2.GetFlowsResponse(
            flow={"uuid": f"u{i}", "node_name": "n" * (i % 3000)}, node_name=f"node-{i % 7}"
        ).SerializeToString()
        for i in range(3000)
    ] + [b"", observer_pb2.GetFlowsResponse(node_name="last").SerializeToString()]

    def get_flows(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from responses

    with grpcio_relay(get_flows) as address:
        call = FlowsCall(address, None, GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        runs = take_all(call)
    assert call.status == ("OK", "") and call.held == 0
    assert len(runs) > 1, "several runs"
    before = [run.messages() for run in runs]
    assert [m for messages in before for m in messages] == responses, "every response, whole, in order"
    arrays = [run.array() for run in runs]
    assert sum(len(array) for array in arrays) == len(responses)
    # each element is its message behind a field no response has: protobuf and the bulk decoder read the same
    elements = [observer_pb2.GetFlowsResponse.FromString(e) for a in arrays for e in a.to_pylist()]
    for element, response in zip(elements, responses, strict=True):
        assert element.ByteSize() == len(response) + 5, "the prefix: a field of its own"
        element.DiscardUnknownFields()
        assert element.SerializeToString() == response
    decoded = pa.concat_tables([decode_responses(array).flows for array in arrays])
    assert decoded.equals(decode_responses(responses).flows)
    assert [run.messages() for run in runs] == before, "after array(): still the messages as they came"


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

    with grpcio_relay(get_flows) as address:
        whole = FlowsCall(address, None, GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        assert read_all(whole) == responses and whole.status == ("OK", "")
        refused = FlowsCall(
            address, None, GET_FLOWS, observer_pb2.GetFlowsRequest(first=1).SerializeToString()
        )
        assert read_all(refused) == []
        assert refused.status == ("FAILED_PRECONDITION", "no first here: 100% sure")


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

            if receiver == "grpcio":  # the channel reconnects on its own, after a backoff of up to a second
                grpc.channel_ready_future(channel).result(timeout=30)
            cancelled = start(following)
            assert drain(cancelled, until=1)
            cancelled.stop()  # from this thread, as the source does
            cancelled.join(5.0)
            assert not cancelled.is_alive()
            # Stopped between two messages it ends as asked, with no error; stopped while waiting for one, with
            # the call's CANCELLED: never with another status.
            assert cancelled.error is None or status_code(cancelled.error) == grpc.StatusCode.CANCELLED
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
    """The receiving process is started with `python -m`: its module and package must not import Arrow & co (it
    loads the decoder itself, when asked for decoded batches)."""
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

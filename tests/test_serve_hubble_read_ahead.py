"""serve-hubble reads the next batches while it sends one: still in time order, each flow once, bounded by the
client (a client that stops reading stops the read), a cancelled call leaves no reading thread behind, and a
file that cannot be read ends the call with a status."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support.small_files import write_small_files

from flowpipe._proto.observer import observer_pb2
from flowpipe.model import FLOW_SCHEMA
from flowpipe.server import history
from flowpipe.server.history import HistoryServer
from flowpipe.sources.relay import _h2call
from flowpipe.sources.relay._h2call import FlowsCall

_HOUR = 1_736_182_800 * 10**9  # 2025-01-06T17:00Z
_FLOWS = 40_000
_BATCH = 256
_GET_FLOWS = "/observer.Observer/GetFlows"


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, str]]]:
    """Two writers' interleaved part files over two hours; the (time, uuid) of every flow in order."""
    root = tmp_path_factory.mktemp("read-ahead")
    tables = []
    for w, writer in enumerate(("w1", "w2")):
        times = [_HOUR + (2 * i + w) * 173_000_000 + (i % 7) * 1_000 for i in range(_FLOWS // 2)]
        table = pa.Table.from_pylist(
            [{"time": t, "node_name": writer, "uuid": f"{writer}-{i:06d}"} for i, t in enumerate(times)],
            schema=FLOW_SCHEMA,
        )
        write_small_files(root, table, batch_rows=5000, writer_id=writer, lost=False)
        tables.append(table)
    table = pa.concat_tables(tables)
    expected = sorted(
        zip(pc.cast(table.column("time"), pa.int64()).to_pylist(), table.column("uuid").to_pylist())
    )
    return root, expected


@pytest.fixture()
def rows_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Small batches (so that what is read ahead is small against the answer), and the rows each read gave."""
    monkeypatch.setattr(history, "MERGED_ROWS", _BATCH)
    monkeypatch.setattr(history, "BATCH_ROWS", _BATCH)
    monkeypatch.setattr(history, "FIRST_ROWS", _BATCH)
    counts: list[int] = []
    read = history._Reader.read

    def counting(self: history._Reader) -> pa.RecordBatch | None:
        batch = read(self)
        counts.append(batch.num_rows if batch is not None else 0)
        return batch

    monkeypatch.setattr(history._Reader, "read", counting)
    yield counts


@pytest.fixture()
def closed(monkeypatch: pytest.MonkeyPatch) -> list[history._Reader]:
    """The readers closed (each closes its call's DuckDB connection)."""
    readers: list[history._Reader] = []
    close = history._Reader.close

    def closing(self: history._Reader) -> None:
        close(self)
        readers.append(self)

    monkeypatch.setattr(history._Reader, "close", closing)
    return readers


def _reading_threads() -> list[threading.Thread]:
    """The threads that read and encode for calls."""
    prefixes = ("flowpipe-serve-hubble-read", "flowpipe-serve-hubble-encode")
    return [t for t in threading.enumerate() if t.name.startswith(prefixes)]


def _wait_until(done: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _settled(counts: list[int]) -> Callable[[], bool]:
    """True once no batch was read for a while (a read blocked by the client stays blocked)."""
    last = [-1, time.monotonic()]

    def check() -> bool:
        if len(counts) != last[0]:
            last[:] = [len(counts), time.monotonic()]
            return False
        return time.monotonic() - last[1] > 1.0

    return check


def _time_and_uuid(message: bytes) -> tuple[int, str] | None:
    response = observer_pb2.GetFlowsResponse.FromString(message)
    return (response.flow.time.ToNanoseconds(), response.flow.uuid) if response.HasField("flow") else None


def _read_all(call: FlowsCall, into: list[bytes]) -> None:
    while call.status is None:
        into.extend(call.read(1.0))


def test_read_ahead_keeps_time_order_and_sends_each_flow_once(
    stored: tuple[Path, list[tuple[int, str]]], rows_read: list[int]
) -> None:
    root, expected = stored
    with HistoryServer(str(root)) as server:
        call = FlowsCall(server.address, None, _GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        messages: list[bytes] = []
        _read_all(call, messages)
        # the first N from since, cut at N while batches after it may have been asked for
        first = observer_pb2.GetFlowsRequest(number=1000, first=True)
        cut = FlowsCall(server.address, None, _GET_FLOWS, first.SerializeToString())
        first_messages: list[bytes] = []
        _read_all(cut, first_messages)
    assert call.status[0] == "OK" and cut.status[0] == "OK"
    assert [flow for m in messages if (flow := _time_and_uuid(m))] == expected
    assert [flow for m in first_messages if (flow := _time_and_uuid(m))] == expected[:1000]
    assert sum(rows_read) >= len(expected)
    _wait_until(lambda: not _reading_threads())
    assert not _reading_threads()


def test_a_client_that_stops_reading_stops_the_read_ahead(
    stored: tuple[Path, list[tuple[int, str]]], rows_read: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, expected = stored
    window = 1 << 16
    monkeypatch.setattr(_h2call, "RECEIVE_WINDOW_BYTES", window)  # the client's frames
    monkeypatch.setattr(_h2call, "STREAM_WINDOW_BYTES", window)  # and its flow-control window
    with HistoryServer(str(root)) as server:
        call = FlowsCall(server.address, None, _GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        messages: list[bytes] = []
        while len(messages) < 500 and call.status is None:
            messages.extend(call.read(1.0))
        received = sum(len(m) for m in messages)
        # The client reads no more: the server fills the flow-control window, reads the batches ahead, stops.
        _wait_until(_settled(rows_read))
        held = sum(rows_read)
        # Rows the window can hold (each flow is at least this many bytes), the batch being sent, those ahead.
        smallest = min(len(m) for m in messages[1:])
        ahead = (1 + history.PREFETCH_BATCHES) * _BATCH
        bound = len(messages) + (window + received) // smallest + ahead
        assert held <= bound, (held, bound)
        assert bound < len(expected) // 4, bound  # (what is read ahead is small against the whole answer)
        # Reading again: the rest comes, in order, each flow once.
        _read_all(call, messages)
    assert call.status[0] == "OK"
    assert [flow for m in messages if (flow := _time_and_uuid(m))] == expected


def test_a_call_cancelled_mid_stream_ends_its_reading_thread(
    stored: tuple[Path, list[tuple[int, str]]], rows_read: list[int], closed: list[history._Reader]
) -> None:
    root, expected = stored
    with HistoryServer(str(root)) as server:
        call = FlowsCall(server.address, None, _GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        messages: list[bytes] = []
        while len(messages) < 2000 and call.status is None:
            messages.extend(call.read(1.0))
        _wait_until(lambda: sum(rows_read) > len(messages))  # batches are being read ahead
        call.cancel()
        _wait_until(lambda: not _reading_threads() and bool(closed))
        assert not _reading_threads()
        assert len(closed) == 1  # the call's reader (its DuckDB connection) was closed
        held = sum(rows_read)
        assert held < len(expected)
        # The server goes on answering.
        again = FlowsCall(
            server.address, None, _GET_FLOWS, observer_pb2.GetFlowsRequest(number=5).SerializeToString()
        )
        tail: list[bytes] = []
        _read_all(again, tail)
    assert again.status[0] == "OK"
    assert [flow for m in tail if (flow := _time_and_uuid(m))] == expected[-5:]


def test_a_corrupt_part_file_met_mid_stream_ends_the_call_with_a_clean_status(
    stored: tuple[Path, list[tuple[int, str]]],
    rows_read: list[int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, expected = stored
    copy = tmp_path / "dataset"
    shutil.copytree(root, copy)
    # A part file of the second hour with its flows' uuids damaged (its footer intact): found only when read.
    victim = max(copy.glob("flows/**/hour=18/*.parquet"))
    chunk = pq.ParquetFile(victim).metadata.row_group(0).column(FLOW_SCHEMA.get_field_index("uuid"))
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = victim.read_bytes()
    victim.write_bytes(data[:middle] + bytes(16) + data[middle + 16 :])
    with HistoryServer(str(copy)) as server:
        call = FlowsCall(server.address, None, _GET_FLOWS, observer_pb2.GetFlowsRequest().SerializeToString())
        messages: list[bytes] = []
        _read_all(call, messages)
        _wait_until(lambda: not _reading_threads())
        assert not _reading_threads()
    code, message = call.status
    assert code == "UNAVAILABLE", call.status
    assert "cannot read the dataset" in message and "hour=18" in message, message
    assert "Traceback" not in caplog.text  # the operator gets one line, not the handler's traceback
    # what went out before the damaged file is in order, each flow once
    flows = [flow for m in messages if (flow := _time_and_uuid(m))]
    assert flows and flows == expected[: len(flows)]


def test_calls_opened_together_and_read_later_each_get_the_whole_answer(
    stored: tuple[Path, list[tuple[int, str]]], rows_read: list[int]
) -> None:
    # The client reads its socket only later: the server's acknowledgement of the client's settings (frames as
    # large as its window) and the first large frames of the answer then come in one read.
    root, expected = stored
    with HistoryServer(str(root)) as server:
        request = observer_pb2.GetFlowsRequest().SerializeToString()
        calls = [FlowsCall(server.address, None, _GET_FLOWS, request) for _ in range(3)]
        _wait_until(_settled(rows_read))  # every call has read ahead and waits for its client
        answers: list[list[bytes]] = [[] for _ in calls]
        for call, messages in zip(calls, answers, strict=True):
            _read_all(call, messages)
    for call, messages in zip(calls, answers, strict=True):
        assert call.status[0] == "OK", call.status
        assert [flow for m in messages if (flow := _time_and_uuid(m))] == expected


def test_stopping_the_server_mid_stream_ends_every_call_and_closes_its_reader(
    stored: tuple[Path, list[tuple[int, str]]],
    rows_read: list[int],
    closed: list[history._Reader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, _ = stored
    # a client window of one frame: far less than each answer, so that every call is mid-stream
    monkeypatch.setattr(_h2call, "STREAM_WINDOW_BYTES", _h2call.RECEIVE_WINDOW_BYTES)
    server = HistoryServer(str(root)).start()
    try:
        request = observer_pb2.GetFlowsRequest().SerializeToString()
        calls = [FlowsCall(server.address, None, _GET_FLOWS, request) for _ in range(3)]
        for call in calls:  # each call's client has taken some flows, then stops reading
            messages: list[bytes] = []
            while len(messages) < 1000 and call.status is None:
                messages.extend(call.read(1.0))
        _wait_until(_settled(rows_read))
        assert _reading_threads()
    finally:
        server.stop()  # (what SIGTERM does)
    for call in calls:
        _read_all(call, [])
        # UNAVAILABLE (a client retries it): with the server's reason, or, when the closed socket still held
        # unread data and the kernel reset the connection before the client read the trailers, the reset
        assert call.status is not None and call.status[0] == "UNAVAILABLE", call.status
        assert call.status[1] == "server is shutting down" or "broke" in call.status[1], call.status
    _wait_until(lambda: not _reading_threads())
    assert not _reading_threads()
    assert len(closed) == len(calls)  # each call's DuckDB connection was closed

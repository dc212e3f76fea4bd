"""Merging an hour's part files in time order: interleaved writers, files out of order, ties, and the fallback."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flowpipe._proto.observer import observer_pb2, observer_pb2_grpc
from flowpipe.config import ParquetSinkConfig
from flowpipe.model import FLOW_SCHEMA, EventBatch
from flowpipe.server import history, hour_merge
from flowpipe.server.history import HistoryServer
from flowpipe.server.hour_merge import HourMerge, MergeFallback, chains
from flowpipe.sinks.parquet import ParquetSink

_HOUR = 1_736_182_800 * 10**9  # 2025-01-06T17:00Z
_ORDER = ("time", "node_name", "uuid")


def _rows(times: Sequence[int], writer: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"time": t, "node_name": writer, "uuid": f"{writer}-{i:06d}"} for i, t in enumerate(times)],
        schema=FLOW_SCHEMA,
    )


class _Files:
    """Part files as in-memory tables, read in their stored order in small batches."""

    def __init__(self, files: dict[str, pa.Table]) -> None:
        self.files = files
        self.opened: list[list[str]] = []

    def times_of(self, path: str) -> np.ndarray:
        return self.files[path].column("time").cast(pa.int64()).to_numpy()

    def open_stream(self, paths: Sequence[str]) -> tuple[pa.RecordBatchReader, object]:
        self.opened.append(list(paths))
        table = pa.concat_tables([self.files[p] for p in paths])
        batches = table.to_batches(max_chunksize=7)
        return pa.RecordBatchReader.from_batches(table.schema, batches), _Closing()


class _Closing:
    def close(self) -> None:
        pass


def _merge(files: dict[str, pa.Table], batch_rows: int = 16) -> tuple[list[tuple[int, str]], _Files]:
    source = _Files(files)
    merge = HourMerge(sorted(files), source.times_of, source.open_stream, _ORDER, batch_rows)
    out = []
    while (batch := merge.next()) is not None:
        assert batch.num_rows <= batch_rows
        out += list(zip(batch.column("time").cast(pa.int64()).to_pylist(), batch.column("uuid").to_pylist()))
    merge.close()
    return out, source


def _expected(files: dict[str, pa.Table]) -> list[tuple[int, str]]:
    table = pa.concat_tables(files.values())
    rows = zip(table.column("time").cast(pa.int64()).to_pylist(), table.column("node_name").to_pylist(),
               table.column("uuid").to_pylist())  # fmt: skip
    return [(t, u) for t, _, u in sorted(rows)]


def test_interleaved_writers_come_out_in_time_order() -> None:
    rng = random.Random(3)
    files = {}
    for writer in ("a", "b", "c"):
        times = sorted(_HOUR + rng.randrange(3600 * 10**9) for _ in range(200))
        files[f"{writer}-1"] = _rows(times[:100], writer)
        files[f"{writer}-2"] = _rows(times[100:], writer + "2")
    got, source = _merge(files)
    assert got == _expected(files)
    # each writer's two files follow one another: three streams, not six
    assert len(source.opened) == 3 and all(len(paths) == 2 for paths in source.opened)


@pytest.mark.parametrize("block_rows", [1, 7, 4096])
def test_files_a_little_out_of_order_and_ties(monkeypatch: pytest.MonkeyPatch, block_rows: int) -> None:
    # The smallest time still to come is kept per block of rows: blocks smaller than a batch, larger, one row.
    monkeypatch.setattr(hour_merge, "_BLOCK_ROWS", block_rows)
    rng = random.Random(5)
    files = {}
    for writer in ("a", "b"):
        times = [_HOUR + i * 1000 + rng.randrange(5000) for i in range(300)]  # local disorder
        times[10:20] = [_HOUR + 12_345] * 10  # ties across both files
        files[writer] = _rows(times, writer)
    got, _ = _merge(files)
    assert got == _expected(files)


def test_a_file_far_from_time_order_stops_the_merge_at_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hour_merge, "MAX_PENDING_ROWS", 50)
    times = [_HOUR + i for i in range(400)]
    shuffled = times[:100] + sorted(times[100:], reverse=True)  # the end of the file reversed
    files = {"a": _rows(shuffled, "a")}
    source = _Files(files)
    merge = HourMerge(["a"], source.times_of, source.open_stream, _ORDER, 16)
    got: list[int] = []
    with pytest.raises(MergeFallback) as stopped:
        while (batch := merge.next()) is not None:
            got += batch.column("time").cast(pa.int64()).to_pylist()
    bound = stopped.value.bound
    assert bound is not None and got == sorted(got) and got == [t for t in times if t < bound]
    assert len(got) >= 90  # the ordered start went out before the merge stopped


def test_too_many_overlapping_files_are_not_merged() -> None:
    files = {
        f"w{i}": _rows([_HOUR + i, _HOUR + 10**9 + i], f"w{i}") for i in range(hour_merge.MAX_STREAMS + 1)
    }
    source = _Files(files)
    with pytest.raises(MergeFallback):
        HourMerge(sorted(files), source.times_of, source.open_stream, _ORDER, 16)


def test_chains_follow_one_another() -> None:
    spans = [("x", np.array([5, 9])), ("y", np.array([0, 4])), ("z", np.array([3, 8])), ("e", np.array([]))]
    assert [[p for p, _ in chain] for chain in chains(spans)] == [["y", "x"], ["z"]]


@pytest.mark.parametrize("shuffled", [False, True])
def test_the_server_streams_interleaved_and_shuffled_part_files_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shuffled: bool
) -> None:
    """Several writers' part files in one hour (one of them in random order): each flow once, in time order."""
    monkeypatch.setattr(hour_merge, "MAX_PENDING_ROWS", 300)
    monkeypatch.setattr(history, "SLICE_ROWS", 400)  # the first slice, then a merge of the rest of the hour
    rng = random.Random(9)
    tables = []
    for writer in ("w1", "w2", "w3"):
        times = sorted(_HOUR + rng.randrange(3500 * 10**9) for _ in range(1500))
        if shuffled and writer == "w3":
            rng.shuffle(times)  # far from time order: read in sorted slices from where the merge stopped
        table = _rows(times, writer)
        sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id=writer, max_batch_rows=500))
        for offset in range(0, table.num_rows, 500):
            sink.write(EventBatch(flows=table.slice(offset, 500)))
            sink.flush()
        sink.close()
        tables.append(table)
    table = pa.concat_tables(tables)
    expected = sorted(
        zip(pc.cast(table.column("time"), pa.int64()).to_pylist(), table.column("uuid").to_pylist())
    )
    with HistoryServer(str(tmp_path)) as server, grpc.insecure_channel(server.address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        responses = stub.GetFlows(observer_pb2.GetFlowsRequest(), timeout=60)
        got = [(r.flow.time.ToNanoseconds(), r.flow.uuid) for r in responses if r.HasField("flow")]
        first = stub.GetFlows(observer_pb2.GetFlowsRequest(number=1000, first=True), timeout=60)
        got_first = [(r.flow.time.ToNanoseconds(), r.flow.uuid) for r in first if r.HasField("flow")]
    assert got == expected
    assert got_first == expected[:1000]


def test_the_newest_flows_of_a_partial_hour_read_in_many_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An hour whose flows fill its first minutes only, cut in slices of its flows' times: the last N, the
    last N before `until` and the first N are those of the table."""
    monkeypatch.setattr(history, "SLICE_ROWS", 40)
    rng = random.Random(11)
    times = sorted(_HOUR + 3600 * 10**9 + rng.randrange(150 * 10**9) for _ in range(600))  # 18:00 to 18:02:30
    times[300:305] = [times[300]] * 5  # ties
    older = sorted(_HOUR + rng.randrange(3600 * 10**9) for _ in range(200))  # the hour before, whole
    table = pa.concat_tables([_rows(older, "w1"), _rows(times, "w2")])
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="w", max_batch_rows=100))
    for offset in range(0, table.num_rows, 100):
        sink.write(EventBatch(flows=table.slice(offset, 100)))
        sink.flush()
    sink.close()
    expected = sorted(
        zip(pc.cast(table.column("time"), pa.int64()).to_pylist(), table.column("uuid").to_pylist())
    )

    def flows(
        stub: observer_pb2_grpc.ObserverStub, request: observer_pb2.GetFlowsRequest
    ) -> list[tuple[int, str]]:
        responses = stub.GetFlows(request, timeout=60)
        return [(r.flow.time.ToNanoseconds(), r.flow.uuid) for r in responses if r.HasField("flow")]

    with HistoryServer(str(tmp_path)) as server, grpc.insecure_channel(server.address) as channel:
        stub = observer_pb2_grpc.ObserverStub(channel)
        until = observer_pb2.GetFlowsRequest(number=150)
        until.until.FromNanoseconds(times[450])
        assert flows(stub, observer_pb2.GetFlowsRequest(number=20)) == expected[-20:]
        assert flows(stub, observer_pb2.GetFlowsRequest(number=700)) == expected[-700:]
        assert flows(stub, until) == [row for row in expected if row[0] <= times[450]][-150:]
        assert flows(stub, observer_pb2.GetFlowsRequest(number=500, first=True)) == expected[:500]
        assert flows(stub, observer_pb2.GetFlowsRequest()) == expected

"""run_pipeline: acknowledgements before commits, backpressure, graceful stop, errors, age flushes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from support.wait import wait_until

from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import DatasetWriteError, FlowDecodeError
from flowpipe.model import FLOW_SCHEMA, EventBatch, LostEvent
from flowpipe.pipeline import handle_stop_signals, run_pipeline
from flowpipe.sinks import Ack
from flowpipe.sinks.parquet import ParquetSink

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
FAST = PipelineConfig(poll_interval_seconds=0.01, stop_timeout_seconds=5)


def flows(n: int, start: int) -> pa.Table:
    """`n` flows one second apart from T0 + `start` seconds, ports numbered from `start`."""
    return pa.Table.from_pylist(
        [
            {"time": T0 + timedelta(seconds=start + i), "destination_port": start + i, "verdict": "FORWARDED"}
            for i in range(n)
        ],
        schema=FLOW_SCHEMA,
    )


def numbered(count: int, rows: int = 4) -> list[EventBatch]:
    return [EventBatch(flows=flows(rows, i * rows), position=i + 1) for i in range(count)]


class ListSource:
    """Yields prepared batches; records commits; optional hooks to block or fail mid-stream."""

    def __init__(self, batches: list[EventBatch], *, then: Callable[[], None] | None = None) -> None:
        self._batches = batches
        self._then = then
        self.produced = 0
        self.commits: list[object] = []
        self.closed = threading.Event()
        self.on_commit: Callable[[object], None] | None = None

    def batches(self) -> Iterator[EventBatch]:
        for batch in self._batches:
            self.produced += 1
            yield batch
        if self._then is not None:
            self._then()

    def commit(self, position: object) -> None:
        if self.on_commit is not None:
            self.on_commit(position)
        self.commits.append(position)

    def close(self) -> None:
        self.closed.set()


class SlowSink:
    """Acknowledges each batch at once, but its first write waits until `gate` opens."""

    name = "slow"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.count = 0

    def write(self, batch: EventBatch) -> Ack | None:
        self.entered.set()
        self.gate.wait(30)
        self.count += 1
        return Ack(batches=self.count)

    def poll(self) -> Ack | None:
        return None

    def flush(self) -> Ack | None:
        return None

    def close(self) -> Ack | None:
        return None


class FailingSink(SlowSink):
    """Acknowledges each batch at once and fails on the third, like a disk that fills up."""

    name = "failing"

    def write(self, batch: EventBatch) -> Ack | None:
        self.count += 1
        if self.count == 3:
            raise DatasetWriteError("cannot write x: No space left on device", path="x")
        return Ack(batches=self.count)


def parquet(root: Path, **options: object) -> ParquetSink:
    clock = options.pop("clock", time.monotonic)
    return ParquetSink(ParquetSinkConfig(path=str(root), writer_id="t", **options), clock=clock)  # type: ignore[arg-type]


def stored_ports(root: Path) -> list[int]:
    files = Dataset(root).list_part_files("flows")
    if not files:
        return []
    rows = duckdb.sql(
        "SELECT destination_port FROM read_parquet($f) ORDER BY 1", params={"f": files}
    ).fetchall()
    return [port for (port,) in rows]


def test_every_commit_follows_durable_rows_of_all_batches_up_to_it(tmp_path: Path) -> None:
    source = ListSource(numbered(20))
    seen: list[tuple[object, list[int]]] = []
    source.on_commit = lambda position: seen.append((position, stored_ports(tmp_path)))
    result = run_pipeline(source, [parquet(tmp_path, max_batch_rows=10)], config=FAST)
    assert result.flows == 80 and result.batches == 20
    positions = [p for p, _ in seen]
    assert positions == sorted(positions) and positions[-1] == 20  # type: ignore[type-var]
    assert len(positions) > 1, "commits happen as flushes complete, not only at the end"
    for position, ports in seen:
        upto = 4 * int(str(position))
        assert ports[:upto] == list(range(upto)), f"commit {position} came before its rows were stored"
    assert source.closed.is_set()
    assert result.commits == len(seen) and result.last_position == 20


def test_no_commit_until_every_sink_acknowledged(tmp_path: Path) -> None:
    class FlushOnCloseSink(SlowSink):
        def write(self, batch: EventBatch) -> Ack | None:
            self.count += 1
            return None

        def close(self) -> Ack | None:
            commits_when_closed.extend(source.commits)
            return Ack(batches=self.count)

    commits_when_closed: list[object] = []
    source = ListSource(numbered(6))
    run_pipeline(source, [parquet(tmp_path, max_batch_rows=4), FlushOnCloseSink()], config=FAST)
    assert commits_when_closed == [], "the parquet sink acked every batch early, the other sink only at close"
    assert source.commits == [1, 2, 3, 4, 5, 6]


def test_a_sink_error_stops_the_pipeline_and_commits_nothing_more(tmp_path: Path) -> None:
    source = ListSource(numbered(10))
    with pytest.raises(DatasetWriteError, match="No space left"):
        run_pipeline(source, [FailingSink()], config=FAST)
    assert source.commits == [1, 2]
    assert source.closed.is_set()


def test_a_source_error_is_raised_after_earlier_batches_are_stored(tmp_path: Path) -> None:
    def fail() -> None:
        raise FlowDecodeError("not JSON", path="flows.json", line_number=13, reason="invalid_json")

    source = ListSource(numbered(3), then=fail)
    with pytest.raises(FlowDecodeError, match="flows.json:13"):
        run_pipeline(source, [parquet(tmp_path)], config=FAST)
    assert stored_ports(tmp_path) == list(range(12))
    assert source.commits == [1, 2, 3]


def test_a_full_buffer_makes_the_source_wait(tmp_path: Path) -> None:
    source = ListSource(numbered(100))
    sink = SlowSink()
    config = PipelineConfig(buffer_batches=2, poll_interval_seconds=0.01)
    runner = threading.Thread(target=run_pipeline, args=(source, [sink]), kwargs={"config": config})
    runner.start()
    try:
        sink.entered.wait(30)
        # one batch in the sink, two in the buffer, one in the reader's hand waiting for room
        wait_until(lambda: source.produced >= 4, what="the buffer to fill")
        time.sleep(0.2)
        assert source.produced == 4
    finally:
        sink.gate.set()
        runner.join(30)
    assert sink.count == 100 and source.commits[-1] == 100


def test_stop_flushes_the_open_batch_commits_and_returns(tmp_path: Path) -> None:
    def endless() -> Iterator[EventBatch]:
        i = 0
        while True:
            yield EventBatch(flows=flows(4, i * 4), position=i + 1)
            i += 1

    source = ListSource([])
    source.batches = endless  # type: ignore[method-assign]
    stop = threading.Event()
    written: list[EventBatch] = []

    def on_batch(batch: EventBatch) -> None:
        written.append(batch)
        if len(written) == 5:
            stop.set()

    sink = parquet(tmp_path, max_batch_rows=1_000_000)
    result = run_pipeline(source, [sink], config=FAST, stop=stop, on_batch=on_batch)
    assert result.stopped
    last = written[-1].position
    assert source.commits[-1] == last == result.batches
    assert stored_ports(tmp_path) == list(range(result.flows))
    assert sink.buffered_rows == 0
    assert source.closed.is_set()


def test_stop_does_not_wait_forever_for_a_blocked_source(tmp_path: Path) -> None:
    holder: dict[str, ListSource] = {}
    # after 3 batches the source blocks until closed, like a relay stream with no traffic
    source = ListSource(numbered(3), then=lambda: holder["source"].closed.wait(60))
    holder["source"] = source
    stop = threading.Event()
    config = PipelineConfig(poll_interval_seconds=0.01, stop_timeout_seconds=0.2)

    def on_batch(batch: EventBatch) -> None:
        if batch.position == 3:
            stop.set()

    result = run_pipeline(source, [parquet(tmp_path)], config=config, stop=stop, on_batch=on_batch)
    assert result.stopped and source.commits == [1, 2, 3]
    assert stored_ports(tmp_path) == list(range(12))


def test_an_idle_pipeline_still_flushes_by_age(tmp_path: Path) -> None:
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    go = threading.Event()
    source = ListSource(numbered(1), then=lambda: go.wait(60))
    sink = parquet(tmp_path, flush_interval_seconds=30, clock=clock)
    taken = threading.Event()
    runner = threading.Thread(
        target=run_pipeline, args=(source, [sink]), kwargs={"config": FAST, "on_batch": lambda b: taken.set()}
    )
    runner.start()
    try:
        assert taken.wait(30), "the batch reached the sink"
        assert sink.buffered_rows == 4
        assert source.commits == []
        clock.now += 30
        wait_until(lambda: source.commits == [1], what="the age flush and its commit")
        assert stored_ports(tmp_path) == [0, 1, 2, 3]
    finally:
        go.set()
        runner.join(30)


def test_result_counts_lost_events_node_status_and_decode_errors(tmp_path: Path) -> None:
    errors = [
        FlowDecodeError(f"bad {i}", path="f.json", line_number=i, reason="invalid_json") for i in range(7)
    ]
    batches = [
        EventBatch(
            flows=flows(2, 0),
            lost_events=[LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=5, time=T0)],
            node_status=1,
            decode_errors=errors,
            position=1,
        ),
        EventBatch(flows=flows(0, 0), node_status=2, position=2),
    ]
    seen: list[object] = []
    result = run_pipeline(
        ListSource(batches), [parquet(tmp_path)], config=FAST, on_batch=lambda b: seen.append(b.position)
    )
    assert (result.flows, result.lost_event_records, result.events_lost, result.node_status) == (2, 1, 5, 3)
    assert result.decode_errors == 7 and result.decode_error_samples == [
        f"f.json:{i}: bad {i}" for i in range(5)
    ]
    assert seen == [1, 2]
    assert len(Dataset(tmp_path).list_part_files("lost_events")) == 1


def test_sigterm_sets_the_stop_event() -> None:
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with handle_stop_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(stop.is_set, what="the SIGTERM handler")
    assert signal.getsignal(signal.SIGTERM) is before


class BulkCommitSource(ListSource):
    """A ListSource that takes all positions one flush made durable in one call."""

    def __init__(self, batches: list[EventBatch]) -> None:
        super().__init__(batches)
        self.calls: list[list[object]] = []

    def commit_many(self, positions: list[object]) -> None:
        self.calls.append(list(positions))
        self.commits.extend(positions)


def test_a_source_with_commit_many_gets_each_flush_in_one_call(tmp_path: Path) -> None:
    source = BulkCommitSource(numbered(20))
    result = run_pipeline(source, [parquet(tmp_path, max_batch_rows=10)], config=FAST)
    assert source.commits == list(range(1, 21)) and result.commits == 20 and result.last_position == 20
    assert len(source.calls) < 20, "batches made durable by one flush are committed together"
    assert any(len(call) > 1 for call in source.calls)

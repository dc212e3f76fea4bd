"""ParquetSink and Dataset: flush triggers, partitions, part files, atomicity, disk errors, state files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.env import small_tmpfs

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import UNKNOWN_PARTITION, Dataset, PartitionKey, parse_part_file_name
from flowpipe.errors import ConfigError, DatasetWriteError
from flowpipe.model import FLOW_SCHEMA, SCHEMA_VERSION, EventBatch, LostEvent
from flowpipe.sinks import Ack, Sink
from flowpipe.sinks.parquet import ParquetSink

T0 = datetime(2024, 3, 22, 17, 0, 0, tzinfo=UTC)
VERDICTS = ["FORWARDED", "DROPPED", "AUDIT", "REDIRECTED"]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_flows(times: list[datetime | None], **columns: list[Any]) -> pa.Table:
    """A FLOW_SCHEMA table with the given times; other columns default to a uuid and a verdict."""
    columns.setdefault("uuid", [str(uuid.uuid4()) for _ in times])
    columns.setdefault("verdict", [VERDICTS[i % len(VERDICTS)] for i in range(len(times))])
    data = {name: columns.get(name, [None] * len(times)) for name in FLOW_SCHEMA.names}
    data["time"] = times
    for name in (
        "source_labels",
        "destination_labels",
        "dns_qtypes",
        "dns_ips",
        "source_names",
        "destination_names",
        "ingress_allowed_by",
        "egress_allowed_by",
        "ingress_denied_by",
        "egress_denied_by",
    ):
        if name not in columns:
            data[name] = [[] for _ in times]
    return pa.Table.from_pydict(data, schema=FLOW_SCHEMA)


def batch_of(times: list[datetime | None], position: object = None, **columns: list[Any]) -> EventBatch:
    return EventBatch(flows=make_flows(times, **columns), position=position)


def seconds(n: int, start: datetime = T0) -> list[datetime | None]:
    return [start + timedelta(seconds=i) for i in range(n)]


def sink_for(root: Path, **options: Any) -> ParquetSink:
    clock = options.pop("clock", FakeClock())
    options.setdefault("writer_id", "test-writer")
    return ParquetSink(ParquetSinkConfig(path=str(root), **options), clock=clock)


def read_flows(root: Path) -> pa.Table:
    """Every visible flow row, read the way a user would: DuckDB over the Hive-partitioned glob."""
    files = Dataset(root).list_part_files("flows")
    if not files:
        return make_flows([])
    return duckdb.sql(
        "SELECT * FROM read_parquet($files, hive_partitioning = true)", params={"files": files}
    ).to_arrow_table()


# -- flush triggers ---------------------------------------------------------------------------------------


def test_sink_satisfies_the_protocol(tmp_path: Path) -> None:
    assert isinstance(sink_for(tmp_path), Sink)


def test_flushes_when_max_batch_rows_reached(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, max_batch_rows=10)
    assert sink.write(batch_of(seconds(4))) is None
    assert sink.write(batch_of(seconds(4))) is None
    assert Dataset(tmp_path).list_part_files("flows") == []
    ack = sink.write(batch_of(seconds(4)))
    # the third batch reaches the limit: published whole with the two before it, the part file closed at 10 rows
    assert ack is not None and ack.batches == 3 and ack.flows == 12
    assert list(ack.files) == Dataset(tmp_path).list_part_files("flows")
    assert [pq.read_metadata(path).num_rows for path in ack.files] == [10, 2]
    assert read_flows(tmp_path).num_rows == 12 and sink.buffered_rows == 0
    assert sink.close() is None


def test_a_batch_bigger_than_max_batch_rows_is_split_into_files_of_that_size(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, max_batch_rows=10)
    ack = sink.write(batch_of(seconds(25)))
    assert ack is not None and ack.flows == 25 and ack.batches == 1, "published whole, in files of 10 rows"
    assert sink.buffered_rows == 0
    sizes = [pq.read_metadata(path).num_rows for path in Dataset(tmp_path).list_part_files("flows")]
    assert sizes == [10, 10, 5]


def test_flushes_when_max_batch_bytes_reached(tmp_path: Path) -> None:
    one = batch_of(seconds(50), http_url=["/" + "x" * 500] * 50)
    sink = sink_for(tmp_path, max_batch_bytes=one.flows.nbytes * 2 + 1, max_batch_rows=1_000_000)
    assert sink.write(one) is None
    assert sink.write(batch_of(seconds(50), http_url=["/" + "y" * 500] * 50)) is None
    ack = sink.write(batch_of(seconds(50), http_url=["/" + "z" * 500] * 50))
    assert ack == Ack(batches=3, flows=150, files=ack.files)
    assert read_flows(tmp_path).num_rows == 150


def test_flushes_when_flush_interval_passes(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = sink_for(tmp_path, flush_interval_seconds=60, clock=clock)
    assert sink.write(batch_of(seconds(3))) is None
    clock.now += 59.9
    assert sink.poll() is None
    assert sink.write(batch_of(seconds(2))) is None
    clock.now += 0.1
    ack = sink.poll()
    assert ack is not None and ack.batches == 2 and ack.flows == 5
    clock.now += 600
    assert sink.poll() is None, "nothing is open, so there is nothing to flush"


def test_age_counts_from_the_first_row_after_a_flush(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = sink_for(tmp_path, flush_interval_seconds=10, clock=clock)
    sink.write(batch_of(seconds(1)))
    clock.now += 10
    assert sink.poll() is not None
    clock.now += 100  # idle: the next batch opens a new age window
    assert sink.write(batch_of(seconds(1))) is None
    clock.now += 9
    assert sink.poll() is None


def test_batches_without_rows_are_acknowledged_in_order(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    assert sink.write(EventBatch(flows=make_flows([]), node_status=1)) == Ack(batches=1)
    assert sink.write(batch_of(seconds(2))) is None
    assert sink.write(EventBatch(flows=make_flows([]))) is None, "must wait for the rows before it"
    ack = sink.flush()
    assert ack is not None and ack.batches == 3
    assert sink.flush() is None


# -- partitions and part files ----------------------------------------------------------------------------


def test_out_of_order_flows_land_in_their_own_hours(tmp_path: Path) -> None:
    times: list[datetime | None] = [T0 + timedelta(minutes=m) for m in (130, 5, 65, 59, 61, 0, 179, 120)]
    sink = sink_for(tmp_path)
    sink.write(batch_of(times[:4]))
    ack = sink.write(batch_of(times[4:]))
    assert ack is None
    ack = sink.flush()
    assert ack is not None and len(ack.files) == 3, "one flush, one part file per partition"
    dataset = Dataset(tmp_path)
    assert dataset.list_partitions("flows") == [
        PartitionKey("2024-03-22", "17"),
        PartitionKey("2024-03-22", "18"),
        PartitionKey("2024-03-22", "19"),
    ]
    for key in dataset.list_partitions("flows"):
        (path,) = dataset.list_part_files("flows", key)
        stored = pq.read_table(path).column("time").to_pylist()
        assert stored == [t for t in times if t is not None and t.hour == int(key.hour)], "arrival order kept"
        assert {(t.strftime("%Y-%m-%d"), f"{t.hour:02d}") for t in stored} == {(key.date, key.hour)}
    assert sorted(read_flows(tmp_path).column("time").to_pylist()) == sorted(times)  # type: ignore[type-var]


def test_hive_columns_read_back_with_their_types(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    sink.write(batch_of([T0 + timedelta(hours=2, minutes=1)]))
    sink.close()
    row = duckdb.sql(
        f"SELECT date, hour FROM read_parquet('{tmp_path}/flows/**/*.parquet', hive_partitioning=true)"
    )
    assert row.fetchall() == [(datetime(2024, 3, 22).date(), 19)]


def test_flows_without_time_are_kept_in_the_null_partition(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    sink.write(batch_of([T0, None, None]))
    sink.close()
    dataset = Dataset(tmp_path)
    assert PartitionKey(UNKNOWN_PARTITION, UNKNOWN_PARTITION) in dataset.list_partitions("flows")
    rows = duckdb.sql(
        f"SELECT date, hour, count(*) FROM read_parquet('{tmp_path}/flows/**/*.parquet', hive_partitioning=true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert rows == [(datetime(2024, 3, 22).date(), 17, 1), (None, None, 2)]


def test_part_files_carry_zstd_dictionary_and_schema_version(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    sink.write(batch_of(seconds(100)))
    (path,) = sink.close().files  # type: ignore[union-attr]
    metadata = pq.read_metadata(path)
    assert metadata.metadata[b"flowpipe.schema_version"] == SCHEMA_VERSION.encode()
    assert metadata.metadata[b"flowpipe.writer_id"] == b"test-writer"
    column = metadata.row_group(0).column(FLOW_SCHEMA.get_field_index("verdict"))
    assert column.compression == "ZSTD"
    assert "RLE_DICTIONARY" in column.encodings
    assert pq.read_schema(path).remove_metadata() == FLOW_SCHEMA.remove_metadata()


def test_part_files_keep_dictionaries_and_statistics_where_they_serve(tmp_path: Path) -> None:
    """Every column has a dictionary but `uuid` (every value differs) and statistics but the lists' items; `time`
    keeps its range and `uuid` its null count (readers skip row groups and files by them)."""
    sink = sink_for(tmp_path)
    sink.write(batch_of(seconds(100)))
    (path,) = sink.close().files  # type: ignore[union-attr]
    group = pq.read_metadata(path).row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    lists = {field.name for field in FLOW_SCHEMA if pa.types.is_list(field.type)}
    assert {"source_labels", "destination_names", "dns_ips"} <= lists
    for name, column in columns.items():
        top = name.split(".", 1)[0]
        assert column.compression == "ZSTD"
        if column.physical_type != "BOOLEAN":  # (Parquet has no dictionary of booleans)
            assert ("RLE_DICTIONARY" in column.encodings) == (top != "uuid"), name
        assert (column.statistics is not None) == (top not in lists), name
    assert columns["time"].statistics.has_min_max and columns["uuid"].statistics.has_null_count
    assert columns["uuid"].statistics.null_count == 0


def test_part_file_names_hold_start_writer_and_sequence(tmp_path: Path) -> None:
    sink = sink_for(tmp_path, writer_id="node-a.1", max_batch_rows=2)
    sink.write(batch_of([T0 + timedelta(minutes=10), T0 + timedelta(minutes=3)]))
    sink.write(batch_of([T0 + timedelta(minutes=20), T0 + timedelta(minutes=30)]))
    names = [Path(p).name for p in Dataset(tmp_path).list_part_files("flows")]
    parsed = [parse_part_file_name(n) for n in names]
    assert [(p.start, p.writer_id, p.seq) for p in parsed if p] == [
        (T0 + timedelta(minutes=3), "node-a.1", 1),
        (T0 + timedelta(minutes=20), "node-a.1", 2),
    ]
    assert names == sorted(names), "names sort by start time"


def test_a_restarted_writer_never_overwrites_earlier_files(tmp_path: Path) -> None:
    for _ in range(2):
        sink = sink_for(tmp_path, writer_id="same")
        sink.write(batch_of([T0]))
        sink.close()
    assert len(Dataset(tmp_path).list_part_files("flows")) == 2
    assert read_flows(tmp_path).num_rows == 2


def test_lost_events_go_to_their_own_table(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    lost = [
        LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=7, node_name="prod/node-1", time=T0, cpu=3),
        LostEvent(
            source="PERF_EVENT_RING_BUFFER",
            num_events_lost=2,
            node_name="node-2",
            time=T0 + timedelta(hours=1),
        ),
    ]
    sink.write(EventBatch(flows=make_flows([]), lost_events=lost))
    ack = sink.close()
    assert ack is not None and ack.batches == 1
    files = Dataset(tmp_path).list_part_files("lost_events")
    assert len(files) == 2
    rows = duckdb.sql(
        "SELECT node_name, cluster_name, source, num_events_lost, cpu, hour "
        "FROM read_parquet($f, hive_partitioning = true) ORDER BY time",
        params={"f": files},
    ).fetchall()
    assert rows == [
        ("prod/node-1", "prod", "HUBBLE_RING_BUFFER", 7, 3, 17),
        ("node-2", None, "PERF_EVENT_RING_BUFFER", 2, None, 18),
    ]
    assert Dataset(tmp_path).list_part_files("flows") == []


def test_bad_writer_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="writer id"):
        ParquetSinkConfig(writer_id="a/b")
    with pytest.raises(ConfigError, match="max_batch_rows"):
        ParquetSinkConfig(max_batch_rows=0)


# -- model round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_same_rows_out_whatever_the_flush_boundaries(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    sink = sink_for(
        tmp_path,
        max_batch_rows=rng.randint(1, 60),
        max_batch_bytes=rng.choice([1_000, 20_000, 10_000_000]),
        row_group_bytes=rng.choice([500, 5_000, 16_000_000]),
        flush_interval_seconds=rng.choice([1.0, 5.0, 1000.0]),
        clock=clock,
    )
    model: list[tuple[Any, ...]] = []
    for _ in range(rng.randint(5, 25)):
        size = rng.randint(0, 30)
        times = [
            None
            if rng.random() < 0.05
            else T0 + timedelta(seconds=rng.randint(-7200, 7200), microseconds=rng.randint(0, 999_999))
            for _ in range(size)
        ]
        ports = [rng.randint(1, 65535) for _ in range(size)]
        verdicts = [rng.choice(VERDICTS) for _ in range(size)]
        batch = batch_of(times, destination_port=ports, verdict=verdicts)
        model += zip(batch.flows.column("uuid").to_pylist(), times, ports, verdicts, strict=True)
        sink.write(batch)
        clock.now += rng.random() * 3
        if rng.random() < 0.2:
            sink.poll()
    sink.close()
    stored = read_flows(tmp_path).select(["uuid", "time", "destination_port", "verdict"]).to_pylist()
    got = sorted((r["uuid"], r["time"], r["destination_port"], r["verdict"]) for r in stored)
    assert got == sorted(model)


# -- atomicity --------------------------------------------------------------------------------------------

_CHILD_PRELUDE = """
import os, sys, signal
from datetime import UTC, datetime, timedelta
import pyarrow as pa
from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.model import FLOW_SCHEMA, EventBatch
from flowpipe.sinks.parquet import ParquetSink

def flows(n, start):
    t0 = datetime(2024, 3, 22, 17, tzinfo=UTC) + timedelta(seconds=start)
    data = {name: [None] * n for name in FLOW_SCHEMA.names}
    for name in FLOW_SCHEMA.names:
        if pa.types.is_list(FLOW_SCHEMA.field(name).type):
            data[name] = [[] for _ in range(n)]
    data["time"] = [t0 + timedelta(microseconds=i) for i in range(n)]
    data["uuid"] = [os.urandom(16).hex() for _ in range(n)]
    return pa.Table.from_pydict(data, schema=FLOW_SCHEMA)
"""


def run_child(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    script = _CHILD_PRELUDE + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_crash_between_write_and_rename_leaves_no_visible_part_file(tmp_path: Path) -> None:
    child = run_child(
        f"""
        class CrashingDataset(Dataset):
            def publish(self, temp, final):
                os.kill(os.getpid(), signal.SIGKILL)   # the process dies with the part file fully written

        sink = ParquetSink(ParquetSinkConfig(path={str(tmp_path)!r}, writer_id="w1"),
                           dataset=CrashingDataset({str(tmp_path)!r}))
        sink.write(EventBatch(flows=flows(1000, 0)))
        sink.close()
        print("not reached")
        """
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    dataset = Dataset(tmp_path)
    assert dataset.list_part_files("flows") == []
    temps = [info.base_name for info in dataset.list_temp_files("flows")]
    assert len(temps) == 1 and temps[0].startswith(".part-") and temps[0].endswith(".parquet.tmp")
    assert read_flows(tmp_path).num_rows == 0
    assert duckdb.sql(f"SELECT count(*) FROM glob('{tmp_path}/flows/**/*.parquet')").fetchall() == [(0,)]
    # the next start of the same writer removes its leftovers
    sink_for(tmp_path, writer_id="w1")
    assert dataset.list_temp_files("flows") == []


def test_a_writer_killed_mid_flush_leaves_only_complete_files(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD_PRELUDE
            + textwrap.dedent(f"""
        sink = ParquetSink(ParquetSinkConfig(path={str(tmp_path)!r}, writer_id="w2", max_batch_rows=100_000))
        for i in range(1000):
            sink.write(EventBatch(flows=flows(100_000, i * 3600)))
        """),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        dataset = Dataset(tmp_path)
        deadline = time.monotonic() + 60
        # kill it while a part file is being written, once at least one file is complete
        while time.monotonic() < deadline and child.poll() is None:
            if dataset.list_part_files("flows") and dataset.list_temp_files("flows"):
                break
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    files = Dataset(tmp_path).list_part_files("flows")
    assert files, "at least one flush completed before the kill"
    for path in files:
        assert pq.read_table(path).num_rows == 100_000, f"{path} is incomplete"
    sink_for(tmp_path, writer_id="w2")
    assert Dataset(tmp_path).list_temp_files("flows") == []


def test_other_writers_temp_files_are_left_alone_until_stale(tmp_path: Path) -> None:
    folder = tmp_path / "flows" / "date=2024-03-22" / "hour=17"
    folder.mkdir(parents=True)
    fresh = folder / ".part-20240322T170000000000Z-other-000001.parquet.tmp"
    stale = folder / ".part-20240322T170000000000Z-gone-000001.parquet.tmp"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    sink_for(tmp_path, writer_id="me")
    assert fresh.exists() and not stale.exists()


# -- disk errors ------------------------------------------------------------------------------------------


def incompressible_batch(rows: int) -> EventBatch:
    return batch_of(seconds(rows), http_url=[os.urandom(64).hex() for _ in range(rows)])


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs mounted for the test (needs root); skips where mounting is not permitted."""
    with small_tmpfs(tmp_path, "256k") as target:
        yield target


def test_disk_full_raises_naming_the_path_and_acknowledges_nothing(small_disk: Path) -> None:
    sink = sink_for(small_disk, max_batch_rows=1_000_000)
    assert sink.write(incompressible_batch(4000)) is None  # ~500 KB of random text: more than the disk holds
    with pytest.raises(DatasetWriteError, match="No space left on device") as caught:
        sink.flush()
    assert caught.value.path.startswith(str(small_disk / "flows" / "date=2024-03-22" / "hour=17"))
    assert Path(caught.value.path).name in str(caught.value)
    dataset = Dataset(small_disk)
    assert dataset.list_part_files("flows") == [] and dataset.list_temp_files("flows") == []
    assert sink.acked_batches == 0
    with pytest.raises(DatasetWriteError, match="stopped after a write error"):
        sink.write(batch_of(seconds(1)))


def test_disk_full_while_streaming_a_row_group_fails_the_write(small_disk: Path) -> None:
    sink = sink_for(small_disk, max_batch_rows=1_000_000, row_group_bytes=50_000)
    with pytest.raises(DatasetWriteError, match="No space left on device"):
        for _ in range(20):  # row groups go to the temporary part file as batches arrive
            sink.write(incompressible_batch(400))
    dataset = Dataset(small_disk)
    assert dataset.list_part_files("flows") == [] and dataset.list_temp_files("flows") == []
    assert sink.acked_batches == 0


def test_after_a_disk_full_the_dataset_holds_exactly_the_acknowledged_batches(small_disk: Path) -> None:
    # Batches of 170 rows cross the 300-row mark, so part files are closed inside them; a batch is published
    # whole or not at all, so what the source must deliver again (the unacknowledged batches) is not there.
    sink = sink_for(small_disk, max_batch_rows=300, row_group_bytes=50_000)
    sizes: list[int] = []
    with pytest.raises(DatasetWriteError, match="No space left on device"):
        for _ in range(40):
            batch = incompressible_batch(170)
            sizes.append(batch.flows.num_rows)
            sink.write(batch)
    assert sink.acked_batches >= 1
    assert read_flows(small_disk).num_rows == sum(sizes[: sink.acked_batches])
    assert Dataset(small_disk).list_temp_files("flows") == []


def test_a_read_only_dataset_raises_dataset_write_error(small_disk: Path) -> None:
    sink = sink_for(small_disk)
    sink.write(batch_of(seconds(5)))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(DatasetWriteError, match="Read-only file system"):
        sink.flush()
    assert sink.acked_batches == 0


def test_file_size_limit_raises_dataset_write_error(tmp_path: Path) -> None:
    """The same failure path without root: a child process whose files may not exceed 64 KiB (RLIMIT_FSIZE)."""
    child = run_child(
        f"""
        import json, resource
        from flowpipe.errors import DatasetWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        sink = ParquetSink(ParquetSinkConfig(path={str(tmp_path)!r}, writer_id="w3"))
        table = flows(5000, 0)
        sink.write(EventBatch(flows=table))
        try:
            sink.flush()
        except DatasetWriteError as exc:
            print(json.dumps({{"message": str(exc), "path": exc.path, "acked": sink.acked_batches}}))
        """
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert "File too large" in report["message"] and report["path"] in report["message"]
    assert report["acked"] == 0
    dataset = Dataset(tmp_path)
    assert dataset.list_part_files("flows") == [] and dataset.list_temp_files("flows") == []


# -- dataset helpers --------------------------------------------------------------------------------------


def test_state_files_round_trip_atomically(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path)
    assert dataset.read_state("files.json") is None
    dataset.write_state("files.json", {"a": {"line": 3}})
    dataset.write_state("files.json", {"a": {"line": 9}, "b": {"line": 1}})
    assert dataset.read_state("files.json") == {"a": {"line": 9}, "b": {"line": 1}}
    assert sorted(p.name for p in (tmp_path / "_state").iterdir()) == ["files.json"]


def test_listing_skips_hidden_temporary_and_private_files(tmp_path: Path) -> None:
    sink = sink_for(tmp_path)
    sink.write(batch_of([T0]))
    (visible,) = sink.close().files  # type: ignore[union-attr]
    folder = Path(visible).parent
    for name in (".part-x.parquet.tmp", "_SUCCESS", ".hidden.parquet", "part-y.parquet.tmp"):
        (folder / name).write_bytes(b"junk")
    assert Dataset(tmp_path).list_part_files("flows") == [visible]

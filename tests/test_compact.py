"""`flowpipe compact`: closed hours merged into few files, every row once, readers never see a row twice."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.metrics import follower_for, received
from support.small_files import LAST_HOUR, simulated_flows, sorted_rows, write_small_files

import flowpipe.dataset.compact as compact_module
from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.compact import compact_dataset
from flowpipe.dataset.layout import Dataset, PartitionKey
from flowpipe.dataset.leases import read_leases
from flowpipe.dataset.maintenance import maintenance_lock
from flowpipe.dataset.visible import COMPACTED_FROM_KEY, is_compacted_name, visible_part_files
from flowpipe.errors import DatasetWriteError
from flowpipe.model import EventBatch
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.sinks.parquet import ParquetSink

NOW = LAST_HOUR + timedelta(minutes=80)
"""The clock of these tests: with the default grace of an hour, 10:00-13:00 are closed and the newest hour
(13:00-14:00) is not yet."""
ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


def clock() -> datetime:
    return NOW


@pytest.fixture(scope="module")
def flows() -> pa.Table:
    return simulated_flows()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, flows: pa.Table) -> Path:
    root = tmp_path_factory.mktemp("small-files") / "ds"
    write_small_files(root, flows)
    return root


@pytest.fixture
def small(tmp_path: Path, template: Path) -> Path:
    """A fresh copy of about 100 small part files over four hours, and lost events."""
    return Path(shutil.copytree(template, tmp_path / "ds"))


def files_in_hour(root: Path, hour: datetime, table: str = "flows") -> list[str]:
    return Dataset(root).list_part_files(table, PartitionKey.from_time(hour))


def answers(root: Path) -> dict[str, list[str]]:
    """Every question's rows over all time, each row as sorted JSON (row order aside)."""
    catalog = load_questions()
    out = {}
    with DuckDBEngine(root) as engine:
        for question in catalog:
            values = {k: v for k, v in ALL_TIME.items() if question.parameter(k) is not None}
            rows = run_question(engine, question, values).table.to_pylist()
            out[question.name] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
    return out


def test_compaction_keeps_every_row_once_and_drops_the_file_count(small: Path) -> None:
    before_rows, before_lost = sorted_rows(small), sorted_rows(small, "lost_events")
    before_files = Dataset(small).list_part_files("flows")
    open_hour = files_in_hour(small, LAST_HOUR)
    closed_rows = sum(
        _rows(Dataset(small).list_part_files(table)) - _rows(files_in_hour(small, LAST_HOUR, table))
        for table in ("flows", "lost_events")
    )
    report = compact_dataset(Dataset(small), clock=clock)
    after_files = Dataset(small).list_part_files("flows")
    assert len(before_files) > 50 and len(after_files) == len(open_hour) + 3
    assert sorted_rows(small).equals(before_rows)
    assert sorted_rows(small, "lost_events").equals(before_lost)
    assert files_in_hour(small, LAST_HOUR) == open_hour  # the open hour is not touched
    assert report.rows == closed_rows
    assert len(report.files_written) == 6  # three closed hours of flows and of lost events
    for path in report.files_written:
        assert is_compacted_name(path.rsplit("/", 1)[1])
        inputs = json.loads(pq.read_metadata(path).metadata[COMPACTED_FROM_KEY])
        assert sum(rows for _, rows in inputs) == pq.read_metadata(path).num_rows
        assert not any(Path(path).with_name(name).exists() for name, _ in inputs)


def _rows(paths: list[str]) -> int:
    return sum(pq.read_metadata(p).num_rows for p in paths)


def test_question_results_are_unchanged(small: Path) -> None:
    before = answers(small)
    compact_dataset(Dataset(small), clock=clock)
    assert answers(small) == before
    assert sum(len(rows) for rows in before.values()) > 0


def test_a_dry_run_changes_nothing(small: Path) -> None:
    before = sorted(p.name for p in small.rglob("*") if p.is_file())
    report = compact_dataset(Dataset(small), clock=clock, dry_run=True)
    assert report.files_merged > 50 and not report.files_written
    assert sorted(p.name for p in small.rglob("*") if p.is_file()) == before


def test_target_size_bounds_the_merged_files(small: Path) -> None:
    closed = [p for p in Dataset(small).list_part_files("flows") if "hour=13" not in p]
    biggest = max(Path(p).stat().st_size for p in closed)
    target = 4 * biggest
    before = sorted_rows(small)
    report = compact_dataset(Dataset(small), clock=clock, target_size_bytes=target)
    assert len(report.files_written) > 3  # more than one file per closed hour
    assert all(Path(p).stat().st_size <= target for p in report.files_written)
    assert sorted_rows(small).equals(before)


def test_grace_period_leaves_recent_hours_alone(small: Path) -> None:
    hour_12 = files_in_hour(small, LAST_HOUR - timedelta(hours=1))
    compact_dataset(Dataset(small), clock=clock, grace_seconds=3 * 3600)  # 12:00-13:00 ended 1h20m ago
    assert files_in_hour(small, LAST_HOUR - timedelta(hours=1)) == hour_12
    assert len(files_in_hour(small, LAST_HOUR - timedelta(hours=3))) == 1


def test_a_crash_between_publish_and_delete_shows_no_row_twice(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted_rows(small)
    real_remove = compact_module._remove

    def crash(dataset: Dataset, files: list[Any]) -> int:
        if files:  # the inputs of a merge, not the (empty) leftovers of an earlier run
            raise KeyboardInterrupt("killed after publishing")
        return 0

    monkeypatch.setattr(compact_module, "_remove", crash)
    with pytest.raises(KeyboardInterrupt):
        compact_dataset(Dataset(small), clock=clock, workers=1)
    monkeypatch.setattr(compact_module, "_remove", real_remove)
    listed = Dataset(small).list_part_files("flows")
    compacted = [p for p in listed if is_compacted_name(p.rsplit("/", 1)[1])]
    assert len(compacted) == 1  # published, and all its inputs are still there
    assert len(visible_part_files(Dataset(small), "flows")) < len(listed)
    assert sorted_rows(small).equals(before)  # the engine leaves the inputs out
    # The next run cleans up.
    report = compact_dataset(Dataset(small), clock=clock)
    assert sum(len(p.leftovers) for p in report.plans) > 0
    assert sorted_rows(small).equals(before)
    assert len(Dataset(small).list_part_files("flows")) < len(listed)


def test_an_engine_opened_before_compaction_still_counts_each_row_once(small: Path) -> None:
    total = sorted_rows(small).num_rows
    with DuckDBEngine(small) as engine:
        compact_dataset(Dataset(small), clock=clock)
        assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total


def test_safe_while_a_collector_writes(small: Path, template: Path, flows: pa.Table) -> None:
    open_hour = set(files_in_hour(small, LAST_HOUR))
    late = flows.filter(
        pc.greater_equal(flows.column("time"), pa.scalar(LAST_HOUR, flows.schema.field("time").type))
    )
    old = flows.slice(0, 500)  # an ingest of old flows into closed hours, at the same time
    written: list[str] = []

    def collector(table: pa.Table, writer_id: str) -> Callable[[], None]:
        def run() -> None:
            sink = ParquetSink(ParquetSinkConfig(path=str(small), writer_id=writer_id, max_batch_rows=100))
            for offset in range(0, table.num_rows, 100):
                sink.write(EventBatch(flows=table.slice(offset, 100)))
            sink.close()
            written.extend(sink.files_written)

        return run

    threads = [
        threading.Thread(target=collector(late, "live")),
        threading.Thread(target=collector(old, "old")),
    ]
    for thread in threads:
        thread.start()
    compact_dataset(Dataset(small), clock=clock)
    for thread in threads:
        thread.join()
    expected = sorted_rows(template, "flows", late, old)
    assert sorted_rows(small).equals(expected)
    assert open_hour <= set(files_in_hour(small, LAST_HOUR))  # nothing of the open hour was merged
    assert all(Path(p).exists() for p in written if "hour=13" in p)


def test_serve_metrics_counts_compacted_rows_once(small: Path) -> None:
    total = sorted_rows(small).num_rows
    running, registry = follower_for(small)
    running.scan()
    assert received(registry) == total
    compact_dataset(Dataset(small), clock=clock)
    running.scan()
    assert received(registry) == total  # the compacted files add nothing already counted
    fresh, fresh_registry = follower_for(small)
    fresh.scan()
    assert received(fresh_registry) == total  # a fresh start counts the compacted files


def test_serve_metrics_reads_a_compacted_file_before_its_inputs_once(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact_module, "_remove", lambda *args, **kwargs: 0)  # inputs stay
    compact_dataset(Dataset(small), clock=clock)
    follower, registry = follower_for(small)
    follower.scan()
    assert received(registry) == sorted_rows(small).num_rows


def test_one_maintenance_run_at_a_time(small: Path) -> None:
    dataset = Dataset(small)
    with (
        maintenance_lock(dataset, "retention", clock=clock),
        pytest.raises(DatasetWriteError, match="retention"),
    ):
        compact_dataset(dataset, clock=clock)
    assert read_leases(dataset) == []  # released
    assert compact_dataset(dataset, clock=clock).files_written


def test_an_input_with_unknown_columns_is_left_as_is(small: Path) -> None:
    hour = LAST_HOUR - timedelta(hours=2)
    first = files_in_hour(small, hour)[0]
    table = pq.read_table(first)
    newer = table.append_column("future_column", pa.array(["x"] * table.num_rows))
    pq.write_table(newer, first)
    report = compact_dataset(Dataset(small), clock=clock)
    assert any("future_column" in reason for reason in report.skipped)
    assert Path(first).exists()


def test_cli_dry_run_and_run(small: Path) -> None:
    runner = CliRunner()
    dry = runner.invoke(
        cli, ["compact", "--dataset", str(small), "--dry-run", "--grace-seconds", "0", "--format", "json"]
    )
    assert dry.exit_code == 0, dry.output
    plans = json.loads(dry.stdout)
    # With the real clock every simulated hour is long closed, the newest one included.
    assert {p["partition"] for p in plans if p["table"] == "flows"} >= {"date=2024-03-01/hour=13"}
    assert "nothing changed" in dry.stderr
    files = len(Dataset(small).list_part_files("flows"))
    assert len(Dataset(small).list_part_files("flows")) == files
    done = runner.invoke(cli, ["compact", "--dataset", str(small), "--target-size-mb", "64"])
    assert done.exit_code == 0, done.output
    assert "compacted" in done.stderr
    assert len(Dataset(small).list_part_files("flows")) == 4
    again = runner.invoke(cli, ["compact", "--dataset", str(small), "--format", "json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == []


def test_compacted_file_names_are_not_taken_for_a_writers_part_files() -> None:
    assert is_compacted_name("compacted-20240301T100000000000Z-cabc-000001.parquet")
    assert not is_compacted_name("part-20240301T100000000000Z-compacted-000001.parquet")

"""`flowpipe retention`: whole hour partitions older than --keep go, from flows and lost events; dry run first."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.flowdata import flow, write_dataset
from support.small_files import LAST_HOUR, START, simulated_flows, sorted_rows, write_small_files

from flowpipe.cli import cli
from flowpipe.dataset.layout import Dataset, PartitionKey
from flowpipe.dataset.maintenance import maintenance_lock
from flowpipe.dataset.retention import apply_retention, plan_retention
from flowpipe.errors import ConfigError, DatasetWriteError
from flowpipe.query import DuckDBEngine

NOW = LAST_HOUR + timedelta(days=30, minutes=30)
"""30 days after the newest hour began (13:00): with --keep 30d, hours up to 12:00-13:00 are expired."""
KEEP = timedelta(days=30)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("retention") / "ds"
    write_small_files(root, simulated_flows(rate=0.5), batch_rows=500)
    write_dataset(root, [flow(time=None, verdict="FORWARDED", uuid="no-time")], writer_id="untimed")
    return root


@pytest.fixture
def ds(tmp_path: Path, template: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "ds"))


def hours(root: Path, table: str = "flows") -> list[str]:
    return [key.path for key in Dataset(root).list_partitions(table)]


def test_dry_run_lists_expired_partitions_with_sizes_and_removes_nothing(ds: Path) -> None:
    before = sorted(str(p) for p in ds.rglob("*"))
    report = plan_retention(Dataset(ds), KEEP, clock=lambda: NOW)
    assert not report.applied
    expired = {(p.table, p.key.path) for p in report.partitions}
    assert expired == {
        (table, f"date=2024-03-01/hour={hour}") for table in ("flows", "lost_events") for hour in (10, 11, 12)
    }
    assert report.bytes == sum(Path(f.path).stat().st_size for p in report.partitions for f in p.files) > 0
    assert sorted(str(p) for p in ds.rglob("*")) == before


def test_apply_removes_exactly_the_expired_hours(ds: Path) -> None:
    with DuckDBEngine(ds) as engine:
        kept = engine.run(
            "SELECT * FROM flows WHERE time >= $cut OR time IS NULL ORDER BY ALL", {"cut": LAST_HOUR}
        )
        kept_lost = engine.run("SELECT count(*) AS n FROM lost_events WHERE time >= $cut", {"cut": LAST_HOUR})
    report = apply_retention(Dataset(ds), KEEP, clock=lambda: NOW)
    assert report.applied and report.files_removed == report.files > 0
    assert hours(ds) == [
        "date=2024-03-01/hour=13",
        "date=__HIVE_DEFAULT_PARTITION__/hour=__HIVE_DEFAULT_PARTITION__",
    ]
    assert hours(ds, "lost_events") == ["date=2024-03-01/hour=13"]
    assert sorted_rows(ds).equals(kept)  # every newer row, and the rows without a time, are still there
    with DuckDBEngine(ds) as engine:
        assert engine.run("SELECT count(*) AS n FROM lost_events").equals(kept_lost)
    assert not (ds / "flows" / "date=2024-03-01" / "hour=10").exists()  # empty folders go too
    assert not list((ds / "_state").glob("*lock*"))


def test_nothing_is_removed_while_every_hour_is_young(ds: Path) -> None:
    report = apply_retention(Dataset(ds), KEEP, clock=lambda: START + timedelta(days=1))
    assert report.partitions == [] and report.files_removed == 0
    assert len(hours(ds)) == 5


def test_the_hour_that_ended_exactly_keep_ago_is_removed(ds: Path) -> None:
    at = datetime(2024, 3, 1, 12, tzinfo=START.tzinfo) + KEEP  # the hour 11:00-12:00 ended exactly 30d ago
    expired = {p.key.hour for p in plan_retention(Dataset(ds), KEEP, clock=lambda: at).partitions}
    assert expired == {"10", "11"}


def test_a_young_temporary_file_in_an_expired_hour_is_left_alone(ds: Path) -> None:
    folder = ds / "flows" / PartitionKey.from_time(START).path
    (folder / ".part-20240301T103000000000Z-live-000009.parquet.tmp").write_bytes(b"being written")
    apply_retention(Dataset(ds), KEEP, clock=lambda: NOW)
    assert [p.name for p in folder.iterdir()] == [".part-20240301T103000000000Z-live-000009.parquet.tmp"]
    assert "date=2024-03-01/hour=10" not in hours(ds)


def test_keep_must_be_positive(ds: Path) -> None:
    with pytest.raises(ConfigError):
        plan_retention(Dataset(ds), timedelta(0))


def test_retention_waits_for_a_running_compaction(ds: Path) -> None:
    dataset = Dataset(ds)
    with (
        maintenance_lock(dataset, "compaction", clock=lambda: NOW),
        pytest.raises(DatasetWriteError, match="compaction"),
    ):
        apply_retention(dataset, KEEP, clock=lambda: NOW)
    assert len(hours(ds)) == 5


def test_cli_dry_run_then_apply(ds: Path) -> None:
    runner = CliRunner()
    # The real clock: the simulated hours of 2024 are all older than 30 days.
    dry = runner.invoke(cli, ["retention", "--dataset", str(ds), "--keep", "30d", "--format", "json"])
    assert dry.exit_code == 0, dry.output
    listed = json.loads(dry.stdout)
    assert len(listed) == 8 and all(row["bytes"] > 0 and row["files"] > 0 for row in listed)
    assert "nothing changed" in dry.stderr and len(hours(ds)) == 5
    done = runner.invoke(cli, ["retention", "--dataset", str(ds), "--keep", "30d", "--apply"])
    assert done.exit_code == 0, done.output
    assert "removed 8 partitions" in done.stderr
    assert hours(ds) == ["date=__HIVE_DEFAULT_PARTITION__/hour=__HIVE_DEFAULT_PARTITION__"]


@pytest.mark.parametrize("keep", ["soon", "now", "0h", ""])
def test_cli_rejects_a_bad_age(ds: Path, keep: str) -> None:
    result = CliRunner().invoke(cli, ["retention", "--dataset", str(ds), "--keep", keep])
    assert result.exit_code == 2 and "--keep" in result.output


def test_rows_without_a_time_are_never_expired(ds: Path) -> None:
    apply_retention(Dataset(ds), KEEP, clock=lambda: NOW)
    with DuckDBEngine(ds) as engine:
        row = engine.run("SELECT uuid FROM flows WHERE time IS NULL").to_pylist()
    assert row == [{"uuid": "no-time"}]

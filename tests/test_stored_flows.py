"""Overlapping captures: each flow with a uuid is stored once per dataset, whichever way it arrives."""

from __future__ import annotations

import json
import uuid as uuid_module
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from support.collect import background_collect, dataset_uuids, fast_collect_config, sim_flow_bytes, uuids_of
from support.wait import wait_until as wait_for

from flowpipe._proto.flow import flow_pb2
from flowpipe.app.ingest import ingest_files
from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.compact import compact_dataset
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.stored_flows import StoredFlows, uuid_words
from flowpipe.server import ObserverServer


def _stored(root: Path) -> tuple[int, int]:
    """Rows and distinct uuids (non-null) in the dataset's flows."""
    with duckdb.connect() as connection:
        rows, distinct = connection.execute(
            "SELECT count(*), count(DISTINCT uuid) FROM read_parquet(?)", [f"{root}/flows/**/*.parquet"]
        ).fetchone()
    return rows, distinct


def _jsonpb(flows: list[bytes]) -> str:
    lines = []
    for data in flows:
        flow = json_format.MessageToDict(flow_pb2.Flow.FromString(data), preserving_proto_field_name=True)
        lines.append(json.dumps({"flow": flow}))
    return "\n".join(lines) + "\n"


def _ingest(runner: CliRunner, *args: str, input: str | None = None) -> str:
    result = runner.invoke(cli, ["ingest", *args], input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_uuid_words_are_the_uuids_128_bits_and_other_text_is_hashed_apart() -> None:
    values = [str(uuid_module.UUID(int=n * 0x1F2E3D4C5B6A79880123456789ABCDEF)) for n in range(1, 6)]
    high, low = uuid_words(pa.array(values + [values[0].upper(), "not-a-uuid", "also not one"]))
    for index, text in enumerate(values):
        number = int(text.replace("-", ""), 16)
        assert (int(high[index]), int(low[index])) == (number >> 64, number & (2**64 - 1))
    assert (high[5], low[5]) == (high[0], low[0]), "the same uuid in capitals"
    assert len({(int(h), int(lo)) for h, lo in zip(high, low, strict=True)}) == 7


def test_overlapping_real_capture_files_store_each_flow_once(hubble_captures: Path, tmp_path: Path) -> None:
    lines = (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text().splitlines()
    expected = {json.loads(line)["flow"]["uuid"] for line in lines}
    assert len(expected) == len(lines) == 60, "every flow of this capture has its own uuid"
    first, second, cut = tmp_path / "first.json", tmp_path / "second.json", tmp_path / "dropped.json"
    first.write_text("\n".join(lines[:40]) + "\n")
    second.write_text("\n".join(lines[25:]) + "\n")  # overlaps lines 26..40
    cut.write_text("\n".join(line for line in lines if '"DROPPED"' in line) + "\n")
    data = tmp_path / "data"
    runner = CliRunner()
    out = _ingest(runner, str(first), "--dataset", str(data))
    assert "already stored" not in out
    out = _ingest(runner, str(second), "--dataset", str(data))
    assert "flows ingested: 20 " in out and "already stored: 15 flows were in the dataset already" in out
    out = _ingest(runner, str(cut), "--dataset", str(data))
    assert "flows ingested: 0 " in out and "already stored: 2 flows" in out
    out = _ingest(runner, "-", "--dataset", str(data), input="\n".join(reversed(lines)) + "\n")
    assert "flows ingested: 0 " in out and "already stored: 60 flows" in out
    assert _stored(data) == (60, 60)
    with duckdb.connect() as connection:
        stored = connection.execute(
            "SELECT uuid FROM read_parquet(?)", [f"{data}/flows/**/*.parquet"]
        ).fetchall()
    assert {row[0] for row in stored} == expected


def test_flows_without_uuid_keep_the_line_checkpoint_rule(hubble_captures: Path, tmp_path: Path) -> None:
    # kind-bookinfo has no uuids; 57 lines repeat across its four files: each line is a flow, as before.
    files = sorted((hubble_captures / "kind-bookinfo").glob("*.json"))
    lines = [line for path in files for line in path.read_text().splitlines() if line.strip()]
    assert not any('"uuid"' in line for line in lines)
    assert len(lines) - len(set(lines)) == 57
    data = tmp_path / "data"
    result = ingest_files(files, ParquetSinkConfig(path=str(data)))
    assert result.flows_already_stored == 0
    assert _stored(data)[0] == result.pipeline.flows == len(lines)
    again = ingest_files(files, ParquetSinkConfig(path=str(data)))  # the same files: the checkpoint
    assert again.pipeline.flows == 0 and again.lines_already_ingested == len(lines)


def test_a_flow_repeated_within_one_input_is_stored_once(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes()[:300])
    text = _jsonpb(flows + flows[100:150])
    path = tmp_path / "twice.json"
    path.write_text(text)
    result = ingest_files([path], ParquetSinkConfig(path=str(tmp_path / "data"), max_batch_rows=64))
    assert result.pipeline.flows == 300 and result.flows_already_stored == 50
    assert result.lines_read == 350
    assert _stored(tmp_path / "data") == (300, 300)


def test_compaction_between_two_ingests_and_under_a_running_check(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes()[:2000])
    root = tmp_path / "data"
    for index, part in enumerate((flows[:800], flows[600:1400])):
        path = tmp_path / f"part{index}.json"
        path.write_text(_jsonpb(part))
        ingest_files([path], ParquetSinkConfig(path=str(root), max_batch_rows=100))
    assert _stored(root) == (1400, 1400)
    dataset = Dataset(str(root))
    stored = StoredFlows(dataset, refresh_seconds=0.0)
    table = _table(tmp_path, flows[1000:1200])
    kept, repeats = stored.new_rows(table)
    assert (kept.num_rows, repeats) == (0, 200)
    files_read = stored.files_read
    report = compact_dataset(dataset, grace_seconds=0.0, clock=lambda: datetime(2100, 1, 1, tzinfo=UTC))
    assert report.files_merged > 1
    kept, repeats = stored.new_rows(_table(tmp_path, flows[1200:1600]))
    assert (kept.num_rows, repeats) == (200, 200)
    assert stored.files_read == files_read, "a compacted file of files already read is not read again"
    # a new reader sees the compacted files only, with the same flows
    kept, repeats = StoredFlows(dataset).new_rows(_table(tmp_path, flows))
    assert (kept.num_rows, repeats) == (600, 1400)
    path = tmp_path / "all.json"
    path.write_text(_jsonpb(flows))
    ingest_files([path], ParquetSinkConfig(path=str(root)))
    assert _stored(root) == (2000, 2000)


def _table(tmp_path: Path, flows: list[bytes]) -> pa.Table:
    """Flow rows as the file source decodes them."""
    from flowpipe.sources.file import read_events

    path = tmp_path / "rows.json"
    path.write_text(_jsonpb(flows))
    return pa.concat_tables([batch.flows for batch in read_events([path]) if batch.flows.num_rows])


def test_a_small_cache_forgets_hours_and_reads_them_again(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes(count=3000, duration_seconds=4 * 3600.0))
    root = tmp_path / "data"
    path = tmp_path / "flows.json"
    path.write_text(_jsonpb(flows[:2000]))
    ingest_files([path], ParquetSinkConfig(path=str(root)))
    table = _table(tmp_path, flows)
    hours = {value.replace(minute=0, second=0, microsecond=0) for value in table.column("time").to_pylist()}
    assert len(hours) >= 3
    stored = StoredFlows(Dataset(str(root)), max_keys=300, unflushed_rows=0)
    total = 0
    for offset in range(0, table.num_rows, 250):
        _, repeats = stored.new_rows(table.slice(offset, 250))
        total += repeats
        assert len(list(stored)) <= 2, "only the hours of the batch are kept past the bound"
    assert total == 2000
    _, repeats = stored.new_rows(table)  # forgotten hours are read again from the files
    assert repeats >= 2000


def test_files_other_writers_add_are_read_at_the_next_listing_and_own_files_are_not(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes()[:900])
    root = tmp_path / "data"
    now = [0.0]
    stored = StoredFlows(Dataset(str(root)), own_writer_id="me", refresh_seconds=30.0, clock=lambda: now[0])
    kept, _ = stored.new_rows(_table(tmp_path, flows[:300]))
    assert kept.num_rows == 300
    for name, part in (("me", flows[:300]), ("other", flows[300:600])):
        path = tmp_path / f"{name}.json"
        path.write_text(_jsonpb(part))
        ingest_files([path], ParquetSinkConfig(path=str(root), writer_id=name))
    _, repeats = stored.new_rows(_table(tmp_path, flows[300:301]))
    assert repeats == 0, "the hour was listed less than refresh_seconds ago"
    now[0] = 31.0
    files_read = stored.files_read
    _, repeats = stored.new_rows(_table(tmp_path, flows[600:900] + flows[301:600]))
    assert repeats == 299 and stored.files_read == files_read + 1, "the other writer's file, not our own"


@pytest.mark.timeout(120)
def test_collect_skips_flows_an_ingest_stored_and_ingest_those_collect_stored(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes()[:1500])
    path = tmp_path / "capture.json"
    path.write_text(_jsonpb(flows[:600]))
    ingest_files([path], ParquetSinkConfig(path=str(tmp_path)))
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows[:1200])
        with background_collect(fast_collect_config(server.address, tmp_path)) as run:
            wait_for(lambda: len(dataset_uuids(tmp_path)) >= 1200, what="the relay's flows")
            result = run.stop()
    assert result.repeats_skipped >= 600
    path.write_text(_jsonpb(flows))  # the capture grew: its first lines are known to the file checkpoint
    later = ingest_files([path], ParquetSinkConfig(path=str(tmp_path)))
    assert later.lines_already_ingested == 600
    assert later.pipeline.flows == 300 and later.flows_already_stored == 600, "collect stored those"
    written = dataset_uuids(tmp_path)
    assert len(written) == len(set(written)) and sorted(written) == sorted(uuids_of(flows))


def test_a_simulated_capture_in_overlapping_files_is_stored_once(tmp_path: Path) -> None:
    folder, truth_path, data = tmp_path / "capture", tmp_path / "truth.json", tmp_path / "data"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["simulate", "--out", str(folder), "--split", "4", "--duration", "90s", "--rate", "100",
         "--start", "2024-01-01T00:00:00", "--ground-truth", str(truth_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    truth = json.loads(truth_path.read_text())
    files = truth["capture_files"]
    assert sorted(files["files"]) == ["capture-1.json", "capture-2.json", "capture-3.json", "capture-4.json",
                                      "dropped.json"]  # fmt: skip
    assert sum(files["files"].values()) == files["distinct_flows"] + files["repeated_lines"]
    assert (
        files["distinct_flows"] == truth["totals"]["flows"]
        and files["repeated_lines"] > files["files"]["dropped.json"]
    )
    out = _ingest(runner, str(folder), "--dataset", str(data))
    assert f"already stored: {files['repeated_lines']:,} flows" in out
    assert _stored(data) == (truth["totals"]["flows"], truth["totals"]["flows"])
    with duckdb.connect() as connection:
        (dropped,) = connection.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE verdict = 'DROPPED'", [f"{data}/flows/**/*.parquet"]
        ).fetchone()
    assert dropped == truth["totals"]["dropped"]
    bad = runner.invoke(cli, ["simulate", "--out", "-", "--split", "2", "--duration", "10s"])
    assert bad.exit_code == 2 and "give --out a folder" in bad.output


def test_a_compaction_between_listing_and_reading_is_read_again(tmp_path: Path) -> None:
    flows = list(sim_flow_bytes()[:600])
    root = tmp_path / "data"
    for index, part in enumerate((flows[:300], flows[300:])):
        path = tmp_path / f"part{index}.json"
        path.write_text(_jsonpb(part))
        ingest_files([path], ParquetSinkConfig(path=str(root)))

    class CompactedAfterListing(Dataset):
        """The dataset, compacted right after the first listing of a partition (before its files are read)."""

        compacted = False

        def list_part_files(self, table: str, partition: object = None) -> list[str]:
            paths = super().list_part_files(table, partition)  # type: ignore[arg-type]
            if not self.compacted:
                self.compacted = True
                report = compact_dataset(Dataset(str(root)), grace_seconds=0.0,
                                         clock=lambda: datetime(2100, 1, 1, tzinfo=UTC))  # fmt: skip
                assert report.files_merged >= 2
            return paths

    stored = StoredFlows(CompactedAfterListing(str(root)))
    kept, repeats = stored.new_rows(_table(tmp_path, flows))
    assert (kept.num_rows, repeats) == (0, 600)

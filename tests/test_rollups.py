"""Edge rollups: every edge question answers the same from rollups as from flows, on simulated and real
traffic, split over many part files, hours and clusters; a writer killed between a flow file and its rollup
counts every flow once after its restart; retention keeps rollups apart; `flowpipe rollup --rebuild`."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.collect import sim_flow_bytes, start_collector
from support.processes import stop_process
from support.rollups import (
    EDGE_QUESTIONS,
    PRIVILEGE,
    answers,
    rollup_names,
    simulated,
    write,
)
from support.s3 import fresh_bucket
from support.wait import wait_until

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import KILL_AT_VARIABLE, Dataset
from flowpipe.dataset.rollups import (
    EDGE_DAYS_TABLE,
    EDGE_HOURS_TABLE,
    EDGE_IDENTITIES_TABLE,
    EDGES_TABLE,
    PRIVILEGE_DAYS_TABLE,
    PRIVILEGE_HOURS_TABLE,
)
from flowpipe.dataset.rollups.read import coverage, privilege_coverage
from flowpipe.model import EventBatch
from flowpipe.query.engine import open_engine
from flowpipe.server import ObserverServer
from flowpipe.sinks.parquet import ParquetSink


def test_rollups_written_beside_every_flow_file(two_clusters: Path) -> None:
    dataset = Dataset(two_clusters)
    flows = [p.split("/flows/", 1)[1] for p in dataset.list_part_files("flows")]
    assert len(flows) > 8
    for table in (EDGES_TABLE, EDGE_IDENTITIES_TABLE):
        assert [p.split(f"/{table}/", 1)[1] for p in dataset.list_part_files(table)] == flows
    cover = coverage(dataset)
    assert [h.hour for h in cover.hours] == [9, 10]
    assert cover.uncovered == []


def test_a_writers_rollup_from_memory_equals_the_one_read_from_its_file(
    two_clusters: Path, tmp_path: Path
) -> None:
    import shutil

    import pyarrow.parquet as pq

    from flowpipe.dataset.rollups.build import build_rollup

    dataset = Dataset(two_clusters)
    copy = Dataset(shutil.copytree(two_clusters, tmp_path / "copy"))
    flow_files = dataset.list_part_files("flows")
    for path in flow_files:  # the writers built theirs from the flows they held; here from the file alone
        build_rollup(copy, copy.table_dir("flows") + path[len(dataset.table_dir("flows")) :])
    for table in (EDGES_TABLE, EDGE_IDENTITIES_TABLE):
        held, read = dataset.list_part_files(table), copy.list_part_files(table)
        assert len(held) == len(flow_files) == len(read)
        for one, other in zip(held, read, strict=True):
            # the same rows (rows that tie on the sort keys come in any order)
            assert sorted(map(repr, pq.read_table(one).to_pylist())) == sorted(
                map(repr, pq.read_table(other).to_pylist())
            ), one


def test_rollups_are_read_in_a_locked_engine_that_reads_nothing_else(
    two_clusters: Path, tmp_path: Path
) -> None:
    from flowpipe.errors import QueryError

    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    with open_engine(two_clusters, source="edges") as engine:
        # DuckDB reads the local rollup files itself: they, and nothing else, are readable
        assert engine.run("SELECT count(*) AS n FROM connections").column("n")[0].as_py() > 100
        with pytest.raises(QueryError) as refused:
            engine.run(f"SELECT * FROM read_csv('{secret}')")
        assert "hunter2" not in str(refused.value)


def test_off_by_default_and_auto_reads_the_flows(tmp_path: Path) -> None:
    """Writers build no rollups unless asked (their cost); `--source auto` then reads the flows, and compaction
    builds none for hours that had none."""
    from flowpipe.dataset.compact import compact_dataset

    assert ParquetSinkConfig(path=str(tmp_path)).edge_rollups is False
    table = simulated("east", seed=9, duration=1200, rate=6.0)
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="plain", max_batch_rows=1_000))
    for offset in range(0, table.num_rows, 500):
        sink.write(EventBatch(flows=table.slice(offset, 500)))
    sink.close()
    dataset = Dataset(tmp_path)
    assert len(dataset.list_part_files("flows")) > 2
    assert dataset.list_part_files(EDGES_TABLE) == [] and coverage(dataset).hours == []
    raw = answers(tmp_path, "flows")
    assert raw["observed_edges"]
    assert answers(tmp_path, "auto") == raw
    assert compact_dataset(dataset, grace_seconds=0).files_written
    assert dataset.list_part_files(EDGES_TABLE) == []
    assert answers(tmp_path, "auto") == raw


def test_every_edge_question_equal_from_rollups(two_clusters: Path) -> None:
    raw = answers(two_clusters, "flows")
    assert all(raw[name] for name in ("observed_edges", "new_connections", "top_talkers"))
    assert answers(two_clusters, "edges") == raw
    assert answers(two_clusters, "auto") == raw


def test_equal_over_windows_and_filters(two_clusters: Path) -> None:
    for values in (
        {"since": "2024-05-01T10:00:00Z", "until": "2024-05-01T10:30:00Z"},
        {"since": "2024-05-01T09:50:00Z", "until": "2024-05-01T10:05:00Z", "cluster": "west"},
        {
            "since": "2024-05-01T09:00:00Z",
            "until": "2024-05-01T11:00:00Z",
            "baseline_since": "2024-05-01T09:00:00Z",
        },
    ):
        raw = answers(two_clusters, "flows", **values)
        assert answers(two_clusters, "auto", **values) == raw, values


def test_equal_on_real_captures(capture_files: list[Path], tmp_path: Path) -> None:
    """Real captures (labels-only pods, both ends on other nodes, socket-LB events), in part files of 150 flows:
    a pod named by its identity in one part file and known only by identity in another is one workload."""
    from flowpipe.app.ingest import ingest_files

    config = ParquetSinkConfig(
        path=str(tmp_path), writer_id="captures", max_batch_rows=150, edge_rollups=True
    )
    result = ingest_files(capture_files, config)
    assert not result.skipped_by_reason, result.skipped_samples
    assert len(Dataset(tmp_path).list_part_files(EDGES_TABLE)) > 10
    raw = answers(tmp_path, "flows", limit=100000)
    assert raw["observed_edges"] and raw["new_connections"]
    assert answers(tmp_path, "edges", limit=100000) == raw
    assert answers(tmp_path, "auto", limit=100000) == raw
    # folded by hour and day: a pod known only by identity in every record of an hour is named when read
    from flowpipe.dataset.rollups.fold import fold_closed

    privilege = answers(tmp_path, "flows", PRIVILEGE, limit=100000)
    assert privilege["least_privilege"]
    hours, days = fold_closed(Dataset(tmp_path), now=datetime(2100, 1, 1, tzinfo=UTC))
    assert hours and days and coverage(Dataset(tmp_path)).days
    assert answers(tmp_path, "edges", limit=100000) == raw
    assert answers(tmp_path, "auto", limit=100000) == raw
    assert privilege_coverage(Dataset(tmp_path)).days
    assert answers(tmp_path, "edges", PRIVILEGE, limit=100000) == privilege
    assert answers(tmp_path, "auto", PRIVILEGE, limit=100000) == privilege


# -- object storage, and a collector killed between a flow file and its rollup ---------------------------------


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh dataset location: a local folder, or a prefix in a fresh bucket of the local S3 server."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    request.getfixturevalue("s3_endpoint")
    return fresh_bucket(request, "rollups")


def flow_count(where: str) -> int:
    if not Dataset(where).list_part_files("flows"):
        return 0
    with open_engine(where) as engine:
        return int(engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py())


def request_records(where: str, source: str) -> int:
    with open_engine(where, source=source) as engine:
        return int(engine.run("SELECT sum(records) AS n FROM edge_observations").column("n")[0].as_py())


def test_a_collector_killed_between_a_flow_file_and_its_rollup_counts_every_flow_once(
    where: str, tmp_path: Path
) -> None:
    flows = sim_flow_bytes()[:1500]
    log = tmp_path / "collect.log"
    args = ["--relay", "", "--dataset", where, "--metrics-address", "off", "--max-batch-rows", "400", "--edge-rollups",
            "--reconnect-backoff-initial-seconds", "0.05", "--flush-interval-seconds", "0.05"]  # fmt: skip
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        args[1] = server.address
        killed = start_collector(args, log, env={KILL_AT_VARIABLE: "rollup:before@2"})
        try:
            assert killed.wait(120) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            stop_process(killed, signal.SIGKILL)
        published, rolled_up = rollup_names(where)
        # killed after publishing flow files, before the rollup of the second of them
        assert len(rolled_up) == 1 and set(rolled_up) < set(published)
        # meanwhile the hour of the file without a rollup is read from flows: the same answer
        assert request_records(where, "auto") == request_records(where, "flows")
        restarted = start_collector(args, log)
        try:
            wait_until(
                lambda: log.read_text().count("following hubble-relay") == 2, what="the restarted collector"
            )
            wait_until(lambda: flow_count(where) >= len(flows), what="every flow after the restart")
        finally:
            assert stop_process(restarted) == 0, log.read_text()[-3000:]
    published, rolled_up = rollup_names(where)
    assert rolled_up == published  # the restart wrote the dead writer's missing rollup
    assert flow_count(where) == len(flows)
    assert coverage(Dataset(where)).uncovered == []
    every = request_records(where, "flows")
    assert request_records(where, "edges") == every  # every flow counted once in the rollups
    raw = answers(where, "flows")
    assert answers(where, "edges") == raw
    from flowpipe.dataset.rollups.fold import fold_closed

    hours, _ = fold_closed(Dataset(where), now=datetime(2100, 1, 1, tzinfo=UTC))
    assert hours and len(coverage(Dataset(where)).folded) == len(hours)
    assert answers(where, "edges") == raw  # folded on the object store too
    assert len(privilege_coverage(Dataset(where)).folded) == len(hours)
    assert answers(where, "edges", PRIVILEGE) == answers(where, "flows", PRIVILEGE)


# -- rebuild, compaction, retention -----------------------------------------------------------------------------


def test_rebuild_compaction_and_separate_retention(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flowpipe.cli import cli
    from flowpipe.dataset.compact import compact_dataset
    from flowpipe.dataset.retention import apply_retention

    root = tmp_path / "dataset"
    write(root, simulated("east", seed=7, duration=1800, rate=8.0), writer="old", rows=2_000, rollups=False)
    dataset = Dataset(root)
    assert dataset.list_part_files(EDGES_TABLE) == [] and coverage(dataset).hours == []
    raw = answers(root, "flows")
    every = {**raw, **answers(root, "flows", PRIVILEGE)}
    assert every["least_privilege"]
    assert answers(root, "auto") == raw  # no rollups yet: auto reads the flows

    result = CliRunner().invoke(cli, ["rollup", "--dataset", str(root)])  # written before rollups existed
    assert result.exit_code == 0, result.output
    flows, edges = rollup_names(str(root))
    assert edges == flows and "rollups written from" in result.output
    assert answers(root, "edges") == raw

    result = CliRunner().invoke(
        cli, ["rollup", "--dataset", str(root), "--rebuild", "--since", "2024-05-01T10:00:00Z"]
    )
    assert result.exit_code == 0, result.output
    assert 0 < result.output.count("hour=10/") < len(flows)  # only the hours ending after --since
    assert answers(root, "edges") == raw

    compacted = compact_dataset(dataset, grace_seconds=0)
    assert compacted.files_written
    flows, edges = rollup_names(str(root))
    assert edges == flows and all("compacted-" in name for name in flows)  # the inputs' rollups went
    assert answers(root, "edges") == raw

    # the raw flows of 09:00-10:00 go, their rollups stay (the CLI: --keep-edges)
    keep = datetime.now(UTC) - datetime(2024, 5, 1, 10, 5, tzinfo=UTC)
    args = [
        "retention",
        "--dataset",
        str(root),
        "--keep",
        f"{int(keep.total_seconds())}s",
        "--keep-edges",
        "36500d",
    ]
    result = CliRunner().invoke(cli, [*args, "--apply"])
    assert result.exit_code == 0, result.output
    assert all("hour=10/" in p for p in dataset.list_part_files("flows"))
    # the hour whose flows went is answered by its folded rows: its per-file rollups went too
    assert not any("hour=09/" in p for p in dataset.list_part_files(EDGES_TABLE))
    assert any("hour=09/" in p for p in dataset.list_part_files(EDGE_HOURS_TABLE))
    assert any("hour=09/" in p for p in dataset.list_part_files(EDGE_IDENTITIES_TABLE))
    assert any("hour=09/" in p for p in dataset.list_part_files(PRIVILEGE_HOURS_TABLE))
    assert answers(root, "auto", (*EDGE_QUESTIONS, *PRIVILEGE)) == every
    since = ["--since", "2024-05-01T09:00:00Z", "--until", "2024-05-01T11:00:00Z"]
    result = CliRunner().invoke(cli, ["query", "drops_by_reason", "--dataset", str(root), *since])
    assert result.exit_code == 0, result.output
    assert (
        "drops_by_reason reads raw flows, which this dataset keeps from 2024-05-01 10:00Z only"
        in result.output
    )
    result = CliRunner().invoke(
        cli, ["query", "observed_edges", "--dataset", str(root), *since, "--format", "json"]
    )
    assert result.exit_code == 0 and "reads raw flows" not in result.output
    result = CliRunner().invoke(cli, ["query", "least_privilege", "--dataset", str(root), *since])
    assert result.exit_code == 0 and "reads raw flows" not in result.output
    # edge rollups folded before privilege rollups existed: least_privilege says what it cannot see
    import shutil

    older = Path(shutil.copytree(root, tmp_path / "older"))
    shutil.rmtree(older / PRIVILEGE_HOURS_TABLE / "date=2024-05-01" / "hour=09")
    result = CliRunner().invoke(cli, ["query", "least_privilege", "--dataset", str(older), *since])
    assert result.exit_code == 0, result.output
    assert (
        "least_privilege reads raw flows and privilege rollups, which this dataset keeps from 2024-05-01 10:00Z"
        in result.output
    )

    apply_retention(dataset, timedelta(days=1), keep_edges=timedelta(days=36500))
    assert dataset.list_part_files("flows") == []
    # raw flows gone: the rollups answer alone
    assert answers(root, "auto", (*EDGE_QUESTIONS, *PRIVILEGE)) == every
    report = apply_retention(dataset, timedelta(days=1), keep_edges=timedelta(days=1))
    assert {p.table for p in report.partitions} == {
        EDGE_IDENTITIES_TABLE,
        EDGE_HOURS_TABLE,
        EDGE_DAYS_TABLE,
        PRIVILEGE_HOURS_TABLE,
        PRIVILEGE_DAYS_TABLE,
    }
    assert dataset.list_part_files(EDGES_TABLE) == dataset.list_part_files(EDGE_HOURS_TABLE) == []
    assert dataset.list_part_files(EDGE_DAYS_TABLE) == dataset.list_part_files(PRIVILEGE_HOURS_TABLE) == []


def test_suggest_equal_from_rollups(two_clusters: Path) -> None:
    from flowpipe.app.suggest import SuggestConfig, suggest_policies

    def drafts(source: str) -> list[tuple[str, str]]:
        with open_engine(two_clusters, source=source) as engine:
            suggestion = suggest_policies(
                engine,
                SuggestConfig(cluster="west", since="2024-05-01T09:00:00Z", until="2024-05-01T11:00:00Z"),
            )
        assert suggestion.edges and suggestion.files
        return [(str(f.path), f.text) for f in suggestion.files]

    assert drafts("edges") == drafts("flows")

"""The background builder of edge rollups: a writer hands over the files it published and goes on; the
rollups are built at the lowest CPU priority, a stop leaves the rest to the next start, and nothing is
counted twice."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import pytest
from support.flowdata import flows_table, synthetic_flows, write_dataset
from support.wait import wait_until

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.rollups import EDGES_TABLE
from flowpipe.dataset.rollups.build import RollupBuilder
from flowpipe.model import EventBatch
from flowpipe.sinks.parquet import ParquetSink


def rollup_names(dataset: Dataset) -> set[str]:
    return {p.rpartition("/")[2] for p in dataset.list_part_files(EDGES_TABLE)}


def flow_names(dataset: Dataset) -> set[str]:
    return {p.rpartition("/")[2] for p in dataset.list_part_files("flows")}


def test_a_sink_builds_the_rollups_of_what_it_published_by_the_time_it_is_closed(tmp_path: Path) -> None:
    sink = ParquetSink(
        ParquetSinkConfig(path=str(tmp_path), writer_id="w1", max_batch_rows=50, edge_rollups=True)
    )
    flows = flows_table(synthetic_flows(400))
    for offset in range(0, flows.num_rows, 50):
        sink.write(EventBatch(flows=flows.slice(offset, 50)))
    sink.close()
    dataset = Dataset(tmp_path)
    assert len(flow_names(dataset)) >= 8 and rollup_names(dataset) == flow_names(dataset)
    assert sink.rollups_waiting == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_the_builder_runs_at_the_lowest_priority(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_flows(200), batch_rows=50)
    dataset = Dataset(tmp_path)
    builder = RollupBuilder(dataset)
    seen: list[int] = []
    original = builder._build

    def build(path: str, held: object) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        original(path, held)  # type: ignore[arg-type]

    builder._build = build  # type: ignore[method-assign]
    builder.submit(dataset.list_part_files("flows"))
    wait_until(lambda: seen, what="the builder thread's first rollup", timeout=300)
    assert builder.close() == 0  # the rest built here, at the caller's priority
    assert seen[0] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the writer's own is untouched
    assert rollup_names(dataset) == flow_names(dataset)


def test_a_builder_stopped_early_leaves_the_rest_to_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_dataset(tmp_path, synthetic_flows(320), batch_rows=40)
    dataset = Dataset(tmp_path)
    published = dataset.list_part_files("flows")
    release = threading.Event()
    builder = RollupBuilder(dataset)
    original = builder._build

    def slow(path: str, held: object) -> None:
        release.wait(10)
        original(path, held)  # type: ignore[arg-type]

    builder._build = slow  # type: ignore[method-assign]
    builder.submit(published)
    threading.Timer(0.3, release.set).start()
    with caplog.at_level(logging.WARNING):
        # builds one itself, past the deadline, and waits for the one the thread is building (which may have
        # taken another meanwhile), not for the rest
        left = builder.close(timeout=0.05)
    assert len(published) > 8 and len(published) // 2 < left <= len(published) - 2
    assert "not built before stopping" in caplog.text and len(rollup_names(dataset)) == len(published) - left
    # the next start of that writer builds what is missing (its flow files carry its writer id)
    from flowpipe.dataset.rollups.build import repair_writers

    repair_writers(dataset, ["test"])
    assert rollup_names(dataset) == flow_names(dataset)


def test_a_flow_file_compacted_away_before_its_turn_is_skipped(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_flows(100), batch_rows=50)
    dataset = Dataset(tmp_path)
    builder = RollupBuilder(dataset)
    gone = dataset.list_part_files("flows")[0]
    Path(gone).unlink()
    builder.submit([gone, *dataset.list_part_files("flows")])
    assert builder.close() == 0 and builder.built == len(flow_names(dataset))


def test_a_part_larger_than_the_builder_holds_is_not_kept_in_memory_and_is_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink keeps an open part's flows for its rollup only while the part is small enough to be built from
    memory (`RollupBuilder.HELD_ROWS`); a larger part holds none, and its rollup is built from its file, with the
    rows of the one built from memory."""
    import pyarrow.parquet as pq

    from flowpipe.dataset.rollups.build import build_rollup

    monkeypatch.setattr(RollupBuilder, "HELD_ROWS", 120)
    sink = ParquetSink(
        ParquetSinkConfig(
            path=str(tmp_path / "large"),
            writer_id="w1",
            max_batch_rows=100_000,
            row_group_bytes=1,
            edge_rollups=True,
        )
    )
    flows = flows_table(synthetic_flows(400))
    held_rows = []
    for offset in range(0, flows.num_rows, 40):
        sink.write(EventBatch(flows=flows.slice(offset, 40)))
        held_rows.append(
            max((sum(t.num_rows for t in part.tables) for part in sink._parts.values()), default=0)
        )
    assert 0 < max(held_rows) <= 120 and held_rows[-1] == 0  # the parts outgrew what is held: nothing held
    handed: list[object] = []
    original = sink._rollups._build  # type: ignore[union-attr]

    def build(path: str, held: object) -> None:
        handed.append(held)
        original(path, held)  # type: ignore[arg-type]

    sink._rollups._build = build  # type: ignore[method-assign, union-attr]
    sink.close()
    dataset = Dataset(tmp_path / "large")
    assert handed and all(h is None for h in handed)  # every part read back
    assert rollup_names(dataset) == flow_names(dataset)
    # The same rows as from memory: each file's flows, summarised as a writer holding them would.
    for path in dataset.list_part_files("flows"):
        copy = Dataset(tmp_path / "memory")
        target = copy.table_dir("flows") + path[len(dataset.table_dir("flows")) :]
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(Path(path).read_bytes())
        rollup = build_rollup(copy, target, flows=pq.read_table(path))
        stored = dataset.table_dir(EDGES_TABLE) + path[len(dataset.table_dir("flows")) :]
        assert sorted(map(repr, pq.read_table(rollup).to_pylist())) == sorted(
            map(repr, pq.read_table(stored).to_pylist())
        )


def test_one_summariser_for_many_files_gives_each_files_own_rollup(tmp_path: Path) -> None:
    """A summariser keeps its views from file to file (they are created again when the fallback regions the
    flows need change): each file's rows are those of a summariser of its own, whatever came before."""
    import duckdb

    from flowpipe.dataset.rollups.build import Summariser, summarise
    from flowpipe.query.views import undescribed_sql

    flows = flows_table(synthetic_flows(600))
    con = duckdb.connect()
    con.register("f", flows)
    undescribed = f"({undescribed_sql('source')}) OR ({undescribed_sql('destination')})"
    # the same flows as Cilium describes them: every pod with its workload, every other end a reserved identity
    described = con.sql(
        "SELECT * REPLACE ("
        + ", ".join(
            f"CASE WHEN {side}_namespace IS NOT NULL THEN coalesce({side}_workload_name, 'w') END"
            f" AS {side}_workload_name, CASE WHEN {side}_namespace IS NOT NULL THEN 4242 ELSE 2 END"
            f" AS {side}_identity"
            for side in ("source", "destination")
        )
        + ") FROM f"
    ).to_arrow_table()
    needing = f"SELECT count(*) FROM {{}} WHERE {undescribed}"
    con.register("d", described)
    assert con.sql(needing.format("f")).fetchall()[0][0] > 0 == con.sql(needing.format("d")).fetchall()[0][0]
    write_dataset(tmp_path / "all", synthetic_flows(600), batch_rows=150)
    files = sorted(Dataset(tmp_path / "all").list_part_files("flows"))
    # described flows first (views without the fallbacks), twice in a row (the views kept), then flows that need
    # them (created again), files, and back
    sources: list[object] = [
        described.slice(0, 200),
        described,
        flows.slice(0, 300),
        [files[0]],
        described.slice(100, 300),
        files[1:],
        flows,
    ]

    def canonical(rows: tuple[object, object]) -> list[list[str]]:
        return [sorted(map(repr, table.to_pylist())) for table in rows]  # type: ignore[attr-defined]

    with Summariser() as summariser:
        for source in sources:
            assert canonical(summariser.summarise(source)) == canonical(summarise(source))  # type: ignore[arg-type]

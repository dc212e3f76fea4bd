"""Edge rollups: every edge question answers the same from rollups as from flows, on simulated and real
traffic, split over many part files, hours and clusters; a writer killed between a flow file and its rollup
counts every flow once after its restart; retention keeps rollups apart; `flowpipe rollup --rebuild`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset import Dataset
from flowpipe.model import EventBatch
from flowpipe.query import load_questions, run_question
from flowpipe.query.engine import open_engine
from flowpipe.rollups import EDGE_IDENTITIES_TABLE, EDGES_TABLE
from flowpipe.rollups.build import build_missing
from flowpipe.rollups.read import coverage
from flowpipe.sim import FAULT_NAMES, Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.normalize import normalize_flows

EDGE_QUESTIONS = ("observed_edges", "new_connections", "top_talkers", "cross_namespace", "world_egress")
ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}
START = datetime(2024, 5, 1, 9, 40, tzinfo=UTC)
"""Twenty minutes before an hour boundary: connections and both ends of one straddle it."""


def simulated(cluster: str, seed: int, *, duration: float = 2400.0, rate: float = 12.0) -> pa.Table:
    config = SimulatorConfig(
        seed=seed,
        start=START,
        duration_seconds=duration,
        rate_flows_per_second=rate,
        faults=frozenset(FAULT_NAMES),
        cluster_name=cluster,
    )
    return normalize_flows(list(Simulator(config).flows()))


def write(root: Path, table: pa.Table, *, writer: str, rows: int, rollups: bool = True) -> None:
    sink = ParquetSink(
        ParquetSinkConfig(path=str(root), writer_id=writer, max_batch_rows=rows, edge_rollups=rollups)
    )
    for offset in range(0, table.num_rows, rows // 2):
        sink.write(EventBatch(flows=table.slice(offset, rows // 2)))
    sink.close()


def answers(root: Path | str, source: str, questions: tuple[str, ...] = EDGE_QUESTIONS, **values: Any) -> dict[str, list[dict[str, Any]]]:
    catalog = load_questions()
    given = {**ALL_TIME, **values}
    out = {}
    with open_engine(root, source=source) as engine:
        for name in questions:
            question = catalog.question(name)
            params = {k: v for k, v in given.items() if k in {p.name for p in question.parameters}}
            # rows in a canonical order: questions leave ties (e.g. between clusters) in any order
            out[name] = sorted(run_question(engine, question, params).table.to_pylist(), key=repr)
    return out


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two clusters, two writers each, small part files (many per hour), over an hour boundary."""
    root = tmp_path_factory.mktemp("rollups-sim")
    for number, cluster in enumerate(("east", "west")):
        table = simulated(cluster, seed=40 + number)
        half = table.num_rows // 2
        # two collectors of one cluster interleave: the ends of one connection land in different part files
        write(root, table.take(list(range(0, table.num_rows, 2))), writer=f"{cluster}-a", rows=3_000)
        write(root, table.take(list(range(1, table.num_rows, 2))), writer=f"{cluster}-b", rows=5_000)
        assert half
    return root


def test_rollups_written_beside_every_flow_file(two_clusters: Path) -> None:
    dataset = Dataset(two_clusters)
    flows = [p.split("/flows/", 1)[1] for p in dataset.list_part_files("flows")]
    assert len(flows) > 8
    for table in (EDGES_TABLE, EDGE_IDENTITIES_TABLE):
        assert [p.split(f"/{table}/", 1)[1] for p in dataset.list_part_files(table)] == flows
    cover = coverage(dataset)
    assert [h.hour for h in cover.hours] == [9, 10]
    assert cover.uncovered == []


def test_every_edge_question_equal_from_rollups(two_clusters: Path) -> None:
    raw = answers(two_clusters, "flows")
    assert all(raw[name] for name in ("observed_edges", "new_connections", "top_talkers"))
    assert answers(two_clusters, "edges") == raw
    assert answers(two_clusters, "auto") == raw


def test_equal_over_windows_and_filters(two_clusters: Path) -> None:
    for values in (
        {"since": "2024-05-01T10:00:00Z", "until": "2024-05-01T10:30:00Z"},
        {"since": "2024-05-01T09:50:00Z", "until": "2024-05-01T10:05:00Z", "cluster": "west"},
        {"since": "2024-05-01T09:00:00Z", "until": "2024-05-01T11:00:00Z", "baseline_since": "2024-05-01T09:00:00Z"},
    ):
        raw = answers(two_clusters, "flows", **values)
        assert answers(two_clusters, "auto", **values) == raw, values

"""Test helpers for edge rollups: simulated traffic of two clusters over an hour boundary, written through the
Parquet sink with rollups, and the edge questions' answers from any source."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.rollups import EDGES_TABLE
from flowpipe.model import EventBatch
from flowpipe.query import load_questions, run_question
from flowpipe.query.engine import open_engine
from flowpipe.sim import FAULT_NAMES, Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.normalize import normalize_flows

EDGE_QUESTIONS = ("observed_edges", "new_connections", "top_talkers", "cross_namespace", "world_egress")
PRIVILEGE = ("least_privilege",)
"""Answered from folded privilege records (hours and days), which only folding writes."""
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


def answers(
    root: Path | str, source: str, questions: tuple[str, ...] = EDGE_QUESTIONS, **values: Any
) -> dict[str, list[dict[str, Any]]]:
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


def write_two_clusters(root: Path) -> Path:
    """Two clusters, two writers each, small part files (many per hour), over an hour boundary, into `root`."""
    for number, cluster in enumerate(("east", "west")):
        table = simulated(cluster, seed=40 + number)
        # two collectors of one cluster interleave: the ends of one connection land in different part files
        write(root, table.take(list(range(0, table.num_rows, 2))), writer=f"{cluster}-a", rows=3_000)
        write(root, table.take(list(range(1, table.num_rows, 2))), writer=f"{cluster}-b", rows=5_000)
    return root


def rollup_names(where: str) -> tuple[list[str], list[str]]:
    """The part files of `flows` and of `edges` in the dataset at `where`, relative to their tables."""
    dataset = Dataset(where)
    flows = [p.split("/flows/", 1)[1] for p in dataset.list_part_files("flows")]
    edges = [p.split(f"/{EDGES_TABLE}/", 1)[1] for p in dataset.list_part_files(EDGES_TABLE)]
    return flows, edges

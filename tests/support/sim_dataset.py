"""Small simulated datasets for question tests: simulator flows, normalized, written by the real ParquetSink."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from flowpipe.config import ParquetSinkConfig
from flowpipe.model import EventBatch
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.query.catalog import Catalog
from flowpipe.sim import FAULT_NAMES, GroundTruth, Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.from_proto import decode_messages

SEED = 3
DURATION_SECONDS = 600.0
RATE_FLOWS_PER_SECOND = 50.0
"""About 30,000 flows: every fault emits a few dozen flows, and the suite stays fast."""

ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


@dataclass
class SimDataset:
    """A simulated run written as a dataset: where it is, what the simulator says it emitted, and its rows."""

    root: Path
    simulator: Simulator
    truth: GroundTruth
    table: pa.Table
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def start(self) -> datetime:
        """The simulated start time."""
        return self.simulator.config.start

    def at(self, fraction: float) -> datetime:
        """The moment `fraction` of the way through the simulated duration."""
        return self.simulator.config.start + (self.end - self.start) * fraction

    @property
    def end(self) -> datetime:
        """The simulated end time."""
        return datetime.fromisoformat(self.truth.end)

    def rows(self) -> list[dict[str, Any]]:
        """Every flow row as written (for expectations computed independently of the SQL); built once."""
        if self._rows is None:
            self._rows = self.table.to_pylist()
        return self._rows

    def ask(self, question: str, **values: object) -> list[dict[str, Any]]:
        """Run a shipped question over the whole dataset (or the window given) and return its rows."""
        with DuckDBEngine(self.root) as engine:
            return ask(engine, question, **values)


_CATALOG: Catalog | None = None


def ask(engine: DuckDBEngine, question: str, **values: object) -> list[dict[str, Any]]:
    """Run a shipped question on `engine` (all time unless `since`/`until` are given); its rows as dicts."""
    global _CATALOG
    if _CATALOG is None:
        _CATALOG = load_questions()
    given = {**ALL_TIME, **{key: value for key, value in values.items()}}
    return run_question(engine, _CATALOG.question(question), given).table.to_pylist()


def build_sim_dataset(root: Path, *, faults: bool, seed: int = SEED) -> SimDataset:
    """Simulate (all faults on, or none), decode the flows and write them with the ParquetSink at `root`."""
    config = SimulatorConfig(
        seed=seed,
        duration_seconds=DURATION_SECONDS,
        rate_flows_per_second=RATE_FLOWS_PER_SECOND,
        faults=frozenset(FAULT_NAMES) if faults else frozenset(),
    )
    simulator = Simulator(config)
    table = decode_messages([response for _, _, response in simulator.response_bytes()]).flows
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="sim", max_batch_rows=20_000))
    for batch in _batches(table, 8_000):
        sink.write(EventBatch(flows=batch))
    sink.close()
    return SimDataset(root=root, simulator=simulator, truth=simulator.ground_truth(), table=table)


def _batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for offset in range(0, table.num_rows, size):
        yield table.slice(offset, size)


def parse_time(text: str | None) -> pd.Timestamp | None:
    """An RFC 3339 time of the ground truth, to the nanosecond (query results hold pandas Timestamps)."""
    return None if text is None else pd.Timestamp(text)

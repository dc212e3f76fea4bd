"""Datasets of many small part files over several hours, as a collector flushing often leaves them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.model import EventBatch, LostEvent
from flowpipe.query import DuckDBEngine
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.from_proto import decode_messages

START = datetime(2024, 3, 1, 10, 30, tzinfo=UTC)
HOURS = 3.0
"""The simulated traffic spans 10:30 to 13:30: hours 10, 11 and 12 close, hour 13 is the newest."""
LAST_HOUR = datetime(2024, 3, 1, 13, tzinfo=UTC)


def simulated_flows(*, rate: float = 1.2, cluster_name: str = "default", seed: int = 5) -> pa.Table:
    """About 13,000 normalized flows of the simulator, every fault on, from `START` over `HOURS`."""
    config = SimulatorConfig(
        seed=seed,
        start=START,
        duration_seconds=HOURS * 3600,
        rate_flows_per_second=rate,
        cluster_name=cluster_name,
    )
    return decode_messages([response for _, _, response in Simulator(config).response_bytes()]).flows


def lost_events(count: int = 40) -> list[LostEvent]:
    """Hubble lost-event records spread over the same hours."""
    return [
        LostEvent(
            source="HUBBLE_RING_BUFFER",
            num_events_lost=index + 1,
            node_name=f"default/node-{index % 3}",
            time=START + timedelta(seconds=index * HOURS * 3600 / count),
        )
        for index in range(count)
    ]


def write_small_files(
    root: Path, flows: pa.Table, *, batch_rows: int = 250, writer_id: str = "small", lost: bool = True
) -> list[str]:
    """Write `flows` with the real ParquetSink, flushing every `batch_rows` flows; returns the part files."""
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id=writer_id, max_batch_rows=batch_rows))
    events = lost_events() if lost else []
    batches = range(0, flows.num_rows, batch_rows)
    for number, offset in enumerate(batches):
        mine = events[number :: len(batches)] if events else []
        sink.write(EventBatch(flows=flows.slice(offset, batch_rows), lost_events=mine))
        sink.flush()
    sink.close()
    return list(sink.files_written)


def sorted_rows(root: Path | str | Dataset, view: str = "flows", *extra: pa.Table) -> pa.Table:
    """Every row of a view (plus the rows of `extra` tables), sorted on every column: equal tables mean
    equal row multisets."""
    with DuckDBEngine(root if isinstance(root, Dataset) else str(root)) as engine:
        parts = [f"SELECT * FROM {view}"]
        for number, table in enumerate(extra):
            engine.connection.register(f"_extra_{number}", table)
            parts.append(f"SELECT * FROM _extra_{number}")
        return engine.run(f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY ALL")

"""The `questions_at_scale` section of `flowpipe bench`: every question over ten million simulated flows.

The dataset is the built-in simulator's cluster, all faults on: a run of up to a million flows over one simulated
hour is normalized once and written `SCALE_FACTOR` times over (each copy an hour later, so the dataset spans
consecutive hours as a real one does) through the real `ParquetSink`. With the default `--flows 1000000` that is
ten million flows; `--flows N` makes it `10 * N`. Each question then runs once over the whole span, and its
wall time is held against `TARGET_SECONDS`; its CPU time and the machine's load stand beside it, because a
shared machine slows wall time down without the code being any slower.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.bench.context import QUESTION_WINDOW, BenchContext, Figure, cpu_seconds

SECTION = "questions_at_scale"
SCALE_FACTOR = 10
"""Flows written = SCALE_FACTOR x `--flows`."""
TARGET_SECONDS = 3.0
BASE_FLOWS_MAX = 1_000_000
"""At most this many flows are simulated; the rest are time-shifted copies of them."""
SIMULATED_HOUR_SECONDS = 3600.0
_NORMALIZE_BATCH = 50_000


def simulated_flows(flows: int, *, seed: int) -> tuple[pa.Table, datetime]:
    """About `flows` simulated flows (all faults on) over one simulated hour, as flow rows; and the start."""
    from flowpipe.sim import DEFAULT_START

    return pa.concat_tables(simulated_batches(flows, seed=seed)), DEFAULT_START


def simulated_batches(
    flows: int,
    *,
    seed: int,
    start: datetime | None = None,
    duration_seconds: float = SIMULATED_HOUR_SECONDS,
    max_flows: int | None = None,
) -> Iterator[pa.Table]:
    """About `flows` simulated flows (all faults on, at most `max_flows`) over `duration_seconds` from `start`
    (the simulator's default), as flow rows in time order, `_NORMALIZE_BATCH` at a time: the same arguments give
    the same batches, and only one is held at a time, so any number of flows can be written."""
    from flowpipe.sim import DEFAULT_START, Simulator, SimulatorConfig
    from flowpipe.transforms.from_proto import decode_messages

    config = SimulatorConfig(
        seed=seed,
        start=start or DEFAULT_START,
        duration_seconds=duration_seconds,
        rate_flows_per_second=max(flows, 1) / duration_seconds,
        max_flows=max_flows,
    )
    batch = []
    for _, _, response in Simulator(config).response_bytes():
        batch.append(response)
        if len(batch) >= _NORMALIZE_BATCH:
            yield decode_messages(batch).flows
            batch = []
    if batch:
        yield decode_messages(batch).flows


def write_scaled_dataset(
    root: Path, flows: int, *, seed: int, log: Callable[[str], None] = lambda message: None
) -> tuple[int, datetime, datetime]:
    """Write `flows` simulated flows into a dataset at `root`; returns (flows written, first hour, end)."""
    from flowpipe.config import ParquetSinkConfig
    from flowpipe.model import EventBatch
    from flowpipe.sinks.parquet import ParquetSink

    base, start = simulated_flows(min(flows, BASE_FLOWS_MAX), seed=seed)
    copies = math.ceil(flows / max(base.num_rows, 1))
    log(f"simulated {base.num_rows:,} flows; writing {copies} hour(s) of them into {root}")
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="bench-sim"))
    index = base.schema.get_field_index("time")
    nanos = pc.cast(base.column("time"), pa.int64())
    written = 0
    for copy in range(copies):
        part = base.slice(0, min(base.num_rows, flows - written))
        shift = int(copy * SIMULATED_HOUR_SECONDS * 1e9)
        shifted = pc.cast(pc.add(nanos.slice(0, part.num_rows), shift), base.schema.field(index).type)
        sink.write(EventBatch(flows=part.set_column(index, "time", shifted)))
        written += part.num_rows
    sink.close()
    return written, start, start + timedelta(seconds=copies * SIMULATED_HOUR_SECONDS)


def bench_questions_at_scale(ctx: BenchContext) -> list[Figure]:
    """Wall and CPU time of every question of the catalog over `SCALE_FACTOR x --flows` simulated flows."""
    from flowpipe.query.catalog import load_questions
    from flowpipe.query.engine import open_engine
    from flowpipe.query.run import run_question

    root = ctx.workdir / "simulated"
    target_flows = SCALE_FACTOR * ctx.flows
    started = time.perf_counter()
    flows, start, end = write_scaled_dataset(root, target_flows, seed=ctx.seed, log=ctx.log)
    figures = [
        Figure(
            SECTION,
            "simulated flows written",
            flows,
            "flows",
            target=target_flows,
            note=f"{time.perf_counter() - started:.0f} s to simulate and write",
        ),
    ]
    window = {"since": start.isoformat(), "until": end.isoformat()}
    started = time.perf_counter()
    with open_engine(str(root)) as engine:
        figures.append(Figure(SECTION, "open the dataset", time.perf_counter() - started, "s", 1.0, False))
        for question in load_questions():
            values = {name: value for name, value in window.items() if question.parameter(name) is not None}
            load = os.getloadavg()[0]
            cpu, started = cpu_seconds(), time.perf_counter()
            result = run_question(engine, question, values, relative_to="now")
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            note = f"{result.table.num_rows} rows; CPU {cpu:.1f} s; load average {load:.1f} on {os.cpu_count()} cores"
            figures.append(
                Figure(SECTION, f"query {question.name}", seconds, "s", TARGET_SECONDS, False, note)
            )
    return figures


def bench_questions(ctx: BenchContext) -> list[Figure]:
    """Time of every question of the catalog over the whole dataset (defaults, `since` widened)."""
    from flowpipe.query.catalog import load_questions
    from flowpipe.query.engine import open_engine
    from flowpipe.query.run import run_question

    ingest = ctx.ingest()
    figures = []
    started = time.perf_counter()
    with open_engine(str(ctx.dataset)) as engine:
        figures.append(
            Figure("questions", "open the dataset", time.perf_counter() - started, "s", 1.0, False)
        )
        for question in load_questions():
            values = {"since": QUESTION_WINDOW} if question.parameter("since") is not None else {}
            started = time.perf_counter()
            result = run_question(engine, question, values, relative_to="now")
            seconds = time.perf_counter() - started
            note = f"{result.table.num_rows} rows, {ingest['flows']:,} flows"
            figures.append(Figure("questions", f"query {question.name}", seconds, "s", 1.0, False, note))
    return figures

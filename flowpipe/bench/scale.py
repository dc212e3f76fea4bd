"""The `scale` and `compaction` sections of `flowpipe bench`: how question times and bytes on disk grow with the
number of flows, and how fast compaction merges many small part files.

Both build their datasets from the built-in simulator (every fault on): up to a million flows over one simulated
hour are normalized once (`flowpipe.bench.questions.simulated_flows`) and written again and again, each copy an
hour later, through the real `ParquetSink`.

- `scale`: one dataset grown to 1x, 10x and 50x `--flows` (1, 10 and 50 million by default); at each size the
  bytes on disk, and every question's time on DuckDB over the whole span. Where pyspark and Java are
  installed (and `--flows` is a million or more), the questions also run on Spark in local mode at the first
  size: what Spark costs on one machine.
- `compaction`: 10x `--flows` flows (10 million by default) written as 1,000 part files (fewer for a small
  `--flows`: at least 1,000 flows a file), then `compact_dataset` with every hour closed; its time is held
  against `COMPACTION_TARGET_SECONDS`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.bench.context import BenchContext, Figure

if TYPE_CHECKING:
    from flowpipe.query.catalog import Question

SCALE_FACTORS = (1, 10, 50)
"""Dataset sizes of the `scale` section, as multiples of `--flows`."""
COMPACTION_FACTOR = 10
COMPACTION_FILES = 1000
COMPACTION_MIN_ROWS_PER_FILE = 1000
"""Fewer files than `COMPACTION_FILES` when a small `--flows` would make them smaller than this."""
SPARK_MIN_FLOWS = 1_000_000
"""Spark's times are measured only from this `--flows` on (at small sizes they are all fixed cost)."""
COMPACTION_TARGET_SECONDS = 60.0
_HOUR_NS = 3600 * 1_000_000_000


@dataclass(slots=True)
class _Grower:
    """Writes time-shifted copies of a base table into one dataset, continuing where the last call stopped."""

    root: Path
    base: pa.Table
    max_batch_rows: int = 200_000
    written: int = 0
    copies: int = 0

    def grow(self, flows: int) -> None:
        """Write copies until the dataset holds `flows` flows."""
        from flowpipe.config import ParquetSinkConfig
        from flowpipe.model import EventBatch
        from flowpipe.sinks.parquet import ParquetSink

        config = ParquetSinkConfig(
            path=str(self.root), writer_id="bench-scale", max_batch_rows=self.max_batch_rows
        )
        sink = ParquetSink(config)
        index = self.base.schema.get_field_index("time")
        nanos = pc.cast(self.base.column("time"), pa.int64())
        while self.written < flows:
            rows = min(self.base.num_rows, flows - self.written)
            shifted = pc.cast(
                pc.add(nanos.slice(0, rows), self.copies * _HOUR_NS), self.base.schema.field(index).type
            )
            table = self.base.slice(0, rows).set_column(index, "time", shifted)
            for offset in range(0, rows, self.max_batch_rows):
                sink.write(EventBatch(flows=table.slice(offset, self.max_batch_rows)))
            self.written += rows
            self.copies += 1
        sink.close()


def _base(ctx: BenchContext) -> tuple[pa.Table, datetime]:
    """The simulated base flows (built once per bench run and shared by the sections)."""
    from flowpipe.bench.questions import BASE_FLOWS_MAX, simulated_flows

    if "simulated_base" not in ctx.results:
        started = time.perf_counter()
        ctx.results["simulated_base"] = simulated_flows(min(ctx.flows, BASE_FLOWS_MAX), seed=ctx.seed)
        ctx.log(
            f"simulated {ctx.results['simulated_base'][0].num_rows:,} flows in {time.perf_counter() - started:.0f} s"
        )
    base: tuple[pa.Table, datetime] = ctx.results["simulated_base"]
    return base


def _files(root: Path) -> list[Path]:
    return [p for p in (root / "flows").rglob("*.parquet") if not p.name.startswith((".", "_"))]


def _label(flows: int) -> str:
    return f"{flows / 1e6:g}M" if flows >= 1_000_000 else f"{flows / 1e3:g}k"


def bench_scale(ctx: BenchContext) -> list[Figure]:
    """Bytes on disk and every question's DuckDB time at 1x, 10x and 50x `--flows` simulated flows."""
    from flowpipe.query.catalog import load_questions
    from flowpipe.query.engine import open_engine
    from flowpipe.query.run import run_question

    base, start = _base(ctx)
    grower = _Grower(ctx.workdir / "scale", base)
    questions = list(load_questions())
    sizes: list[Figure] = []
    times: dict[str, list[Figure]] = {question.name: [] for question in questions}
    for factor in SCALE_FACTORS:
        flows = factor * ctx.flows
        label = _label(flows)
        started = time.perf_counter()
        grower.grow(flows)
        ctx.log(f"scale: {grower.written:,} flows written ({time.perf_counter() - started:.0f} s)")
        files = _files(grower.root)
        on_disk = sum(p.stat().st_size for p in files)
        note = f"{len(files):,} part files, {on_disk / grower.written:.0f} B/flow, {grower.copies} hours"
        sizes.append(Figure("scale", f"bytes on disk at {label} flows", on_disk / 1e6, "MB", note=note))
        end = start + timedelta(hours=grower.copies)
        window = {"since": start.isoformat(), "until": end.isoformat()}
        with open_engine(str(grower.root)) as engine:
            for question in questions:
                values = {k: v for k, v in window.items() if question.parameter(k) is not None}
                load = os.getloadavg()[0]
                started = time.perf_counter()
                result = run_question(engine, question, values, relative_to="now")
                seconds = time.perf_counter() - started
                times[question.name].append(
                    Figure(
                        "scale",
                        f"{question.name} at {label}",
                        seconds,
                        "s",
                        note=f"{result.table.num_rows} rows; load average {load:.1f}",
                    )
                )
        if factor == SCALE_FACTORS[0] and ctx.flows >= SPARK_MIN_FLOWS and _spark_available():
            sizes += _spark_times(ctx, grower.root, questions, window, label)
    return sizes + [figure for name in times for figure in times[name]]


def _spark_available() -> bool:
    return importlib.util.find_spec("pyspark") is not None and shutil.which("java") is not None


def _spark_times(
    ctx: BenchContext, root: Path, questions: list[Question], window: dict[str, str], label: str
) -> list[Figure]:
    """Every question on Spark in local mode over the same dataset: what Spark costs on one machine."""
    from flowpipe.query.run import run_question
    from flowpipe.query.spark import DEFAULT_MASTER, SparkEngine

    ctx.log(f"scale: the questions at {label} on Spark {DEFAULT_MASTER}")
    figures = []
    started = time.perf_counter()
    with SparkEngine(str(root), master=DEFAULT_MASTER) as engine:
        figures.append(Figure("scale", f"start Spark {DEFAULT_MASTER}", time.perf_counter() - started, "s"))
        for question in questions:
            values = {k: v for k, v in window.items() if question.parameter(k) is not None}
            started = time.perf_counter()
            result = run_question(engine, question, values, relative_to="now")
            figures.append(
                Figure(
                    "scale",
                    f"{question.name} at {label} on Spark",
                    time.perf_counter() - started,
                    "s",
                    note=f"{result.table.num_rows} rows",
                )
            )
    return figures


def bench_compaction(ctx: BenchContext) -> list[Figure]:
    """Compaction of 10x `--flows` flows written as 1,000 part files, every hour closed."""
    from flowpipe.dataset.compact import compact_dataset
    from flowpipe.dataset.layout import Dataset

    base, _ = _base(ctx)
    flows = COMPACTION_FACTOR * ctx.flows
    files = max(1, min(COMPACTION_FILES, flows // COMPACTION_MIN_ROWS_PER_FILE))
    grower = _Grower(ctx.workdir / "compaction", base, max_batch_rows=max(1, flows // files))
    started = time.perf_counter()
    grower.grow(flows)
    before = _files(grower.root)
    ctx.log(
        f"compaction: {flows:,} flows in {len(before):,} part files ({time.perf_counter() - started:.0f} s)"
    )
    bytes_before = sum(p.stat().st_size for p in before)
    load = os.getloadavg()[0]
    report = compact_dataset(Dataset(grower.root), clock=lambda: datetime(2200, 1, 1, tzinfo=UTC))
    after = _files(grower.root)
    rows_after = _rows(after)
    note = f"{report.files_merged:,} files into {len(report.files_written):,}; load average {load:.1f}"
    return [
        Figure("compaction", "part files before", len(before), "files", note=f"{bytes_before / 1e6:,.0f} MB"),
        Figure(
            "compaction",
            "part files after",
            len(after),
            "files",
            note=f"{sum(p.stat().st_size for p in after) / 1e6:,.0f} MB",
        ),
        Figure(
            "compaction",
            "rows after",
            rows_after,
            "flows",
            note="every row once" if rows_after == flows else f"MISMATCH: {flows:,} written",
        ),
        Figure(
            "compaction",
            f"compact {_label(flows)} flows",
            report.seconds,
            "s",
            COMPACTION_TARGET_SECONDS,
            False,
            note,
        ),
        Figure("compaction", "compaction throughput", report.rows / max(report.seconds, 1e-9), "flows/s"),
    ]


def _rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(path).num_rows for path in files)

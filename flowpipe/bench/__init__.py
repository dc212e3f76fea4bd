"""`flowpipe bench`: measured figures next to their targets, one module per section.

`SECTIONS` lists every section in the order it runs; `flowpipe bench --only ingest,questions` runs some of them.
A section is a function `(BenchContext) -> list[Figure]` (see `flowpipe.bench.context`); sections share one
`BenchContext`, which builds the common inputs lazily and once: the synthetic jsonpb file (`ctx.jsonpb_file()`),
the dataset ingested from it (`ctx.ingest()`). To add one, write its module and add a line to `SECTIONS`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from flowpipe.bench.collect import bench_collect
from flowpipe.bench.context import (
    DEFAULT_BASELINE_FLOWS,
    DEFAULT_FLOWS,
    BenchContext,
    BenchFunction,
    BenchSection,
    Figure,
)
from flowpipe.bench.ingest import bench_baseline, bench_ingest
from flowpipe.bench.policy import bench_delta, bench_replay, bench_suggest
from flowpipe.bench.questions import bench_questions, bench_questions_at_scale
from flowpipe.bench.rollups import bench_rollups
from flowpipe.bench.s3 import bench_s3
from flowpipe.bench.scale import bench_compaction, bench_scale
from flowpipe.bench.serve import bench_serve_hubble
from flowpipe.bench.startup import bench_startup
from flowpipe.errors import ConfigError

SECTIONS: list[BenchSection] = [
    BenchSection(
        "ingest", "file ingest of synthetic jsonpb: throughput, peak RSS, dataset size", bench_ingest
    ),
    BenchSection(
        "baseline",
        "the naive baseline (json.loads + dict walk + pandas to_parquet) and the speed ratio",
        bench_baseline,
    ),
    BenchSection("questions", "each shipped question over the ingested dataset", bench_questions),
    BenchSection(
        "collect", "relay → dataset over loopback gRPC: throughput, memory, naive client", bench_collect
    ),
    BenchSection(
        "questions_at_scale",
        "every question over ten times --flows simulated flows (10 million by default), 3 s each",
        bench_questions_at_scale,
    ),
    BenchSection(
        "scale",
        "question times on DuckDB and bytes on disk at 1x, 10x and 50x --flows simulated flows",
        bench_scale,
    ),
    BenchSection(
        "compaction",
        "compaction of 10x --flows flows written as 1,000 part files, under 60 s",
        bench_compaction,
    ),
    BenchSection(
        "suggest",
        "suggest over 10x --flows simulated flows (10 million by default), under 20 s",
        bench_suggest,
    ),
    BenchSection("replay", "replay of 200 policies over the same flows, under 30 s", bench_replay),
    BenchSection(
        "delta", "replay --baseline: 200 policies on each side over the same flows, under 10 s", bench_delta
    ),
    BenchSection(
        "s3",
        "requests per flush to an S3-compatible server (moto, counted at the server), no folder markers",
        bench_s3,
    ),
    BenchSection(
        "rollups",
        "edge rollups: size and write cost on simulated flows, equal answers, a month of 5,000 workloads in 10 s",
        bench_rollups,
    ),
    BenchSection(
        "startup",
        "warm start of `flowpipe --help` and `flowpipe query --list` (no data library imported)",
        bench_startup,
    ),
    BenchSection(
        "serve-hubble",
        "the Hubble API over 10x --flows stored flows: first flow, number=20, streaming, peak RSS",
        bench_serve_hubble,
    ),
]
"""Every section, in the order `flowpipe bench` runs them."""

__all__ = [
    "DEFAULT_BASELINE_FLOWS",
    "DEFAULT_FLOWS",
    "SECTIONS",
    "BenchContext",
    "BenchFunction",
    "BenchSection",
    "Figure",
    "run_bench",
    "select_sections",
]


def select_sections(only: Sequence[str] | None) -> list[BenchSection]:
    """The sections to run: all, or those named in `only` (in registry order); ConfigError for unknown names."""
    if not only:
        return list(SECTIONS)
    known = {s.name for s in SECTIONS}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"unknown bench section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [s for s in SECTIONS if s.name in only]


@contextmanager
def _workdir(path: Path | None, keep: bool) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix="flowpipe-bench-"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def run_bench(
    *,
    flows: int = DEFAULT_FLOWS,
    only: Sequence[str] | None = None,
    workdir: Path | None = None,
    keep: bool = False,
    seed: int = 1,
    baseline_flows: int = DEFAULT_BASELINE_FLOWS,
    log: Callable[[str], None] = lambda message: None,
) -> list[Figure]:
    """Run the selected sections and return their figures.

    Without `workdir` the inputs go to a temporary folder, removed afterwards unless `keep`.
    """
    if flows <= 0 or baseline_flows <= 0:
        raise ConfigError("--flows and --baseline-flows must be > 0")
    sections = select_sections(only)
    figures: list[Figure] = []
    with _workdir(workdir, keep) as folder:
        ctx = BenchContext(flows=flows, workdir=folder, seed=seed, baseline_flows=baseline_flows, log=log)
        for bench in sections:
            log(f"section {bench.name}: {bench.description}")
            figures += bench.run(ctx)
        if keep or workdir is not None:
            log(f"inputs kept in {folder}")
    return figures

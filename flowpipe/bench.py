"""`flowpipe bench`: measured figures next to their targets, in sections that later work adds to.

A section is a function `(BenchContext) -> list[Figure]` registered with `@section("name", "what it measures")`
in `SECTIONS`, in the order it runs; `flowpipe bench --only ingest,questions` runs some of them. Sections share
one `BenchContext`, which builds the common inputs lazily and once: the synthetic jsonpb file
(`ctx.jsonpb_file()`), the dataset ingested from it (`ctx.ingest()`). A later issue adds, e.g.:

```python
@section("collector", "relay → dataset throughput over loopback gRPC")
def bench_collector(ctx: BenchContext) -> list[Figure]:
    ...
    return [Figure("collector", "flows/s", value, "flows/s", target=100_000)]
```

Ingest and the naive baseline each run in a child process, so that their peak RSS is theirs alone (read with
`resource.getrusage(RUSAGE_SELF)` in the child, reported back as JSON) and the parent stays small.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowpipe.bench_data import SyntheticStats, write_synthetic_jsonpb
from flowpipe.errors import ConfigError, FlowpipeError

DEFAULT_FLOWS = 1_000_000
DEFAULT_BASELINE_FLOWS = 200_000
QUESTION_WINDOW = "30d"
"""`since` given to every question that has one, so that it scans the whole synthetic dataset."""


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured value. `target` with `higher_is_better` decides `ok`; no target means informational."""

    section: str
    name: str
    value: float | None
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def ok(self) -> bool | None:
        """True when the value meets its target, None when there is no target or no value."""
        if self.target is None or self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value < self.target

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the figure."""
        return {
            "section": self.section,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "target_is": "min" if self.higher_is_better else "max",
            "ok": self.ok,
            "note": self.note,
        }


@dataclass(slots=True)
class BenchContext:
    """What sections share: sizes, the work folder, lazily built inputs and results of earlier sections."""

    flows: int
    workdir: Path
    seed: int = 1
    baseline_flows: int = DEFAULT_BASELINE_FLOWS
    log: Callable[[str], None] = lambda message: None
    results: dict[str, Any] = field(default_factory=dict)
    _jsonpb: tuple[Path, SyntheticStats] | None = None

    def jsonpb_file(self) -> tuple[Path, SyntheticStats]:
        """The synthetic jsonpb file (generated on first use) and what it holds."""
        if self._jsonpb is None:
            path = self.workdir / "flows.jsonpb"
            self.log(f"generating {self.flows:,} synthetic flows in {path}")
            started = time.perf_counter()
            stats = write_synthetic_jsonpb(path, self.flows, seed=self.seed)
            self.log(f"generated {stats.bytes / 1e6:,.0f} MB in {time.perf_counter() - started:.1f}s")
            self._jsonpb = (path, stats)
        return self._jsonpb

    @property
    def dataset(self) -> Path:
        """Where the ingest section writes its dataset."""
        return self.workdir / "dataset"

    def ingest(self) -> dict[str, Any]:
        """Ingest the synthetic file into `dataset` in a child process (once); returns its report."""
        if "ingest" not in self.results:
            path, _ = self.jsonpb_file()
            shutil.rmtree(self.dataset, ignore_errors=True)
            self.log("ingesting it with flowpipe (child process)")
            self.results["ingest"] = run_child("ingest", str(path), str(self.dataset))
        report: dict[str, Any] = self.results["ingest"]
        return report


BenchFunction = Callable[[BenchContext], list[Figure]]


@dataclass(frozen=True, slots=True)
class BenchSection:
    """A named group of measurements."""

    name: str
    description: str
    run: BenchFunction


SECTIONS: list[BenchSection] = []
"""Every section, in the order `flowpipe bench` runs them."""


def section(name: str, description: str) -> Callable[[BenchFunction], BenchFunction]:
    """Register a bench section under `name` (appended to `SECTIONS`)."""

    def register(function: BenchFunction) -> BenchFunction:
        if any(s.name == name for s in SECTIONS):
            raise ValueError(f"bench section {name!r} is registered twice")
        SECTIONS.append(BenchSection(name, description, function))
        return function

    return register


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


# -- child processes --------------------------------------------------------------------------------------


def run_child(task: str, *args: str) -> dict[str, Any]:
    """Run `task` of `child_main` in a fresh Python process; returns the JSON object it prints last."""
    code = "import sys; from flowpipe.bench import child_main; child_main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, task, *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise FlowpipeError(f"bench {task} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def child_main(argv: list[str]) -> None:
    """Entry point of the child processes: `ingest FILE DATASET` or `baseline FILE OUT LIMIT`."""
    task, *args = argv
    if task == "ingest":
        from flowpipe.config import ParquetSinkConfig
        from flowpipe.ingest import ingest_files

        source, dataset = args
        cpu, started = _cpu_seconds(), time.perf_counter()
        result = ingest_files([source], ParquetSinkConfig(path=dataset, writer_id="bench"))
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {
            "flows": result.pipeline.flows,
            "seconds": seconds,
            "cpu_seconds": _cpu_seconds() - cpu,
            "files": len(result.pipeline.files),
        }
        report["by_verdict"] = result.flows_by_verdict
    elif task == "baseline":
        from flowpipe.bench_data import naive_ingest

        source, out, limit = args
        flows, seconds = naive_ingest(Path(source), Path(out), limit=int(limit))
        report = {"flows": flows, "seconds": seconds}
    else:
        raise SystemExit(f"unknown bench task {task}")
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_note() -> str:
    """The machine's load when a timing was taken: timings on a busy machine are not the code's own."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet") if p.is_file())


# -- sections ---------------------------------------------------------------------------------------------


@section("ingest", "file ingest of synthetic jsonpb: throughput, peak RSS, dataset size")
def bench_ingest(ctx: BenchContext) -> list[Figure]:
    """Throughput, peak memory and compression of `flowpipe ingest` on the synthetic file."""
    _, stats = ctx.jsonpb_file()
    load = _load_note()
    report = ctx.ingest()
    flows, seconds = report["flows"], report["seconds"]
    dataset_bytes = _folder_bytes(ctx.dataset / "flows")
    note = "" if flows == stats.flows else f"{flows:,} of {stats.flows:,} flows stored"
    return [
        Figure("ingest", "flows ingested", flows, "flows", target=stats.flows, note=note),
        Figure("ingest", "file ingest throughput", flows / seconds, "flows/s", target=100_000, note=load),
        Figure("ingest", "ingest CPU time per flow", 1e6 * report["cpu_seconds"] / max(flows, 1), "us"),
        Figure("ingest", "peak RSS of the ingest process", report["max_rss_bytes"] / 1e6, "MB", 500, False),
        Figure("ingest", "jsonpb bytes per flow", stats.bytes / max(stats.flows, 1), "B"),
        Figure("ingest", "dataset bytes per flow", dataset_bytes / max(flows, 1), "B"),
        Figure(
            "ingest",
            "jsonpb bytes / dataset bytes",
            stats.bytes / max(dataset_bytes, 1),
            "x smaller",
            target=25,
            note=f"{report['files']} part files",
        ),
    ]


@section("baseline", "the naive baseline (json.loads + dict walk + pandas to_parquet) and the speed ratio")
def bench_baseline(ctx: BenchContext) -> list[Figure]:
    """How much faster ingest is than the obvious per-line Python approach."""
    path, _ = ctx.jsonpb_file()
    limit = min(ctx.flows, ctx.baseline_flows)
    ctx.log(f"naive baseline on the first {limit:,} flows (child process)")
    report = run_child("baseline", str(path), str(ctx.workdir / "baseline.parquet"), str(limit))
    baseline = report["flows"] / report["seconds"]
    ingest = ctx.ingest()
    speed = ingest["flows"] / ingest["seconds"]
    return [
        Figure(
            "baseline", "naive baseline throughput", baseline, "flows/s", note=f"on {report['flows']:,} flows"
        ),
        Figure("baseline", "peak RSS of the baseline process", report["max_rss_bytes"] / 1e6, "MB"),
        Figure("baseline", "ingest speed / baseline speed", speed / baseline, "x", target=5),
    ]


@section("questions", "each shipped question over the ingested dataset")
def bench_questions(ctx: BenchContext) -> list[Figure]:
    """Time of every question of the catalog over the whole dataset (defaults, `since` widened)."""
    try:
        from flowpipe.query.catalog import load_questions
        from flowpipe.query.engine import open_engine
        from flowpipe.query.run import run_question
    except ImportError as exc:  # hook: the query package is not there yet
        return [Figure("questions", "questions", None, "s", note=f"query package missing: {exc}")]
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


from flowpipe.bench_collect import bench_collect

section("collect", "relay → dataset over loopback gRPC: throughput, memory, naive client")(bench_collect)

from flowpipe.bench_questions import bench_questions_at_scale

section(
    "questions_at_scale",
    "every question over ten times --flows simulated flows (10 million by default), 3 s each",
)(bench_questions_at_scale)

from flowpipe.bench_scale import bench_compaction, bench_scale

section("scale", "question times on DuckDB and bytes on disk at 1x, 10x and 50x --flows simulated flows")(
    bench_scale
)
section("compaction", "compaction of 10x --flows flows written as 1,000 part files, under 60 s")(
    bench_compaction
)

from flowpipe.bench_policy import bench_delta, bench_replay, bench_suggest

section("suggest", "suggest over 10x --flows simulated flows (10 million by default), under 20 s")(
    bench_suggest
)
section("replay", "replay of 200 policies over the same flows, under 30 s")(bench_replay)
section("delta", "replay --baseline: 200 policies on each side over the same flows, under 10 s")(bench_delta)

from flowpipe.bench_s3 import bench_s3

section(
    "s3", "requests per flush to an S3-compatible server (moto, counted at the server), no folder markers"
)(bench_s3)

from flowpipe.bench_rollups import bench_rollups

section(
    "rollups",
    "edge rollups: size and write cost on simulated flows, equal answers, a month of 5,000 workloads in 10 s",
)(bench_rollups)

from flowpipe.bench_startup import bench_startup

section("startup", "warm start of `flowpipe --help` and `flowpipe query --list` (no data library imported)")(
    bench_startup
)

from flowpipe.bench_serve import bench_serve_hubble

section(
    "serve-hubble",
    "the Hubble API over 10x --flows stored flows: first flow, number=20, streaming, peak RSS",
)(bench_serve_hubble)

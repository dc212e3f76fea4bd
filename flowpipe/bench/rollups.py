"""The `rollups` section of `flowpipe bench`: edge rollups' size, their cost when writing, equal answers, and the
edge questions over a month of a 5,000-workload cluster read from rollups alone.

1. Size and build cost: up to a million flows of the built-in simulator (all faults on) are written twice
   through the real `ParquetSink`, without and with edge rollups, and the closed hours are folded; what stays
   past the raw retention (`edge_hours/` and `edge_identities/`) is held against 1% of the flow bytes, the
   rollups' build CPU and the fold's are printed, and `flowpipe ingest` of the bench's synthetic file with
   rollups off and on gives what they cost its throughput, against 10% (collect's: its own section).
2. Equality: `EQUALITY_FLOWS` (ten million) simulated flows at the default `--flows` (a smaller `--flows`
   scales them down), all faults on, over `EQUALITY_HOURS` (the end of one UTC day, a whole day, the start of the
   next), streamed from the simulator in batches (never held whole) through the real `ParquetSink` with rollups
   on, every closed hour and day folded; then every edge question (`flowpipe.dataset.rollups.EDGE_QUESTIONS`,
   over `EQUALITY_WINDOWS`) and `suggest`'s drafts from the flows (`--source flows`) and from rollups
   (`--source auto` with every closed hour folded: rollups alone, but for an hour a window cuts, which
   least_privilege reads from its flows: it has no per-file rollups), each side in a child process whose DuckDB may use `EQUALITY_FLOWS_DUCKDB_MEMORY` (flows,
   the reference) or `EQUALITY_DUCKDB_MEMORY` (rollups); target: every
   answer equal, row for row, and the drafts byte for byte, with each side's time and peak RSS.
3. Fleet: folded hours generated directly for `FLEET_WORKLOADS` workloads over `FLEET_DAYS` days (at the
   default `--flows`; a smaller `--flows` scales both down, for a quick run), as compaction and retention leave
   a month whose flows are gone: one row per edge (pod pair and port) and hour, standing for that hour's
   connections, and the pods' identities; and the folded privilege records of the same edges (each edge's
   requests at both ends, policy verdicts at the destinations policies select). `observed_edges`,
   `new_connections`, `suggest` and `least_privilege` read them (`--source edges`), each in a child process
   whose DuckDB may use `FLEET_DUCKDB_MEMORY`, against 10 s and 2 GiB of peak RSS (with its CPU seconds and the
   load average: the machine may be shared).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowpipe.bench.context import BenchContext, Figure

SECTION = "rollups"
SIZE_TARGET_PERCENT = 1.0
BUILD_COST_TARGET_PERCENT = 10.0
QUESTION_TARGET_SECONDS = 10.0
RSS_TARGET_MB = 2048.0
BASE_FLOWS_MAX = 1_000_000
FLEET_WORKLOADS = 5_000
FLEET_DAYS = 30
FLEET_PEERS = 6
"""Destinations per workload: 30,000 edges."""
FLEET_START = datetime(2024, 6, 1, tzinfo=UTC)
FLEET_CLUSTER = "fleet"
CHILD_TIMEOUT_SECONDS = 300.0
"""A fleet task still running after this is stopped (and reported as such)."""
FLEET_DUCKDB_MEMORY = "1536MiB"
"""DuckDB's memory limit in a fleet task (unless `FLOWPIPE_DUCKDB_MEMORY_LIMIT` sets one): the RSS target less
the interpreter's own, so that a task spills rather than takes the machine's memory (merging a week of the fleet's
connections holds some 3 GB, a month 10 GB and more)."""


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet")) if path.is_dir() else 0


def _write(root: Path, table: Any, *, rollups: bool) -> tuple[float, float]:
    """Write `table` through the Parquet sink into `root`; (wall seconds, CPU seconds of this process)."""
    from flowpipe.config import ParquetSinkConfig
    from flowpipe.model import EventBatch
    from flowpipe.sinks.parquet import ParquetSink

    shutil.rmtree(root, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="bench", edge_rollups=rollups))
    for offset in range(0, table.num_rows, 50_000):
        sink.write(EventBatch(flows=table.slice(offset, 50_000)))
    sink.close()
    return time.perf_counter() - started, time.process_time() - cpu


def _ingest_cost(ctx: BenchContext) -> list[Figure]:
    """`flowpipe ingest` of the bench's synthetic file with edge rollups off, then on (each in a child process):
    the throughput the rollups cost, against `BUILD_COST_TARGET_PERCENT` (collect's is in its own section)."""
    from flowpipe.bench.context import Figure, run_child
    from flowpipe.dataset.rollups import EDGES_TABLE

    path, _ = ctx.jsonpb_file()
    reports = {}
    for mode in ("off", "on"):
        root = ctx.workdir / f"rollups-ingest-{mode}"
        shutil.rmtree(root, ignore_errors=True)
        ctx.log(f"ingesting {path.name} with edge rollups {mode} (child process)")
        reports[mode] = run_child("ingest", str(path), str(root), *(["rollups"] if mode == "on" else []))
    off, on = reports["off"], reports["on"]
    rate_off, rate_on = off["flows"] / off["seconds"], on["flows"] / on["seconds"]
    root = ctx.workdir / "rollups-ingest-on"
    built = len(list((root / EDGES_TABLE).rglob("*.parquet"))) if (root / EDGES_TABLE).is_dir() else 0
    return [
        Figure(
            SECTION,
            "ingest throughput cost of edge rollups",
            100.0 * (rate_off / rate_on - 1.0),
            "%",
            BUILD_COST_TARGET_PERCENT,
            False,
            f"{on['flows']:,} synthetic flows: {rate_on:,.0f} flows/s with rollups (until they were all built: "
            f"{built} rollups for {on['files']} part files), {rate_off:,.0f} without; CPU {on['cpu_seconds']:.1f} s "
            f"against {off['cpu_seconds']:.1f} s",
        ),
    ]


def _fold(root: Path) -> tuple[float, float, int]:
    """Fold every hour of `root` (as compaction does once an hour is closed); (wall s, CPU s, hours folded)."""
    from flowpipe.dataset.layout import Dataset
    from flowpipe.dataset.rollups.fold import fold_closed

    started, cpu = time.perf_counter(), time.process_time()
    hours, _ = fold_closed(Dataset(root), now=datetime(2100, 1, 1, tzinfo=UTC))
    return time.perf_counter() - started, time.process_time() - cpu, len(hours)


def _build_later(root: Path) -> tuple[float, float]:
    """Build the rollups of `root` (written without) and fold them, as compaction does; (wall s, CPU s)."""
    from flowpipe.dataset.layout import Dataset
    from flowpipe.dataset.rollups.build import build_missing
    from flowpipe.dataset.rollups.fold import fold_closed

    started, cpu = time.perf_counter(), time.process_time()
    build_missing(Dataset(root))
    fold_closed(Dataset(root), now=datetime(2100, 1, 1, tzinfo=UTC))
    return time.perf_counter() - started, time.process_time() - cpu


def bench_rollups(ctx: BenchContext) -> list[Figure]:
    """Rollup size, build cost and equality on simulated flows; the fleet questions over generated rollups."""
    from flowpipe.bench.context import Figure
    from flowpipe.bench.questions import simulated_flows
    from flowpipe.dataset.rollups import EDGE_HOURS_TABLE, EDGE_IDENTITIES_TABLE, EDGES_TABLE

    figures: list[Figure] = []
    flows, _ = simulated_flows(min(ctx.flows, BASE_FLOWS_MAX), seed=ctx.seed)
    ctx.log(f"simulated {flows.num_rows:,} flows; writing them without, then with edge rollups")
    off_root, on_root = ctx.workdir / "rollups-off", ctx.workdir / "rollups-on"
    (off, off_cpu), (on, on_cpu) = (
        _write(off_root, flows, rollups=False),
        _write(on_root, flows, rollups=True),
    )
    raw_bytes = _folder_bytes(on_root / "flows")
    file_bytes = _folder_bytes(on_root / EDGES_TABLE)
    identity_bytes = _folder_bytes(on_root / EDGE_IDENTITIES_TABLE)
    fold_seconds, fold_cpu, folded_hours = _fold(on_root)
    late_seconds, late_cpu = _build_later(off_root)
    folded_bytes = _folder_bytes(on_root / EDGE_HOURS_TABLE)
    rows = f"{flows.num_rows:,} simulated flows"
    figures += [
        Figure(SECTION, "write without rollups", flows.num_rows / off, "flows/s", note=rows),
        Figure(SECTION, "write with rollups", flows.num_rows / on, "flows/s", note=rows),
        Figure(
            SECTION,
            "rollup build CPU",
            100.0 * (on_cpu - off_cpu) / off_cpu,
            "% of writing",
            note=f"{on_cpu:.1f} CPU-s against {off_cpu:.1f} (wall {on:.1f} s against {off:.1f} s): what building "
            "costs, in the writer's background thread at the lowest priority",
        ),
        *_ingest_cost(ctx),
        Figure(
            SECTION,
            "rollups built at compaction (CPU)",
            100.0 * late_cpu / max(off_cpu, 1e-9),
            "% of writing",
            note=f"{late_cpu:.1f} CPU-s ({late_seconds:.1f} s) to read the closed hours back, write their rollups "
            "and fold them (`compact --edge-rollups`, `flowpipe rollup`): the writers, with rollups off, pay nothing",
        ),
        Figure(
            SECTION,
            "fold of the closed hours (CPU)",
            fold_cpu,
            "CPU-s",
            note=f"{folded_hours} hour(s) folded by edge in {fold_seconds:.1f} s: "
            f"{100.0 * fold_cpu / max(off_cpu, 1e-9):.0f}% of writing the flows (compaction or `flowpipe rollup` "
            "does it, not the writer)",
        ),
        Figure(
            SECTION,
            "rollup size / flow bytes",
            100.0 * (folded_bytes + identity_bytes) / max(raw_bytes, 1),
            "%",
            SIZE_TARGET_PERCENT,
            False,
            f"what stays past the raw retention: {folded_bytes / 1e6:,.2f} MB of hourly edge rows and "
            f"{identity_bytes / 1e6:,.2f} MB of pod identities for {raw_bytes / 1e6:,.1f} MB of flows; while the "
            f"flows are kept, the per-file rollups add {file_bytes / 1e6:,.1f} MB "
            f"({100.0 * file_bytes / max(raw_bytes, 1):.1f}%)",
        ),
    ]
    del flows  # the equality part writes its own flows, in batches, in a child process
    figures += bench_equality(ctx)
    figures += _fleet(ctx, on_root)
    return figures


# -- equality: every edge question and `suggest` from ten million flows and from their rollups ------------------

EQUALITY_FLOWS = 10_000_000
"""Flows of the equality part at the default `--flows` (a million); a smaller `--flows` scales it down."""
EQUALITY_START = datetime(2025, 1, 5, 21, tzinfo=UTC)
EQUALITY_HOURS = 30
"""The equality flows span the last three hours of a UTC day, the whole next day and three hours of the day
after, so that hours and days are folded (the last hours as far as the flows reach)."""
EQUALITY_WINDOWS: tuple[dict[str, str], ...] = (
    {"since": "2000-01-01", "until": "2100-01-01", "baseline_since": "2000-01-01"},
    {
        "since": "2025-01-05T22:30:00Z",
        "until": "2025-01-07T01:30:00Z",
        "baseline_since": "2025-01-05T21:00:00Z",
    },
)
"""Every edge question runs over each: all time (read from the folded days), then a window whose times cut an
hour of the first and of the last day (those hours read from their per-file rollups, the other hours of those
days from their folded hours, the day between from its folded day)."""
EQUALITY_DUCKDB_MEMORY = "1GiB"
"""DuckDB's memory limit in the equality tasks that write and answer from rollups (unless
`FLOWPIPE_DUCKDB_MEMORY_LIMIT` sets one): rollups answer within it."""
EQUALITY_FLOWS_DUCKDB_MEMORY = "4GiB"
"""DuckDB's memory limit when the equality part answers from the raw flows, the reference: an edge question
over all of ten million stored flows groups every connection at once (a peak RSS near 3 GB); the figure names a
question left unanswered ("out of memory")."""
EQUALITY_TIMEOUT_SECONDS = 3600.0


def equality_flows(flows: int) -> int:
    """Flows of the equality part: `EQUALITY_FLOWS` at the default `--flows` (a million), scaled down with a
    smaller `--flows` (a quick run)."""
    return max(1, round(EQUALITY_FLOWS * min(1.0, flows / 1_000_000)))


def bench_equality(ctx: BenchContext) -> list[Figure]:
    """Write `equality_flows` simulated flows with their rollups and fold them (a child process), then answer
    every edge question and `suggest` from the flows and from the rollups (a child process each), and compare."""
    from flowpipe.bench.context import Figure

    flows = equality_flows(ctx.flows)
    root, answers = ctx.workdir / "rollups-equal", ctx.workdir / "rollups-equal-answers"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(answers, ignore_errors=True)
    started = time.perf_counter()
    ctx.log(
        f"equality: simulating {flows:,} flows over {EQUALITY_HOURS} h, writing them with edge rollups, folding"
    )
    written = _equality_child("write", str(flows), str(ctx.seed), str(root))
    reports = {}
    # the rollups' side reads as `--source auto` does with every closed hour folded: rollups for every edge
    # question; least_privilege has no per-file rollups, so an hour its window cuts is read from its flows
    for side, source in (("flows", "flows"), ("edges", "auto")):
        if "error" not in written:
            ctx.log(f"equality: every edge question and suggest from --source {source} (child process)")
            memory = EQUALITY_FLOWS_DUCKDB_MEMORY if side == "flows" else EQUALITY_DUCKDB_MEMORY
            reports[side] = _equality_child("answer", source, str(root), str(answers / side), memory=memory)
    total = time.perf_counter() - started
    failed = [r["error"] for r in (written, *reports.values()) if "error" in r]
    if failed:
        note = "; ".join(failed)
        return [
            Figure(SECTION, "edge questions equal from rollups", None, "questions", note=note),
            Figure(SECTION, "suggest drafts equal from rollups", None, "", note=note),
        ]
    raw, rolled = reports["flows"], reports["edges"]
    differ = _differences(answers, ctx.log)
    # a question one side could not answer (e.g. DuckDB out of memory) is compared no more than one that differs
    errors = {
        k: f"{k} from {side}: {why}"
        for side, r in (("flows", raw), ("rollups", rolled))
        for k, why in r["errors"].items()
    }
    for line in errors.values():
        ctx.log(f"not answered: {line}")
    names = raw["questions"]
    unequal = [name for name in names if any(key.startswith(f"{name}.") for key in (*differ, *errors))]
    what = (
        f"{written['flows']:,} simulated flows, all faults on, over {EQUALITY_HOURS} h from "
        f"{EQUALITY_START:%Y-%m-%d %H:%M} UTC, written with rollups in {written['write_seconds']:.0f} s, "
        f"{written['hours']} hours and {written['days']} days folded in {written['fold_seconds']:.0f} s"
    )
    rss = {"writer": written["rss_mb"], "from rollups": rolled["rss_mb"]}
    suggest_equal = None if "suggest" in errors else float("suggest" not in differ)
    ctx.log(
        f"equality: {len(names) - len(unequal)} of {len(names)} edge questions equal, suggest's drafts "
        f"{ {None: 'not compared', 0.0: 'differ', 1.0: 'equal'}[suggest_equal] }, in {total:.0f} s"
    )
    questions_differ = sorted(k for k in differ if k != "suggest")
    return [
        Figure(
            SECTION,
            "edge questions equal from rollups",
            float(len(names) - len(unequal)),
            "questions",
            float(len(names)),
            True,
            f"{what}; {len(EQUALITY_WINDOWS)} windows each (all time; one cutting hours); from flows "
            f"{sum(raw['seconds_by_question'].values()):.1f} s (peak RSS {raw['rss_mb']:.0f} MB), from rollups "
            f"{sum(rolled['seconds_by_question'].values()):.1f} s (peak RSS {rolled['rss_mb']:.0f} MB)"
            + (f"; differ: {', '.join(questions_differ)}" if questions_differ else "")
            + "".join(f"; not answered: {line}" for k, line in sorted(errors.items()) if k != "suggest"),
        ),
        Figure(
            SECTION,
            "suggest drafts equal from rollups",
            suggest_equal,
            "",
            1.0,
            True,
            f"{rolled['drafted']} from the {EQUALITY_HOURS} h; from flows {raw['suggest_seconds']:.1f} s, from "
            f"rollups {rolled['suggest_seconds']:.1f} s (with the replay of the stored flows)"
            + (f"; differ: {differ['suggest']}" if "suggest" in differ else "")
            + (f"; not answered: {errors['suggest']}" if "suggest" in errors else ""),
        ),
        Figure(
            SECTION,
            "equality peak RSS",
            max(v for v in rss.values() if v is not None),
            "MB",
            RSS_TARGET_MB,
            False,
            ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
            + f" (child processes, DuckDB limited to {EQUALITY_DUCKDB_MEMORY}); the reference from flows "
            f"{raw['rss_mb']:.0f} MB (DuckDB limited to {EQUALITY_FLOWS_DUCKDB_MEMORY}); the equality part took "
            f"{total:.0f} s",
        ),
    ]


def _differences(answers: Path, log: Callable[[str], None]) -> dict[str, str]:
    """What differs between the answers from flows and from rollups (`answers/{flows,edges}/<key>.txt`, one row
    a line): key → how many rows each side alone has; the first rows are logged."""
    differ = {}
    for path in sorted((answers / "flows").glob("*.txt")):
        other = answers / "edges" / path.name
        if not other.is_file():
            continue  # not answered from rollups
        raw, rolled = path.read_text(), other.read_text()
        if raw == rolled:
            continue
        key = path.name.removesuffix(".txt")
        only_raw = sorted(set(raw.splitlines()) - set(rolled.splitlines()))
        only_rolled = sorted(set(rolled.splitlines()) - set(raw.splitlines()))
        differ[key] = f"{len(only_raw)} lines only from flows, {len(only_rolled)} only from rollups"
        log(f"differ: {key}: {differ[key]}")
        for side, lines in (("flows", only_raw), ("rollups", only_rolled)):
            for line in lines[:3]:
                log(f"  only from {side}: {line[:500]}")
    return differ


def _equality_child(task: str, *args: str, memory: str = EQUALITY_DUCKDB_MEMORY) -> dict[str, Any]:
    """Run `task` of `equality_main` in a child process whose DuckDB may use `memory`; its report, or
    {"error": why}."""
    outcome = run_python("equality_main", [task, *args], EQUALITY_TIMEOUT_SECONDS, memory)
    return outcome if isinstance(outcome, dict) else {"error": f"equality {task} {outcome}"}


def run_python(entry: str, args: list[str], timeout: float, memory: str) -> dict[str, Any] | str:
    """Run `entry(args)` of this module in a child process whose DuckDB may use `memory` (unless
    `FLOWPIPE_DUCKDB_MEMORY_LIMIT` sets a limit); the JSON object it prints last, or why it gave none."""
    from flowpipe._resources import MEMORY_VARIABLE

    code = f"import sys; from flowpipe.bench.rollups import {entry}; {entry}(sys.argv[1:])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={
                MEMORY_VARIABLE: memory,
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            },
        )
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout:.0f} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"failed: {done.stderr.strip()[-300:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def equality_main(argv: list[str]) -> None:
    """In a child process: `write FLOWS SEED ROOT` or `answer SOURCE ROOT OUT`; prints its report (with the
    process's peak RSS) as JSON."""
    from flowpipe.bench.context import peak_rss_mb

    task, *args = argv
    if task == "write":
        report = _equality_write(int(args[0]), int(args[1]), Path(args[2]))
    elif task == "answer":
        report = _equality_answer(args[0], Path(args[1]), Path(args[2]))
    else:
        raise SystemExit(f"unknown equality task {task}")
    report["rss_mb"] = peak_rss_mb(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def _equality_write(flows: int, seed: int, root: Path) -> dict[str, Any]:
    """Simulate `flows` flows over `EQUALITY_HOURS` in batches, write them through the Parquet sink with edge
    rollups (cheaper than building them afterwards, which reads the flows back), and fold every closed hour
    and day as compaction does."""
    from flowpipe.bench.questions import simulated_batches
    from flowpipe.config import ParquetSinkConfig
    from flowpipe.dataset.layout import Dataset
    from flowpipe.dataset.rollups.build import build_missing
    from flowpipe.dataset.rollups.fold import fold_closed
    from flowpipe.model import EventBatch
    from flowpipe.sinks.parquet import ParquetSink

    started = time.perf_counter()
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="bench", edge_rollups=True))
    written = 0
    for batch in simulated_batches(
        flows, seed=seed, start=EQUALITY_START, duration_seconds=EQUALITY_HOURS * 3600.0, max_flows=flows
    ):
        sink.write(EventBatch(flows=batch))
        written += batch.num_rows
    sink.close()
    write_seconds, started = time.perf_counter() - started, time.perf_counter()
    # the rollups the writer's background builder left (it trails a busy writer), as compaction builds them
    build_missing(Dataset(root))
    hours, days = fold_closed(Dataset(root), now=datetime(2100, 1, 1, tzinfo=UTC))
    return {
        "flows": written,
        "write_seconds": write_seconds,
        "fold_seconds": time.perf_counter() - started,
        "hours": len(hours),
        "days": len(days),
    }


def _equality_answer(source: str, root: Path, out: Path) -> dict[str, Any]:
    """Every edge question over each of `EQUALITY_WINDOWS` and `suggest` over the whole span, from `source`;
    each answer written under `out` (`<question>.<window>.txt`: its rows in a canonical order, one a line, as
    questions leave ties in any order; `suggest.txt`: the drafts)."""
    from flowpipe.app.suggest import SuggestConfig, suggest_policies
    from flowpipe.dataset.rollups import EDGE_QUESTIONS
    from flowpipe.errors import FlowpipeError
    from flowpipe.query import load_questions, run_question
    from flowpipe.query.engine import open_engine

    catalog = load_questions()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    errors: dict[str, str] = {}
    with open_engine(root, source=source) as engine:
        for name in EDGE_QUESTIONS:
            question = catalog.question(name)
            names = {p.name for p in question.parameters}
            started = time.perf_counter()
            for number, window in enumerate(EQUALITY_WINDOWS, 1):
                values = {k: v for k, v in {**window, "limit": "1000000"}.items() if k in names}
                try:
                    table = run_question(engine, question, values).table
                except FlowpipeError as exc:
                    errors[f"{name}.{number}"] = str(exc).splitlines()[0][:300]
                    continue
                rows = sorted(repr(row) for row in table.to_pylist())
                (out / f"{name}.{number}.txt").write_text("".join(f"{row}\n" for row in rows))
            seconds[name] = time.perf_counter() - started
        started = time.perf_counter()
        end = EQUALITY_START + timedelta(hours=EQUALITY_HOURS)
        drafted = "no drafts"
        try:
            suggestion = suggest_policies(
                engine, SuggestConfig(since=EQUALITY_START.isoformat(), until=end.isoformat())
            )
        except FlowpipeError as exc:
            errors["suggest"] = str(exc).splitlines()[0][:300]
        else:
            (out / "suggest.txt").write_text("".join(f"# {f.path}\n{f.text}" for f in suggestion.files))
            drafted = f"{len(suggestion.files)} files drafted from {suggestion.edges:,} edges"
    return {
        "questions": list(EDGE_QUESTIONS),
        "seconds_by_question": seconds,
        "suggest_seconds": time.perf_counter() - started,
        "drafted": drafted,
        "errors": errors,
    }


# -- the fleet: a month of rollups of a 5,000-workload cluster ------------------------------------------------


def fleet_size(flows: int) -> tuple[int, int]:
    """(workloads, days) of the fleet: the full `FLEET_WORKLOADS` x `FLEET_DAYS` at the default `--flows`
    (a million), scaled down with a smaller `--flows` (a quick run)."""
    scale = min(1.0, flows / 1_000_000)
    return max(20, int(FLEET_WORKLOADS * scale)), max(1, round(FLEET_DAYS * scale))


def _fleet(ctx: BenchContext, example: Path) -> list[Figure]:
    from flowpipe.bench.context import Figure

    workloads, days = fleet_size(ctx.flows)
    root = ctx.workdir / f"rollups-fleet-folded-{workloads}x{days}"
    marker = root / "_state" / "bench-rollups.json"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        rows = generate_fleet(root, example, workloads=workloads, days=days)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"rows": rows}))
        ctx.log(f"generated {rows:,} rollup rows in {time.perf_counter() - started:.0f} s")
    rows = json.loads(marker.read_text())["rows"]
    size = _folder_bytes(root)
    note = (
        f"{workloads:,} workloads, {workloads * FLEET_PEERS:,} edges, {days} days: "
        f"{rows:,} rollup rows, {size / 1e6:,.0f} MB"
    )
    figures = [
        _privilege_size(example),
        Figure(SECTION, "fleet rollups on disk", size / 1e6, "MB", note=note),
    ]
    privilege_marker = root / "_state" / "bench-privilege.json"
    if not privilege_marker.is_file():
        started = time.perf_counter()
        privilege_rows = generate_fleet_privilege(root, example, workloads=workloads, days=days)
        privilege_marker.write_text(json.dumps({"rows": privilege_rows}))
        ctx.log(f"generated {privilege_rows:,} privilege rows in {time.perf_counter() - started:.0f} s")
    privilege_rows = json.loads(privilege_marker.read_text())["rows"]
    for task in ("observed_edges", "new_connections", "suggest", "least_privilege"):
        ctx.log(f"fleet: {task} over {days} days of rollups (child process)")
        result = _child(task, root, days)
        seconds, rss = result.get("seconds"), result.get("rss_mb")
        what = f"{note}, {privilege_rows:,} privilege rows" if task == "least_privilege" else note
        detail = f"{what}; {result.get('detail', '')}".rstrip("; ")
        figures.append(Figure(SECTION, f"fleet {task}", seconds, "s", QUESTION_TARGET_SECONDS, False, detail))
        figures.append(Figure(SECTION, f"fleet {task} peak RSS", rss, "MB", RSS_TARGET_MB, False))
    return figures


def _privilege_size(example: Path) -> Figure:
    """What least_privilege keeps past the raw retention (folded privilege hours) against the flow bytes of the
    simulated dataset `example` (its closed hours folded)."""
    from flowpipe.bench.context import Figure
    from flowpipe.dataset.rollups import PRIVILEGE_HOURS_TABLE

    flow_bytes, privilege_bytes = (
        _folder_bytes(example / "flows"),
        _folder_bytes(example / PRIVILEGE_HOURS_TABLE),
    )
    return Figure(
        SECTION,
        "privilege rollup size / flow bytes",
        100.0 * privilege_bytes / max(flow_bytes, 1),
        "%",
        note=f"{privilege_bytes / 1e6:,.2f} MB of hourly privilege rows (least_privilege past the raw retention) "
        f"for {flow_bytes / 1e6:,.1f} MB of flows, besides the edge rows above",
    )


def generate_fleet(
    root: Path, example: Path, *, workloads: int = FLEET_WORKLOADS, days: int = FLEET_DAYS
) -> int:
    """Write `days` days of folded hours and days (one row per edge and hour, `edge_hours/`, and per edge and
    day, `edge_days/`) and the pod identities for `workloads` workloads under `root`, as compaction and
    retention leave a month whose flows are gone; returns the hourly rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowpipe.dataset.layout import PartitionKey
    from flowpipe.dataset.rollups import (
        EDGE_DAYS_TABLE,
        EDGE_HOURS_TABLE,
        EDGE_IDENTITIES_TABLE,
        fold_name,
    )

    hours_schema = pq.read_schema(next((example / EDGE_HOURS_TABLE).rglob("*.parquet")))
    ids_schema = pq.read_schema(next((example / EDGE_IDENTITIES_TABLE).rglob("*.parquet")))
    count = workloads
    numbers = np.arange(count)
    names = pa.array([f"wl-{w}" for w in numbers])
    namespaces = pa.array([f"ns-{w % 250}" for w in numbers])
    ids = pa.array([f"ns-{w % 250}/wl-{w}" for w in numbers])
    pods = pa.array([f"wl-{w}-7d9f8c6b5-x{w % 10}k2q" for w in numbers])
    ips = pa.array([f"10.{w // 250}.{w % 250}.7" for w in numbers])
    identities = pa.array(100_000 + numbers, pa.int64())
    edges = count * FLEET_PEERS
    source = np.repeat(numbers, FLEET_PEERS)
    destination = (source * 7919 + np.tile(np.arange(1, FLEET_PEERS + 1), count) * 104729) % count
    port = 8000 + (destination % 7)
    hours = days * 24
    rows = 0
    base: dict[str, Any] = {
        "cluster_name": pa.array([FLEET_CLUSTER] * edges),
        "is_connection": pa.array(np.ones(edges, bool)),
        "destination_ip": ips.take(destination),
        "destination_port": pa.array(port),
        "l4_protocol": pa.array(["TCP"] * edges),
        "outcome": pa.array(["delivered"] * edges),
        "denied_packets": pa.array(np.zeros(edges, np.int64)),
        "dropped_packets": pa.array(np.zeros(edges, np.int64)),
        "source_observed": pa.array(np.ones(edges, bool)),
        "destination_observed": pa.array(np.ones(edges, bool)),
        "source_namespace": namespaces.take(source),
        "source_pod_name": pods.take(source),
        "source_workload": names.take(source),
        "source_workload_id": ids.take(source),
        "source_identity": identities.take(source),
        "destination_namespace": namespaces.take(destination),
        "destination_pod_name": pods.take(destination),
        "destination_workload": names.take(destination),
        "destination_workload_id": ids.take(destination),
        "destination_identity": identities.take(destination),
    }
    labels = pa.array([[f"k8s:app=wl-{w}", f"k8s:io.kubernetes.pod.namespace=ns-{w % 250}"] for w in numbers])
    day_files: dict[datetime, str] = {}
    day_sums = np.zeros(edges, np.int64)
    for hour in range(hours):
        start = FLEET_START + timedelta(hours=hour)
        start_ns = int(start.timestamp() * 1e9)
        offsets = (np.arange(edges) * 1_000_003) % 3_000_000_000_000
        # 50,000 flows a second over 30,000 edges: about 6,000 request packets an edge and hour
        connections = 1 + (np.arange(edges) + hour) % 300
        columns = dict(base)
        columns["hour"] = pa.array(np.full(edges, start_ns), pa.timestamp("ns", "UTC"))
        columns["folded"] = pa.array(connections)
        columns["packets"] = pa.array(connections * 20)
        columns["first_seen"] = pa.array(start_ns + offsets, pa.timestamp("ns", "UTC"))
        columns["last_seen"] = pa.array(start_ns + offsets + 500_000_000_000, pa.timestamp("ns", "UTC"))
        key = PartitionKey.from_time(start)
        for table_name, rows_table in (
            (
                EDGE_IDENTITIES_TABLE,
                _as(ids_schema, _fleet_identities(hour, identities, namespaces, labels), None),
            ),
            (EDGE_HOURS_TABLE, _as(hours_schema, columns, edges)),
        ):
            folder = root / table_name / key.path
            folder.mkdir(parents=True, exist_ok=True)
            name = fold_name([f"fleet-{hour}"]) if table_name == EDGE_HOURS_TABLE else f"fleet-{hour}.parquet"
            pq.write_table(rows_table, folder / name, compression="zstd")
            if table_name == EDGE_HOURS_TABLE:
                day_files[start] = str(folder / name)
        rows += edges
        day_sums += connections
        if start.hour == 23:  # the day is closed: its hours folded again by edge, as compaction does
            columns["folded"], columns["packets"] = pa.array(day_sums), pa.array(day_sums * 20)
            _write_fleet_day(root / EDGE_DAYS_TABLE, hours_schema, columns, start, offsets, day_files)
            day_sums[:] = 0
    return rows


FLEET_SELECTED_EVERY = 10
"""Every workload but one in this many is selected by a policy (its ingress records get policy verdicts); the
others are the fleet's `no_policy` findings."""
FLEET_BROAD_EVERY = 7
"""One selected workload in this many is allowed by a policy matching any peer (`broad_policy`)."""


def generate_fleet_privilege(
    root: Path, example: Path, *, workloads: int = FLEET_WORKLOADS, days: int = FLEET_DAYS
) -> int:
    """Write `days` days of folded privilege records (`privilege_hours/`, `privilege_days/`) for the fleet's
    edges (`generate_fleet`): each edge's requests at its source (egress) and at its destination (ingress), and,
    for destinations that policies select, their policy-verdict events (which policy allowed them, some with a
    wildcard peer); returns the hourly rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowpipe.dataset.layout import PartitionKey
    from flowpipe.dataset.rollups import PRIVILEGE_DAYS_TABLE, PRIVILEGE_HOURS_TABLE, fold_name

    schema = pq.read_schema(next((example / PRIVILEGE_HOURS_TABLE).rglob("*.parquet")))
    numbers = np.arange(workloads)
    names = pa.array([f"wl-{w}" for w in numbers])
    namespaces = pa.array([f"ns-{w % 250}" for w in numbers])
    source = np.repeat(numbers, FLEET_PEERS)
    destination = (source * 7919 + np.tile(np.arange(1, FLEET_PEERS + 1), workloads) * 104729) % workloads
    port = 8000 + (destination % 7)
    selected = np.nonzero(destination % FLEET_SELECTED_EVERY != 0)[0]
    # the rows of an hour: egress at each source, ingress at each destination, verdicts at selected destinations
    at = np.concatenate([source, destination, destination[selected]])
    peer = np.concatenate([destination, source, source[selected]])
    edge = np.concatenate([np.arange(len(source)), np.arange(len(source)), selected])
    count = len(at)
    egress = np.arange(count) < len(source)
    verdict = np.arange(count) >= 2 * len(source)
    broad = verdict & (at % FLEET_BROAD_EVERY == 0)
    policies = pa.array(
        [
            [f"ns-{w % 250}/allow-wl-{w}"] if v else None
            for w, v in zip(at.tolist(), verdict.tolist(), strict=True)
        ],
        pa.list_(pa.string()),
    )
    base: dict[str, Any] = {
        "cluster_name": pa.array([FLEET_CLUSTER] * count),
        "namespace": namespaces.take(at),
        "workload": names.take(at),
        "direction": pa.array(np.where(egress, "egress", "ingress")),
        "peer_namespace": namespaces.take(peer),
        "peer_workload": names.take(peer),
        "port": pa.array(port.take(edge)),
        "l4_protocol": pa.array(["TCP"] * count),
        "allowed": pa.array(np.ones(count, bool)),
        "verdict_event": pa.array(verdict),
        "policy_match_type": pa.array(np.where(broad, 3, 1), mask=~verdict),
        "allowed_by": policies,
        "call": pa.array(np.where(port.take(edge) == 8000, "GET /v1/items/{id}", None)),
    }
    offsets = (np.arange(count) * 1_000_003) % 3_000_000_000_000
    rows = 0
    hour_files: dict[datetime, str] = {}
    day_sums = np.zeros(count, np.int64)
    for hour in range(days * 24):
        start = FLEET_START + timedelta(hours=hour)
        start_ns = int(start.timestamp() * 1e9)
        records = 20 * (1 + (edge + hour) % 300)
        columns = {
            **base,
            "hour": pa.array(np.full(count, start_ns), pa.timestamp("ns", "UTC")),
            "flows": pa.array(np.where(verdict, 1 + (edge + hour) % 300, records)),
            "first_seen": pa.array(start_ns + offsets, pa.timestamp("ns", "UTC")),
            "last_seen": pa.array(start_ns + offsets + 500_000_000_000, pa.timestamp("ns", "UTC")),
        }
        folder = root / PRIVILEGE_HOURS_TABLE / PartitionKey.from_time(start).path
        folder.mkdir(parents=True, exist_ok=True)
        name = fold_name([f"fleet-{hour}"])
        pq.write_table(_as(schema, columns, count), folder / name, compression="zstd")
        hour_files[start] = str(folder / name)
        rows += count
        day_sums += np.where(verdict, 1 + (edge + hour) % 300, records)
        if start.hour == 23:  # the day is closed: its hours folded again, as compaction does
            columns["flows"] = pa.array(day_sums)
            _write_fleet_day(root / PRIVILEGE_DAYS_TABLE, schema, columns, start, offsets, hour_files)
            day_sums[:] = 0
    return rows


def _write_fleet_day(
    table_dir: Path,
    schema: Any,
    columns: dict[str, Any],
    last_hour: datetime,
    offsets: Any,
    hours: dict[datetime, str],
) -> None:
    """Write the folded day ending with `last_hour` (its hours' files in `hours`) under `table_dir`: `columns`
    (their counts the day's) with the day as `hour` and times spanning the day."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowpipe.dataset.layout import PartitionKey
    from flowpipe.dataset.rollups import day_name

    day = last_hour.replace(hour=0)
    first = int(day.timestamp() * 1e9) + offsets
    columns = {
        **columns,
        "hour": pa.array(np.full(len(offsets), int(day.timestamp() * 1e9)), pa.timestamp("ns", "UTC")),
        "first_seen": pa.array(first, pa.timestamp("ns", "UTC")),
        "last_seen": pa.array(first + 23 * 3_600_000_000_000 + 500_000_000_000, pa.timestamp("ns", "UTC")),
    }
    folder = table_dir / PartitionKey.from_time(day).path
    folder.mkdir(parents=True, exist_ok=True)
    own = {h: path for h, path in hours.items() if h >= day}
    pq.write_table(_as(schema, columns, len(offsets)), folder / day_name(own), compression="zstd")


def _fleet_identities(hour: int, identities: Any, namespaces: Any, labels: Any) -> dict[str, Any]:
    import pyarrow as pa

    if hour:  # the first hour names every identity; later hours add nothing new
        return {}
    count = len(identities)
    return {
        "cluster_name": pa.array([FLEET_CLUSTER] * count),
        "identity": identities,
        "namespace": namespaces,
        "labels": labels,
    }


def _as(schema: Any, columns: dict[str, Any], rows: int | None) -> Any:
    """A table of `schema` from `columns` (cast to its types; other columns NULL)."""
    import pyarrow as pa

    length = rows if rows is not None else (len(next(iter(columns.values()))) if columns else 0)
    arrays = [columns[f.name].cast(f.type) if f.name in columns else pa.nulls(length, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _child(task: str, root: Path, days: int) -> dict[str, Any]:
    outcome = run_python(
        "child_main", [task, str(root.resolve()), str(days)], CHILD_TIMEOUT_SECONDS, FLEET_DUCKDB_MEMORY
    )
    return outcome if isinstance(outcome, dict) else {"seconds": None, "rss_mb": None, "detail": outcome}


def child_main(argv: list[str]) -> None:
    """In a child process: run one fleet task over rollups alone; print seconds, peak RSS and a note as JSON."""
    from flowpipe.query import load_questions, run_question
    from flowpipe.query.engine import open_engine

    task, root, days_text = argv
    days = int(days_text)
    since = FLEET_START.isoformat()
    until = (FLEET_START + timedelta(days=days)).isoformat()
    started = time.perf_counter()
    with open_engine(root, source="edges") as engine:
        if task == "suggest":
            from flowpipe.app.suggest import SuggestConfig, suggest_policies

            suggestion = suggest_policies(engine, SuggestConfig(since=since, until=until, verify_flows=False))
            detail = f"{suggestion.edges:,} edges, {len(suggestion.files)} files drafted"
        else:
            question = load_questions().question(task)
            values = {"since": since, "until": until, "limit": "1000000"}
            if task == "new_connections":
                values = {
                    "since": (FLEET_START + timedelta(days=days - 1)).isoformat(),
                    "until": until,
                    "baseline_since": since,
                }
            names = {p.name for p in question.parameters}
            table = run_question(engine, question, {k: v for k, v in values.items() if k in names}).table
            detail = f"{table.num_rows:,} rows"
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    from flowpipe.bench.context import peak_rss_mb

    rss_mb = peak_rss_mb(os.getpid()) or usage.ru_maxrss / 1024
    # the machine may be shared: the CPU time says what the task cost whatever else ran
    detail += f"; {usage.ru_utime + usage.ru_stime:.1f} CPU-s, load average {os.getloadavg()[0]:.1f}"
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "detail": detail}))

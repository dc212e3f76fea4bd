"""What bench sections share: the `Figure` they report, the `BenchContext` that builds common inputs once, and
the child processes whose peak RSS is their own.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowpipe.bench.data import SyntheticStats, write_synthetic_jsonpb
from flowpipe.errors import FlowpipeError

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


# -- child processes --------------------------------------------------------------------------------------


def run_child(task: str, *args: str) -> dict[str, Any]:
    """Run `task` of `child_main` in a fresh Python process; returns the JSON object it prints last."""
    code = "import sys; from flowpipe.bench.context import child_main; child_main(sys.argv[1:])"
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
    """Entry point of the child processes: `ingest FILE DATASET [rollups]` or `baseline FILE OUT LIMIT`."""
    task, *args = argv
    if task == "ingest":
        from flowpipe.app.ingest import ingest_files
        from flowpipe.config import ParquetSinkConfig

        source, dataset, *options = args
        cpu, started = cpu_seconds(), time.perf_counter()
        sink = ParquetSinkConfig(path=dataset, writer_id="bench", edge_rollups="rollups" in options)
        result = ingest_files([source], sink)
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {
            "flows": result.pipeline.flows,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds() - cpu,
            "files": len(result.pipeline.files),
        }
        report["by_verdict"] = result.flows_by_verdict
    elif task == "baseline":
        from flowpipe.bench.data import naive_ingest

        source, out, limit = args
        flows, seconds = naive_ingest(Path(source), Path(out), limit=int(limit))
        report = {"flows": flows, "seconds": seconds}
    else:
        raise SystemExit(f"unknown bench task {task}")
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report))


def cpu_seconds() -> float:
    """User plus system CPU time this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_note() -> str:
    """The machine's load when a timing was taken: timings on a busy machine are not the code's own."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet") if p.is_file())


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of another process so far (from /proc, so it works for a child still
    running); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory of process `pid` in MB (`VmHWM`: of its current program only, unlike
    `ru_maxrss`, which a child started by fork and exec inherits from its parent); None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

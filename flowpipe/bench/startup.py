"""The `startup` bench section: how long `flowpipe --help` and `flowpipe query --list` take, and what they import.

Each command runs in a fresh interpreter (`python -m flowpipe ...`), as a user's shell runs it: a first run warms
the bytecode and the file cache, then the median of `STARTUP_RUNS` runs is the figure. The target is what a
person notices: under 0.3 s. These commands import none of `HEAVY_MODULES`; `imported_heavy_modules` says which
of them a command line loads (the tests hold it to none).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from flowpipe.bench.context import BenchContext, Figure
from flowpipe.errors import FlowpipeError

HEAVY_MODULES = ("pyarrow", "duckdb", "pandas", "numpy", "grpc")
"""Libraries that cost most of a second to import; the light commands do without them."""
LIGHT_COMMANDS: tuple[tuple[str, ...], ...] = (("--help",), ("query", "--list"))
STARTUP_RUNS = 5
STARTUP_TARGET_SECONDS = 0.3

_PROBE = """
import json, sys
from flowpipe.cli import cli
try:
    cli(sys.argv[1:], prog_name="flowpipe")
except SystemExit:
    pass
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.stdin.readline())))
sys.stdout.write("\\n" + json.dumps(heavy) + "\\n")
"""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("COLUMNS", "120")
    return env


def imported_heavy_modules(args: Sequence[str]) -> list[str]:
    """The `HEAVY_MODULES` that `flowpipe ARGS` imports, run in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        input=json.dumps(HEAVY_MODULES) + "\n",
        capture_output=True,
        text=True,
        env=_environment(),
        check=False,
        timeout=120,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise FlowpipeError(f"flowpipe {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    modules: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return modules


def startup_seconds(args: Sequence[str], runs: int = STARTUP_RUNS) -> float:
    """Median wall time of `python -m flowpipe ARGS` over `runs` runs after one warm-up run."""
    command = [sys.executable, "-m", "flowpipe", *args]
    times = []
    for attempt in range(runs + 1):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, env=_environment(), check=False, timeout=120)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise FlowpipeError(f"flowpipe {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
        if attempt:
            times.append(elapsed)
    return statistics.median(times)


def bench_startup(ctx: BenchContext) -> list[Figure]:
    """Warm start time of the light commands, with the heavy libraries each one loaded (none is the goal)."""

    figures = []
    for args in LIGHT_COMMANDS:
        name = "flowpipe " + " ".join(args)
        ctx.log(f"timing `{name}` ({STARTUP_RUNS} runs)")
        heavy = imported_heavy_modules(args)
        note = f"median of {STARTUP_RUNS} warm runs; imports " + (
            ", ".join(heavy) if heavy else "no data library"
        )
        seconds = startup_seconds(args)
        figures.append(Figure("startup", f"`{name}` warm", seconds, "s", STARTUP_TARGET_SECONDS, False, note))
    return figures

"""DuckDB's memory limit and threads from the container's limits, so questions run inside a collector fit it.

DuckDB sizes itself from the machine: 80% of the host's memory and one thread per host CPU, whatever limits a
container has. In a pod limited to 512 MiB that is an out-of-memory kill waiting to happen. `duckdb_settings()`
reads the limits of the process's cgroup (v2: `memory.max`, `cpu.max`; v1: `memory.limit_in_bytes`,
`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and gives DuckDB half the memory limit (the rest is the collector's:
Arrow batches, the gRPC stream) and the CPU limit rounded up as threads. No limit: DuckDB's own defaults.
`FLOWPIPE_DUCKDB_MEMORY_LIMIT` (e.g. `300MiB`, `1GB`) and `FLOWPIPE_DUCKDB_THREADS` override either.

What does not fit in memory DuckDB spills to disk; an in-memory connection would spill into `.tmp/` of the
current directory (a user's checkout, a read-only folder): flowpipe's connections spill into a folder of their
process under the system's temporary directory (`TMPDIR`), removed when the process ends.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flowpipe.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY_SHARE = 0.5
"""The part of the container's memory limit DuckDB may use."""
MIN_MEMORY_BYTES = 64 << 20
MEMORY_VARIABLE = "FLOWPIPE_DUCKDB_MEMORY_LIMIT"
THREADS_VARIABLE = "FLOWPIPE_DUCKDB_THREADS"
_UNLIMITED_V1 = 1 << 60
"""cgroup v1 writes "no limit" as a huge number (9223372036854771712): anything above this is none."""
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def memory_limit_bytes(root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup's memory limit in bytes, or None when there is none (or no cgroup to read)."""
    text = _read(root / "memory.max")
    if text is None:
        text = _read(root / "memory" / "memory.limit_in_bytes")
    if text is None or not text.isdigit():
        return None  # "max" (v2) or unreadable
    value = int(text)
    return value if 0 < value < _UNLIMITED_V1 else None


def cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU limit in CPUs (quota / period), or None when there is none."""
    text = _read(root / "cpu.max")
    if text is not None:
        quota, _, period = text.partition(" ")
    else:
        quota = _read(root / "cpu" / "cpu.cfs_quota_us") or ""
        period = _read(root / "cpu" / "cpu.cfs_period_us") or ""
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # "max" / -1: no quota
    return int(quota) / int(period)


def available_cpus(root: Path = CGROUP_ROOT) -> float:
    """The CPUs this process may use: those it may run on (`sched_getaffinity`), fewer under a cgroup quota
    (a container's CPU limit), never the host's count alone."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cpu_limit(root)
    return min(cpus, limit) if limit is not None else cpus


def duckdb_settings(environ: Mapping[str, str] | None = None, root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """`memory_limit` and `threads` for DuckDB from the container's limits and the override variables; only
    the settings that have a value."""
    env = os.environ if environ is None else environ
    settings: dict[str, Any] = {}
    memory = env.get(MEMORY_VARIABLE, "").strip()
    if memory:
        if not _SIZE.match(memory):
            raise ConfigError(f"{MEMORY_VARIABLE}={memory!r} is not a size such as 300MiB or 1GB")
        settings["memory_limit"] = memory.replace(" ", "")
    else:
        limit = memory_limit_bytes(root)
        if limit is not None:
            settings["memory_limit"] = f"{max(MIN_MEMORY_BYTES, int(limit * MEMORY_SHARE)) >> 20}MiB"
    threads = env.get(THREADS_VARIABLE, "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ConfigError(f"{THREADS_VARIABLE}={threads!r} is not a whole number of threads (1 or more)")
        settings["threads"] = int(threads)
    else:
        cpus = cpu_limit(root)
        if cpus is not None:
            settings["threads"] = max(1, math.ceil(cpus))
    return settings


def apply_duckdb_limits(connection: Any, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Set DuckDB's `memory_limit` and `threads` on `connection` (a DuckDB connection) from
    `duckdb_settings()`, and where it spills (`spill_directory()`); returns the limits set. The values are
    checked above: a size, a number."""
    chosen = dict(duckdb_settings() if settings is None else settings)
    connection.execute("SET temp_directory = $dir", {"dir": spill_directory()})
    if "memory_limit" in chosen:
        connection.execute(f"SET memory_limit = '{chosen['memory_limit']}'")
    if "threads" in chosen:
        connection.execute(f"SET threads = {int(chosen['threads'])}")
    return chosen


_spill_folders: dict[int, str] = {}


def spill_directory() -> str:
    """Where this process's DuckDB connections spill what exceeds their memory limit: a folder of its own
    under the system's temporary directory (DuckDB creates it when it first spills), removed at exit. A forked
    child gets a folder of its own, and never removes its parent's."""
    pid = os.getpid()
    folder = _spill_folders.get(pid)
    if folder is None:
        folder = _spill_folders[pid] = os.path.join(tempfile.gettempdir(), f"flowpipe-spill-{pid}")
        atexit.register(_remove_spill_folder, pid, folder)
    return folder


def _remove_spill_folder(pid: int, folder: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run a block that builds many objects that live on (rows, drafts, documents) with Python's cyclic garbage
    collector paused, as it was before restored after (a collection can then run as usual).

    Each collection walks the objects built since the last one, and collections of the older generations walk
    them again, until they reach the oldest: a block that builds a million lasting objects pays for walks that
    find nothing to free (in `suggest` over a fleet, half of its CPU time; the whole run leaves some 100 objects
    in cycles). Reference counting frees everything else at once, as always.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

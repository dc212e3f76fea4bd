"""DuckDB inside a container: its memory limit and threads follow the cgroup's limits, not the host's; it spills
under the system's temporary folder."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from flowpipe._resources import (
    apply_duckdb_limits,
    collector_paused,
    cpu_limit,
    duckdb_settings,
    memory_limit_bytes,
)
from flowpipe.errors import ConfigError
from flowpipe.query.engine import DuckDBEngine


def cgroup_v2(root: Path, memory: str, cpu: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(memory + "\n")
    (root / "cpu.max").write_text(cpu + "\n")
    return root


def cgroup_v1(root: Path, memory: str, quota: str, period: str = "100000") -> Path:
    (root / "memory").mkdir(parents=True)
    (root / "cpu").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(memory + "\n")
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


def test_a_pod_limited_to_512mi_and_one_and_a_half_cpus(tmp_path: Path) -> None:
    v2 = cgroup_v2(tmp_path / "v2", str(512 << 20), "150000 100000")
    v1 = cgroup_v1(tmp_path / "v1", str(512 << 20), "150000")
    for root in (v2, v1):
        assert memory_limit_bytes(root) == 512 << 20 and cpu_limit(root) == 1.5
        assert duckdb_settings({}, root) == {"memory_limit": "256MiB", "threads": 2}


def test_no_limit_leaves_duckdb_its_defaults(tmp_path: Path) -> None:
    assert duckdb_settings({}, cgroup_v2(tmp_path / "v2", "max", "max 100000")) == {}
    assert duckdb_settings({}, cgroup_v1(tmp_path / "v1", "9223372036854771712", "-1")) == {}
    assert duckdb_settings({}, tmp_path / "no-cgroup") == {}


def test_the_variables_override_and_are_checked(tmp_path: Path) -> None:
    root = cgroup_v2(tmp_path, str(512 << 20), "100000 100000")
    env = {"FLOWPIPE_DUCKDB_MEMORY_LIMIT": "100MiB", "FLOWPIPE_DUCKDB_THREADS": "3"}
    assert duckdb_settings(env, root) == {"memory_limit": "100MiB", "threads": 3}
    with pytest.raises(ConfigError, match="FLOWPIPE_DUCKDB_MEMORY_LIMIT='lots'"):
        duckdb_settings({"FLOWPIPE_DUCKDB_MEMORY_LIMIT": "lots"}, root)
    with pytest.raises(ConfigError, match="FLOWPIPE_DUCKDB_THREADS='0'"):
        duckdb_settings({"FLOWPIPE_DUCKDB_THREADS": "0"}, root)
    with pytest.raises(ConfigError):
        duckdb_settings({"FLOWPIPE_DUCKDB_MEMORY_LIMIT": "1GB'; SET threads=64; --"}, root)


def test_duckdb_takes_the_settings(tmp_path: Path) -> None:
    connection = duckdb.connect()
    chosen = apply_duckdb_limits(
        connection, duckdb_settings({}, cgroup_v2(tmp_path, str(1 << 30), "200000 100000"))
    )
    assert chosen == {"memory_limit": "512MiB", "threads": 2}
    memory, threads = connection.execute(
        "SELECT current_setting('memory_limit'), current_setting('threads')"
    ).fetchone()  # type: ignore[misc]
    assert memory == "512.0 MiB" and threads == 2


def test_every_engine_applies_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWPIPE_DUCKDB_MEMORY_LIMIT", "200MiB")
    monkeypatch.setenv("FLOWPIPE_DUCKDB_THREADS", "1")
    with DuckDBEngine(None) as engine:
        row = engine.run("SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t")
    assert row.to_pylist() == [{"m": "200.0 MiB", "t": 1}]


def test_a_spill_goes_to_the_temporary_folder_and_leaves_with_the_process(tmp_path: Path) -> None:
    """A question larger than DuckDB's memory limit spills: never into `.tmp/` of the directory the user runs
    flowpipe from, and the spill folder is gone when the process ends."""
    work, temporary = tmp_path / "checkout", tmp_path / "tmp"
    work.mkdir()
    temporary.mkdir()
    script = (
        "import duckdb, os\n"
        "from flowpipe._resources import apply_duckdb_limits, spill_directory\n"
        "con = duckdb.connect()\n"
        "apply_duckdb_limits(con, {'memory_limit': '64MiB', 'threads': 1})\n"
        "con.execute('SET preserve_insertion_order = false')\n"
        "con.execute('SET enable_progress_bar = false')\n"
        "rows = con.execute('SELECT count(*) FROM (SELECT i, md5(i::VARCHAR) AS h FROM range(3000000) t(i)"
        " ORDER BY h)').fetchone()[0]\n"
        "assert rows == 3000000, rows\n"
        "print(spill_directory(), os.path.isdir(spill_directory()))\n"
    )
    env = {**os.environ, "TMPDIR": str(temporary)}
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    folder, spilled = done.stdout.split()
    assert Path(folder).parent == temporary and spilled == "True"  # it did spill, there
    assert not (work / ".tmp").exists() and list(work.iterdir()) == []
    assert not Path(folder).exists()  # removed at exit


def test_the_collector_is_paused_in_the_block_and_restored_after_even_on_an_error() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("boom")
    assert gc.isenabled()
    gc.disable()  # paused before: stays paused
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

"""Test helpers for the relay source and `flowpipe collect`: simulated flows, the built-in relay, datasets, processes."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from flowpipe._proto.flow import flow_pb2
from flowpipe.app.collect import CollectConfig, CollectResult, collect
from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.sources.relay import RelaySourceConfig

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

RECEIVING_MODES = [
    pytest.param(1, "http2", id="1-http2"),
    pytest.param(2, "http2", id="2-http2"),
    pytest.param(1, "grpcio", id="1-grpcio"),
]
"""(workers, receiver) of the reliability tests: one process and two with the HTTP/2 reader, and the library
client (`--receiver grpcio`, one process)."""


@cache
def sim_flow_bytes(count: int = 6000, seed: int = 3, duration_seconds: float = 3600.0) -> tuple[bytes, ...]:
    """`count` serialised flows of the simulated cluster (all faults on), time ordered, distinct uuids."""
    from flowpipe.sim import Simulator, SimulatorConfig

    rate = max(1.0, count / duration_seconds) if duration_seconds < 3600 else 50.0
    simulator = Simulator(
        SimulatorConfig(seed=seed, duration_seconds=duration_seconds, rate_flows_per_second=rate)
    )
    return tuple(itertools.islice(simulator.flow_bytes(), count))


def retimed(flows: Sequence[bytes], end_ns: int) -> list[bytes]:
    """The flows shifted in time so that the last one is at `end_ns` (for questions asked relative to now)."""
    parsed = [flow_pb2.Flow.FromString(data) for data in flows]
    shift = end_ns - max(f.time.ToNanoseconds() for f in parsed)
    for flow in parsed:
        flow.time.FromNanoseconds(flow.time.ToNanoseconds() + shift)
    return [flow.SerializeToString() for flow in parsed]


def uuids_of(flows: Sequence[bytes]) -> list[str]:
    """The uuid of each serialised flow."""
    return [flow_pb2.Flow.FromString(data).uuid for data in flows]


def chunks(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """`items` split into `parts` consecutive, nearly equal slices."""
    size = -(-len(items) // parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


def dataset_table(root: Path | str, table: str = "flows", columns: Sequence[str] | None = None) -> pa.Table:
    """Every visible row of a dataset table (empty when there is none)."""
    folder = Path(root) / table
    if not folder.exists():
        return pa.table({})
    files = [
        str(p)
        for p in folder.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    ]
    if not files:
        return pa.table({})
    return pads.dataset(files, format="parquet").to_table(columns=list(columns) if columns else None)


def dataset_uuids(root: Path | str) -> list[str]:
    """The uuid of every flow in a dataset (repeats kept, to count them)."""
    table = dataset_table(root, columns=["uuid"])
    return table.column("uuid").to_pylist() if table.num_columns else []


def fast_source(address: str, **changes: Any) -> RelaySourceConfig:
    """A relay source config with test-sized waits."""
    options: dict[str, Any] = {
        "address": address,
        "reconnect_backoff_initial_seconds": 0.02,
        "reconnect_backoff_max_seconds": 0.2,
        "batch_max_seconds": 0.05,
        "call_timeout_seconds": 5.0,
        "node_refresh_seconds": 0.5,
    }
    options.update(changes)
    return RelaySourceConfig(**options)


def fast_collect_config(
    address: str, dataset: Path, *, writer_id: str = "test", workers: int | None = None, **source: Any
) -> CollectConfig:
    """A collect config that flushes every 0.1 s and polls often (`workers` None: as many as the CPUs allow)."""
    return CollectConfig(
        source=fast_source(address, **source),
        sink=ParquetSinkConfig(path=str(dataset), flush_interval_seconds=0.1, writer_id=writer_id),
        pipeline=PipelineConfig(poll_interval_seconds=0.05, stop_timeout_seconds=5.0),
        question_interval_seconds=3600.0,
        workers=workers,
    )


@dataclass
class BackgroundCollect:
    """`collect` running on a thread; `stop()` ends it and returns its result (or raises its error)."""

    config: CollectConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    result: CollectResult | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> BackgroundCollect:
        def run() -> None:
            try:
                self.result = collect(self.config, stop=self.stop_event)
            except BaseException as exc:  # noqa: BLE001  (re-raised by stop())
                self.error = exc

        self.thread = threading.Thread(target=run, name="test-collect", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> CollectResult:
        self.stop_event.set()
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "collect did not stop"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@contextmanager
def background_collect(config: CollectConfig) -> Iterator[BackgroundCollect]:
    """Run `collect` on a thread for the duration of the block (stopped at the end)."""
    running = BackgroundCollect(config).start()
    try:
        yield running
    finally:
        if running.thread is not None and running.thread.is_alive():
            running.stop_event.set()
            running.thread.join(30)


def collect_command(*args: str) -> list[str]:
    """The argv of `flowpipe collect` in this interpreter."""
    return [sys.executable, "-m", "flowpipe", "--log-level", "info", "collect", *args]


def start_collector(
    args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `flowpipe collect` as a child process, its stderr into `log_path`."""
    environment = dict(os.environ)
    environment.update(env or {})
    log_file = open(log_path, "ab")  # noqa: SIM115  (closed with the process by the caller's wait)
    return subprocess.Popen(
        collect_command(*args), stdout=log_file, stderr=log_file, cwd=ROOT, env=environment
    )

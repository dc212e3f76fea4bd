"""The demo as library calls: a simulated cluster served by the built-in Observer server on loopback, collected
over gRPC into a fresh dataset (the same code path as against hubble-relay), then the questions it asks."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from flowpipe.app.collect import CollectConfig, CollectResult, collect
from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.errors import ConfigError, FlowpipeError
from flowpipe.model import EventBatch
from flowpipe.server import ObserverServer
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.sources.relay import RelaySourceConfig

QUESTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("drops_by_reason", "Drops by reason",
     ("drop_reason_desc", "reason_class", "source_namespace", "destination_namespace", "flows")),
    ("dns_failures", "Failing DNS lookups",
     ("kind", "source_namespace", "source_workload", "query", "rcode_name", "failures", "lookups")),
    ("unexpected_drops", "Unexpected drops",
     ("why", "source_namespace", "source_workload", "destination_namespace", "destination_workload",
      "destination_port", "drop_reason_desc", "flows")),
)  # fmt: skip
"""The questions the demo asks, and the columns it shows of each (the query command shows them all)."""
_PUBLISH_CHUNK = 5000


def fresh_dataset(path: str | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="flowpipe-demo-"))
    folder = Path(path)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(
            f"--dataset {folder} is not empty: the demo writes a fresh dataset (give a new folder)"
        )
    return folder


def simulate_cluster(minutes: float, rate: float, seed: int) -> tuple[Simulator, list[bytes]]:
    end = datetime.now(UTC).replace(microsecond=0)
    config = SimulatorConfig(
        seed=seed,
        start=end - timedelta(minutes=minutes),
        duration_seconds=minutes * 60,
        rate_flows_per_second=rate,
    )
    simulator = Simulator(config)
    return simulator, list(simulator.flow_bytes())


def collect_from_relay(
    flows: list[bytes],
    dataset: Path,
    *,
    on_started: Callable[[str], None] = lambda address: None,
    on_progress: Callable[[int], None] = lambda received: None,
) -> CollectResult:
    """Serve `flows` from the built-in relay and collect them over gRPC into `dataset`; `on_started` gets the
    relay's address, `on_progress` the flows received so far."""
    received = 0
    done = threading.Event()

    def count(batch: EventBatch) -> None:
        nonlocal received
        received += batch.flows.num_rows
        on_progress(received)
        if received >= len(flows):
            done.set()

    with ObserverServer(port=0, buffer_size=len(flows) + 1) as server:
        config = CollectConfig(
            source=RelaySourceConfig(
                address=server.address, reconnect_backoff_initial_seconds=0.05, batch_max_seconds=0.1
            ),
            sink=ParquetSinkConfig(path=str(dataset), writer_id="demo", flush_interval_seconds=1.0),
            pipeline=PipelineConfig(poll_interval_seconds=0.1),
            question_interval_seconds=3600.0,
        )
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = collect(config, stop=stop, on_batch=count)
            except BaseException as exc:  # noqa: BLE001  (re-raised on the main thread)
                outcome["error"] = exc
                done.set()

        on_started(server.address)
        worker = threading.Thread(target=run, name="flowpipe-demo-collect", daemon=True)
        worker.start()
        for start in range(0, len(flows), _PUBLISH_CHUNK):  # the relay receives the window as it "happens"
            server.publish(flows[start : start + _PUBLISH_CHUNK])
        done.wait()
        stop.set()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    result: CollectResult = outcome["result"]
    return result


def ask_questions(dataset: Path) -> list[tuple[str, str, tuple[str, ...], pa.Table | FlowpipeError]]:
    """(name, title, columns shown, answer or the error it raised) of each demo question the catalog has."""
    from flowpipe.query.catalog import load_questions
    from flowpipe.query.engine import open_engine
    from flowpipe.query.run import run_question

    catalog = load_questions()
    answers: list[tuple[str, str, tuple[str, ...], pa.Table | FlowpipeError]] = []
    with open_engine(str(dataset), require_flows=True) as engine:
        for name, title, columns in QUESTIONS:
            if name not in catalog:
                continue
            try:
                result = run_question(engine, catalog.question(name), {"since": "1d"}, relative_to="data")
            except FlowpipeError as exc:
                answers.append((name, title, columns, exc))
                continue
            answers.append((name, title, columns, result.table))
    return answers

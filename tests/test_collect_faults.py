"""`flowpipe collect` when things go wrong: the relay restarting, a full disk, and addresses that are not a relay."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.collect import (
    RECEIVING_MODES,
    BackgroundCollect,
    background_collect,
    chunks,
    dataset_table,
    dataset_uuids,
    fast_collect_config,
    sim_flow_bytes,
    uuids_of,
)
from support.env import small_tmpfs
from support.wait import wait_until

from flowpipe._proto.flow import flow_pb2
from flowpipe.cli import cli
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import DatasetWriteError
from flowpipe.server import ObserverServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("workers", "receiver"), RECEIVING_MODES)
def test_relay_restarted_20_times_during_a_stream_loses_and_repeats_nothing(
    tmp_path: Path, workers: int, receiver: str
) -> None:
    flows = sim_flow_bytes()[:4200]
    parts = chunks(flows, 21)
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(parts[0])
        with background_collect(
            fast_collect_config(
                server.address, tmp_path, resume_overlap_seconds=5.0, workers=workers, receiver=receiver
            )
        ) as run:
            for part in parts[1:]:
                assert server.wait_for_streams(1, timeout_seconds=30)
                server.publish(part)
                server.restart()
            wait_until(
                lambda: len(dataset_uuids(tmp_path)) >= len(flows), what="every flow after the restarts"
            )
            result = run.stop()
    written = dataset_uuids(tmp_path)
    assert len(written) == len(set(written)), "no flow written twice"
    assert sorted(written) == sorted(uuids_of(flows)), "no flow missing"
    assert result.reconnects >= 20
    assert result.repeats_skipped > 0


def test_flows_without_uuid_are_recognised_by_content_across_relay_and_collector_restarts(
    tmp_path: Path,
) -> None:
    # Older Cilium sends no uuid: repeats after a reconnect or a restart are recognised by a hash of the row.
    flows = []
    for data in sim_flow_bytes()[:1500]:
        flow = flow_pb2.Flow.FromString(data)
        flow.uuid = ""
        flows.append(flow.SerializeToString())
    expected = sorted(
        (
            f.time.ToNanoseconds(),
            f.node_name,
            f.IP.source or None,
            f.l4.TCP.source_port or f.l4.UDP.source_port or None,
        )
        for f in map(flow_pb2.Flow.FromString, flows)
    )
    assert len(set(expected)) == len(expected), "every served flow is told apart by these columns"

    def written() -> list[tuple[object, ...]]:
        table = dataset_table(tmp_path, columns=["time", "node_name", "source_ip", "source_port", "uuid"])
        if not table.num_columns:
            return []
        assert table.column("uuid").null_count == table.num_rows
        times = pc.cast(table.column("time"), pa.int64()).to_pylist()
        rest = (table.column(c).to_pylist() for c in ("node_name", "source_ip", "source_port"))
        return sorted(zip(times, *rest, strict=True))

    parts = chunks(flows, 6)
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(parts[0])
        config = fast_collect_config(server.address, tmp_path, resume_overlap_seconds=5.0)
        with background_collect(config) as run:
            for part in parts[1:3]:
                assert server.wait_for_streams(1, timeout_seconds=30)
                server.publish(part)
                server.restart()
            wait_until(lambda: len(written()) >= 750, what="the flows served before the collector stops")
            first = run.stop()
        for part in parts[3:]:
            server.publish(part)
        config = fast_collect_config(server.address, tmp_path, writer_id="again", resume_overlap_seconds=5.0)
        with background_collect(config) as run:
            wait_until(lambda: len(written()) >= len(flows), what="every flow after the restart")
            second = run.stop()
    assert written() == expected, "no flow written twice, none missing"
    assert first.reconnects >= 2 and first.repeats_skipped > 0
    assert second.repeats_skipped > 0, "the restart skipped repeats by the hashes of the flows in the dataset"


def test_reconnection_failures_are_logged_once_per_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flows = sim_flow_bytes()[:200]
    with ObserverServer(buffer_size=1000) as server:
        server.publish(flows[:100])
        with background_collect(fast_collect_config(server.address, tmp_path)) as run:
            wait_until(lambda: len(dataset_uuids(tmp_path)) == 100, what="the first flows")
            with caplog.at_level(logging.DEBUG, logger="flowpipe.sources.relay"):
                server.restart(downtime_seconds=1.5)  # ~10 failed attempts at 0.02-0.2 s backoff
                server.publish(flows[100:])
                wait_until(lambda: len(dataset_uuids(tmp_path)) == 200, what="the flows after the downtime")
            run.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refused = [m for m in warnings if "connection refused" in m]
    debug_attempts = [r for r in caplog.records if r.levelno == logging.DEBUG and "attempt" in r.getMessage()]
    assert len(refused) == 1, warnings
    assert len(debug_attempts) >= 2, "later attempts with the same reason are logged at debug level only"
    assert any("again after" in m for m in warnings)


# -- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs mounted for the test (needs root); skips where mounting is not permitted."""
    with small_tmpfs(tmp_path, "1m") as target:
        yield target


def assert_checkpoint_not_ahead(state: dict[str, object], dataset: Path, written: list[str]) -> None:
    """A relay checkpoint claims no flow the dataset lacks.

    The relay sends its node_status message before the backlog; when that message is a batch of its own
    (the backlog came after the source's batch window closed, as on a busy machine), its position is the
    first one committed and saved, and it records no position at all. Later positions are saved at most
    once a second, so on a disk that fills within that second the position-less checkpoint is the one that
    stays (the save at close fails, or nothing more was acknowledged): a restart then starts from the
    relay's whole buffer, which is never ahead.
    """
    if state["resume_ns"] is None:
        assert state["newest_ns"] is None and state["uuid"] is None and state["nodes"] == {}, state
        return
    times = pc.cast(dataset_table(dataset, columns=["time"]).column("time"), pa.int64())
    assert state["uuid"] in written
    newest = state["newest_ns"]
    assert isinstance(newest, int) and newest <= pc.max(times).as_py()


@pytest.mark.parametrize(("workers", "receiver"), RECEIVING_MODES)
def test_disk_full_while_flushing_acknowledges_nothing_unwritten_and_the_next_start_fetches_it(
    small_disk: Path, workers: int, receiver: str
) -> None:
    dataset = small_disk / "data"
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 96 * 1024))  # leave room for a few part files only
    flows = sim_flow_bytes()[:6000]
    with ObserverServer(buffer_size=20_000) as server:
        server.publish(flows)
        config = fast_collect_config(server.address, dataset, workers=workers, receiver=receiver)
        config = type(config)(
            # batches of 150 flows: several are published before the disk fills (a batch is published whole)
            source=dataclasses.replace(config.source, batch_max_flows=150),
            sink=type(config.sink)(
                path=str(dataset), flush_interval_seconds=0.1, max_batch_rows=400, writer_id="w"
            ),
            pipeline=config.pipeline,
            question_interval_seconds=3600.0,
            workers=workers,
        )
        failing = BackgroundCollect(config).start()
        assert failing.thread is not None
        failing.thread.join(60)
        assert not failing.thread.is_alive(), "collect stops on a full disk"
        assert isinstance(failing.error, DatasetWriteError)
        assert "No space left on device" in str(failing.error)
        assert failing.error.path.startswith(str(dataset / "flows"))  # names the part file it was writing
        assert Path(failing.error.path).name in str(failing.error)

        written = dataset_uuids(dataset)
        assert 0 < len(written) < len(flows)
        for path in Dataset(dataset).list_part_files("flows"):
            assert pq.read_table(path).num_rows > 0  # every visible part file is whole
        assert Dataset(dataset).list_temp_files("flows") == []
        state_path = dataset / "_state" / "relay.json"
        if state_path.exists():  # the checkpoint never runs ahead of what is in the dataset
            assert_checkpoint_not_ahead(json.loads(state_path.read_text()), dataset, written)

        filler.unlink()
        with background_collect(config) as run:
            wait_until(lambda: len(dataset_uuids(dataset)) >= len(flows), what="the flows not written before")
            run.stop()
    written = dataset_uuids(dataset)
    assert sorted(written) == sorted(uuids_of(flows)) and len(written) == len(set(written))


def test_a_checkpoint_saved_before_any_flow_records_no_position_and_the_next_start_fetches_everything(
    tmp_path: Path,
) -> None:
    flows = sim_flow_bytes()[:300]
    dataset = tmp_path / "data"
    state_path = dataset / "_state" / "relay.json"
    nodes = sorted({flow_pb2.Flow.FromString(data).node_name for data in flows})
    with ObserverServer(buffer_size=1000, nodes=nodes) as server:  # node_status, no flow yet
        with background_collect(fast_collect_config(server.address, dataset)) as run:
            wait_until(state_path.exists, what="the checkpoint of the node_status batch")
            run.stop()
        state = json.loads(state_path.read_text())
        assert state["resume_ns"] is None and state["uuid"] is None, state
        server.publish(flows)  # while no collector runs
        with background_collect(fast_collect_config(server.address, dataset)) as run:
            wait_until(
                lambda: len(dataset_uuids(dataset)) >= len(flows), what="the flows published meanwhile"
            )
            run.stop()
    written = dataset_uuids(dataset)
    assert sorted(written) == sorted(uuids_of(flows)) and len(written) == len(set(written))


# -- addresses that are not a relay --------------------------------------------------------------------------------


def run_collect(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["collect", "--startup-timeout-seconds", "1", "--metrics-address", "off", *args]
    )
    return result.exit_code, result.output


def test_a_wrong_port_is_retried_then_reported_with_a_startup_timeout(tmp_path: Path) -> None:
    port = free_port()
    code, output = run_collect("--relay", f"127.0.0.1:{port}", "--dataset", str(tmp_path))
    assert code == 1
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in output


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for connection in held:
            connection.close()


def test_the_startup_timeout_bounds_a_peer_that_stays_silent(tmp_path: Path, silent_peer: int) -> None:
    # The call, the diagnosis of its failure and the waits between tries share the startup timeout (a silent
    # peer used to hold each call for its own deadline, then each socket check of the diagnosis for 5 s more).
    started = time.monotonic()
    result = CliRunner().invoke(
        cli,
        ["collect", "--startup-timeout-seconds", "2", "--metrics-address", "off", "--relay",
         f"127.0.0.1:{silent_peer}", "--dataset", str(tmp_path)],
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"127.0.0.1:{silent_peer} accepted the connection but answered nothing" in result.output
    assert elapsed < 2 * 2 + 2, f"a 2 s startup timeout took {elapsed:.1f} s"


def test_an_unknown_host_is_reported(tmp_path: Path) -> None:
    code, output = run_collect("--relay", "relay.invalid:4245", "--dataset", str(tmp_path))
    assert code == 1 and "cannot resolve the relay host 'relay.invalid'" in output


def test_a_malformed_address_is_a_usage_error(tmp_path: Path) -> None:
    # (a host alone is not malformed: it takes hubble's port 4245)
    code, output = run_collect("--relay", "hubble-relay:http", "--dataset", str(tmp_path))
    assert code == 2 and "is not HOST:PORT" in output


def test_a_grpc_server_that_is_not_hubble_is_reported_at_once(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = CliRunner().invoke(
            cli,
            [
                "collect",
                "--relay",
                f"127.0.0.1:{port}",
                "--dataset",
                str(tmp_path),
                "--metrics-address",
                "off",
            ],
        )
    finally:
        server.stop(None)
    assert result.exit_code == 1
    assert "answers gRPC but is not a Hubble relay" in result.output and "ServerStatus" in result.output


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_http_server_is_reported_at_once(tmp_path: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = CliRunner().invoke(
            cli,
            ["collect", "--relay", f"127.0.0.1:{httpd.server_address[1]}", "--dataset", str(tmp_path),
             "--metrics-address", "off"],
        )  # fmt: skip
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.exit_code == 1
    assert "is an HTTP/1 server" in result.output and "not a gRPC Hubble relay" in result.output

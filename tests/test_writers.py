"""Several writers on one dataset, on a local folder and on an S3-compatible server: real processes at once.

Two ingests of different files keep both checkpoints; two ingests of one file, or two collectors of one relay
and checkpoint, never both write (the second is refused, naming the first: host, pid, since when); a writer
killed at any step of a publish leaves nothing that a plain `**/*.parquet` glob counts twice once it ran again;
a compaction killed half-way is finished at once by the next; queries never fail while compaction runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.collect import ROOT, sim_flow_bytes, start_collector, uuids_of
from support.processes import stop_process
from support.s3 import fresh_bucket
from support.small_files import simulated_flows, write_small_files
from support.wait import wait_until

from flowpipe.bench.s3 import count_flush_requests, counting_s3_server, request_counts
from flowpipe.cli import cli
from flowpipe.dataset.compact import compact_dataset
from flowpipe.dataset.layout import KILL_AT_VARIABLE, SINGLE_PUT_VARIABLE, Dataset
from flowpipe.dataset.leases import SourceClaimedError, read_leases, take_lease
from flowpipe.query import DuckDBEngine
from flowpipe.server import ObserverServer
from flowpipe.sim import Simulator, SimulatorConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 in a child process, counting requests (`flowpipe.bench.s3`)."""
    with counting_s3_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "flowpipe-test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "flowpipe-test")
        patch.setenv("AWS_REGION", "us-east-1")
        patch.setenv("FLOWPIPE_S3_ENDPOINT", endpoint)
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh dataset location: a local folder, or a prefix in a fresh bucket of the local S3 server."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    request.getfixturevalue("s3_endpoint")
    return fresh_bucket(request)


def all_keys(url: str) -> list[str]:
    """Every object or file under the dataset, hidden ones included (what a tool listing the prefix sees)."""
    dataset = Dataset(url)
    infos = dataset.filesystem.get_file_info(pafs.FileSelector(dataset.root, recursive=True))
    return sorted(i.path[len(dataset.root) :] for i in infos if i.type == pafs.FileType.File)


def glob_rows(url: str) -> int:
    """Rows of every `**/*.parquet` under `flows/`, as a tool that knows nothing of flowpipe counts them."""
    dataset = Dataset(url)
    return sum(
        pq.read_metadata(dataset.root + path, filesystem=dataset.filesystem).num_rows
        for path in all_keys(url)
        if path.startswith("/flows/") and path.endswith(".parquet")
    )


def count(url: str) -> int:
    with DuckDBEngine(url) as engine:
        return int(engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py())


def simulated_file(path: Path, *, seed: int, seconds: float = 1800, rate: float = 2.0) -> Path:
    config = SimulatorConfig(seed=seed, duration_seconds=seconds, rate_flows_per_second=rate)
    with path.open("w") as out:
        Simulator(config).write_jsonpb(out)
    return path


def flows_in(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if '"flow"' in line)


def flowpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "flowpipe", *args],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


# -- several ingests ------------------------------------------------------------------------------------------


def test_two_ingests_of_different_files_at_once_keep_both_checkpoints(where: str, tmp_path: Path) -> None:
    files = [simulated_file(tmp_path / f"flows-{seed}.jsonpb", seed=seed) for seed in (1, 2)]
    expected = sum(flows_in(f) for f in files)
    runs = [flowpipe("ingest", "--dataset", where, "--max-batch-rows", "300", str(f)) for f in files]
    for process in runs:
        code, output = finish(process)
        assert code == 0, output
    assert count(where) == expected
    # each file's progress survived the other's checkpoint writes: running both again adds nothing
    again = [flowpipe("ingest", "--dataset", where, str(f)) for f in files]
    for process in again:
        code, output = finish(process)
        assert code == 0 and "flows ingested: 0" in output, output
    assert count(where) == expected
    assert read_leases(Dataset(where)) == []  # every lease released


def test_two_ingests_of_one_file_at_once_store_it_once(where: str, tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb", seed=3)
    runs = [flowpipe("ingest", "--dataset", where, "--max-batch-rows", "200", str(source)) for _ in range(2)]
    results = [finish(process) for process in runs]
    assert count(where) == flows_in(source)  # whoever came second stored nothing twice
    assert any(code == 0 for code, _ in results)
    for code, output in results:
        if code != 0:
            assert "is taken by flowpipe ingest on host" in output and "pid" in output, output


HOLDER = textwrap.dedent(
    """
    import sys, time
    from flowpipe.dataset.leases import take_lease
    from flowpipe.dataset.layout import Dataset
    from flowpipe.sources.file import input_claims
    take_lease(Dataset(sys.argv[1]), "ingest", input_claims([sys.argv[2]]))
    print("held", flush=True)
    time.sleep(3600)
    """
)


def test_an_ingest_of_a_file_another_process_reads_is_refused_naming_it(where: str, tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb", seed=4, seconds=600)
    renamed = tmp_path / "renamed.jsonpb"  # the same content under another name is the same file
    renamed.write_bytes(source.read_bytes())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, where, str(source)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, output = finish(flowpipe("ingest", "--dataset", where, str(renamed)))
        assert code == 1, output
        assert f"on host {socket.gethostname()}, pid {holder.pid}, since " in output, output
        assert "Traceback" not in output
        assert count_or_zero(where) == 0
    finally:
        holder.kill()
        holder.wait(10)
    # its holder is gone (killed): the next ingest takes the file over at once
    code, output = finish(flowpipe("ingest", "--dataset", where, str(renamed)))
    assert code == 0, output
    assert count(where) == flows_in(source)


def count_or_zero(url: str) -> int:
    return count(url) if Dataset(url).list_part_files("flows") else 0


def test_an_earlier_single_checkpoint_document_is_still_honoured(tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb", seed=5, seconds=300)
    where = str(tmp_path / "dataset")
    code, output = finish(flowpipe("ingest", "--dataset", where, str(source)))
    assert code == 0, output
    # fold the per-content documents into the files.json of earlier versions, as an old dataset has it
    state = tmp_path / "dataset" / "_state"
    documents = {
        path.stem.replace("-", ":"): json.loads(path.read_text()) for path in (state / "files").glob("*.json")
    }
    (state / "files.json").write_text(json.dumps({"version": 1, "files": documents}))
    for path in (state / "files").glob("*.json"):
        path.unlink()
    code, output = finish(flowpipe("ingest", "--dataset", where, str(source)))
    assert code == 0 and "flows ingested: 0" in output, output


# -- several collectors ---------------------------------------------------------------------------------------


def collector_args(address: str, where: str) -> list[str]:
    return ["--relay", address, "--dataset", where, "--metrics-address", "off",
            "--reconnect-backoff-initial-seconds", "0.05", "--flush-interval-seconds", "0.05"]  # fmt: skip


def test_a_second_collector_of_one_relay_and_checkpoint_is_refused(where: str, tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:2000]
    log = tmp_path / "collect.log"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows[:1000])
        first = start_collector(collector_args(server.address, where), log)
        try:
            wait_until(lambda: count_or_zero(where) > 0, what="the first collector's part files")
            code, output = finish(flowpipe("collect", *collector_args(server.address, where)))
            assert code == 1, output
            assert "the relay checkpoint relay.json" in output and f"pid {first.pid}" in output, output
            assert "--node-shard" in output
            # the first one is killed: a new collector takes over at once and carries on from its checkpoint
            assert stop_process(first, signal.SIGKILL) == -signal.SIGKILL
            server.publish(flows[1000:])
            first = start_collector(collector_args(server.address, where), log)
            wait_until(lambda: count_or_zero(where) >= len(flows), what="every flow after the take-over")
        finally:
            assert stop_process(first) in (0, -signal.SIGKILL), log.read_text()[-3000:]
    written = uuids(where)
    assert sorted(written) == sorted(uuids_of(flows))  # each flow once


def uuids(url: str) -> list[str]:
    with DuckDBEngine(url) as engine:
        return engine.run("SELECT uuid FROM flows").column("uuid").to_pylist()


# -- a writer killed at each step of a publish -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "single_put_bytes"),
    [
        ("publish:written", None),  # a small part file: held in memory, one PUT of its final key
        ("publish:done", None),
        ("publish:written", "0"),  # every part file through a temporary object: uploaded, copied, deleted
        ("publish:copied", "0"),
    ],
)
def test_a_collector_killed_at_each_step_of_a_publish_leaves_nothing_counted_twice(
    step: str, single_put_bytes: str | None, s3_endpoint: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = fresh_bucket(request)  # an object store: no rename, a copy then a delete
    flows = sim_flow_bytes()[:1500]
    log = tmp_path / "collect.log"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        args = collector_args(server.address, where)
        hooks = {KILL_AT_VARIABLE: step, SINGLE_PUT_VARIABLE: single_put_bytes or ""}
        killed = start_collector(args, log, env=hooks)
        try:
            assert killed.wait(120) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            stop_process(killed, signal.SIGKILL)
        leftovers = [k for k in all_keys(where) if k.endswith(".tmp")]
        assert bool(leftovers) == (single_put_bytes == "0" and step != "publish:done")  # a hidden temporary
        restarted = start_collector(args, log)
        try:
            wait_until(
                lambda: log.read_text().count("following hubble-relay") == 2, what="the restarted collector"
            )
            wait_until(lambda: count_or_zero(where) >= len(flows), what="every flow after the restart")
        finally:
            assert stop_process(restarted) == 0, log.read_text()[-3000:]
    assert [k for k in all_keys(where) if k.endswith(".tmp")] == []  # the restart removed its leftovers
    assert glob_rows(where) == len(flows)  # a plain glob counts each flow once
    assert sorted(uuids(where)) == sorted(uuids_of(flows))


def test_an_ingest_killed_between_copy_and_delete_leaves_no_temporary_object(
    s3_endpoint: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = fresh_bucket(request)
    source = simulated_file(tmp_path / "flows.jsonpb", seed=6, seconds=600)
    args = ["ingest", "--dataset", where, "--max-batch-rows", "300", str(source)]
    hooks = {KILL_AT_VARIABLE: "publish:copied@2", SINGLE_PUT_VARIABLE: "0"}
    code, output = finish(flowpipe(*args, env=hooks))
    assert code == -signal.SIGKILL, output
    assert [k for k in all_keys(where) if k.endswith(".tmp")]
    code, output = finish(flowpipe(*args))  # a new writer id: the dead one's lease names its leftovers
    assert code == 0, output
    assert [k for k in all_keys(where) if k.endswith(".tmp")] == []


# -- compaction: killed, then at once again; queries during it -----------------------------------------------


@pytest.fixture(scope="module")
def small_flows() -> Any:
    return simulated_flows()


def small_dataset(where: str, flows: Any) -> int:
    write_small_files(where, flows, batch_rows=1000, lost=False)  # type: ignore[arg-type]
    return int(flows.num_rows)


@pytest.mark.parametrize("step", ["publish:written@2", "publish:copied@2", "publish:done@2"])
def test_a_killed_compaction_is_finished_at_once_by_the_next(where: str, small_flows: Any, step: str) -> None:
    if step.startswith("publish:copied") and not where.startswith("s3://"):
        pytest.skip("a local folder renames: there is no copy step")
    total = small_dataset(where, small_flows)
    code, output = finish(flowpipe("compact", "--dataset", where, env={KILL_AT_VARIABLE: step}))
    assert code == -signal.SIGKILL, output
    assert read_leases(Dataset(where))  # the dead run's lease is still there
    assert count(where) == total  # flowpipe's readers leave out what a compacted file holds
    code, output = finish(flowpipe("compact", "--dataset", where))  # at once: no waiting for an expiry
    assert code == 0, output
    assert [k for k in all_keys(where) if k.endswith(".tmp")] == []
    assert glob_rows(where) == total  # inputs of the killed run's compacted file removed: nothing twice
    assert count(where) == total
    assert read_leases(Dataset(where)) == []


def test_a_compaction_while_another_runs_is_refused(where: str, small_flows: Any) -> None:
    small_dataset(where, small_flows)
    lease = take_lease(Dataset(where), "compaction", {"maintenance": "maintenance (compaction or retention)"})
    try:
        code, output = finish(flowpipe("compact", "--dataset", where))
    finally:
        lease.release()
    assert code == 1 and f"pid {os.getpid()}" in output and "one compaction or retention" in output, output


def test_an_engine_open_across_a_compaction_answers(where: str, small_flows: Any) -> None:
    total = small_dataset(where, small_flows)
    with DuckDBEngine(where) as engine:
        assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total
        compact_dataset(Dataset(where))
        assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total
        engine.refresh()  # the views' probe reads the flows too
        assert engine.run("SELECT count(DISTINCT uuid) AS n FROM flows").column("n")[0].as_py() == total


def test_queries_in_a_loop_during_compaction_never_fail_nor_double_count(
    where: str, small_flows: Any
) -> None:
    total = small_dataset(where, small_flows)
    answers: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def ask() -> None:
        with DuckDBEngine(where) as engine:
            while not done.is_set():
                try:
                    answers.append(engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py())
                    engine.refresh()
                except BaseException as exc:  # noqa: BLE001  (asserted below)
                    errors.append(exc)
                    return

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        compacting = flowpipe("compact", "--dataset", where)
        code, output = finish(compacting)
    finally:
        done.set()
        thread.join(120)
    assert code == 0, output
    assert errors == []
    assert answers and set(answers) == {total}
    assert len(Dataset(where).list_part_files("flows")) < total // 1000


# -- requests --------------------------------------------------------------------------------------------------


def test_a_flush_writes_no_folder_marker_and_few_requests(s3_endpoint: str) -> None:
    per_flush, counts = count_flush_requests(s3_endpoint, flushes=3, rows=500)
    # the check that the part file's name is free (HEAD, then LIST), one PUT of the part file
    assert counts == {"head": 3, "list": 3, "put": 3}
    assert per_flush == 3
    assert request_counts(s3_endpoint)  # the counter answers


# -- leases ------------------------------------------------------------------------------------------------------


def lease_document(holder: str, *, host: str, pid: int, expires_in: float) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "holder": holder,
        "host": host,
        "pid": pid,
        "command": "collect",
        "writer_id": "w-" + holder,
        "since": now.isoformat(),
        "renewed": now.isoformat(),
        "expires": (now + timedelta(seconds=expires_in)).isoformat(),
        "claims": {"relay/relay.json": "the relay checkpoint relay.json"},
    }


def test_a_lease_from_another_host_holds_until_it_expires(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path / "dataset")
    leases = tmp_path / "dataset" / "_state" / "leases"
    leases.mkdir(parents=True)
    claims = {"relay/relay.json": "the relay checkpoint relay.json"}
    (leases / "a.json").write_text(json.dumps(lease_document("a", host="elsewhere", pid=1, expires_in=30)))
    with pytest.raises(SourceClaimedError, match="on host elsewhere, pid 1, since "):
        take_lease(dataset, "collect", claims)
    # expired: its process is gone; the lease is taken over and the dead writer's temporary files are named
    (leases / "a.json").write_text(json.dumps(lease_document("a", host="elsewhere", pid=1, expires_in=-1)))
    lease = take_lease(dataset, "collect", claims, writer_id="mine")
    try:
        assert lease.dead_writers == ["w-a"]
        assert [d["holder"] for d in read_leases(dataset)] == [lease.holder]
        assert read_leases(dataset)[0]["writer_id"] == "mine"
    finally:
        lease.release()
    assert read_leases(dataset) == []


def test_a_lease_of_a_process_gone_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path / "dataset")
    leases = tmp_path / "dataset" / "_state" / "leases"
    leases.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    document = lease_document("b", host=socket.gethostname(), pid=gone.pid, expires_in=60)
    (leases / "b.json").write_text(json.dumps(document))
    take_lease(dataset, "collect", {"relay/relay.json": "the relay checkpoint relay.json"}).release()


def test_bench_counts_requests_per_flush_at_the_s3_server(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["bench", "--only", "s3", "--workdir", str(tmp_path), "--format", "json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    figures = {row["name"]: row for row in json.loads(result.stdout)}
    assert figures["requests per flush"]["value"] == 3 and figures["requests per flush"]["ok"]
    assert figures["folder-marker PUTs per flush"]["value"] == 0


def test_a_lease_removed_by_another_process_is_noticed_at_its_next_renewal(tmp_path: Path) -> None:
    dataset = Dataset(tmp_path / "dataset")
    lease = take_lease(
        dataset, "collect", {"relay/relay.json": "the relay checkpoint relay.json"}, renew=False
    )
    try:
        lease.renew()
        assert not lease.lost
        Path(lease.path).unlink()  # what another process does to a lease it found expired
        lease.renew()
        assert lease.lost and Path(lease.path).exists()
    finally:
        lease.release()

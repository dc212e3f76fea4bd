"""Object storage: ingest, collect (sharded too), compact, retention and every question on `s3://`.

Against a local S3-compatible server (moto's standalone server on 127.0.0.1, in its own process); a writer killed
in the middle of an upload leaves no object behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from support.collect import (
    background_collect,
    chunks,
    fast_collect_config,
    sim_flow_bytes,
    start_collector,
    uuids_of,
)
from support.processes import stop_process
from support.small_files import START
from support.wait import wait_until

from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset import storage
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import ConfigError
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.server import ObserverServer
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink

ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


@pytest.fixture
def bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    s3().create_bucket(Bucket=name)
    return name


def s3() -> Any:
    return boto3.client("s3", endpoint_url=os.environ["FLOWPIPE_S3_ENDPOINT"], region_name="us-east-1")


def keys(bucket: str, prefix: str = "") -> list[str]:
    pages = s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def simulated_file(
    path: Path, *, seconds: float = 3 * 3600, rate: float = 1.0, cluster: str = "default"
) -> Path:
    config = SimulatorConfig(
        seed=4, start=START, duration_seconds=seconds, rate_flows_per_second=rate, cluster_name=cluster
    )
    with path.open("w") as out:
        Simulator(config).write_jsonpb(out)
    return path


def answers(dataset: str | Path) -> dict[str, list[str]]:
    """Every question's rows over all time, each row as JSON, sorted (row order aside)."""
    out = {}
    with DuckDBEngine(str(dataset)) as engine:
        for question in load_questions():
            values = {k: v for k, v in ALL_TIME.items() if question.parameter(k) is not None}
            rows = run_question(engine, question, values).table.to_pylist()
            out[question.name] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
    return out


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


# -- resolving --dataset ------------------------------------------------------------------------------------------


def test_s3_urls_resolve_to_bucket_and_prefix(s3_endpoint: str) -> None:
    filesystem, root = storage.resolve_dataset("s3://flows/prod/eu")
    assert filesystem.type_name == "s3" and root == "flows/prod/eu"
    assert storage.resolve_dataset("s3://flows")[1] == "flows"
    assert storage.s3_options().endpoint == s3_endpoint
    with pytest.raises(ConfigError, match="names no bucket"):
        storage.resolve_dataset("s3:///prefix")


def test_flags_win_over_the_environment() -> None:
    env = {"AWS_ENDPOINT_URL": "http://from-env:9000", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "x"}
    try:
        assert storage.s3_options(env) == storage.S3Options("http://from-env:9000", "eu-west-1")
        storage.set_s3_options(endpoint="http://flag:9000", region=None)
        assert storage.s3_options(env) == storage.S3Options("http://flag:9000", "eu-west-1")
        assert storage.s3_options(
            {"AWS_ENDPOINT_URL_S3": "http://s3-only", "AWS_ENDPOINT_URL": "x"}
        ).endpoint == ("http://flag:9000")
    finally:
        storage.set_s3_options()
    assert storage.s3_options(
        {"AWS_ENDPOINT_URL_S3": "http://s3-only", "AWS_ENDPOINT_URL": "x"}
    ).endpoint == ("http://s3-only")


def test_a_bad_endpoint_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="ftp://x"):
        storage.s3_filesystem(storage.S3Options(endpoint="ftp://x"))


def test_a_missing_bucket_names_the_dataset(s3_endpoint: str, tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb", seconds=60)
    result = CliRunner().invoke(cli, ["ingest", "--dataset", "s3://no-such-bucket/x", str(source)])
    assert result.exit_code == 1
    assert "no-such-bucket" in result.output


# -- ingest, every question, compaction, retention --------------------------------------------------------------


def test_ingest_then_every_question_answers_as_on_a_local_folder(bucket: str, tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb")
    local = tmp_path / "local"
    invoke("ingest", "--dataset", str(local), "--max-batch-rows", "700", str(source))
    url = f"s3://{bucket}/prod"
    first = invoke("ingest", "--dataset", url, "--max-batch-rows", "700", str(source))
    again = invoke("ingest", "--dataset", url, str(source))  # the checkpoint is in the bucket too
    assert "already ingested" in again.output and "flows ingested: 0" in again.output
    assert "flows ingested: 0" not in first.output
    assert any(k.startswith("prod/_state/") for k in keys(bucket))
    assert not [k for k in keys(bucket) if k.endswith(".tmp")]  # temporary objects are gone
    expected = answers(local)
    assert answers(url) == expected
    assert sum(len(rows) for rows in expected.values()) > 0
    query = invoke("query", "drops_by_reason", "--dataset", url, "--since", "2000-01-01", "--format", "json")
    assert json.loads(query.stdout)

    # compaction on the object store: fewer files, the same answers, inputs gone
    before = len(Dataset(url).list_part_files("flows"))
    invoke("compact", "--dataset", url)
    after = Dataset(url).list_part_files("flows")
    assert len(after) == 4 < before  # one per simulated hour (10:30-13:30)
    assert all("/compacted-" in path for path in after)
    assert answers(url) == expected

    # retention: every hour of 2024 is older than 30 days
    dry = invoke("retention", "--dataset", url, "--keep", "30d", "--format", "json")
    assert {row["table"] for row in json.loads(dry.stdout)} == {"flows"}
    assert len(Dataset(url).list_part_files("flows")) == 4
    invoke("retention", "--dataset", url, "--keep", "30d", "--apply")
    assert [k for k in keys(bucket, "prod/flows/") if "date=" in k] == []  # files and folder markers
    assert Dataset(url).list_part_files("flows") == []


def test_endpoint_given_as_a_flag(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = os.environ["FLOWPIPE_S3_ENDPOINT"]
    monkeypatch.delenv("FLOWPIPE_S3_ENDPOINT")
    source = simulated_file(tmp_path / "flows.jsonpb", seconds=120)
    url = f"s3://{bucket}/flag"
    invoke("ingest", "--dataset", url, "--s3-endpoint", endpoint, "--s3-region", "us-east-1", str(source))
    result = invoke(
        "sql",
        "--dataset",
        url,
        "--s3-endpoint",
        endpoint,
        "SELECT count(*) AS n FROM flows",
        "--format",
        "json",
    )
    assert json.loads(result.stdout)[0]["n"] > 0


def test_suggest_and_replay_read_the_object_store_as_a_local_folder(bucket: str, tmp_path: Path) -> None:
    source = simulated_file(tmp_path / "flows.jsonpb", seconds=1800, rate=2.0)
    window = ["--since", "2000-01-01", "--until", "2100-01-01"]
    drafts, replays = {}, {}
    for name, dataset in (("local", str(tmp_path / "local")), ("s3", f"s3://{bucket}/policy")):
        invoke("ingest", "--dataset", dataset, str(source))
        out = tmp_path / f"drafts-{name}"
        invoke("suggest", "--dataset", dataset, *window, "--out", str(out))
        drafts[name] = {path.name: path.read_text() for path in sorted(out.glob("*.yaml"))}
        # the same policy files replayed over each dataset
        replayed = invoke(
            "replay", "--dataset", dataset, *window, str(tmp_path / "drafts-local"), "--format", "json"
        )
        replays[name] = json.loads(replayed.stdout)
    assert drafts["s3"] and "kind: CiliumNetworkPolicy" in "".join(drafts["s3"].values())
    assert drafts["s3"] == drafts["local"]
    assert (
        replays["s3"]["would_break"] == 0 and replays["s3"]["allowed"] > 0
    )  # what the drafts were learned from
    assert replays["s3"] == replays["local"]


# -- collect --------------------------------------------------------------------------------------------------------


def test_collect_and_sharded_collectors_write_the_whole_stream_once(bucket: str) -> None:
    flows = sim_flow_bytes()[:3000]
    url = f"s3://{bucket}/live"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        configs = [
            fast_collect_config(server.address, url, writer_id=f"shard{i}", node_shard=(i, 2))  # type: ignore[arg-type]
            for i in range(2)
        ]
        with background_collect(configs[0]) as one, background_collect(configs[1]) as two:
            wait_until(lambda: len(dataset_uuids(url)) >= len(flows), what="both shards wrote every flow")
            results = [one.stop(), two.stop()]
    written = dataset_uuids(url)
    assert sorted(written) == sorted(uuids_of(flows))  # the union is the whole, nothing twice
    assert all(result.pipeline.flows > 0 for result in results)  # each shard took its part
    assert {"live/_state/relay-shard-0-of-2.json", "live/_state/relay-shard-1-of-2.json"} <= set(keys(bucket))


def dataset_uuids(url: str) -> list[str]:
    with DuckDBEngine(url) as engine:
        return engine.run("SELECT uuid FROM flows").column("uuid").to_pylist()


def test_a_collector_killed_and_restarted_loses_and_repeats_nothing(bucket: str, tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:2000]
    first, second = chunks(flows, 2)
    url = f"s3://{bucket}/killed"
    log = tmp_path / "collect.log"
    with ObserverServer(buffer_size=10_000) as server:
        args = ["--relay", server.address, "--dataset", url, "--metrics-address", "off", "--writer-id", "w",
                "--reconnect-backoff-initial-seconds", "0.05", "--flush-interval-seconds", "0.05"]  # fmt: skip
        server.publish(first)
        process = start_collector(args, log)
        wait_until(lambda: len(dataset_uuids(url)) > 0, what="the first part files")
        assert stop_process(process, signal.SIGKILL) == -signal.SIGKILL
        server.publish(second)
        process = start_collector(args, log)
        try:
            wait_until(
                lambda: len(set(dataset_uuids(url))) == len(flows), what="every flow after the restart"
            )
        finally:
            assert stop_process(process, signal.SIGTERM) == 0, log.read_text()[-3000:]
    written = dataset_uuids(url)
    assert sorted(written) == sorted(uuids_of(flows))


# -- an upload cut short ------------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys, time
    import pyarrow as pa
    from flowpipe.config import ParquetSinkConfig
    from flowpipe.model import FLOW_SCHEMA, EventBatch
    from flowpipe.sinks.parquet import ParquetSink
    from datetime import datetime, UTC
    url = sys.argv[1]
    config = ParquetSinkConfig(path=url, writer_id="big", max_batch_rows=10**9, max_batch_bytes=2**40,
                               flush_interval_seconds=1e9, row_group_bytes=2 * 2**20)
    sink = ParquetSink(config)
    rows = 2000
    for batch in range(12):  # about 24 MB of incompressible URLs: more than one 10 MB upload part
        values = {name: pa.nulls(rows, field.type) for name, field in zip(FLOW_SCHEMA.names, FLOW_SCHEMA)}
        values["time"] = pa.array([datetime(2024, 3, 1, 10, tzinfo=UTC)] * rows, FLOW_SCHEMA.field("time").type)
        values["uuid"] = pa.array([f"{batch}-{i}" for i in range(rows)])
        values["http_url"] = pa.array([os.urandom(512).hex() for _ in range(rows)])
        sink.write(EventBatch(flows=pa.table(values, schema=FLOW_SCHEMA)))
    print("written", flush=True)
    time.sleep(3600)  # the part file stays open: killed before it is finished
    """
)


def test_a_writer_killed_mid_upload_leaves_no_object(bucket: str) -> None:
    url = f"s3://{bucket}/cut"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == b"written", process.stderr.read() if process.stderr else ""

        def uploading() -> list[dict[str, Any]]:
            uploads = s3().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            return [
                upload
                for upload in uploads
                if s3().list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts")
            ]

        (upload,) = wait_until(uploading, what="a multipart upload with parts sent")
        assert "/date=2024-03-01/hour=10/" in upload["Key"]
    finally:
        process.kill()
        process.wait(10)
    assert [k for k in keys(bucket) if k.endswith((".parquet", ".tmp"))] == []  # no object, whole or partial
    assert Dataset(url).list_part_files("flows") == []
    # the incomplete upload stays invisible (a bucket lifecycle rule reclaims it); a new writer carries on
    assert s3().list_multipart_uploads(Bucket=bucket).get("Uploads")
    with DuckDBEngine(url) as engine:
        assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == 0


def test_an_exception_while_writing_completes_only_a_hidden_temporary_object(bucket: str) -> None:
    dataset = Dataset(f"s3://{bucket}/error")
    folder = f"{dataset.root}/flows/date=2024-03-01/hour=10"
    temp, handle = dataset.open_temp(folder, "part-20240301T100000000000Z-w-000001.parquet")
    with pytest.raises(RuntimeError), handle:
        handle.write(b"PAR1 half a file")
        raise RuntimeError("the writer failed")
    # pyarrow's stream completes the upload when it is closed on the way out: the object exists, but only
    # under the hidden temporary name that no reader lists
    assert [k for k in keys(bucket) if k.endswith((".parquet", ".tmp"))] == [temp.split("/", 1)[1]]
    assert dataset.list_part_files("flows") == []
    ParquetSink(
        ParquetSinkConfig(path=dataset.uri, writer_id="w"), dataset=dataset
    )  # the same writer restarts
    assert [k for k in keys(bucket) if k.endswith((".parquet", ".tmp"))] == []

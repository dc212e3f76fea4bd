"""`flowpipe ingest` end to end on the real captures, and `flowpipe bench` on a small run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner, Result

from flowpipe.app.ingest import ingest_files
from flowpipe.bench.data import write_synthetic_jsonpb
from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset.layout import Dataset

COUNTED_EVENTS = ("lost_events", "node_status", "agent_event", "debug_event")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def json_objects(path: Path) -> list[dict[str, Any]]:
    """The JSON values of a capture, parsed independently of flowpipe: a JSON array, or one object per line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def verdicts_in_files(files: list[Path]) -> Counter[str | None]:
    """Flows per verdict as written in the files (a flow without `verdict` counts as None)."""
    counts: Counter[str | None] = Counter()
    for path in files:
        for obj in json_objects(path):
            if any(key in obj for key in COUNTED_EVENTS):
                continue
            flow = obj.get("flow", obj)
            counts[flow.get("verdict")] += 1
    return counts


def verdicts_in_dataset(root: Path) -> Counter[str | None]:
    files = Dataset(root).list_part_files("flows")
    if not files:
        return Counter()
    rows = duckdb.sql(
        "SELECT verdict, count(*) FROM read_parquet($files, hive_partitioning = true) GROUP BY verdict",
        params={"files": files},
    ).fetchall()
    return Counter({verdict: count for verdict, count in rows})


@pytest.fixture
def bad_file(tmp_path: Path, hubble_captures: Path) -> Path:
    """Three real flows with a malformed line between the first and the second."""
    real = (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "with-bad-line.json"
    path.write_text("\n".join([real[0], '{"flow": {"verdict": "FORWARDED", ', real[1], real[2]]) + "\n")
    return path


def test_ingest_stores_every_flow_with_its_verdict(capture_files: list[Path], tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    result = invoke("ingest", *map(str, capture_files), "--dataset", str(dataset))
    assert result.exit_code == 0, result.output
    expected = verdicts_in_files(capture_files)
    assert sum(expected.values()) > 1000
    assert verdicts_in_dataset(dataset) == expected
    assert f"flows ingested: {sum(expected.values()):,}" in result.stdout
    assert f"FORWARDED {expected['FORWARDED']:,}" in result.stdout
    assert "lines skipped: 0" in result.stdout
    assert list((dataset / "_state" / "files").glob("*.json"))  # one checkpoint document per file content


def test_second_ingest_of_the_same_files_adds_nothing(capture_files: list[Path], tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    assert invoke("ingest", *map(str, capture_files), "--dataset", str(dataset)).exit_code == 0
    files_before = Dataset(dataset).list_part_files("flows")
    counts_before = verdicts_in_dataset(dataset)
    again = invoke("ingest", *map(str, capture_files), "--dataset", str(dataset))
    assert again.exit_code == 0, again.output
    assert "flows ingested: 0" in again.stdout
    assert "already ingested" in again.stdout
    assert Dataset(dataset).list_part_files("flows") == files_before
    assert verdicts_in_dataset(dataset) == counts_before


def test_a_malformed_line_is_skipped_reported_and_the_rest_ingested(bad_file: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    result = invoke("ingest", str(bad_file), "--dataset", str(dataset))
    assert result.exit_code == 0, result.output
    assert sum(verdicts_in_dataset(dataset).values()) == 3
    assert "lines skipped: 1" in result.stdout
    assert f"{bad_file}:2" in result.stdout


def test_strict_fails_on_the_first_bad_line_naming_file_and_line(bad_file: Path, tmp_path: Path) -> None:
    result = invoke("ingest", str(bad_file), "--dataset", str(tmp_path / "data"), "--strict")
    assert result.exit_code != 0
    assert f"{bad_file}:2" in result.stderr


def test_cluster_and_batch_size_options(hubble_captures: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    capture = hubble_captures / "kind-bookinfo" / "basic-sample-400-tcp-flows.json"
    result = invoke(
        "ingest", str(capture), "--dataset", str(dataset), "--cluster", "kind", "--max-batch-rows", "100"
    )
    assert result.exit_code == 0, result.output
    files = Dataset(dataset).list_part_files("flows")
    assert len(files) >= 4, "a flush every 100 flows"
    rows = duckdb.sql(
        "SELECT cluster_name, count(*) FROM read_parquet($files) GROUP BY 1", params={"files": files}
    ).fetchall()
    assert rows == [("kind", sum(verdicts_in_files([capture]).values()))]


def test_lost_events_are_counted_and_stored(hubble_captures: Path, tmp_path: Path) -> None:
    real = (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text(encoding="utf-8").splitlines()
    lost = {
        "lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "42", "cpu": 3},
        "node_name": "kind-worker2",
        "time": "2024-03-22T17:23:02Z",
    }
    path = tmp_path / "with-lost.json"
    path.write_text("\n".join([real[0], json.dumps(lost), real[1]]) + "\n")
    dataset = tmp_path / "data"
    result = invoke("ingest", str(path), "--dataset", str(dataset))
    assert result.exit_code == 0, result.output
    assert "lost events seen: 1 record, 42 events lost by Hubble" in result.stdout
    assert "(HUBBLE_RING_BUFFER: 1 record, 42 events)" in result.stdout
    (stored,) = Dataset(dataset).list_part_files("lost_events")
    assert duckdb.sql(
        "SELECT num_events_lost, cpu FROM read_parquet($f)", params={"f": stored}
    ).fetchall() == [(42, 3)]


def test_an_interrupted_ingest_continues_where_it_stopped(tmp_path: Path) -> None:
    source = tmp_path / "big.jsonpb"
    stats = write_synthetic_jsonpb(source, 12_000)  # ~19 MB: several blocks of the file source
    config = ParquetSinkConfig(path=str(tmp_path / "data"), writer_id="t")
    stop = threading.Event()
    first = ingest_files(
        [source],
        config,
        stop=stop,
        on_batch=lambda b: stop.set(),
        pipeline_config=PipelineConfig(buffer_batches=1),
    )
    assert first.pipeline.stopped and 0 < first.pipeline.flows < stats.flows
    second = ingest_files([source], config)
    assert second.skipped_by_reason == {}
    assert first.pipeline.flows + second.pipeline.flows == stats.flows
    assert sum(verdicts_in_dataset(tmp_path / "data").values()) == stats.flows


def test_sigterm_stops_ingest_with_what_was_read_stored_and_status_130(tmp_path: Path) -> None:
    source = tmp_path / "flows.jsonpb"
    # several blocks of the file source; stdin stays open, so the child cannot reach the end before the signal
    stats = write_synthetic_jsonpb(source, 40_000)
    dataset = tmp_path / "data"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowpipe",
            "ingest",
            "-",
            "--dataset",
            str(dataset),
            "--max-batch-rows",
            "1000",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    release = threading.Event()

    def feed() -> None:
        assert child.stdin is not None
        try:
            child.stdin.write(source.read_bytes())
            child.stdin.flush()
            release.wait(60)  # stdin stays open until the signal was sent
            child.stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the child stopped reading and exited: what this test asks of it

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        checkpoint = dataset / "_state" / "files"
        deadline = time.monotonic() + 60
        while not any(checkpoint.glob("*.json")) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        assert any(checkpoint.glob("*.json")), "the first batches were stored and committed"
        child.send_signal(signal.SIGTERM)
        release.set()
        child.wait(timeout=60)
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
        feeder.join(60)
    assert child.stdout is not None and child.stderr is not None
    out, err = child.stdout.read(), child.stderr.read()
    assert child.returncode == 130, err.decode()
    assert b"stopped before the end of the input" in out
    stored = sum(verdicts_in_dataset(dataset).values())
    assert 0 < stored < stats.flows
    again = invoke("ingest", str(source), "--dataset", str(dataset))
    assert again.exit_code == 0, again.output
    assert "already ingested" in again.stdout
    assert sum(verdicts_in_dataset(dataset).values()) == stats.flows


def test_bench_prints_its_figures(tmp_path: Path) -> None:
    result = invoke(
        "bench", "--flows", "2000", "--baseline-flows", "500", "--workdir", str(tmp_path), "--format", "json"
    )
    assert result.exit_code == 0, result.output
    figures = {(row["section"], row["name"]): row for row in json.loads(result.stdout)}
    assert figures[("ingest", "flows ingested")]["value"] == 2000
    for name in ("file ingest throughput", "peak RSS of the ingest process", "jsonpb bytes / dataset bytes"):
        assert figures[("ingest", name)]["value"] > 0
        assert figures[("ingest", name)]["target"] is not None
    assert figures[("baseline", "ingest speed / baseline speed")]["value"] > 0
    questions = [row for (section, _), row in figures.items() if section == "questions"]
    assert len(questions) >= 3 and all(row["value"] is not None for row in questions)
    # what edge rollups cost collect and ingest, against the same target
    for key in (
        ("collect", "throughput cost of edge rollups"),
        ("rollups", "ingest throughput cost of edge rollups"),
    ):
        assert figures[key]["value"] is not None and figures[key]["target"] == 10.0, key


def test_bench_only_runs_the_named_sections(tmp_path: Path) -> None:
    result = invoke(
        "bench", "--flows", "500", "--only", "ingest", "--workdir", str(tmp_path), "--format", "json"
    )
    assert result.exit_code == 0, result.output
    assert {row["section"] for row in json.loads(result.stdout)} == {"ingest"}
    unknown = CliRunner().invoke(cli, ["bench", "--only", "nope"])
    assert unknown.exit_code != 0 and "unknown bench section" in unknown.output


# -- the summary accounts for every line read ------------------------------------------------------------------


@pytest.fixture
def mixed_file(tmp_path: Path, hubble_captures: Path) -> Path:
    """Every kind of line: two flows, counted events, lines of no known event kind and a malformed line."""
    real = (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text(encoding="utf-8").splitlines()
    lost = {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "7"}, "node_name": "n1"}
    lines = [
        real[0],
        "{}",
        '{"flow": null}',
        '{"some_future_event": {"x": 1}}',
        json.dumps({"agent_event": {"type": "AGENT_STARTED"}, "node_name": "n1"}),
        json.dumps({"debug_event": {"type": "DBG_GENERIC"}, "node_name": "n1"}),
        json.dumps({"node_status": {"state_change": "NODE_CONNECTED"}, "node_name": "n1"}),
        json.dumps(lost),
        '{"flow": {"verdict": ',
        real[1],
    ]
    path = tmp_path / "mixed.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_line_read_is_accounted_for_in_the_result(mixed_file: Path, tmp_path: Path) -> None:
    result = ingest_files([mixed_file], ParquetSinkConfig(path=str(tmp_path / "data")))
    lines = mixed_file.read_text().splitlines()
    assert result.flows_by_verdict == Counter(json.loads(lines[i])["flow"]["verdict"] for i in (0, -1))
    assert result.lost_events_by_source == {"HUBBLE_RING_BUFFER": 1}
    assert result.events_lost_by_source == {"HUBBLE_RING_BUFFER": 7}
    assert (result.node_status, result.agent_events, result.debug_events) == (1, 1, 1)
    assert result.skipped_by_reason == {"unknown_event": 3, "invalid_json": 1}
    assert result.lines_read == 10 == len(lines)
    again = ingest_files([mixed_file], ParquetSinkConfig(path=str(tmp_path / "data")))
    assert again.lines_already_ingested == 10 and again.lines_read == 0
    assert again.pipeline.flows == 0


def test_the_summary_shows_counted_events_and_lines_of_unknown_kinds(
    mixed_file: Path, tmp_path: Path
) -> None:
    result = invoke("ingest", str(mixed_file), "--dataset", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "flows ingested: 2 " in out
    assert (
        "lost events seen: 1 record, 7 events lost by Hubble (HUBBLE_RING_BUFFER: 1 record, 7 events)" in out
    )
    assert "events counted, not stored: 3 (node_status 1, agent 1, debug 1)" in out
    assert "lines skipped: 4 (invalid_json 1, unknown_event 3)" in out
    assert f"{mixed_file}:9: invalid JSON" in out
    assert "unknown_event: 3 lines of valid JSON hold no event flowpipe reads" in out


def test_the_summary_speaks_of_one_record_and_one_line_in_the_singular(
    hubble_captures: Path, tmp_path: Path
) -> None:
    lost = {"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "1"}, "node_name": "n1"}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(lost) + "\n")
    dataset = str(tmp_path / "data")
    first = invoke("ingest", str(path), "--dataset", dataset)
    assert first.exit_code == 0, first.output
    assert "lost events seen: 1 record, 1 event lost by Hubble" in first.stdout
    again = invoke("ingest", str(path), "--dataset", dataset)
    assert "already ingested: 1 line was in the dataset" in again.stdout
    assert not re.search(r"\b1 (records|events|lines)\b", first.stdout + again.stdout)


def test_strict_failure_in_a_later_file_says_what_was_already_stored(
    hubble_captures: Path, bad_file: Path, tmp_path: Path
) -> None:
    real = (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text(encoding="utf-8").splitlines()
    good = tmp_path / "good.json"
    good.write_text("\n".join(real[3:5]) + "\n")
    dataset = tmp_path / "data"
    result = invoke("ingest", str(good), str(bad_file), "--dataset", str(dataset), "--strict")
    assert result.exit_code == 1
    assert f"{bad_file}:2: invalid JSON" in result.stderr
    assert f"--strict stopped the ingest at {bad_file}:2" in result.stderr
    assert (
        f"stored before it and kept: 2 flows, 0 lost event records, from {good} up to line 2" in result.stderr
    )
    assert sum(verdicts_in_dataset(dataset).values()) == 2
    # without --strict the same command adds the rest, and nothing twice
    rest = invoke("ingest", str(good), str(bad_file), "--dataset", str(dataset))
    assert rest.exit_code == 0, rest.output
    assert sum(verdicts_in_dataset(dataset).values()) == 5


def test_a_file_given_as_the_dataset_is_refused_before_reading(bad_file: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "flows.json"
    not_a_folder.write_text("{}\n")
    # --strict and a bad line: reading the input first would fail on the line instead
    result = invoke("ingest", str(bad_file), "--dataset", str(not_a_folder), "--strict")
    assert result.exit_code == 2, result.output
    assert f"dataset {not_a_folder} is a file, not a dataset folder" in result.stderr
    assert "invalid JSON" not in result.output
    below = invoke("ingest", str(bad_file), "--dataset", str(not_a_folder / "data"))
    assert below.exit_code == 2, below.output
    assert f"dataset {not_a_folder / 'data'} cannot be created: {not_a_folder} is a file" in below.stderr


def test_a_bad_line_is_shown_once_and_logged_only_at_info(bad_file: Path, tmp_path: Path) -> None:
    def run(*options: str) -> str:
        dataset = tmp_path / f"data{len(options)}"  # a new dataset each time: the bad line is read again
        done = subprocess.run(
            [sys.executable, "-m", "flowpipe", *options, "ingest", str(bad_file), "--dataset", str(dataset)],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout + done.stderr

    assert run().count(f"{bad_file}:2") == 1
    assert run("--log-level", "info").count(f"{bad_file}:2") == 2  # the log line, then the summary

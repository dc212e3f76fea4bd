"""Hostile or careless input to `ingest`: each bad line is one bad line, the rest is stored, nothing tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from support.env import small_tmpfs

from flowpipe.bench.data import generate_lines
from flowpipe.cli import cli
from flowpipe.dataset.layout import Dataset
from flowpipe.transforms import normalize_json_lines, normalize_json_texts


def invoke(*args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def good_lines(count: int) -> list[str]:
    """`count` valid jsonpb flow lines."""
    lines = [line for line in generate_lines(count * 2, seed=3) if line.startswith('{"flow"')]
    return lines[:count]


def stored_flows(root: Path) -> int:
    return sum(pq.read_metadata(path).num_rows for path in Dataset(root).list_part_files("flows"))


def test_a_deeply_nested_line_is_one_bad_line(tmp_path: Path) -> None:
    good = good_lines(3)
    deep_flow = '{"flow":' + '{"a":' * 10_000 + "1" + "}" * 10_000 + "}"
    deep_array = "[" * 10_000 + "]" * 10_000
    source = tmp_path / "flows.json"
    source.write_text("\n".join([good[0], deep_flow, good[1], deep_array, good[2]]) + "\n")
    result = invoke("ingest", str(source), "--dataset", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    assert "RecursionError" not in result.output
    assert f"{source}:2: invalid JSON: nested too deeply" in result.output
    assert f"{source}:4: invalid JSON: nested too deeply" in result.output
    assert stored_flows(tmp_path / "data") == 3


def test_a_deeply_nested_pretty_printed_object_is_one_bad_value(tmp_path: Path) -> None:
    source = tmp_path / "pretty.json"
    deep = "[" * 10_000 + "]" * 10_000
    good = good_lines(1)[0]
    source.write_text('{\n  "flow": ' + deep + "\n}\n" + good.replace('{"flow":', '{\n  "flow":', 1) + "\n")
    result = invoke("ingest", str(source), "--dataset", str(tmp_path / "data"))
    assert "RecursionError" not in result.output and "Traceback" not in result.output
    assert f"{source}:1: invalid JSON object: nested too deeply" in result.output
    assert stored_flows(tmp_path / "data") == 1


# -- careless operators: clear messages, exit status 1, no traceback ---------------------------------------------


def assert_clear_failure(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith("Error: "), result.output
    for word in words:
        assert word in result.output, result.output


@pytest.fixture
def read_only_dataset(tmp_path: Path) -> Iterator[Path]:
    """A dataset with several part files per hour on a real tmpfs, then remounted read-only (needs root)."""
    with small_tmpfs(tmp_path, "8m") as mount:
        root = mount / "data"
        for seed in (1, 2, 3):
            source = tmp_path / f"flows-{seed}.json"
            lines = [line for line in generate_lines(60, seed=seed) if line.startswith('{"flow"')]
            source.write_text("\n".join(lines) + "\n")
            assert invoke("ingest", str(source), "--dataset", str(root)).exit_code == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield root


@pytest.mark.parametrize("command", [["compact"], ["retention", "--keep", "1h", "--apply"]])
def test_maintenance_on_a_read_only_dataset_says_so(read_only_dataset: Path, command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--dataset", str(read_only_dataset)])
    assert_clear_failure(result, "Read-only file system", str(read_only_dataset))


def test_ingest_from_a_closed_standard_input_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flowpipe", "ingest", "-", "--dataset", str(tmp_path / "data")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.close(0),
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "standard input is closed" in done.stderr


def test_names_too_long_are_named_in_the_message(tmp_path: Path) -> None:
    long_name = "a" * 300
    source = tmp_path / "flows.json"
    source.write_text("\n".join(good_lines(2)) + "\n")
    result = CliRunner().invoke(
        cli, ["ingest", str(tmp_path / f"{long_name}.json"), "--dataset", str(tmp_path)]
    )
    assert_clear_failure(result, "File name too long", long_name)
    result = CliRunner().invoke(cli, ["ingest", str(source), "--dataset", str(tmp_path / long_name)])
    assert_clear_failure(result, "File name too long", long_name)
    result = CliRunner().invoke(cli, ["compact", "--dataset", str(tmp_path / long_name)])
    assert_clear_failure(result, "File name too long")


# -- values outside their proto types ---------------------------------------------------------------------------


def with_value(line: str, path: str, value: object) -> str:
    """`line` (an envelope) with the value at a dotted path inside `flow` set."""
    record = json.loads(line)
    node = record["flow"]
    *parents, last = path.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return json.dumps(record)


OUT_OF_RANGE = [
    ("l4.TCP.destination_port", -1, "flow.l4.TCP.destination_port: -1 is outside uint32"),
    ("l4.TCP.source_port", 1 << 32, f"flow.l4.TCP.source_port: {1 << 32} is outside uint32"),
    ("source.identity", -5, "flow.source.identity: -5 is outside uint32"),
    ("destination.identity", "4294967296", "flow.destination.identity: 4294967296 is outside uint32"),
    ("event_type.type", 1 << 31, f"flow.event_type.type: {1 << 31} is outside int32"),
    ("socket_cookie", "-1", "flow.socket_cookie: -1 is outside uint64"),
    ("cgroup_id", str(1 << 64), f"flow.cgroup_id: {1 << 64} is outside uint64"),
    ("l7.latency_ns", "-5", "flow.l7.latency_ns: -5 is outside uint64"),
    ("time", "1500-01-01T00:00:00Z", "flow.time: '1500-01-01T00:00:00Z' is outside the times"),
    ("time", "2300-01-01T00:00:00Z", "flow.time: '2300-01-01T00:00:00Z' is outside the times"),
]


def test_values_outside_their_proto_types_are_bad_lines_naming_the_field(tmp_path: Path) -> None:
    good = good_lines(len(OUT_OF_RANGE) + 2)
    lines = [good[0]]
    for index, (path, value, _) in enumerate(OUT_OF_RANGE, start=1):
        lines.append(with_value(good[index], path, value))
    lines.append(with_value(good[-1], "socket_cookie", str((1 << 64) - 1)))  # a uint64 beyond int64: stored
    data = ("\n".join(lines) + "\n").encode()
    for decoded in (
        normalize_json_lines(data, path="flows.json"),  # the block parser, then the lines it refused
        normalize_json_texts(list(enumerate(lines, start=1)), path="flows.json"),  # line by line
    ):
        messages = [str(error) for error in decoded.errors]
        assert len(messages) == len(OUT_OF_RANGE), messages
        for number, (message, (_, _, expected)) in enumerate(
            zip(messages, OUT_OF_RANGE, strict=True), start=2
        ):
            assert f"flows.json:{number}" in message and expected in message, message
        assert decoded.flows.num_rows == 2
        assert [v for v in decoded.flows.column("socket_cookie").to_pylist() if v] == [(1 << 64) - 1]
    # and through the command: bad lines reported, the good ones stored, no pyarrow message
    source = tmp_path / "flows.json"
    source.write_bytes(data)
    result = invoke("ingest", str(source), "--dataset", str(tmp_path / "data"))
    assert result.exit_code == 0, result.output
    assert f"{source}:2: flow.l4.TCP.destination_port: -1 is outside uint32" in result.output
    assert "Arrow" not in result.output
    assert stored_flows(tmp_path / "data") == 2

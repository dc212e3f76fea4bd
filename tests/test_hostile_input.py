"""Hostile or careless input to `ingest`: each bad line is one bad line, the rest is stored, nothing tracebacks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from flowpipe.bench_data import generate_lines
from flowpipe.cli import cli
from flowpipe.dataset import Dataset


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

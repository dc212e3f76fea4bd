"""Pretty-printed JSON input: one flow saved from a browser or `jq .`, several such objects one after the other,
and inputs from which nothing can be read."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from flowpipe.cli import cli
from flowpipe.errors import FlowDecodeError
from flowpipe.model import FLOW_SCHEMA
from flowpipe.sources import FileSource
from flowpipe.sources.file._reader import looks_pretty_printed


def _rows(path: Path, **options: object) -> tuple[pa.Table, list[Exception], FileSource]:
    source = FileSource([path], **options)  # type: ignore[arg-type]
    batches = list(source.batches())
    tables = [b.flows for b in batches if b.flows.num_rows]
    errors = [e for b in batches for e in b.decode_errors]
    return (pa.concat_tables(tables) if tables else FLOW_SCHEMA.empty_table()), errors, source


def _pretty(lines: list[str], indent: int = 2) -> str:
    return "".join(json.dumps(json.loads(line), indent=indent) + "\n" for line in lines)


@pytest.fixture
def starwars(hubble_captures: Path) -> list[str]:
    return (hubble_captures / "kind-starwars" / "testdata1.jsonl").read_text().splitlines()


def test_a_single_pretty_printed_flow_gives_the_row_of_its_jsonpb_line(
    starwars: list[str], tmp_path: Path
) -> None:
    line, pretty = tmp_path / "line.json", tmp_path / "saved.json"
    line.write_text(starwars[0] + "\n")
    pretty.write_text(_pretty(starwars[:1], indent=4))
    expected, _, _ = _rows(line)
    table, errors, source = _rows(pretty)
    assert errors == [] and table.num_rows == 1
    assert table.to_pylist() == expected.to_pylist()
    assert source.summary.lines_skipped == {}


def test_concatenated_pretty_objects_of_every_kind_straddling_chunks(
    starwars: list[str], hubble_captures: Path, tmp_path: Path
) -> None:
    legacy = (hubble_captures / "format-samples" / "legacy-json-flow.json").read_text().strip()
    lost = json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "7"}})
    lines = [*starwars, lost, legacy]
    plain = tmp_path / "lines.json"
    plain.write_text("\n".join(lines) + "\n")
    expected, _, _ = _rows(plain)
    for name, data in (
        ("pretty.json", _pretty(lines).encode()),
        ("tabs.json", _pretty(lines, indent="\t").encode()),  # type: ignore[arg-type]
        ("pretty.json.gz", gzip.compress(_pretty(lines).encode())),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        table, errors, source = _rows(path, block_bytes=333)
        assert errors == [], name
        assert table.to_pylist() == expected.to_pylist(), name
        assert source.summary.lost_event_records == {"HUBBLE_RING_BUFFER": 1}


def test_a_malformed_object_is_reported_at_its_line_and_the_next_ones_are_read(
    starwars: list[str], tmp_path: Path
) -> None:
    good = _pretty(starwars[:3]).split("\n")
    first_end = good.index("}") + 1  # the first object's last line
    broken = good[:first_end] + ["{", '  "flow": {', '    "time": oops', "  }", "}"] + good[first_end:]
    path = tmp_path / "broken.json"
    path.write_text("\n".join(broken))
    table, errors, _ = _rows(path)
    assert table.column("uuid").to_pylist() == [json.loads(line)["flow"]["uuid"] for line in starwars[:3]]
    (error,) = errors
    assert isinstance(error, FlowDecodeError) and error.reason == "invalid_json"
    assert error.line_number == first_end + 3, "the line of `oops`"
    assert str(error).startswith(f"{path}:{first_end + 3}: ") and f"starts on line {first_end + 1}" in str(
        error
    )
    with pytest.raises(FlowDecodeError) as raised:
        list(FileSource([path], strict=True).batches())
    assert raised.value.line_number == first_end + 3


def test_json_lines_are_not_taken_for_pretty_printed_json() -> None:
    line = json.dumps({"flow": {"time": "2024-01-01T00:00:00Z", "verdict": "DROPPED"}})
    assert not looks_pretty_printed((line + "\n" + line + "\n").encode())
    assert not looks_pretty_printed(b"{broken\n" + line.encode() + b"\n")
    assert not looks_pretty_printed(line.encode())
    assert looks_pretty_printed(b'\xef\xbb\xbf  {\n  "flow": {\n')
    assert looks_pretty_printed(b'{"flow": {"time": "2024-01-01T00:00:00Z",\n "verdict": "DROPPED"}}\n')


def test_ingest_reads_pretty_json_from_stdin_and_once_only(starwars: list[str], tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    text = _pretty(starwars[:5])
    result = runner.invoke(cli, ["ingest", "-", "--dataset", str(data)], input=text, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "flows ingested: 5 " in result.output and "lines skipped: 0" in result.output
    path = tmp_path / "saved.json"
    path.write_text(text)
    result = runner.invoke(cli, ["ingest", str(path), "--dataset", str(data)], catch_exceptions=False)
    assert result.exit_code == 0 and "flows ingested: 0 " in result.output


def test_an_input_from_which_nothing_could_be_read_fails_the_ingest_and_the_others_are_stored(
    starwars: list[str], tmp_path: Path
) -> None:
    good, bad, empty = tmp_path / "good.json", tmp_path / "notes.txt", tmp_path / "empty.json"
    good.write_text("\n".join(starwars[:4]) + "\n")
    bad.write_text("these are my notes\nabout the cluster\n")
    empty.write_text("")
    data = tmp_path / "data"
    result = CliRunner().invoke(cli, ["ingest", str(bad), str(good), str(empty), "--dataset", str(data)])
    assert result.exit_code == 1
    assert "flows ingested: 4 " in result.output, "what the other inputs held is stored"
    assert f"{bad}: nothing could be read: 2 line(s) or value(s) skipped" in result.output
    assert f"(first: {bad}:1: invalid JSON" in result.output
    assert str(empty) not in result.output.split("Error:")[-1], "an empty input is not a failure"
    assert "Traceback" not in result.output
    objects = tmp_path / "objects.json"
    objects.write_text("{}\n{}\n")
    result = CliRunner().invoke(cli, ["ingest", str(objects), "--dataset", str(data)])
    assert result.exit_code == 1 and "valid JSON of no event kind flowpipe reads" in result.output


def test_a_paused_pipe_of_pretty_objects_delivers_them_before_it_is_closed(
    starwars: list[str], tmp_path: Path
) -> None:
    from support.stdin import PausedPipe

    text = _pretty(starwars[:7])
    cut = text.index("{", len(_pretty(starwars[:6])) - 1)  # the seventh object is cut in the middle
    pipe = PausedPipe((text[: cut + 40]).encode())
    batches = pipe.batches()
    first = next(batches)  # the pause hands on the six whole objects while the pipe is still open
    assert first == 6 and pipe.sent.is_set() and not pipe.closed.is_set()
    assert sum(batches) == 0

"""The file source: every input format, bad input, truncated .gz, checkpoints (same content twice adds nothing)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import flowpipe.sources.file as file_module
from flowpipe.errors import ConfigError, FlowDecodeError, SourceError
from flowpipe.model import FLOW_SCHEMA, EventBatch
from flowpipe.sources import FileSource, read_events
from flowpipe.sources.file import export_files


def flow_line(uuid: str, *, verdict: str = "FORWARDED", second: int = 0, node: str = "node-1") -> str:
    flow = {
        "time": f"2024-05-01T10:00:{second % 60:02d}.000000001Z",
        "uuid": uuid,
        "verdict": verdict,
        "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
        "l4": {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}},
        "source": {"identity": 1234, "namespace": "shop", "pod_name": "web-1", "labels": ["k8s:app=web"]},
        "destination": {"identity": 2, "labels": ["reserved:world"]},
        "Type": "L3_L4",
        "node_name": node,
        "traffic_direction": "EGRESS",
        "Summary": "TCP Flags: SYN",
    }
    return json.dumps({"flow": flow, "node_name": node, "time": flow["time"]})


def lines_of(uuids: list[str]) -> str:
    return "".join(flow_line(u, second=i) + "\n" for i, u in enumerate(uuids))


def uuids(n: int, prefix: str = "f") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def read_all(source: FileSource, *, commit: bool = True) -> tuple[pa.Table, list[EventBatch]]:
    batches = list(source.batches())
    if commit:
        for batch in batches:
            source.commit(batch.position)
    tables = [b.flows for b in batches if b.flows.num_rows]
    table = pa.concat_tables(tables) if tables else FLOW_SCHEMA.empty_table()
    return table, batches


def uuid_list(table: pa.Table) -> list[str]:
    return table["uuid"].to_pylist()


# -- formats --------------------------------------------------------------------------------------------------


def test_jsonpb_lines(tmp_path: Path) -> None:
    path = tmp_path / "observe.json"
    path.write_text(lines_of(uuids(50)))
    source = FileSource([path])
    table, batches = read_all(source)
    assert uuid_list(table) == uuids(50)
    assert table.schema == FLOW_SCHEMA
    assert source.summary.flows == 50 and source.summary.files == 1
    assert batches[-1].position.records == 50  # type: ignore[union-attr]


def test_legacy_bare_flow_lines(tmp_path: Path) -> None:
    path = tmp_path / "legacy.json"
    path.write_text("".join(json.dumps(json.loads(flow_line(u))["flow"]) + "\n" for u in uuids(5)))
    table, _ = read_all(FileSource([path]))
    assert uuid_list(table) == uuids(5)
    assert table["node_name"].to_pylist() == ["node-1"] * 5


def test_real_captures_all_read(capture_files: list[Path]) -> None:
    source = FileSource(capture_files)
    table, _ = read_all(source, commit=False)
    lines = sum(1 for p in capture_files for line in p.read_text().splitlines() if line.strip())
    assert table.num_rows == lines == source.summary.flows
    assert source.summary.lines_skipped == {}


def test_exporter_directory_is_read_oldest_first_with_gz_backups(tmp_path: Path) -> None:
    (tmp_path / "events-2024-01-02T00-00-00.000.log").write_text(lines_of(["b1", "b2"]))
    with gzip.open(tmp_path / "events-2024-01-01T00-00-00.000.log.gz", "wt") as gz:
        gz.write(lines_of(["a1", "a2"]))
    (tmp_path / "events.log").write_text(lines_of(["c1"]))
    (tmp_path / "README.md").write_text("not an export")
    (tmp_path / ".hidden.log").write_text("garbage\n")
    assert [Path(p).name for p in export_files(tmp_path)] == [
        "events-2024-01-01T00-00-00.000.log.gz",
        "events-2024-01-02T00-00-00.000.log",
        "events.log",
    ]
    table, _ = read_all(FileSource([tmp_path]))
    assert uuid_list(table) == ["a1", "a2", "b1", "b2", "c1"]


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    path.write_bytes(gzip.compress(lines_of(uuids(3)).encode()))
    assert uuid_list(read_all(FileSource([path]))[0]) == uuids(3)


def test_multi_member_gzip(tmp_path: Path) -> None:
    path = tmp_path / "two.log.gz"
    path.write_bytes(gzip.compress(lines_of(["m1"]).encode()) + gzip.compress(lines_of(["m2"]).encode()))
    assert uuid_list(read_all(FileSource([path]))[0]) == ["m1", "m2"]


@pytest.mark.parametrize("indent", [None, 2])
def test_json_arrays(tmp_path: Path, indent: int | None) -> None:
    path = tmp_path / "array.json"
    events = [json.loads(flow_line(u)) for u in uuids(30)]
    events.insert(3, {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "4"}})
    path.write_text(json.dumps(events, indent=indent))
    source = FileSource([path], block_bytes=700)  # elements straddle many chunks
    table, _ = read_all(source)
    assert uuid_list(table) == uuids(30)
    assert source.summary.lost_event_records == {"HUBBLE_RING_BUFFER": 1}
    assert source.summary.events_lost == {"HUBBLE_RING_BUFFER": 4}


def test_json_array_with_a_syntax_error_keeps_the_elements_before_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    text = "[\n" + ",\n".join(flow_line(u) for u in uuids(3)) + ",\n{oops}\n]"
    path.write_text(text)
    table, batches = read_all(FileSource([path]))
    assert uuid_list(table) == uuids(3)
    (error,) = [e for b in batches for e in b.decode_errors]
    assert isinstance(error, FlowDecodeError) and error.line_number == 5 and error.reason == "invalid_json"
    assert str(error).startswith(f"{path}:5: ")


def test_byte_order_mark_and_crlf_line_ends(tmp_path: Path) -> None:
    lines = tmp_path / "windows.json"
    lines.write_bytes(b"\xef\xbb\xbf" + lines_of(uuids(3)).replace("\n", "\r\n").encode())
    assert uuid_list(read_all(FileSource([lines]))[0]) == uuids(3)
    array = tmp_path / "array.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([json.loads(flow_line("z"))]).encode())
    assert uuid_list(read_all(FileSource([array]))[0]) == ["z"]


def test_stdin(tmp_path: Path) -> None:
    source = FileSource(["-"], stdin=io.BytesIO(lines_of(uuids(4)).encode()))
    assert uuid_list(read_all(source)[0]) == uuids(4)
    gz = FileSource(["-"], stdin=io.BytesIO(gzip.compress(lines_of(uuids(2)).encode())))
    assert uuid_list(read_all(gz)[0]) == uuids(2)


def test_small_blocks_give_the_same_rows_as_one_block(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    text = lines_of(uuids(40))
    path.write_text(
        text.replace('"verdict": "FORWARDED"', '"verdict": 2', 3)
    )  # some blocks take the fallback
    whole, one = read_all(FileSource([path]))
    small, many = read_all(FileSource([path], block_bytes=2000))
    assert len(one) == 1 and len(many) > 10
    assert whole.equals(small)
    assert [b.position.records for b in many] == sorted(b.position.records for b in many)  # type: ignore[union-attr]


def test_read_events_function(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(lines_of(uuids(7)))
    assert sum(batch.flows.num_rows for batch in read_events([path], cluster_name="lab")) == 7


def test_cluster_name_fills_where_the_flow_has_none(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(flow_line("x", node="east/n1") + "\n" + flow_line("y", node="n2") + "\n")
    table, _ = read_all(FileSource([path], cluster_name="west"))
    assert table["cluster_name"].to_pylist() == ["east", "west"]


# -- counted events and bad input ------------------------------------------------------------------------------


def test_lost_events_and_node_status_are_counted_not_stored(tmp_path: Path) -> None:
    path = tmp_path / "mixed.json"
    path.write_text(
        "\n".join(
            [
                flow_line("f1"),
                json.dumps({"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "10", "cpu": 1},
                            "node_name": "n1", "time": "2024-05-01T10:00:00Z"}),
                json.dumps({"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": "5"}}),
                json.dumps({"node_status": {"state_change": "NODE_ERROR", "message": "x"}}),
                json.dumps({"agent_event": {"type": "POLICY_UPDATED"}}),
                json.dumps({"debug_event": {"type": "DBG_GENERIC"}}),
                flow_line("f2"),
            ]
        )
        + "\n"
    )  # fmt: skip
    source = FileSource([path])
    table, batches = read_all(source)
    assert uuid_list(table) == ["f1", "f2"]
    assert sum(len(b.lost_events) for b in batches) == 2 and sum(b.node_status for b in batches) == 1
    summary = source.summary
    assert summary.lost_event_records == {"PERF_EVENT_RING_BUFFER": 2}
    assert summary.events_lost == {"PERF_EVENT_RING_BUFFER": 15}
    assert (summary.node_status, summary.agent_events, summary.debug_events) == (1, 1, 1)


def test_malformed_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        "\n".join([flow_line("ok1"), "{not json", flow_line("ok2"), '"a string"', json.dumps({"x": 1}),
                   flow_line("ok3")]) + "\n"
    )  # fmt: skip
    source = FileSource([path])
    table, batches = read_all(source)
    assert uuid_list(table) == ["ok1", "ok2", "ok3"]
    errors = [e for b in batches for e in b.decode_errors]
    assert [(e.path, e.line_number, e.reason) for e in errors] == [  # type: ignore[attr-defined]
        (str(path), 2, "invalid_json"),
        (str(path), 4, "not_an_object"),
    ]
    assert source.summary.lines_skipped == {"invalid_json": 1, "not_an_object": 1, "unknown_event": 1}
    assert source.summary.decode_errors == 2


def test_strict_raises_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(flow_line("ok") + "\n" + flow_line("ok2") + "\n{broken\n")
    with pytest.raises(FlowDecodeError, match=rf"^{path}:3: invalid JSON") as info:
        list(FileSource([path], strict=True).batches())
    assert info.value.line_number == 3


def test_truncated_gz_keeps_every_flow_before_the_cut(tmp_path: Path) -> None:
    whole = gzip.compress(lines_of(uuids(400)).encode())
    path = tmp_path / "events-2024-01-01T00-00-00.000.log.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    source = FileSource([path], block_bytes=4096)
    table, batches = read_all(source)
    got = uuid_list(table)
    assert 100 < len(got) < 400 and got == uuids(len(got))
    (error,) = [e for b in batches for e in b.decode_errors]
    assert isinstance(error, FlowDecodeError) and error.reason == "truncated"
    assert error.path == str(path) and error.line_number == len(got) + 1
    assert f"every line up to line {len(got)} was read" in str(error)
    with pytest.raises(FlowDecodeError, match="truncated"):
        list(FileSource([path], strict=True).batches())


def test_truncated_gz_smaller_than_a_block_keeps_its_flows(tmp_path: Path) -> None:
    # The usual case: a cut backup far smaller than one block (default block size), whole lines before the cut.
    whole = gzip.compress(lines_of(uuids(400)).encode())
    path = tmp_path / "events-2024-01-01T00-00-00.000.log.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    table, batches = read_all(FileSource([path]))
    got = uuid_list(table)
    assert 100 < len(got) < 400 and got == uuids(len(got))
    (error,) = [e for b in batches for e in b.decode_errors]
    assert error.reason == "truncated" and error.line_number == len(got) + 1  # type: ignore[attr-defined]


def test_corrupt_gz_is_a_decode_error(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(lines_of(uuids(50)).encode()))
    data[len(data) // 2 : len(data) // 2 + 40] = b"\x00" * 40
    path = tmp_path / "bad.log.gz"
    path.write_bytes(bytes(data))
    table, batches = read_all(FileSource([path]))
    errors = [e for b in batches for e in b.decode_errors]
    assert errors and errors[-1].reason == "truncated"  # type: ignore[attr-defined]
    assert uuid_list(table) == uuids(table.num_rows)


def test_unterminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_text(lines_of(["a", "b"]) + flow_line("c"))  # complete JSON, no newline yet
    state = tmp_path / "_state" / "files.json"
    source = FileSource([path], checkpoint_path=state)
    assert uuid_list(read_all(source)[0]) == ["a", "b", "c"]
    with path.open("a") as f:  # the writer finishes the line and goes on
        f.write("\n" + flow_line("d") + "\n" + "{bad\n")
    again = FileSource([path], checkpoint_path=state)
    table, batches = read_all(again)
    assert uuid_list(table) == ["d"]
    assert [e.line_number for b in batches for e in b.decode_errors] == [5]


def test_cut_last_line_is_reported_and_read_again_once_complete(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    full = flow_line("b")
    path.write_text(lines_of(["a"]) + full[:40])
    state = tmp_path / "files.json"
    source = FileSource([path], checkpoint_path=state)
    table, batches = read_all(source)
    assert uuid_list(table) == ["a"]
    assert [(e.line_number, e.reason) for b in batches for e in b.decode_errors] == [(2, "truncated")]
    path.write_text(lines_of(["a"]) + full + "\n")
    assert uuid_list(read_all(FileSource([path], checkpoint_path=state))[0]) == ["b"]


def test_too_long_line_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "MAX_LINE_BYTES", 3000)
    path = tmp_path / "long.json"
    path.write_text(
        flow_line("a") + "\n" + '{"flow": {"uuid": "' + "x" * 10_000 + '"}}\n' + flow_line("c") + "\n"
    )
    source = FileSource([path], block_bytes=1000)
    table, _ = read_all(source)
    assert uuid_list(table) == ["a", "c"]
    assert source.summary.lines_skipped == {"line_too_long": 1}


def padded_line(uuid: str, length: int) -> str:
    """A flow line of exactly `length` bytes (without its newline)."""
    line = flow_line(uuid)
    return line[:-1] + " " * (length - len(line)) + "}"


@pytest.mark.parametrize("block_bytes", [700, 1000, 3000, 50_000])
def test_the_line_cap_is_exact_wherever_a_line_falls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    # Lines of the cap are read and one byte more are skipped, whether the line ends in the block it began in,
    # in a later block, or lies inside a block larger than the cap.
    cap = 3000
    monkeypatch.setattr(file_module, "MAX_LINE_BYTES", cap)
    lengths = {"a": cap, "b": cap + 1, "c": 400, "d": cap + 500, "e": cap, "f": 2 * cap + 7, "g": 300}
    path = tmp_path / "lines.json"
    path.write_text("".join(padded_line(uuid, length) + "\n" for uuid, length in lengths.items()))
    source = FileSource([path], block_bytes=block_bytes)
    table, batches = read_all(source)
    assert uuid_list(table) == ["a", "c", "e", "g"]
    skipped = [(e.line_number, e.reason) for b in batches for e in b.decode_errors]
    assert skipped == [(2, "line_too_long"), (4, "line_too_long"), (6, "line_too_long")]
    assert batches[-1].position.offset == path.stat().st_size  # every byte accounted for


def test_a_line_over_the_cap_is_let_go_as_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A line of 40 times the cap never sits in memory whole: what is held stays within the cap and one block.
    cap, block = 100_000, 64 * 1024
    monkeypatch.setattr(file_module, "MAX_LINE_BYTES", cap)
    path = tmp_path / "huge.json"
    with open(path, "w") as handle:
        handle.write(flow_line("a") + "\n" + '{"flow": {"uuid": "')
        handle.writelines("x" * cap for _ in range(40))
        handle.write('"}}\n' + flow_line("c") + "\n")
    source = FileSource([path], block_bytes=block)
    tracemalloc.start()
    try:
        table, _ = read_all(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert uuid_list(table) == ["a", "c"]
    assert source.summary.lines_skipped == {"line_too_long": 1}
    assert peak < 8 * (cap + block), peak  # far below the 4 MB line


def test_missing_inputs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.json: no such file"):
        FileSource([tmp_path / "nope.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no Hubble export files"):
        FileSource([tmp_path / "empty"])
    with pytest.raises(ConfigError):
        FileSource([])


# -- checkpoints: the same content twice adds nothing ----------------------------------------------------------


def test_ingesting_the_same_file_twice_adds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(lines_of(uuids(20)))
    state = tmp_path / "_state" / "files.json"
    assert read_all(FileSource([path], checkpoint_path=state))[0].num_rows == 20
    again = FileSource([path], checkpoint_path=state)
    assert read_all(again)[0].num_rows == 0
    assert again.summary.lines_already_ingested == 20
    document = json.loads(state.read_text())
    assert [entry["records"] for entry in document["files"].values()] == [20]
    assert [p.name for p in state.parent.iterdir()] == ["files.json"]  # no temporary file left


def test_rotated_renamed_and_compressed_copies_are_recognised(tmp_path: Path) -> None:
    live = tmp_path / "events.log"
    live.write_text(lines_of(uuids(30)))
    state = tmp_path / "files.json"
    read_all(FileSource([live], checkpoint_path=state))
    rotated = tmp_path / "events-2024-05-01T10-00-00.000.log"
    os.replace(live, rotated)
    compressed = tmp_path / "events-2024-05-01T10-00-00.000.log.gz"
    compressed.write_bytes(gzip.compress(rotated.read_bytes()))
    source = FileSource([rotated, compressed], checkpoint_path=state)
    assert read_all(source)[0].num_rows == 0
    assert source.summary.lines_already_ingested == 60


def test_a_grown_file_continues_from_the_committed_line(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_text(lines_of(uuids(3, "a")))  # smaller than the fingerprint head
    state = tmp_path / "files.json"
    read_all(FileSource([path], checkpoint_path=state))
    big = uuids(600, "b")  # now far beyond the 64 KiB head
    with path.open("a") as f:
        f.write(lines_of(big))
    table, _ = read_all(FileSource([path], checkpoint_path=state, block_bytes=50_000))
    assert uuid_list(table) == big
    with path.open("a") as f:
        f.write(lines_of(["c0"]))
    assert uuid_list(read_all(FileSource([path], checkpoint_path=state))[0]) == ["c0"]
    assert len(json.loads(state.read_text())["files"]) == 1  # the short head's entry was replaced


def test_only_committed_batches_count(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(lines_of(uuids(100)))
    state = tmp_path / "files.json"
    source = FileSource([path], checkpoint_path=state, block_bytes=3000)
    batches = list(source.batches())
    assert len(batches) > 3
    durable = batches[:2]
    for batch in durable:  # the sink made only these durable before the crash
        source.commit(batch.position)
    done = sum(b.flows.num_rows for b in durable)
    table, _ = read_all(FileSource([path], checkpoint_path=state))
    assert uuid_list(table) == uuids(100)[done:]


def test_resuming_past_the_first_chunks_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(lines_of(uuids(400)))  # ~250 KB: far beyond the 64 KiB fingerprint head
    for name, content in (("big.json", None), ("big.json.gz", gzip.compress(path.read_bytes()))):
        target = tmp_path / name
        if content is not None:
            target.write_bytes(content)
        state = tmp_path / f"{name}.state.json"
        source = FileSource([target], checkpoint_path=state, block_bytes=4000)
        done = 0
        for batch in source.batches():
            source.commit(batch.position)
            done += batch.flows.num_rows
            if batch.position.offset > 150_000:  # type: ignore[union-attr]
                break
        again = FileSource([target], checkpoint_path=state, block_bytes=4000)
        table, batches = read_all(again)
        assert [e for b in batches for e in b.decode_errors] == []
        assert uuid_list(table) == uuids(400)[done:], name


def test_the_same_content_twice_in_one_run_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(lines_of(uuids(5)))
    copy = tmp_path / "copy.json.gz"
    copy.write_bytes(gzip.compress(path.read_bytes()))
    source = FileSource([path, copy, path])
    assert read_all(source, commit=False)[0].num_rows == 5
    assert source.summary.lines_already_ingested == 5


def test_stdin_content_is_checkpointed_too(tmp_path: Path) -> None:
    data = lines_of(uuids(3)).encode()
    state = tmp_path / "files.json"
    assert read_all(FileSource(["-"], stdin=io.BytesIO(data), checkpoint_path=state))[0].num_rows == 3
    assert read_all(FileSource(["-"], stdin=io.BytesIO(data), checkpoint_path=state))[0].num_rows == 0


def test_json_array_resumes_after_committed_elements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "ARRAY_BATCH_ITEMS", 10)
    path = tmp_path / "array.json"
    path.write_text(json.dumps([json.loads(flow_line(u)) for u in uuids(25)]))
    state = tmp_path / "files.json"
    source = FileSource([path], checkpoint_path=state)
    first = next(iter(source.batches()))
    source.commit(first.position)
    assert uuid_list(first.flows) == uuids(10)
    assert uuid_list(read_all(FileSource([path], checkpoint_path=state))[0]) == uuids(25)[10:]
    assert read_all(FileSource([path], checkpoint_path=state))[0].num_rows == 0


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "files.json"
    state.write_text("{not json")
    (tmp_path / "f.json").write_text(lines_of(["a"]))
    with pytest.raises(SourceError, match="files.json: the file checkpoint cannot be read"):
        FileSource([tmp_path / "f.json"], checkpoint_path=state)


def test_close_stops_after_the_current_block(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(lines_of(uuids(100)))
    source = FileSource([path], block_bytes=2000)
    seen: list[Any] = []
    for batch in source.batches():
        seen.append(batch)
        source.close()
    assert len(seen) == 1


def test_directory_and_file_given_together_are_read_once(tmp_path: Path) -> None:
    (tmp_path / "events.log").write_text(lines_of(["x"]))
    source = FileSource([tmp_path, tmp_path / "events.log"])
    assert source.paths == [str(tmp_path / "events.log")]
    shutil.rmtree(tmp_path)

"""Live input on stdin (`hubble observe -f -o jsonpb | flowpipe ingest -`) is ingested as it arrives."""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
from pathlib import Path

import duckdb
from support.stdin import PausedPipe
from support.wait import WAIT_SECONDS, wait_until

from flowpipe.bench.data import write_synthetic_jsonpb
from flowpipe.dataset.layout import Dataset

"""Upper bound of every wait below (a wait ends as soon as its condition holds)."""


def synthetic_lines(tmp_path: Path, flows: int) -> list[bytes]:
    path = tmp_path / "flows.jsonpb"
    write_synthetic_jsonpb(path, flows)
    lines = path.read_bytes().splitlines(keepends=True)
    return [line for line in lines if b'"flow"' in line][:flows]


def stored_flows(root: Path) -> int:
    files = Dataset(root).list_part_files("flows")
    if not files:
        return 0
    ((count,),) = duckdb.sql("SELECT count(*) FROM read_parquet($files)", params={"files": files}).fetchall()
    return int(count)


def test_a_paused_pipe_delivers_its_whole_lines_before_it_is_closed(tmp_path: Path) -> None:
    lines = synthetic_lines(tmp_path, 30)
    # The last line is incomplete: it waits for its newline, which never comes (the pipe is closed after).
    pipe = PausedPipe(b"".join(lines) + lines[0][:40])
    batches = pipe.batches()
    first = next(batches)  # far less than one block was written: this is the pause delivering it
    assert first == 30 and pipe.sent.is_set() and not pipe.closed.is_set()
    assert list(batches) == []


def test_a_pause_after_a_full_block_delivers_it(tmp_path: Path) -> None:
    lines = synthetic_lines(tmp_path, 30)
    whole = b"".join(lines)
    # One full block of whole lines, then part of a line: the pause brings no new line, yet the block, which
    # waits for a second one to be decoded alongside, must be delivered.
    pipe = PausedPipe(whole + lines[0][:40])
    batches = pipe.batches(block_bytes=len(whole))
    assert next(batches) == 30 and not pipe.closed.is_set()
    assert list(batches) == []


def test_a_paused_gzip_pipe_delivers_what_is_decompressed(tmp_path: Path) -> None:
    lines = synthetic_lines(tmp_path, 20)
    compressor = gzip.GzipFile(fileobj=(buffer := _Buffer()), mode="wb")
    compressor.write(b"".join(lines))
    compressor.flush()  # a sync flush: everything so far can be decompressed, the gzip stream is not ended
    pipe = PausedPipe(buffer.data)
    batches = pipe.batches()
    assert next(batches) == 20 and not pipe.closed.is_set()


class _Buffer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_ingest_from_a_live_stdin_stores_flows_before_stdin_closes(tmp_path: Path) -> None:
    lines = synthetic_lines(tmp_path, 40)
    dataset = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-m", "flowpipe", "ingest", "-", "--dataset", str(dataset), "--max-batch-rows", "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    try:
        for line in lines[:20]:  # slowly, like `hubble observe -f`
            child.stdin.write(line)
            child.stdin.flush()
            time.sleep(0.01)
        wait_until(lambda: stored_flows(dataset) == 20, what="the first lines stored while stdin is open")
        assert child.poll() is None
        _, err = child.communicate(b"".join(lines[20:]), timeout=WAIT_SECONDS)  # then stdin is closed
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err.decode()
    assert stored_flows(dataset) == 40

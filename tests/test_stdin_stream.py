"""Live input on stdin (`hubble observe -f -o jsonpb | flowpipe ingest -`) is ingested as it arrives."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from flowpipe.bench.data import write_synthetic_jsonpb
from flowpipe.dataset.layout import Dataset
from flowpipe.sources.file import FileSource

WAIT_SECONDS = 60.0
"""Upper bound of every wait below (a wait ends as soon as its condition holds)."""


def wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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


class PausedPipe:
    """A real pipe whose writer writes `data`, then pauses with the pipe open until `release()`."""

    def __init__(self, data: bytes) -> None:
        self.read_end, write_end = os.pipe()
        self.sent = threading.Event()
        self.closed = threading.Event()
        self._release = threading.Event()

        def write() -> None:
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
                out.flush()
                self.sent.set()
                self._release.wait(WAIT_SECONDS)
            self.closed.set()

        self._writer = threading.Thread(target=write)
        self._writer.start()

    def release(self) -> None:
        self._release.set()

    def batches(self, **options: int) -> Iterator[int]:
        """Flows per batch of a FileSource reading the pipe as stdin (the pipe is released at the end)."""
        try:
            with os.fdopen(self.read_end, "rb", buffering=0) as stdin:
                for batch in FileSource(["-"], stdin=stdin, **options).batches():
                    if batch.flows.num_rows:
                        yield batch.flows.num_rows
                        self.release()  # the writer closes the pipe once flows were delivered
        finally:
            self.release()
            self._writer.join(WAIT_SECONDS)


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
        assert wait_for(lambda: stored_flows(dataset) == 20), (
            "the first lines were stored while stdin is open"
        )
        assert child.poll() is None
        _, err = child.communicate(b"".join(lines[20:]), timeout=WAIT_SECONDS)  # then stdin is closed
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err.decode()
    assert stored_flows(dataset) == 40

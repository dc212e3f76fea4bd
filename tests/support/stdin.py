"""A pipe that pauses mid-stream, as `hubble observe -f` piped into `flowpipe ingest -` does."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from flowpipe.sources.file import FileSource
from support.wait import WAIT_SECONDS


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

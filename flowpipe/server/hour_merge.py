"""One hour of part files in time order by merging them, each file read once in its stored order.

Sorting an hour in DuckDB needs its flows in memory (or slices of the hour, each of which decodes whole row
groups again); but part files are written in arrival order, which is close to time order. `HourMerge` reads the
hour as a few streams instead, each a chain of part files whose times follow one another, and merges them:

- a first pass reads only the times of the flows of the request in each file (in the order DuckDB returns
  them), which gives each stream the smallest time still to come after each row (its suffix minimum);
- the watermark is the smallest of those over the streams: a row read before it is older than every row
  still unread, so the rows read that are older than the watermark go out, sorted (time, then the columns
  that break ties), and the stream that holds the watermark back is read next;
- a file whose rows come back in another order than in the first pass, or an hour whose streams would hold
  too many rows ahead of the watermark (files far from time order) stops the merge with `MergeFallback`:
  `bound` then says from which time the rest of the hour is to be read another way (every row returned is
  older than it, every other row is not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_STREAMS = 16
"""Chains of part files read at once; an hour needing more (many writers at once) is not merged."""

MAX_PENDING_ROWS = 100_000
"""Rows read ahead of the watermark; more (part files far from time order) stops the merge."""

_AFTER_LAST = np.iinfo(np.int64).max
_BLOCK_ROWS = 4096  # a stream keeps the smallest time still to come per block of rows (not per row)


class MergeFallback(Exception):
    """The hour cannot be merged with bounded memory; read it from `bound` on another way."""

    def __init__(self, reason: str, bound: int | None) -> None:
        super().__init__(reason)
        self.bound = bound


class _Stream:
    """A chain of part files read in stored order, with the times the first pass found in it."""

    def __init__(self, reader: pa.RecordBatchReader, cursor: Any, times: np.ndarray) -> None:
        self.reader = reader
        self.cursor = cursor
        self.times = times
        # blocks[k]: the smallest time of rows k * _BLOCK_ROWS.. (the last entry: after the last row)
        starts = np.arange(0, len(times), _BLOCK_ROWS)
        minima = np.minimum.reduceat(times, starts) if len(times) else np.zeros(0, dtype=np.int64)
        self.blocks = np.append(np.minimum.accumulate(minima[::-1])[::-1], _AFTER_LAST)
        self.position = 0
        self.next_time = self._smallest_from(0)

    def _smallest_from(self, position: int) -> int:
        """The smallest time of rows `position`.. (`_AFTER_LAST` after the last row)."""
        if position >= len(self.times):
            return _AFTER_LAST
        block = position // _BLOCK_ROWS
        rest = self.times[position : (block + 1) * _BLOCK_ROWS]
        return min(int(rest.min()), int(self.blocks[block + 1]))

    def advance(self, rows: int) -> None:
        """`rows` more rows were read."""
        self.position += rows
        self.next_time = self._smallest_from(self.position)

    def close(self) -> None:
        self.cursor.close()


def chains(files: Sequence[tuple[str, np.ndarray]]) -> list[list[tuple[str, np.ndarray]]]:
    """Files (with their times) in chains of files that follow one another in time: the fewest such chains.

    Files without rows are left out.
    """
    spans = sorted(
        ((int(times.min()), int(times.max()), path, times) for path, times in files if len(times)),
        key=lambda item: (item[0], item[1], item[2]),
    )
    out: list[list[tuple[str, np.ndarray]]] = []
    ends: list[int] = []
    for start, end, path, times in spans:
        fitting = [i for i, last in enumerate(ends) if last <= start]
        if fitting:
            chosen = max(fitting, key=lambda i: ends[i])
            out[chosen].append((path, times))
            ends[chosen] = end
        else:
            out.append([(path, times)])
            ends.append(end)
    return out


class HourMerge:
    """The rows of one hour in order (time, then `order`), merged from streams of part files.

    `times_of(path)` gives the times (ns) of the rows of a file as a stream of it would return them;
    `open_stream(paths)` opens a reader of the rows of those files, one after the other, and returns it with a
    handle to close. `bound`: no row older than it is read (None: the hour's start).
    """

    def __init__(
        self,
        files: Sequence[str],
        times_of: Callable[[str], np.ndarray],
        open_stream: Callable[[Sequence[str]], tuple[pa.RecordBatchReader, Any]],
        order: Sequence[str],
        batch_rows: int,
        bound: int | None = None,
    ) -> None:
        self.bound = bound
        self._order = [(column, "ascending") for column in order]
        self._batch_rows = batch_rows
        self._pending: list[pa.RecordBatch] = []
        self._pending_times: list[np.ndarray] = []
        self._ready: list[pa.RecordBatch] = []
        self._streams: list[_Stream] = []
        groups = chains([(path, times_of(path)) for path in files])
        if len(groups) > MAX_STREAMS:
            raise MergeFallback(f"{len(groups)} part files overlap in time", bound)
        try:
            for group in groups:
                reader, cursor = open_stream([path for path, _ in group])
                self._streams.append(_Stream(reader, cursor, np.concatenate([times for _, times in group])))
        except BaseException:
            self.close()
            raise

    def _watermark(self) -> int:
        return min((stream.next_time for stream in self._streams), default=_AFTER_LAST)

    def _pending_rows(self) -> int:
        return sum(len(times) for times in self._pending_times)

    def next(self) -> pa.RecordBatch | None:
        """The next rows in order; None once the hour is read. Raises MergeFallback (see the module)."""
        while not self._ready:
            watermark = self._watermark()
            due = sum(int(np.count_nonzero(times < watermark)) for times in self._pending_times)
            if due and (due >= self._batch_rows or watermark == _AFTER_LAST):
                self._release(watermark)
                break
            if watermark == _AFTER_LAST:
                return None
            if self._pending_rows() > MAX_PENDING_ROWS:
                raise MergeFallback("part files far from time order", self.bound)
            self._read(min(self._streams, key=lambda stream: stream.next_time))
        return self._ready.pop(0)

    def _read(self, stream: _Stream) -> None:
        try:
            batch = stream.reader.read_next_batch()
        except StopIteration:
            if stream.position != len(stream.times):
                raise MergeFallback("a part file gave fewer rows than counted", self.bound) from None
            stream.advance(len(stream.times) - stream.position)
            self._streams.remove(stream)
            stream.close()
            return
        times = pc.cast(batch.column("time"), pa.int64()).to_numpy(zero_copy_only=False)
        expected = stream.times[stream.position : stream.position + len(times)]
        if not np.array_equal(times, expected):
            raise MergeFallback("a part file gave its rows in another order than counted", self.bound)
        stream.advance(len(times))
        if stream.position == len(stream.times):
            self._streams.remove(stream)
            stream.close()
        if len(times):
            self._pending.append(batch)
            self._pending_times.append(times)

    def _release(self, watermark: int) -> None:
        """Move the pending rows older than the watermark, sorted, to the ready batches."""
        table = pa.Table.from_batches(self._pending)
        times = np.concatenate(self._pending_times)
        due = times < watermark
        if due.all():
            out, self._pending, self._pending_times = table, [], []
        else:
            out = table.filter(pa.array(due))
            rest = table.filter(pa.array(~due)).combine_chunks()
            self._pending, self._pending_times = rest.to_batches(), [times[~due]]
            times = times[due]
        # Part files in time order give rows whose times only grow: in order whatever breaks ties (no sort).
        if not (np.diff(times) > 0).all():
            order = pc.sort_indices(out, sort_keys=self._order).to_numpy()  # NULLs last, as DuckDB sorts
            if not np.array_equal(order, np.arange(len(order))):
                out = out.take(order)
        if out.num_rows and all(column.num_chunks == 1 for column in out.columns):
            self._ready.extend(out.to_batches(max_chunksize=self._batch_rows))  # (no copy)
        else:
            self._ready.extend(out.combine_chunks().to_batches(max_chunksize=self._batch_rows))
        self.bound = watermark

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []

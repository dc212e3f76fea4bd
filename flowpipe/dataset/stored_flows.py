"""Flows the dataset already holds, recognised by uuid, so that each flow with a uuid is stored once per dataset.

Captures overlap: two `hubble observe` runs cover the same minutes, `--last N` repeats what the previous run
printed, a `dropped.json` is cut from a larger capture, a relay stream resumes a little before where it stopped.
A flow's `uuid` (Cilium 1.10+) names it wherever it appears, so every writer (file ingest, stdin, `collect`)
passes its batches through `StoredFlows.new_rows` before they reach the sinks: rows whose uuid is already in the
dataset, or earlier in the same run, are left out and counted. Rows without a uuid are not looked at here (the
file checkpoint and the relay's resume overlap handle them, as before).

How it stays fast (a few percent of ingest time):

- A uuid is kept as two 64-bit words (its 128 bits, parsed with numpy from the canonical text; any other text is
  hashed to 128 bits), in sorted numpy arrays: a batch is checked with one binary search per row, in bulk.
- Only the hour partitions a batch touches are looked at. The first time a partition is touched its part files
  are read (the `time` and `uuid` columns only); after that the partition's keys stay in memory, with the keys of
  the rows this run passed on, and the folder is listed again at most every `refresh_seconds` to read the files
  other writers added since (never this run's own files, whose rows are already known).
- The cache is bounded (`max_keys`): the partitions touched least recently are forgotten first, except those of
  the current batch and those that received rows recently enough that the sink may not have written them yet
  (they would not be found in the files if read again).

Compaction rewrites part files without changing their rows, so keys already read stay right; a file that a
compaction removes between listing and reading is looked up again (its rows are in the compacted file, which is
published before its inputs are deleted), inputs that a compacted file supersedes are not read, and a compacted
file whose inputs were all read already adds nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset.layout import FLOWS_TABLE, Dataset, PartitionKey, parse_part_file_name
from flowpipe.dataset.visible import is_compacted_name, read_compacted_inputs, superseded_names
from flowpipe.errors import DatasetWriteError
from flowpipe.model import EventBatch

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 8_000_000
"""Uuids kept in memory at most (16 bytes each), beyond the partitions that cannot be forgotten yet."""
DEFAULT_REFRESH_SECONDS = 30.0
"""How often a cached partition's folder is listed again for files that other writers added."""
_READ_ATTEMPTS = 3
_READ_ROWS = 256 * 1024

_HEX = np.full(256, 255, np.uint8)
for _value, _char in enumerate(b"0123456789abcdef"):
    _HEX[_char] = _value
    _HEX[ord(chr(_char).upper())] = _value
_DASHES = np.array([8, 13, 18, 23])
_DIGITS = np.array([i for i in range(36) if i not in _DASHES])
_DASH = ord("-")


def _hashed_words(text: str) -> tuple[int, int]:
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def uuid_words(uuids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 words per (non-null) uuid: its 128 bits for the canonical `8-4-4-4-12` hex form, else a hash."""
    uuids = pc.cast(uuids, pa.string()) if uuids.type != pa.string() else uuids
    count = len(uuids)
    high = np.zeros(count, np.uint64)
    low = np.zeros(count, np.uint64)
    if count == 0:
        return high, low
    offsets = np.frombuffer(uuids.buffers()[1], np.int32, count=count + 1, offset=uuids.offset * 4)
    canonical = np.diff(offsets) == 36
    rows = np.flatnonzero(canonical)
    if len(rows):
        data = np.frombuffer(uuids.buffers()[2], np.uint8)
        starts = offsets[rows][:, None]
        nibbles = _HEX[data[starts + _DIGITS]]
        dashes = data[starts + _DASHES]
        if nibbles.max() == 255 or (dashes != _DASH).any():  # some are not hex uuids: found row by row
            canonical[rows] = (dashes == _DASH).all(axis=1) & (nibbles != 255).all(axis=1)
        packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(">u8")
        high[rows] = packed[:, 0]
        low[rows] = packed[:, 1]
    if not canonical.all():
        texts = uuids.to_pylist()
        for index in np.flatnonzero(~canonical).tolist():
            high[index], low[index] = _hashed_words(texts[index])
    return high, low


@dataclass(slots=True)
class _Keys:
    """Uuid keys sorted by their high word (keys of equal high words, practically never seen, are adjacent)."""

    high: np.ndarray
    low: np.ndarray

    @classmethod
    def sorted(cls, high: np.ndarray, low: np.ndarray) -> _Keys:
        # stable sort: a merge of runs that are already sorted (two segments concatenated) is linear
        order = np.argsort(high, kind="stable")
        return cls(high[order], low[order])

    def __len__(self) -> int:
        return len(self.high)

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """For each (high, low), whether it is among these keys."""
        found = np.zeros(len(high), bool)
        if not len(self.high) or not len(high):
            return found
        index = np.searchsorted(self.high, high, side="left")
        last = len(self.high) - 1
        pending = np.ones(len(high), bool)
        while True:
            at = np.minimum(index, last)
            same_high = pending & (index <= last) & (self.high[at] == high)
            found |= same_high & (self.low[at] == low)
            pending = same_high & ~found  # another key with the same high word may follow (practically never)
            if not pending.any():
                return found
            index = index + 1


def _merge(parts: list[_Keys]) -> _Keys:
    return _Keys.sorted(np.concatenate([p.high for p in parts]), np.concatenate([p.low for p in parts]))


@dataclass(slots=True)
class _Partition:
    """What is known of one hour partition: the part files read, and the keys of their rows and of this run's."""

    files: set[str] = field(default_factory=set)
    segments: list[_Keys] = field(default_factory=list)
    listed_at: float = 0.0
    added_at_row: int = -1
    """`StoredFlows.rows_passed` when this run last passed rows of this partition on (-1: never)."""

    @property
    def keys(self) -> int:
        return sum(len(s) for s in self.segments)

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        found = np.zeros(len(high), bool)
        for segment in self.segments:
            found |= segment.contains(high, low)
        return found

    def add(self, keys: _Keys) -> None:
        """Add sorted keys; segments of similar size are merged (a few segments, each row re-sorted log times)."""
        if not len(keys):
            return
        self.segments.append(keys)
        while len(self.segments) > 1 and len(self.segments[-2]) <= 2 * len(self.segments[-1]):
            last = self.segments.pop()
            self.segments[-1] = _merge([self.segments[-1], last])


class StoredFlows:
    """Which flows with a uuid the dataset (or this run) already has; see the module docstring.

    `own_writer_id` is the writer id of the sink this run writes with: files of that id that appear after a
    partition was read hold rows this run passed on, and are not read again. `unflushed_rows` is how many rows
    passed on may still wait in the sink's open batch, and `buffer_batches` how many batches in the pipeline's
    buffer (a partition that received rows within that many is never forgotten). `for_writer` takes them from
    the sink's and the pipeline's configuration.

    >>> stored = StoredFlows(Dataset("flowpipe-data"))
    >>> flows, repeats = stored.new_rows(batch.flows)      # `repeats` rows were already stored
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        own_writer_id: str | None = None,
        unflushed_rows: int = 1_000_000,
        buffer_batches: int = 4,
        max_keys: int = DEFAULT_MAX_KEYS,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dataset = dataset
        self.own_writer_id = own_writer_id
        self.unflushed_rows = unflushed_rows
        self.buffer_batches = buffer_batches
        self._largest_batch = 0
        self.max_keys = max_keys
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._partitions: OrderedDict[PartitionKey, _Partition] = OrderedDict()
        self.rows_passed = 0
        self.repeats = 0
        """Rows with a uuid left out so far because the dataset or this run already had them."""
        self.files_read = 0

    @classmethod
    def for_writer(
        cls,
        dataset: Dataset,
        sink: ParquetSinkConfig,
        pipeline: PipelineConfig | None = None,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> StoredFlows:
        """The stored flows of `dataset`, for a run that writes into it with the sink configuration `sink`."""
        return cls(
            dataset,
            own_writer_id=sink.writer_id,
            unflushed_rows=sink.max_batch_rows,
            buffer_batches=(pipeline or PipelineConfig()).buffer_batches,
            max_keys=max_keys,
        )

    def new_rows(self, flows: pa.Table) -> tuple[pa.Table, int]:
        """`flows` without the rows whose uuid is already stored (or earlier in `flows`), and how many left out."""
        self._largest_batch = max(self._largest_batch, flows.num_rows)
        if flows.num_rows == 0 or flows.schema.get_field_index("uuid") < 0:
            return flows, 0
        uuid = flows.column("uuid").combine_chunks()
        if uuid.null_count == len(uuid):
            self.rows_passed += flows.num_rows
            return flows, 0
        with_uuid = np.flatnonzero(pc.is_valid(uuid).to_numpy(zero_copy_only=False))
        high, low = uuid_words(uuid.take(pa.array(with_uuid)) if uuid.null_count else uuid)
        hours = _hour_indexes(flows.column("time"), with_uuid)
        repeated = np.zeros(len(with_uuid), bool)
        touched = set()
        single = hours.min() == hours.max()
        for hour in [int(hours[0])] if single else np.unique(hours).tolist():
            rows = np.arange(len(hours)) if single else np.flatnonzero(hours == hour)
            key = PartitionKey.from_hour_index(None if hour == _NO_HOUR else hour)
            touched.add(key)
            partition = self._partition(key)
            order = rows[np.argsort(high[rows], kind="stable")]  # sorted needles: a cache-friendly search
            keys = _Keys(high[order], low[order])
            seen = _earlier_in_batch(keys) | partition.contains(keys.high, keys.low)
            repeated[order] = seen
            if not seen.all():
                partition.add(_Keys(keys.high[~seen], keys.low[~seen]) if seen.any() else keys)
                partition.added_at_row = self.rows_passed + flows.num_rows
        count = int(repeated.sum())
        if count:
            keep = np.ones(flows.num_rows, bool)
            keep[with_uuid[repeated]] = False
            flows = flows.filter(pa.array(keep))
            self.repeats += count
        self.rows_passed += flows.num_rows
        self._forget(touched)
        return flows, count

    def skip_stored(self, batch: EventBatch) -> EventBatch:
        """`batch` with its already stored flows left out (in place), counted in `batch.flows_already_stored`."""
        batch.flows, count = self.new_rows(batch.flows)
        batch.flows_already_stored += count
        return batch

    # -- the cache ----------------------------------------------------------------------------------------

    def _partition(self, key: PartitionKey) -> _Partition:
        partition = self._partitions.get(key)
        now = self._clock()
        if partition is None:
            partition = _Partition()
            self._read_new_files(key, partition, own_too=True)
            partition.listed_at = now
            self._partitions[key] = partition
        elif now - partition.listed_at >= self.refresh_seconds:
            self._read_new_files(key, partition, own_too=False)
            partition.listed_at = now
        self._partitions.move_to_end(key)
        return partition

    def _forget(self, touched: set[PartitionKey]) -> None:
        total = sum(p.keys for p in self._partitions.values())
        if total <= self.max_keys:
            return
        # rows passed on but perhaps not written yet: the sink's open batch, the buffer, the batch in hand
        unwritten = self.unflushed_rows + (self.buffer_batches + 2) * self._largest_batch
        for key in list(self._partitions):
            if total <= self.max_keys:
                break
            partition = self._partitions[key]
            recent = partition.added_at_row >= 0 and self.rows_passed - partition.added_at_row < unwritten
            if key in touched or recent:
                continue
            total -= partition.keys
            del self._partitions[key]

    # -- reading the dataset ------------------------------------------------------------------------------

    def _read_new_files(self, key: PartitionKey, partition: _Partition, *, own_too: bool) -> None:
        """Read the keys of the partition's visible part files not read yet (own files only when `own_too`)."""
        folder = self.dataset.partition_dir(FLOWS_TABLE, key)
        for attempt in range(_READ_ATTEMPTS):
            try:
                names = self._unread(folder, key, partition, own_too=own_too)
                for name in names:
                    keys = self._read_keys(f"{folder}/{name}")
                    partition.add(keys)
                    partition.files.add(name)
                    self.files_read += 1
                return
            except FileNotFoundError:
                if attempt == _READ_ATTEMPTS - 1:
                    raise DatasetWriteError(
                        f"part files of {folder} kept disappearing while flowpipe read their uuids "
                        "(is a compaction or retention running?); run the command again",
                        path=folder,
                    ) from None
                log.info("a part file of %s was removed while being read (compaction): listing again", folder)

    def _unread(self, folder: str, key: PartitionKey, partition: _Partition, *, own_too: bool) -> list[str]:
        paths = self.dataset.list_part_files(FLOWS_TABLE, key)
        present = [path.rsplit("/", 1)[-1] for path in paths]
        hidden = superseded_names(self.dataset, folder, present)
        unread = []
        for name in present:
            if name in partition.files or name in hidden:
                continue
            parsed = parse_part_file_name(name)
            if not own_too and parsed is not None and parsed.writer_id == self.own_writer_id:
                partition.files.add(name)  # this run's own rows: already known
                continue
            if is_compacted_name(name) and partition.files:
                inputs = read_compacted_inputs(self.dataset, f"{folder}/{name}") or []
                if inputs and all(input_name in partition.files for input_name, _ in inputs):
                    partition.files.add(name)  # the same rows as files already read
                    continue
            unread.append(name)
        return unread

    def _read_keys(self, path: str) -> _Keys:
        """The uuid keys of one part file, read a row group's worth at a time (memory stays small)."""
        highs: list[np.ndarray] = []
        lows: list[np.ndarray] = []
        try:
            with self.dataset.filesystem.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(columns=["uuid"], batch_size=_READ_ROWS):
                    uuid = batch.column(0)
                    if uuid.null_count:
                        uuid = uuid.filter(pc.is_valid(uuid))
                    high, low = uuid_words(uuid)
                    highs.append(high)
                    lows.append(low)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                raise FileNotFoundError(path) from exc
            raise DatasetWriteError(
                f"cannot read {path} to skip flows already stored: {exc}", path=path
            ) from exc
        if not highs:
            return _Keys(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        return _Keys.sorted(np.concatenate(highs), np.concatenate(lows))

    def __iter__(self) -> Iterator[PartitionKey]:
        return iter(self._partitions)


_NO_HOUR = np.iinfo(np.int64).min
_HOUR_NS = 3_600_000_000_000


def _hour_indexes(times: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> np.ndarray:
    """The hour index (hours since the epoch) of each of `rows`; `_NO_HOUR` for a row without a time."""
    values = pc.cast(times, pa.int64())
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    values = values.take(pa.array(rows)) if len(rows) != len(values) else values
    if values.null_count:
        ns = pc.fill_null(values, _NO_HOUR).to_numpy()
        return np.where(ns == _NO_HOUR, _NO_HOUR, ns // _HOUR_NS)
    return values.to_numpy() // _HOUR_NS


def _earlier_in_batch(keys: _Keys) -> np.ndarray:
    """For each of the sorted `keys`, whether the same key comes earlier among them (the first one is kept)."""
    same_high = keys.high[1:] == keys.high[:-1]
    repeated = np.zeros(len(keys), bool)
    if not same_high.any():
        return repeated
    order = np.lexsort((keys.low, keys.high))  # stable: equal keys keep their order
    same = (keys.high[order][1:] == keys.high[order][:-1]) & (keys.low[order][1:] == keys.low[order][:-1])
    repeated[order[1:][same]] = True
    return repeated

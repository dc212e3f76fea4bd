"""The Parquet sink: batches flows and lost events, and flushes them into Hive-partitioned part files.

A flush happens when the open batch reaches `max_batch_rows` flows or `max_batch_bytes` bytes, when it is older
than `flush_interval_seconds` (by the injected clock), and on `flush()` / `close()`. Batches from the source
are published whole, never in part: a flush publishes the open batch with the batch that filled it, and
acknowledges exactly the batches it published (a later failure can then never leave part of an unacknowledged
batch in the dataset, for the source to deliver again). A part file still holds at most `max_batch_rows`
flows: where a batch crosses that count, its part files are closed and new ones opened (still temporary,
published by the same flush). Each flow goes to the
partition of its own time, so flows that arrive out of time order (a relay merging nodes, exporter files read
out of order) still land in the right hour: one flush writes a part file per partition it touches (and per
roll-over), rows in
arrival order (Parquet statistics on `time` still let readers skip row groups). Flows without a time are kept, in the partition `date=__HIVE_DEFAULT_PARTITION__/hour=...`
(Hive's NULL partition, read back as NULL `date` and `hour`).

Every part file is written under a temporary name (flows are streamed into it a row group at a time, so
memory stays small), fsynced, and only once all files of the flush are complete are they renamed into place.
The batches of a flush are acknowledged after the last rename. A write error (disk full, I/O error,
permission) removes the temporary files (and any file of the same flush already renamed), acknowledges
nothing, and raises `DatasetWriteError` naming the path; the open batch is dropped and the sink refuses
further work (the pipeline stops; the source delivers the unacknowledged batches again on the next run).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.layout import (
    FLOWS_TABLE,
    LOST_EVENTS_TABLE,
    Dataset,
    PartitionKey,
    part_file_name,
    translate_write_errors,
)
from flowpipe.errors import DatasetWriteError
from flowpipe.model import (
    FLOW_SCHEMA,
    LOST_EVENTS_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    WRITER_ID_KEY,
    EventBatch,
    LostEvent,
)
from flowpipe.sinks import Ack

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def lost_events_table(events: list[LostEvent]) -> pa.Table:
    """LostEvent records as a table of `LOST_EVENTS_SCHEMA` (cluster from a `cluster/node` node name)."""

    def cluster(node: str) -> str | None:
        return node.split("/", 1)[0] or None if "/" in node else None

    columns = {
        "time": [e.time for e in events],
        "node_name": [e.node_name or None for e in events],
        "cluster_name": [cluster(e.node_name) for e in events],
        "source": [e.source or None for e in events],
        "num_events_lost": [e.num_events_lost for e in events],
        "cpu": [e.cpu for e in events],
        "first": [e.first for e in events],
        "last": [e.last for e in events],
    }
    return pa.Table.from_pydict(columns, schema=LOST_EVENTS_SCHEMA)


MAX_RUNS_PER_PART = 256
"""Above this many separate runs of rows per partition, a flush copies rows (filter) instead of slicing."""
ROLLUP_CLOSE_SECONDS = 60.0
"""How long closing a sink waits for the edge rollups still being built in the background (the flows are
already safe; rollups left are built by the next start, compaction or `flowpipe rollup`)."""


def split_by_hour(table: pa.Table) -> list[tuple[PartitionKey, pa.Table]]:
    """Split rows by the hour of their `time` (NULL: the unknown partition), keeping their order.

    Flows arrive nearly in time order, so each hour is a few contiguous runs of rows: those are sliced (no
    copy) and chained. Only when the hours are finely interleaved are rows copied out with a filter.
    """
    if table.num_rows == 0:
        return []
    hour_ns = pc.cast(pc.floor_temporal(table.column("time"), unit="hour"), pa.int64())
    hours = hour_ns.to_numpy() if hour_ns.null_count == 0 else pc.fill_null(hour_ns, _NULL_HOUR).to_numpy()
    starts = np.flatnonzero(hours[1:] != hours[:-1]) + 1
    if len(starts) == 0:
        return [(_key(int(hours[0])), table)]
    bounds = [0, *starts.tolist(), len(hours)]
    runs: dict[int, list[tuple[int, int]]] = {}
    for begin, end in itertools.pairwise(bounds):
        runs.setdefault(int(hours[begin]), []).append((begin, end - begin))
    parts = []
    for hour, slices in runs.items():
        if len(slices) <= MAX_RUNS_PER_PART:
            part = pa.concat_tables([table.slice(offset, length) for offset, length in slices])
        else:
            part = table.filter(pa.array(hours == hour))
        parts.append((_key(hour), part))
    return sorted(parts, key=lambda item: item[0])


_NULL_HOUR = -(2**63)


def _key(hour_ns: int) -> PartitionKey:
    if hour_ns == _NULL_HOUR:
        return PartitionKey.from_time(None)
    return PartitionKey.from_time(datetime.fromtimestamp(hour_ns // 1_000_000_000, UTC))


@dataclass(slots=True)
class _OpenPart:
    """A part file being written: its temporary file, its Parquet writer, and what it holds so far."""

    folder: str
    temp: str
    handle: Any
    writer: pq.ParquetWriter
    seq: int
    rows: int = 0
    min_ns: int | None = None
    tables: list[pa.Table] = field(default_factory=list)
    """With edge rollups: the flows written while the part holds at most `RollupBuilder.HELD_ROWS`, kept until
    the file is published so that its rollup is built from them (a larger part's file is read back)."""


@dataclass(slots=True)
class _Pending:
    """Flows of one partition waiting to become the next row group of its part file."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0


class ParquetSink:
    """Writes flows to `<root>/flows/...` and lost events to `<root>/lost_events/...` as part files.

    Flows of the open batch are streamed into one temporary part file per partition, a row group at a time
    (every `row_group_bytes`), so memory stays small however large a part file grows; the flush closes and
    renames them.

    >>> sink = ParquetSink(ParquetSinkConfig(path="flowpipe-data", max_batch_rows=50_000))
    >>> ack = sink.write(batch)      # None until a flush made batches durable
    >>> ack = sink.close()           # flushes the rest
    """

    name = "parquet"

    def __init__(
        self,
        config: ParquetSinkConfig,
        *,
        dataset: Dataset | None = None,
        clock: Clock = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.dataset = dataset if dataset is not None else Dataset(config.path)
        self._clock = clock
        self._now = now
        self._pending: dict[PartitionKey, _Pending] = {}
        self._parts: dict[PartitionKey, _OpenPart] = {}
        self._closed: list[_OpenPart] = []
        """Part files of the open batch already complete (closed at `max_batch_rows`), waiting for the flush."""
        self._part_rows = 0
        self._lost: list[LostEvent] = []
        self._rows = 0
        self._bytes = 0
        self._opened_at: float | None = None
        self._written_batches = 0
        self._acked_batches = 0
        self._seq = 0
        self._failed: DatasetWriteError | None = None
        self.files_written: list[str] = []
        self.flows_written = 0
        self.lost_events_written = 0
        self._metadata = {
            SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(),
            WRITER_ID_KEY: config.writer_id.encode(),
        }
        removed = self.dataset.clean_temp_files(writer_id=config.writer_id)
        if removed:
            log.warning(
                "removed %d temporary file(s) left by an earlier crash: %s", len(removed), ", ".join(removed)
            )
        self._rollups = None
        if config.edge_rollups:
            from flowpipe.dataset.rollups.build import RollupBuilder, repair_writers

            repair_writers(self.dataset, [config.writer_id])
            self._rollups = RollupBuilder(self.dataset, zstd_level=config.zstd_level)

    @property
    def acked_batches(self) -> int:
        """How many of the batches written so far are durable."""
        return self._acked_batches

    @property
    def buffered_rows(self) -> int:
        """Flows in the open batch (in memory or in temporary part files), not yet acknowledged."""
        return self._rows

    def write(self, batch: EventBatch) -> Ack | None:
        """Add a whole batch to the open batch; flushes when a row, byte or age limit is reached.

        Where the batch takes the open part files to `max_batch_rows` flows they are closed and new ones
        opened, so part files stay that size; the flush that follows publishes them all and acknowledges
        this batch with the ones before it.
        """
        self._check_usable()
        flows = batch.flows
        if flows.num_rows and flows.schema != FLOW_SCHEMA:
            flows = flows.cast(FLOW_SCHEMA)
        limit = self.config.max_batch_rows
        offset = 0
        while offset < flows.num_rows:
            if self._part_rows >= limit:
                self._roll_over()
            piece = flows.slice(offset, limit - self._part_rows)
            self._add_flows(piece)
            offset += piece.num_rows
        if batch.lost_events:
            self._lost.extend(batch.lost_events)
            self._open_age()
        self._written_batches += 1
        if not self._rows and not self._lost:
            return self._ack_empty()
        if self._rows >= limit or self._bytes >= self.config.max_batch_bytes:
            return self.flush()
        return self.poll()

    def poll(self) -> Ack | None:
        """Flush if the open batch is older than `flush_interval_seconds`."""
        if (
            self._opened_at is not None
            and self._clock() - self._opened_at >= self.config.flush_interval_seconds
        ):
            return self.flush()
        return None

    def flush(self) -> Ack | None:
        """Finish the open batch's part files, rename them into place, and acknowledge its batches."""
        self._check_usable()
        if not self._rows and not self._lost:
            return self._ack_empty()
        staged: list[tuple[str, str]] = []
        written: dict[str, list[pa.Table]] = {}
        try:
            self._close_parts()
            for part in self._closed:
                name = self._final_name(part.folder, part.min_ns, part.seq)
                staged.append((part.temp, f"{part.folder}/{name}"))
                written[f"{part.folder}/{name}"] = part.tables
            self._closed.clear()
            if self._lost:
                for key, table in split_by_hour(lost_events_table(self._lost)):
                    folder = self.dataset.partition_dir(LOST_EVENTS_TABLE, key)
                    name = self._final_name(folder, _min_ns(table))
                    table = table.replace_schema_metadata(
                        {**(LOST_EVENTS_SCHEMA.metadata or {}), **self._metadata}
                    )
                    temp = self.dataset.write_parquet_temp(
                        table, folder, name, hold=True, **self._parquet_options(LOST_EVENTS_SCHEMA)
                    )
                    staged.append((temp, f"{folder}/{name}"))
            files = self._publish(staged)
        except DatasetWriteError as exc:
            self._abort(staged, exc)
            raise
        if self._rollups is not None:
            self._rollups.submit(files, written)
        flows = self._rows
        self.flows_written += flows
        self.lost_events_written += len(self._lost)
        self.files_written.extend(files)
        self._lost, self._rows, self._bytes, self._opened_at = [], 0, 0, None
        self._acked_batches = self._written_batches
        return Ack(batches=self._acked_batches, flows=flows, files=tuple(files))

    @property
    def rollups_waiting(self) -> int:
        """Published flow files whose edge rollup is not built yet (0 with rollups off)."""
        return self._rollups.waiting if self._rollups is not None else 0

    def close(self) -> Ack | None:
        """Flush what is open; with edge rollups, wait for the rollups of the files published (at most
        `ROLLUP_CLOSE_SECONDS`: the rest are built by the next start, compaction or `flowpipe rollup`)."""
        try:
            return self.flush()
        finally:
            if self._rollups is not None:
                self._rollups.close(ROLLUP_CLOSE_SECONDS)

    # -- internals ----------------------------------------------------------------------------------------

    def _open_age(self) -> None:
        if self._opened_at is None:
            self._opened_at = self._clock()

    def _close_parts(self) -> None:
        """Write what is pending and close the open part files (complete temporary files, not yet published)."""
        for key in list(self._pending):
            self._write_row_group(key)
        for key in sorted(self._parts):
            part = self._parts[key]
            with translate_write_errors(part.temp):
                part.writer.close()
            self.dataset.finish_temp(part.temp, part.handle)
            self._closed.append(self._parts.pop(key))
        self._part_rows = 0

    def _roll_over(self) -> None:
        """The open part files reached `max_batch_rows`: close them; the next flows open new ones."""
        try:
            self._close_parts()
        except DatasetWriteError as exc:
            self._abort([], exc)
            raise

    def _add_flows(self, flows: pa.Table) -> None:
        self._open_age()
        self._rows += flows.num_rows
        self._part_rows += flows.num_rows
        self._bytes += flows.nbytes
        for key, part in split_by_hour(flows):
            pending = self._pending.setdefault(key, _Pending())
            pending.tables.append(part)
            pending.rows += part.num_rows
            pending.bytes += part.nbytes
            if pending.bytes >= self.config.row_group_bytes:
                self._write_row_group(key)

    def _write_row_group(self, key: PartitionKey) -> None:
        """Write a partition's pending flows as one row group of its open part file (opened on first use)."""
        pending = self._pending.pop(key, None)
        if pending is None or not pending.rows:
            return
        table = pa.concat_tables(pending.tables) if len(pending.tables) > 1 else pending.tables[0]
        try:
            part = self._parts.get(key) or self._open_part(key, table)
            with translate_write_errors(part.temp):
                part.writer.write_table(table, row_group_size=table.num_rows)
        except DatasetWriteError as exc:
            self._abort([], exc)
            raise
        if self._rollups is not None:
            # The builder takes at most HELD_ROWS flows from memory and reads larger files back: a larger
            # part's flows would never be used, so they are not held.
            if part.rows + table.num_rows <= self._rollups.HELD_ROWS:
                part.tables.append(table)
            else:
                part.tables.clear()
        part.rows += table.num_rows
        low = _min_ns(table)
        if low is not None and (part.min_ns is None or low < part.min_ns):
            part.min_ns = low

    def _open_part(self, key: PartitionKey, first: pa.Table) -> _OpenPart:
        folder = self.dataset.partition_dir(FLOWS_TABLE, key)
        self._seq += 1
        name = part_file_name(self._start(_min_ns(first)), self.config.writer_id, self._seq)
        temp, handle = self.dataset.open_temp(folder, name, hold=True)
        schema = FLOW_SCHEMA.with_metadata({**(FLOW_SCHEMA.metadata or {}), **self._metadata})
        try:
            with translate_write_errors(temp):
                writer = pq.ParquetWriter(handle, schema, **self._parquet_options(FLOW_SCHEMA))
        except DatasetWriteError:
            handle.close()
            self.dataset.discard(temp)
            raise
        part = _OpenPart(folder=folder, temp=temp, handle=handle, writer=writer, seq=self._seq)
        self._parts[key] = part
        return part

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise DatasetWriteError(
                f"the Parquet sink stopped after a write error ({self._failed}); nothing more is written",
                path=self._failed.path,
            )

    def _abort(self, staged: list[tuple[str, str]], error: DatasetWriteError) -> None:
        """Drop the open batch after a write error: close and remove its temporary and renamed files.

        Nothing of it was acknowledged, so the source delivers it again on the next run; this sink refuses
        further work.
        """
        self._failed = error
        for part in self._parts.values():
            for closer in (part.writer.close, part.handle.close):
                try:
                    closer()
                except (OSError, pa.ArrowException):
                    pass
            self.dataset.discard(part.temp)
        for part in self._closed:
            self.dataset.discard(part.temp)
        for temp, final in staged:
            self.dataset.discard(temp)
            self.dataset.discard(final)  # nothing of an unacknowledged flush stays visible
        self._parts.clear()
        self._closed.clear()
        self._pending.clear()
        self._part_rows = 0
        self._lost, self._rows, self._bytes, self._opened_at = [], 0, 0, None

    def _ack_empty(self) -> Ack | None:
        if self._acked_batches == self._written_batches:
            return None
        self._acked_batches = self._written_batches
        return Ack(batches=self._acked_batches)

    def _start(self, min_ns: int | None) -> datetime:
        if min_ns is None:
            return self._now()
        return datetime.fromtimestamp(min_ns // 1_000_000_000, UTC).replace(
            microsecond=(min_ns // 1000) % 1_000_000
        )

    def _final_name(self, folder: str, min_ns: int | None, seq: int | None = None) -> str:
        start = self._start(min_ns)
        while True:
            if seq is None:
                self._seq += 1
                seq = self._seq
            name = part_file_name(start, self.config.writer_id, seq)
            # a restarted writer with the same id counts from 1 again: never overwrite an earlier file
            with translate_write_errors(f"{folder}/{name}"):  # an object store may fail to answer
                taken = self.dataset.exists(f"{folder}/{name}")
            if not taken:
                return name
            seq = None

    def _parquet_options(self, schema: pa.Schema) -> dict[str, Any]:
        dictionary, statistics = _column_options(schema)
        return {
            "compression": "zstd",
            "compression_level": self.config.zstd_level,
            "use_dictionary": dictionary,
            "write_statistics": statistics,
        }

    def _publish(self, staged: list[tuple[str, str]]) -> list[str]:
        """Rename every finished temporary file to its final name; then fsync the folders."""
        published: list[str] = []
        for temp, final in staged:
            self.dataset.publish(temp, final)
            published.append(final)
        self.dataset.sync_dirs({final.rsplit("/", 1)[0] for final in published})
        return published


PLAIN_COLUMNS = frozenset({"uuid"})
"""Columns written without a dictionary: every value is different (a dictionary of them costs time and space)."""


@functools.cache
def _column_options(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """The Parquet columns (paths) of `schema` written with a dictionary, and those written with statistics.

    Every column but `PLAIN_COLUMNS` has a dictionary. Lists (labels, names, policies, DNS answers) have no
    statistics: the smallest and largest of their items tell a reader nothing, and computing them over every
    item costs more than any other column's (the other columns keep theirs: `time` to skip row groups,
    `uuid`'s null count to skip whole files, and the rest to skip on the filters of questions)."""
    out = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), out)
    parquet = pq.ParquetFile(pa.BufferReader(out.getvalue())).schema
    paths = [parquet.column(index).path for index in range(len(parquet))]
    lists = {field.name for field in schema if pa.types.is_list(field.type)}
    dictionary = [path for path in paths if path not in PLAIN_COLUMNS]
    statistics = [path for path in paths if path.split(".", 1)[0] not in lists]
    return dictionary, statistics


def _min_ns(table: pa.Table) -> int | None:
    value = pc.min(pc.cast(table.column("time"), pa.int64())).as_py()
    return None if value is None else int(value)

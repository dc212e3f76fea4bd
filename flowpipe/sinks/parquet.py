"""The Parquet sink: batches flows and lost events, and flushes them into Hive-partitioned part files.

A flush happens when the open batch reaches `max_batch_rows` flows or `max_batch_bytes` bytes, when it is older
than `flush_interval_seconds` (by the injected clock), and on `flush()` / `close()`. A part file holds at most
`max_batch_rows` flows, even when one batch from the source was bigger. Each flow goes to the
partition of its own time, so flows that arrive out of time order (a relay merging nodes, exporter files read
out of order) still land in the right hour: one flush writes one part file per partition it touches, rows in
arrival order (Parquet statistics on `time` still let readers skip row groups). Flows without a time are kept, in the partition `date=__HIVE_DEFAULT_PARTITION__/hour=...`
(Hive's NULL partition, read back as NULL `date` and `hour`).

Every part file is written under a temporary name, fsynced, and only once all files of the flush are complete
are they renamed into place. The batches of a flush are acknowledged after the last rename. A write error
(disk full, I/O error, permission) removes the temporary files (and any file of the same flush already
renamed), acknowledges nothing, and raises `DatasetWriteError` naming the path; the open batch is kept so a
later `flush()` can retry.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset import (
    FLOWS_TABLE,
    LOST_EVENTS_TABLE,
    Dataset,
    PartitionKey,
    parse_part_file_name,
    part_file_name,
)
from flowpipe.errors import DatasetWriteError
from flowpipe.model import (
    FLOW_SCHEMA,
    LOST_EVENTS_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    EventBatch,
    LostEvent,
)
from flowpipe.sinks import Ack

log = logging.getLogger(__name__)

WRITER_ID_KEY = b"flowpipe.writer_id"

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


class ParquetSink:
    """Writes flows to `<root>/flows/...` and lost events to `<root>/lost_events/...` as part files.

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
        self._flows: list[pa.Table] = []
        self._lost: list[LostEvent] = []
        self._rows = 0
        self._bytes = 0
        self._opened_at: float | None = None
        self._written_batches = 0
        self._acked_batches = 0
        self._seq = 0
        self.files_written: list[str] = []
        self.flows_written = 0
        self.lost_events_written = 0
        removed = self.dataset.clean_temp_files(writer_id=config.writer_id)
        if removed:
            log.warning(
                "removed %d temporary file(s) left by an earlier crash: %s", len(removed), ", ".join(removed)
            )

    @property
    def acked_batches(self) -> int:
        """How many of the batches written so far are durable."""
        return self._acked_batches

    @property
    def buffered_rows(self) -> int:
        """Flows waiting in the open batch."""
        return self._rows

    def write(self, batch: EventBatch) -> Ack | None:
        """Add a batch to the open batch; flushes when a row, byte or age limit is reached."""
        flows = batch.flows
        if flows.num_rows:
            if flows.schema != FLOW_SCHEMA:
                flows = flows.cast(FLOW_SCHEMA)
            self._flows.append(flows)
            self._rows += flows.num_rows
            self._bytes += flows.nbytes
        self._lost.extend(batch.lost_events)
        self._written_batches += 1
        if not self._flows and not self._lost:
            return self._ack_empty()
        if self._opened_at is None:
            self._opened_at = self._clock()
        if self._rows >= self.config.max_batch_rows or self._bytes >= self.config.max_batch_bytes:
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
        """Write the open batch as part files (one per partition and table) and acknowledge its batches."""
        if not self._flows and not self._lost:
            return self._ack_empty()
        plan: list[tuple[str, PartitionKey, pa.Table]] = []
        if self._flows:
            flows = pa.concat_tables(self._flows) if len(self._flows) > 1 else self._flows[0]
            size = self.config.max_batch_rows
            for key, part in split_by_hour(flows):
                # a batch bigger than max_batch_rows (one huge source block) still gives files of that size
                plan += [
                    (FLOWS_TABLE, key, part.slice(start, size)) for start in range(0, part.num_rows, size)
                ]
        if self._lost:
            plan += [
                (LOST_EVENTS_TABLE, key, part) for key, part in split_by_hour(lost_events_table(self._lost))
            ]
        files = self._write_all(plan)
        flows_count = self._rows
        self.flows_written += flows_count
        self.lost_events_written += len(self._lost)
        self.files_written.extend(files)
        self._flows, self._lost, self._rows, self._bytes, self._opened_at = [], [], 0, 0, None
        self._acked_batches = self._written_batches
        return Ack(batches=self._acked_batches, flows=flows_count, files=tuple(files))

    def close(self) -> Ack | None:
        """Flush what is open."""
        return self.flush()

    def _ack_empty(self) -> Ack | None:
        if self._acked_batches == self._written_batches:
            return None
        self._acked_batches = self._written_batches
        return Ack(batches=self._acked_batches)

    def _next_name(self, folder: str, table: pa.Table) -> str:
        nanos = pc.min(pc.cast(table.column("time"), pa.int64())).as_py()
        if nanos is None:
            start = self._now()
        else:
            start = datetime.fromtimestamp(nanos // 1_000_000_000, UTC).replace(
                microsecond=(nanos // 1000) % 1_000_000
            )
        while True:
            self._seq += 1
            name = part_file_name(start, self.config.writer_id, self._seq)
            # a restarted writer with the same id counts from 1 again: never overwrite an earlier file
            if not self.dataset.exists(f"{folder}/{name}"):
                return name

    def _parquet_options(self, table_name: str) -> dict[str, Any]:
        return {
            "compression": "zstd",
            "compression_level": self.config.zstd_level,
            "use_dictionary": True,
            "write_statistics": True,
        }

    def _write_all(self, plan: list[tuple[str, PartitionKey, pa.Table]]) -> list[str]:
        """Write every planned file under a temporary name, then rename them all; all or nothing."""
        staged: list[tuple[str, str]] = []
        published: list[str] = []
        try:
            for table_name, key, table in plan:
                folder = self.dataset.partition_dir(table_name, key)
                name = self._next_name(folder, table)
                schema = FLOW_SCHEMA if table_name == FLOWS_TABLE else LOST_EVENTS_SCHEMA
                metadata = dict(schema.metadata or {})
                metadata[SCHEMA_VERSION_KEY] = SCHEMA_VERSION.encode()
                metadata[WRITER_ID_KEY] = self.config.writer_id.encode()
                table = table.replace_schema_metadata(metadata)
                temp = self.dataset.write_parquet_temp(
                    table, folder, name, **self._parquet_options(table_name)
                )
                staged.append((temp, f"{folder}/{name}"))
            for temp, final in staged:
                self.dataset.publish(temp, final)
                published.append(final)
            self.dataset.sync_dirs({final.rsplit("/", 1)[0] for final in published})
        except DatasetWriteError:
            for temp, _ in staged:
                self.dataset.discard(temp)
            for final in published:  # nothing of an unacknowledged flush stays visible
                self.dataset.discard(final)
            raise
        return published


def part_file_writer_id(name: str) -> str | None:
    """The writer id in a part-file name (None if `name` is not a part file)."""
    parsed = parse_part_file_name(name)
    return parsed.writer_id if parsed else None

"""What the relay source already has: keys of the flows and lost-events records received, and of the dataset.

After a reconnect or a restart the stream is asked again from a little before the last flow received (the relay
merges nodes only nearly in time order, hubble-api.md 2.4), so the first flows that come back may be ones already
received. They are recognised by key: the flow's `uuid`, or, for flows without one, a hash of the row's content.
`RecentFlows` remembers the keys of the last few seconds of flows received; `load_written_keys` reads the keys
of flows without a uuid already in the dataset from a given time on (after a restart, including flows written
after the last checkpoint was saved, e.g. by a collector killed between the two). Flows with a uuid are checked
against the dataset by `flowpipe.dataset.stored_flows`, as every writer does. Lost-events records are recognised the same
way (`SeenLostEvents`, `load_lost_event_keys`): a stream resumed with an overlap may send them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowpipe.dataset.layout import FLOWS_TABLE, LOST_EVENTS_TABLE, UNKNOWN_PARTITION, Dataset, PartitionKey
from flowpipe.errors import DatasetWriteError
from flowpipe.model import LostEvent

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"


def _row_hash(row: dict[str, object]) -> str:
    text = json.dumps(row, sort_keys=True, default=str, separators=(",", ":"))
    return HASH_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def flow_keys(table: pa.Table) -> pa.Array:
    """One key per flow row: its uuid, or a hash of the row's values when it has none (same row, same hash)."""
    uuid = table.column("uuid").combine_chunks() if table.num_rows else pa.array([], pa.string())
    if uuid.null_count == 0:
        return uuid
    missing = pc.is_null(uuid)
    rows = table.filter(missing)
    rows = rows.set_column(0, "time", pc.cast(rows.column("time"), pa.int64()))
    hashes = iter([_row_hash(row) for row in rows.to_pylist()])
    keys = [next(hashes) if value is None else value for value in uuid.to_pylist()]
    return pa.array(keys, pa.string())


def _time_ns(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pc.cast(values, pa.int64())


@dataclass(slots=True)
class _Chunk:
    newest_ns: int
    keys: pa.Array


@dataclass(slots=True)
class RecentFlows:
    """The keys of recently received flows, kept while they are newer than `horizon_ns` (moved by the caller)."""

    chunks: deque[_Chunk] = field(default_factory=deque)

    def add(self, keys: pa.Array, times: pa.Array | pa.ChunkedArray) -> None:
        """Remember one batch of flow keys with the flows' times."""
        if len(keys) == 0:
            return
        newest = pc.max(_time_ns(times)).as_py()
        self.chunks.append(_Chunk(newest if newest is not None else -1, keys))

    def forget_before(self, horizon_ns: int) -> None:
        """Drop batches whose every flow is older than `horizon_ns`."""
        self.chunks = deque(c for c in self.chunks if c.newest_ns < 0 or c.newest_ns >= horizon_ns)

    def keys_since(self, since_ns: int | None) -> tuple[pa.Array, int | None]:
        """Keys of the batches with flows at or after `since_ns`, and the newest time among them."""
        chosen = [c for c in self.chunks if since_ns is None or c.newest_ns < 0 or c.newest_ns >= since_ns]
        if not chosen:
            return pa.array([], pa.string()), None
        newest = max(c.newest_ns for c in chosen)
        return pa.concat_arrays([c.keys for c in chosen]).unique(), newest

    def __len__(self) -> int:
        return sum(len(c.keys) for c in self.chunks)


class Deduplicator:
    """Drops flows whose key is in a set of already received keys, until the stream is past them.

    The set is active right after a (re)connect; once a flow newer than the newest known key plus the overlap
    arrives, nothing later can be a repeat and the set is released.
    """

    def __init__(self, overlap_ns: int) -> None:
        self.overlap_ns = overlap_ns
        self._keys: pa.Array | None = None
        self._until_ns: int | None = None
        self.skipped = 0

    @property
    def active(self) -> bool:
        """Whether incoming flows are still checked."""
        return self._keys is not None

    def arm(self, keys: pa.Array, newest_ns: int | None) -> None:
        """Check the next flows against `keys` (flows at or before `newest_ns` + overlap)."""
        if len(keys) == 0:
            self._keys, self._until_ns = None, None
            return
        self._keys = keys
        self._until_ns = None if newest_ns is None else newest_ns + self.overlap_ns

    def filter(self, table: pa.Table, keys: pa.Array) -> tuple[pa.Table, pa.Array]:
        """The rows of `table` (and their keys) that were not received before."""
        if self._keys is None or table.num_rows == 0:
            return table, keys
        repeated = pc.is_in(keys, value_set=self._keys)
        count = repeated.true_count
        if count:
            keep = pc.invert(repeated)
            table, keys = table.filter(keep), keys.filter(keep)
            self.skipped += count
        oldest = pc.min(_time_ns(table.column("time"))).as_py() if table.num_rows else None
        if self._until_ns is not None and oldest is not None and oldest > self._until_ns:
            self._keys = self._until_ns = None
        return table, keys


def _partitions_from(dataset: Dataset, table: str, since_ns: int) -> list[PartitionKey]:
    floor = PartitionKey.from_hour_index(since_ns // 3_600_000_000_000)
    return [
        key
        for key in dataset.list_partitions(table)
        if key.date != UNKNOWN_PARTITION and (key.date, key.hour) >= (floor.date, floor.hour)
    ]


def load_written_keys(
    dataset: Dataset, since_ns: int, nodes: Iterable[str] | None = None
) -> tuple[pa.Array, int | None]:
    """Content keys of the flows without a uuid in the dataset with `time >= since_ns` (only `nodes` when given),
    and their newest time. (Flows with a uuid: `flowpipe.dataset.stored_flows.StoredFlows`.)"""
    wanted = sorted(set(nodes)) if nodes is not None else None
    keys: list[pa.Array] = []
    newest: int | None = None
    for partition in _partitions_from(dataset, FLOWS_TABLE, since_ns):
        for path in dataset.list_part_files(FLOWS_TABLE, partition):
            try:
                with dataset.filesystem.open_input_file(path) as handle:
                    parquet = pq.ParquetFile(handle)
                    if _every_flow_has_a_uuid(parquet.metadata):
                        continue
                    table = parquet.read()
            except (OSError, pa.ArrowException) as exc:
                raise DatasetWriteError(
                    f"cannot read {path} to skip flows already written: {exc}", path=path
                ) from exc
            times = _time_ns(table.column("time"))
            mask = pc.and_(pc.greater_equal(times, since_ns), pc.is_null(table.column("uuid")))
            if wanted is not None:
                mask = pc.and_(
                    mask, pc.is_in(table.column("node_name"), value_set=pa.array(wanted, pa.string()))
                )
            selected = table.filter(pc.fill_null(mask, False))
            if selected.num_rows == 0:
                continue
            keys.append(flow_keys(selected))
            top = pc.max(_time_ns(selected.column("time"))).as_py()
            newest = top if newest is None else max(newest, top)
    if not keys:
        return pa.array([], pa.string()), None
    return pa.concat_arrays(keys).unique(), newest


def _every_flow_has_a_uuid(metadata: pq.FileMetaData) -> bool:
    """Whether a part file's statistics show no row without a uuid (then it holds no key of this module)."""
    if metadata.num_row_groups == 0:
        return True
    first = metadata.row_group(0)
    index = next((i for i in range(first.num_columns) if first.column(i).path_in_schema == "uuid"), None)
    if index is None:
        return False
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_null_count or statistics.null_count:
            return False
    return True


LostKey = tuple[str, str, int, int | None, int | None, int | None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def lost_event_key(event: LostEvent) -> LostKey:
    """What identifies one lost-events record (a replayed record has the same key)."""
    return (
        event.node_name or "",
        event.source or "",
        int(event.num_events_lost),
        event.cpu,
        _micros(event.first),
        _micros(event.last),
    )


class SeenLostEvents:
    """The keys of the lost-events records already received or written (at most `limit`, then forgotten at once)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.keys: set[LostKey] = set()

    def first_time(self, event: LostEvent) -> bool:
        """Whether `event` is new (it is remembered from now on)."""
        key = lost_event_key(event)
        if key in self.keys:
            return False
        if len(self.keys) >= self.limit:
            self.keys.clear()
        self.keys.add(key)
        return True


def load_lost_event_keys(dataset: Dataset, since_ns: int) -> set[LostKey]:
    """Keys of the lost-events records in the dataset from `since_ns` on."""
    found: set[LostKey] = set()
    for partition in _partitions_from(dataset, LOST_EVENTS_TABLE, since_ns):
        for path in dataset.list_part_files(LOST_EVENTS_TABLE, partition):
            try:
                with dataset.filesystem.open_input_file(path) as handle:
                    rows = pq.read_table(handle).to_pylist()
            except (OSError, pa.ArrowException) as exc:
                log.warning("cannot read %s to skip lost events already written: %s", path, exc)
                continue
            for row in rows:
                event = LostEvent(
                    source=row["source"] or "",
                    num_events_lost=row["num_events_lost"] or 0,
                    node_name=row["node_name"] or "",
                    cpu=row["cpu"],
                    first=row["first"],
                    last=row["last"],
                )
                found.add(lost_event_key(event))
    return found

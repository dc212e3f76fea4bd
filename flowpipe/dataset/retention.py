"""Retention: remove whole hour partitions older than a set age, from `flows` and `lost_events` alike.

A partition `date=D/hour=H` is expired when its whole hour ended at least `keep` before now: with `keep=30d`
at 2024-05-31 12:20, every hour that ended by 2024-05-01 12:20 goes (the hour 11:00-12:00 of May 1st is the
newest removed, 12:00-13:00 stays). The partition of rows without a time (`__HIVE_DEFAULT_PARTITION__`) has no
age and is never removed. Removal deletes the partition's files (its Parquet files, and temporary files older
than an hour: a younger one may be a write in progress, which is left alone) and then its empty folders (on
an object store, the empty folder marker objects).

`plan_retention` only looks; `apply_retention` removes, holding the maintenance lock so that it never runs at
the same time as a compaction. A query running meanwhile either read a partition's files before they went or
(when one vanishes under it) lists the dataset again and answers without that partition. Checkpoints in
`_state/` are kept: files ingested earlier are not ingested again after their flows expired.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.dataset.layout import FLOWS_TABLE, STALE_TEMP_SECONDS, TABLES, Dataset
from flowpipe.dataset.maintenance import PartitionFiles, list_partitions, maintenance_lock
from flowpipe.dataset.rollups import EDGES_TABLE, ROLLUP_TABLES
from flowpipe.errors import ConfigError, DatasetWriteError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass(slots=True)
class RetentionReport:
    """The expired partitions (per table), and what was removed when applied."""

    keep: timedelta
    cutoff: datetime
    applied: bool
    partitions: list[PartitionFiles] = field(default_factory=list)
    files_removed: int = 0
    bytes_removed: int = 0
    seconds: float = 0.0

    @property
    def files(self) -> int:
        """Visible files in the expired partitions."""
        return sum(len(p.files) for p in self.partitions)

    @property
    def bytes(self) -> int:
        """Bytes of the visible files in the expired partitions."""
        return sum(p.bytes for p in self.partitions)


def is_expired(partition: PartitionFiles, cutoff: datetime) -> bool:
    """True when the partition's hour ended at or before `cutoff` (never for rows without a time)."""
    start = partition.hour_start()
    return start is not None and start + timedelta(hours=1) <= cutoff


def plan_retention(
    dataset: Dataset,
    keep: timedelta,
    *,
    clock: Clock = lambda: datetime.now(UTC),
    tables: Iterable[str] = TABLES,
    keep_edges: timedelta | None = None,
) -> RetentionReport:
    """The partitions older than `keep` (nothing is removed). `ConfigError` when `keep` is not positive.

    Edge rollups (`flowpipe.dataset.rollups`) have their own age, `keep_edges`; without it they are kept.
    """
    if keep <= timedelta(0) or (keep_edges is not None and keep_edges <= timedelta(0)):
        bad = keep if keep <= timedelta(0) else keep_edges
        raise ConfigError(f"retention must keep a positive age, got {bad}")
    now = clock()
    cutoff = now - keep
    report = RetentionReport(keep=keep, cutoff=cutoff, applied=False)
    for table in tables:
        report.partitions += [p for p in list_partitions(dataset, table) if is_expired(p, cutoff)]
    if keep_edges is not None:
        for table in ROLLUP_TABLES:
            report.partitions += [
                p for p in list_partitions(dataset, table) if is_expired(p, now - keep_edges)
            ]
    return report


def apply_retention(
    dataset: Dataset,
    keep: timedelta,
    *,
    clock: Clock = lambda: datetime.now(UTC),
    on_partition: Callable[[PartitionFiles], None] = lambda partition: None,
    keep_edges: timedelta | None = None,
    edge_rollups: bool = True,
) -> RetentionReport:
    """Remove every partition older than `keep` (edge rollups: older than `keep_edges`, if given); the report
    lists them with what they held. With `edge_rollups`, the flows of an hour that goes leave their rollups
    complete first: any flow file without one gets it, and rollups of flow files compacted away go.

    Raises `DatasetWriteError` when a file cannot be removed (partitions removed before stay removed) or
    when another maintenance run holds the lock.
    """
    started = time.perf_counter()
    with maintenance_lock(dataset, "retention", clock=clock):
        report = plan_retention(dataset, keep, clock=clock, keep_edges=keep_edges)
        report.applied = True
        if edge_rollups and dataset.list_part_files(EDGES_TABLE):
            from flowpipe.dataset.rollups.build import build_missing
            from flowpipe.dataset.rollups.fold import fold_closed

            hours = [(p.key.date, p.key.hour) for p in report.partitions if p.table == FLOWS_TABLE]
            build_missing(dataset, partitions=hours)
            fold_closed(dataset, partitions=hours, now=clock())
        now = time.time()
        for partition in report.partitions:
            for entry in partition.files:
                if _delete(dataset, entry.path):
                    report.files_removed += 1
                    report.bytes_removed += entry.size
            for info in partition.hidden:
                mtime = info.mtime.timestamp() if info.mtime is not None else now
                if now - mtime > STALE_TEMP_SECONDS:
                    _delete(dataset, info.path)
            _remove_empty_folders(dataset, partition)
            on_partition(partition)
        if edge_rollups:
            from flowpipe.dataset.rollups.fold import drop_observations, keep_folded

            # hours whose flows went: their folded rows answer, the per-file rollups go (most of the size), and
            # the folded rows are kept apart from any flows written into those hours later
            gone = [(p.key.date, p.key.hour) for p in report.partitions if p.table == FLOWS_TABLE]
            report.files_removed += len(drop_observations(dataset, gone))
            keep_folded(dataset, gone)
    report.seconds = time.perf_counter() - started
    return report


def _delete(dataset: Dataset, path: str) -> bool:
    try:
        dataset.filesystem.delete_file(path)
    except FileNotFoundError:
        return False
    except (OSError, pa.ArrowException) as exc:
        raise DatasetWriteError(f"cannot remove {path}: {exc}", path=path) from exc
    return True


def _remove_empty_folders(dataset: Dataset, partition: PartitionFiles) -> None:
    """Remove the hour folder, then the date folder, when nothing is left in them.

    On an object store the "folders" are the empty marker objects some clients create (pyarrow does): they go
    when no object is left under them.
    """
    date_folder = partition.folder.rpartition("/")[0]
    for folder in (partition.folder, date_folder):
        if dataset.is_local:
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (a write in progress, another hour of the day) or already gone
        else:
            selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
            try:
                left = [i for i in dataset.filesystem.get_file_info(selector) if i.type == pafs.FileType.File]
                if left:
                    break
                dataset.filesystem.delete_dir(folder)
            except FileNotFoundError:
                continue
            except (OSError, pa.ArrowException) as exc:
                log.warning("cannot remove the empty folder %s: %s", folder, exc)
                break
    dataset.sync_dirs({dataset.table_dir(partition.table)})

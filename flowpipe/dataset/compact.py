"""Compaction: merge the small part files of closed hours into few large ones, every row kept exactly once.

Collectors flush often (every minute, or every `max_batch_rows` flows), so an hour ends up as dozens or
thousands of small part files; queries then spend their time opening files. `compact_dataset` rewrites each
closed hour of `flows` and `lost_events` as files of about `target_size_bytes`:

- Only **closed** hours are touched: an hour is closed once it ended more than `grace_seconds` ago (by the
  clock), so the hour collectors are writing into, and late flows of the hour before, are left alone. The
  partition of rows without a time is never compacted. A file that a writer adds to a closed hour while
  compaction runs (an ingest of old captures) is simply not an input: compaction only ever deletes the files it
  merged.
- Within a partition, files smaller than the target are taken in name order (= time order) and packed into
  groups of at most the target size; each group of two or more files becomes one **compacted file**
  `compacted-<start>-<run id>-<seq>.parquet`, whose rows are the inputs' rows, input after input. Its Parquet
  file metadata key `flowpipe.compacted_from` lists the inputs (`[[name, rows], ...]`, in that order).
- Order of work per group: write the compacted file under a temporary name, check its row count against the
  inputs, publish it (rename; on an object store an atomic server-side copy), then delete the inputs.

What a reader sees follows `flowpipe.dataset.visible`: a file that a present compacted file lists as an input
is left out.

Only one compaction or retention runs at a time on a dataset (`flowpipe.dataset.maintenance.maintenance_lock`, a lease
renewed while the run lives). A run that crashed is finished by the next one, which can start at once (on the
same host; from another once the crashed run's lease expired): it removes the hidden temporary files the dead run
left, and the inputs of every compacted file it published.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flowpipe.dataset.layout import (
    COMPACTED_PREFIX,
    FLOWS_TABLE,
    LOST_EVENTS_TABLE,
    TABLES,
    Dataset,
    parse_part_file_name,
    part_file_name,
    translate_write_errors,
)
from flowpipe.dataset.maintenance import PartFile, PartitionFiles, list_partitions, maintenance_lock
from flowpipe.dataset.visible import (
    COMPACTED_FROM_KEY,
    is_compacted_name,
    superseded_names,
)
from flowpipe.errors import ConfigError, DatasetWriteError
from flowpipe.model import FLOW_SCHEMA, LOST_EVENTS_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, WRITER_ID_KEY

log = logging.getLogger(__name__)

DEFAULT_TARGET_SIZE_BYTES = 128 * 1024 * 1024
DEFAULT_GRACE_SECONDS = 3600.0
ROW_GROUP_ROWS = 1_000_000
"""Rows of a compacted file's row groups (inputs' small row groups are gathered up to this)."""
ROW_GROUP_BYTES = 64 * 1024 * 1024
"""...or this many bytes in memory, whichever comes first (per worker)."""

SCHEMAS: dict[str, pa.Schema] = {FLOWS_TABLE: FLOW_SCHEMA, LOST_EVENTS_TABLE: LOST_EVENTS_SCHEMA}
Clock = Callable[[], datetime]


# -- planning -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class PartitionPlan:
    """What compaction does to one partition: groups of inputs to merge, leftovers of an earlier run."""

    partition: PartitionFiles
    groups: list[list[PartFile]] = field(default_factory=list)
    leftovers: list[PartFile] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        """Files merged."""
        return sum(len(group) for group in self.groups)

    @property
    def input_bytes(self) -> int:
        """Bytes of the files merged."""
        return sum(f.size for group in self.groups for f in group)


@dataclass(slots=True)
class CompactionReport:
    """What a compaction did (or, on a dry run, would do)."""

    dry_run: bool
    plans: list[PartitionPlan] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    files_removed: int = 0
    rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files_merged(self) -> int:
        """Input files merged (or to merge)."""
        return sum(plan.inputs for plan in self.plans)


def is_closed(partition: PartitionFiles, now: datetime, grace_seconds: float) -> bool:
    """True when the partition's hour ended more than `grace_seconds` before `now`."""
    start = partition.hour_start()
    return start is not None and start + timedelta(hours=1, seconds=grace_seconds) <= now


def plan_partition(dataset: Dataset, partition: PartitionFiles, *, target_size_bytes: int) -> PartitionPlan:
    """Group a closed partition's small files (name order) into merges of at most `target_size_bytes`."""
    plan = PartitionPlan(partition)
    names = [f.name for f in partition.files]
    superseded = superseded_names(dataset, partition.folder, names)
    plan.leftovers = [f for f in partition.files if f.name in superseded]
    candidates = [
        f
        for f in partition.files
        if f.name not in superseded and f.size < target_size_bytes and _start_of(f.name) is not None
    ]
    group: list[PartFile] = []
    size = 0
    for entry in candidates:
        if group and size + entry.size > target_size_bytes:
            if len(group) > 1:
                plan.groups.append(group)
            group, size = [], 0
        group.append(entry)
        size += entry.size
    if len(group) > 1:
        plan.groups.append(group)
    return plan


def plan_compaction(
    dataset: Dataset,
    *,
    now: datetime,
    target_size_bytes: int = DEFAULT_TARGET_SIZE_BYTES,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    tables: Iterable[str] = TABLES,
) -> list[PartitionPlan]:
    """The plans of every closed partition that has something to merge or to clean up."""
    plans = []
    for table in tables:
        for partition in list_partitions(dataset, table):
            if not is_closed(partition, now, grace_seconds) or len(partition.files) < 2:
                continue
            plan = plan_partition(dataset, partition, target_size_bytes=target_size_bytes)
            if plan.groups or plan.leftovers:
                plans.append(plan)
    return plans


# -- doing it -------------------------------------------------------------------------------------------------


def compact_dataset(
    dataset: Dataset,
    *,
    target_size_bytes: int = DEFAULT_TARGET_SIZE_BYTES,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
    zstd_level: int = 3,
    clock: Clock = lambda: datetime.now(UTC),
    on_partition: Callable[[PartitionPlan], None] = lambda plan: None,
    workers: int | None = None,
    edge_rollups: bool = True,
    build_rollups: bool = False,
) -> CompactionReport:
    """Merge the small part files of every closed hour of `dataset`; see the module docstring.

    With `edge_rollups`, each compacted file of an hour that has edge rollups (`flowpipe.dataset.rollups`) gets
    its own and its inputs' go, and those hours are folded. With `build_rollups`, every closed hour gets its
    rollups and is folded, whether or not its writers built any (rollups built here cost the writers nothing).

    `workers` groups are merged at the same time (default: `default_workers()`); `on_partition` is called as
    each partition is done.

    >>> compact_dataset(Dataset("flowpipe-data"), dry_run=True).files_merged  # doctest: +SKIP
    1180

    Raises `ConfigError` for bad sizes and `DatasetWriteError` when the dataset cannot be read or written or
    another maintenance run holds the lock.
    """
    if target_size_bytes <= 0:
        raise ConfigError(f"the target size must be > 0 bytes, got {target_size_bytes}")
    if grace_seconds < 0:
        raise ConfigError(f"the grace period must be >= 0 seconds, got {grace_seconds}")
    started = time.perf_counter()
    report = CompactionReport(dry_run=dry_run)
    if dry_run:
        report.plans = plan_compaction(
            dataset, now=clock(), target_size_bytes=target_size_bytes, grace_seconds=grace_seconds
        )
        report.bytes_before = sum(plan.input_bytes for plan in report.plans)
        report.seconds = time.perf_counter() - started
        return report
    run_id = f"c{secrets.token_hex(4)}"
    with maintenance_lock(dataset, "compaction", writer_id=run_id) as lock:
        # what a run that died left: its hidden temporary files, and (below) the inputs of files it published
        dataset.clean_temp_files(writer_ids=lock.dead_writers)
        report.plans = plan_compaction(
            dataset, now=clock(), target_size_bytes=target_size_bytes, grace_seconds=grace_seconds
        )
        for plan in report.plans:
            report.files_removed += _remove(dataset, plan.leftovers)
        _merge_all(dataset, report, run_id, zstd_level, workers or default_workers(), on_partition)
        if edge_rollups or build_rollups:
            _roll_up(dataset, report, clock(), grace_seconds, build_rollups, zstd_level)
    report.seconds = time.perf_counter() - started
    return report


def _roll_up(
    dataset: Dataset,
    report: CompactionReport,
    now: datetime,
    grace_seconds: float,
    every_hour: bool,
    zstd_level: int,
) -> None:
    """The compacted files' edge rollups, in hours that had rollups (with `every_hour`, in every closed hour);
    those of their inputs go; then the closed hours and days are folded."""
    from flowpipe.dataset.rollups import EDGES_TABLE
    from flowpipe.dataset.rollups.build import build_missing, visible_flow_names
    from flowpipe.dataset.rollups.fold import fold_closed
    from flowpipe.dataset.rollups.read import hour_start

    if every_hour:
        closed = now - timedelta(seconds=grace_seconds)
        hours = [
            key
            for key in visible_flow_names(dataset)
            if (start := hour_start(key)) is not None and start + timedelta(hours=1) <= closed
        ]
    else:
        rolled_up = {(p.key.date, p.key.hour) for p in list_partitions(dataset, EDGES_TABLE)}
        hours = [(p.partition.key.date, p.partition.key.hour) for p in report.plans]
        hours = [key for key in hours if key in rolled_up]
    if hours:
        build_missing(dataset, partitions=hours, zstd_level=zstd_level)
        # a compacted hour is closed: its rollups folded by edge (and its day, once closed)
        fold_closed(dataset, partitions=hours, now=now, zstd_level=zstd_level)


def default_workers() -> int:
    """Groups merged at the same time: one per core, at most four (each holds a row group in memory)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class _Merged:
    """What merging one group did: the compacted file and its counts, or why the group was left as is."""

    path: str | None = None
    rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    removed: int = 0
    skipped: str | None = None


def _merge_all(
    dataset: Dataset,
    report: CompactionReport,
    run_id: str,
    zstd_level: int,
    workers: int,
    on_partition: Callable[[PartitionPlan], None],
) -> None:
    """Merge every group of every plan, `workers` at a time (pyarrow reads and writes outside the GIL)."""
    tasks = [(plan, group) for plan in report.plans for group in plan.groups]
    remaining = {id(plan): len(plan.groups) for plan in report.plans}
    for plan in report.plans:
        if not plan.groups:
            on_partition(plan)
    failed = threading.Event()

    def merge(partition: PartitionFiles, group: list[PartFile], seq: int) -> _Merged:
        if failed.is_set():  # another group failed: start nothing new
            return _Merged()
        try:
            return _merge_group(dataset, partition, group, run_id, seq, zstd_level)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compact") as pool:
        futures = {
            pool.submit(merge, plan.partition, group, seq): plan
            for seq, (plan, group) in enumerate(tasks, start=1)
        }
        try:
            for future in as_completed(futures):
                merged = future.result()
                if merged.path is not None:
                    report.files_written.append(merged.path)
                if merged.skipped is not None:
                    report.skipped.append(merged.skipped)
                report.rows += merged.rows
                report.bytes_before += merged.bytes_before
                report.bytes_after += merged.bytes_after
                report.files_removed += merged.removed
                plan = futures[future]
                remaining[id(plan)] -= 1
                if not remaining[id(plan)]:
                    on_partition(plan)
        except BaseException:
            for pending in futures:
                pending.cancel()
            raise
    report.files_written.sort()


def _merge_group(
    dataset: Dataset,
    partition: PartitionFiles,
    group: list[PartFile],
    run_id: str,
    seq: int,
    zstd_level: int,
) -> _Merged:
    """Write one compacted file from `group`, check it, publish it, then delete the inputs."""
    schema = SCHEMAS[partition.table]
    where = f"{partition.folder} ({', '.join(f.name for f in group[:3])}{', ...' if len(group) > 3 else ''})"
    start = min(s for s in (_start_of(entry.name) for entry in group) if s is not None)
    final_name = COMPACTED_PREFIX + part_file_name(start, run_id, seq).removeprefix("part-")
    metadata = {
        **(schema.metadata or {}),
        SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(),
        WRITER_ID_KEY: run_id.encode(),
    }
    temp, out = dataset.open_temp(partition.folder, final_name)
    try:
        inputs = _copy_rows(dataset, group, schema.with_metadata(metadata), out, temp, zstd_level)
        if not isinstance(inputs, str):
            dataset.finish_temp(temp, out)
    except BaseException:
        _close_quietly(out)
        dataset.discard(temp)
        raise
    if isinstance(inputs, str):
        _close_quietly(out)
        dataset.discard(temp)
        return _Merged(skipped=f"{where}: {inputs}")
    expected = sum(n for _, n in inputs)
    with translate_write_errors(temp):
        written = pq.read_metadata(temp, filesystem=dataset.filesystem).num_rows
    if written != expected:
        dataset.discard(temp)
        raise DatasetWriteError(
            f"compacting {where}: wrote {written} rows for {expected} input rows; inputs kept", path=temp
        )
    final = f"{partition.folder}/{final_name}"
    dataset.publish(temp, final)
    dataset.sync_dirs({partition.folder})
    size = int(dataset.filesystem.get_file_info(final).size or 0)
    removed = _remove(dataset, group)
    return _Merged(final, expected, sum(f.size for f in group), size, removed)


def _copy_rows(
    dataset: Dataset,
    group: list[PartFile],
    schema: pa.Schema,
    out: pa.NativeFile,
    temp: str,
    zstd_level: int,
) -> list[tuple[str, int]] | str:
    """Stream the inputs' rows, input after input, into `out`, and record the inputs in the file's metadata.

    The inputs are scanned as one pyarrow dataset (files read ahead on Arrow's threads, batches in file order),
    with `schema` as the dataset schema: a column missing from an older file reads as NULL. Returns the
    `(name, rows)` of each input, or a reason (str) why this group cannot be merged.
    """
    rows = {entry.path: 0 for entry in group}
    pending: list[pa.RecordBatch] = []
    pending_rows = pending_bytes = 0
    plain = schema.remove_metadata()
    with translate_write_errors(temp):
        writer = pq.ParquetWriter(
            out,
            schema,
            compression="zstd",
            compression_level=zstd_level,
            use_dictionary=True,
            write_statistics=True,
        )
    try:
        current = None
        try:
            source = pads.dataset(list(rows), schema=plain, format="parquet", filesystem=dataset.filesystem)
            for tagged in source.scanner(batch_size=ROW_GROUP_ROWS, use_threads=True).scan_batches():
                path = tagged.fragment.path
                if path != current:
                    current = path
                    unknown = sorted(set(tagged.fragment.physical_schema.names) - set(plain.names))
                    if unknown:
                        return (
                            f"{path.rpartition('/')[2]} has columns {', '.join(unknown)} that this flowpipe does "
                            "not know (written by a newer version?); left as is"
                        )
                batch = tagged.record_batch
                rows[path] += batch.num_rows
                pending.append(batch)
                pending_rows += batch.num_rows
                pending_bytes += batch.nbytes
                if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                    with translate_write_errors(temp):
                        _write(writer, pending, schema)
                    pending, pending_rows, pending_bytes = [], 0, 0
        except FileNotFoundError as exc:
            return f"an input vanished before it was merged (another process removed it): {exc}; left as is"
        except (OSError, pa.ArrowException) as exc:
            where = current or ", ".join(list(rows)[:3])
            raise DatasetWriteError(f"cannot read {where}: {exc}", path=where) from exc
        inputs = [(entry.name, rows[entry.path]) for entry in group]
        with translate_write_errors(temp):
            _write(writer, pending, schema)
            writer.add_key_value_metadata(
                {COMPACTED_FROM_KEY.decode(): json.dumps(inputs, separators=(",", ":"))}
            )
    finally:
        with translate_write_errors(temp):
            writer.close()
    return inputs


def _write(writer: pq.ParquetWriter, batches: list[pa.RecordBatch], schema: pa.Schema) -> None:
    """Write `batches` as one row group."""
    table = pa.Table.from_batches(batches, schema=schema)
    if table.num_rows:
        writer.write_table(table, row_group_size=table.num_rows)


def _start_of(name: str) -> datetime | None:
    """The start time in a part or compacted file name (None for other names, which are never merged)."""
    if is_compacted_name(name):
        name = "part-" + name.removeprefix(COMPACTED_PREFIX)
    parsed = parse_part_file_name(name)
    return parsed.start if parsed else None


def _remove(dataset: Dataset, files: list[PartFile]) -> int:
    """Delete `files` (already in a compacted file); returns how many were deleted (gone ones are skipped)."""
    removed = 0
    for entry in files:
        try:
            dataset.filesystem.delete_file(entry.path)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(
                f"cannot remove {entry.path} (already compacted; readers skip it): {exc}", path=entry.path
            ) from exc
        removed += 1
    if files and dataset.is_local:
        dataset.sync_dirs({files[0].path.rpartition("/")[0]})
    return removed


def _close_quietly(handle: pa.NativeFile) -> None:
    try:
        handle.close()
    except (OSError, pa.ArrowException):
        pass

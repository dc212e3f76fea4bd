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

What a reader sees: between the publish and the last delete, a compacted file and (some of) its inputs are
both present. `visible_part_files` (what the DuckDB and Spark engines read) therefore leaves out every file
that a present compacted file lists as an input, so a query sees each row exactly once at every moment, and a
crash between the two steps leaves nothing visible twice (the next run deletes those inputs). A query whose
file list was taken before compaction and which then finds a file gone lists again and retries once (the
engines do that). Tools that read the folders directly (Trino, a plain `spark.read.parquet`) do not know the
marker and can count the rows of a compacted hour twice for the moment between publish and delete.

Only one compaction or retention runs at a time on a dataset (`flowpipe._maintenance.maintenance_lock`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq

from flowpipe._maintenance import PartFile, PartitionFiles, list_partitions, maintenance_lock
from flowpipe.dataset import (
    FLOWS_TABLE,
    LOST_EVENTS_TABLE,
    TABLES,
    Dataset,
    parse_part_file_name,
    part_file_name,
    translate_write_errors,
)
from flowpipe.errors import ConfigError, DatasetWriteError
from flowpipe.model import FLOW_SCHEMA, LOST_EVENTS_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY

log = logging.getLogger(__name__)

COMPACTED_FROM_KEY = b"flowpipe.compacted_from"
"""Parquet metadata key of a compacted file: JSON `[[input name, rows], ...]`, in the order of its rows."""
COMPACTED_PREFIX = "compacted-"
WRITER_ID_KEY = b"flowpipe.writer_id"
DEFAULT_TARGET_SIZE_BYTES = 128 * 1024 * 1024
DEFAULT_GRACE_SECONDS = 3600.0
ROW_GROUP_ROWS = 1_000_000
"""Rows of a compacted file's row groups (inputs' small row groups are gathered up to this)."""
ROW_GROUP_BYTES = 128 * 1024 * 1024
"""...or this many bytes in memory, whichever comes first."""

SCHEMAS: dict[str, pa.Schema] = {FLOWS_TABLE: FLOW_SCHEMA, LOST_EVENTS_TABLE: LOST_EVENTS_SCHEMA}
Clock = Callable[[], datetime]


# -- the marker: compacted files and the inputs they replace --------------------------------------------------


def is_compacted_name(name: str) -> bool:
    """True for the base name of a compacted file."""
    return name.startswith(COMPACTED_PREFIX) and name.endswith(".parquet")


def compacted_inputs(metadata: Mapping[bytes, bytes] | None) -> list[tuple[str, int]] | None:
    """The `(input name, rows)` list in a Parquet file's key-value metadata (`pq.FileMetaData.metadata`);
    None for a file that is not a compacted file."""
    if not metadata or COMPACTED_FROM_KEY not in metadata:
        return None
    try:
        value = json.loads(metadata[COMPACTED_FROM_KEY])
        return [(str(name), int(rows)) for name, rows in value]
    except (ValueError, TypeError) as exc:
        raise DatasetWriteError(f"unreadable {COMPACTED_FROM_KEY.decode()} metadata: {exc}", path="") from exc


def read_compacted_inputs(dataset: Dataset, path: str) -> list[tuple[str, int]] | None:
    """The inputs a compacted file lists (None when it lists none); FileNotFoundError if it is gone."""
    with dataset.filesystem.open_input_file(path) as handle:
        metadata = pq.read_metadata(handle).metadata
    return compacted_inputs(metadata)


def superseded_names(dataset: Dataset, folder: str, names: Iterable[str]) -> set[str]:
    """The names among `names` (the files of one partition folder) that a reader must leave out.

    These are the inputs listed by a compacted file in the folder (present after a compaction published its
    file but before it deleted them, or after a crash between the two), and a compacted file that vanished
    while being looked at. Only folders with a compacted file and at least one other file cost a footer read.
    """
    present = set(names)
    compacted = sorted(name for name in present if is_compacted_name(name))
    if not compacted or len(present) < 2:
        return set()
    claims: dict[str, set[str]] = {}
    dropped: set[str] = set()
    for name in compacted:
        try:
            inputs = read_compacted_inputs(dataset, f"{folder}/{name}")
        except FileNotFoundError:
            dropped.add(name)
            continue
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(f"cannot read {folder}/{name}: {exc}", path=f"{folder}/{name}") from exc
        claims[name] = {input_name for input_name, _ in inputs or []}
    listed = set().union(*claims.values()) if claims else set()
    dropped |= listed & present
    # Two surviving compacted files that claim the same input can only come from two compactions that ran at
    # once (the lock prevents it): keep the first by name so that no row is counted twice.
    taken: set[str] = set()
    for name in compacted:
        if name in dropped or name not in claims:
            continue
        if claims[name] & taken:
            log.warning("%s/%s claims inputs of another compacted file; left out", folder, name)
            dropped.add(name)
            continue
        taken |= claims[name]
    return dropped


def drop_superseded(dataset: Dataset, paths: Iterable[str]) -> list[str]:
    """`paths` without the files a reader must leave out (see `superseded_names`), order kept."""
    paths = list(paths)
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].append(name)
    dropped: set[str] = set()
    for folder, names in by_folder.items():
        dropped |= {f"{folder}/{name}" for name in superseded_names(dataset, folder, names)}
    return [path for path in paths if path not in dropped]


def visible_part_files(dataset: Dataset, table: str) -> list[str]:
    """The part files of `table` a query reads: every visible file, minus inputs already compacted."""
    return drop_superseded(dataset, dataset.list_part_files(table))


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
) -> CompactionReport:
    """Merge the small part files of every closed hour of `dataset`; see the module docstring.

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
    with maintenance_lock(dataset, "compaction", clock=clock) as lock:
        report.plans = plan_compaction(
            dataset, now=clock(), target_size_bytes=target_size_bytes, grace_seconds=grace_seconds
        )
        seq = 0
        for plan in report.plans:
            _remove(dataset, plan.leftovers, report)
            for group in plan.groups:
                seq += 1
                _merge_group(dataset, plan.partition, group, run_id, seq, zstd_level, report)
            on_partition(plan)
            lock.renew()
    report.seconds = time.perf_counter() - started
    return report


def _merge_group(
    dataset: Dataset,
    partition: PartitionFiles,
    group: list[PartFile],
    run_id: str,
    seq: int,
    zstd_level: int,
    report: CompactionReport,
) -> None:
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
        report.skipped.append(f"{where}: {inputs}")
        return
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
    report.files_written.append(final)
    report.rows += expected
    report.bytes_before += sum(f.size for f in group)
    report.bytes_after += int(dataset.filesystem.get_file_info(final).size or 0)
    _remove(dataset, group, report)


def _copy_rows(
    dataset: Dataset,
    group: list[PartFile],
    schema: pa.Schema,
    out: pa.NativeFile,
    temp: str,
    zstd_level: int,
) -> list[tuple[str, int]] | str:
    """Stream the inputs' row groups, in order, into `out`, and record them in the file's metadata.

    Returns the `(name, rows)` of each input, or a reason (str) why this group cannot be merged.
    """
    inputs: list[tuple[str, int]] = []
    pending: list[pa.Table] = []
    pending_rows = pending_bytes = 0
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
        for entry in group:
            try:
                handle = dataset.filesystem.open_input_file(entry.path)
            except FileNotFoundError:
                return f"{entry.name} vanished before it was merged (another process removed it); left as is"
            except (OSError, pa.ArrowException) as exc:
                raise DatasetWriteError(f"cannot read {entry.path}: {exc}", path=entry.path) from exc
            try:
                with translate_write_errors(entry.path):
                    parquet = pq.ParquetFile(handle)
                    unknown = sorted(set(parquet.schema_arrow.names) - set(schema.names))
                    if unknown:
                        return (
                            f"{entry.name} has columns {', '.join(unknown)} that this flowpipe does not know "
                            "(written by a newer version?); left as is"
                        )
                    for index in range(parquet.metadata.num_row_groups):
                        table = _conform(parquet.read_row_group(index), schema)
                        pending.append(table)
                        pending_rows += table.num_rows
                        pending_bytes += table.nbytes
                        if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                            with translate_write_errors(temp):
                                _write(writer, pending)
                            pending, pending_rows, pending_bytes = [], 0, 0
                    inputs.append((entry.name, parquet.metadata.num_rows))
            finally:
                _close_quietly(handle)
        with translate_write_errors(temp):
            _write(writer, pending)
            writer.add_key_value_metadata(
                {COMPACTED_FROM_KEY.decode(): json.dumps(inputs, separators=(",", ":"))}
            )
    finally:
        with translate_write_errors(temp):
            writer.close()
    return inputs


def _write(writer: pq.ParquetWriter, tables: list[pa.Table]) -> int:
    if not tables:
        return 0
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows:
        writer.write_table(table, row_group_size=table.num_rows)
    return int(table.num_rows)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns, in order: missing ones (older files) as NULL."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _start_of(name: str) -> datetime | None:
    """The start time in a part or compacted file name (None for other names, which are never merged)."""
    if is_compacted_name(name):
        name = "part-" + name.removeprefix(COMPACTED_PREFIX)
    parsed = parse_part_file_name(name)
    return parsed.start if parsed else None


def _remove(dataset: Dataset, files: list[PartFile], report: CompactionReport) -> None:
    for entry in files:
        try:
            dataset.filesystem.delete_file(entry.path)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(
                f"cannot remove {entry.path} (already compacted; readers skip it): {exc}", path=entry.path
            ) from exc
        report.files_removed += 1
    if files and dataset.is_local:
        dataset.sync_dirs({files[0].path.rpartition("/")[0]})


def _close_quietly(handle: pa.NativeFile) -> None:
    try:
        handle.close()
    except (OSError, pa.ArrowException):
        pass

"""What compaction and retention share: a table's files by partition (with sizes) and the maintenance lock."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.dataset.layout import Dataset, PartitionKey, is_hidden_name
from flowpipe.dataset.leases import LEASE_SECONDS, MAINTENANCE, Lease, holding_lease
from flowpipe.errors import DatasetWriteError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class PartFile:
    """One file in a partition folder: its full path, base name and size in bytes."""

    path: str
    name: str
    size: int


@dataclass(slots=True)
class PartitionFiles:
    """The files of one partition of one table: visible Parquet files, and hidden ones (temporary files)."""

    table: str
    key: PartitionKey
    folder: str
    files: list[PartFile] = field(default_factory=list)
    hidden: list[pafs.FileInfo] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes of the visible files."""
        return sum(f.size for f in self.files)

    def hour_start(self) -> datetime | None:
        """When this partition's hour begins (None for the partition of rows without a time)."""
        return self.key.start()


def list_partitions(dataset: Dataset, table: str) -> list[PartitionFiles]:
    """Every `date=.../hour=...` folder of `table` with its files, sorted by partition (one listing)."""
    root = dataset.table_dir(table)
    try:
        infos = dataset.filesystem.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True)
        )
    except (OSError, pa.ArrowException) as exc:
        raise DatasetWriteError(f"cannot list {root}: {exc}", path=root) from exc
    partitions: dict[PartitionKey, PartitionFiles] = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        parts = info.path[len(root) :].strip("/").split("/")
        if len(parts) != 3 or not parts[0].startswith("date=") or not parts[1].startswith("hour="):
            continue
        if is_hidden_name(parts[0]) or is_hidden_name(parts[1]):
            continue
        key = PartitionKey(parts[0][5:], parts[1][5:])
        entry = partitions.setdefault(key, PartitionFiles(table, key, dataset.partition_dir(table, key)))
        if is_hidden_name(parts[2]):
            entry.hidden.append(info)
        elif parts[2].endswith(".parquet"):
            entry.files.append(PartFile(info.path, parts[2], int(info.size or 0)))
    for entry in partitions.values():
        entry.files.sort(key=lambda f: f.name)
    return [partitions[key] for key in sorted(partitions)]


@contextmanager
def maintenance_lock(
    dataset: Dataset, what: str, *, clock: Clock | None = None, writer_id: str | None = None
) -> Iterator[Lease]:
    """Hold the dataset's maintenance lease while compaction or retention (`what`) changes the dataset.

    Only one of them runs at a time on a dataset: the lease claims `maintenance` (see `flowpipe.dataset.leases`). It
    is renewed while this process lives, so a run that crashed does not block the next one: on the same host
    it is taken over at once, from another host once its lease expired (`LEASE_SECONDS`). `writer_id` names
    the temporary files this run writes, so that a later run removes them if this one dies. `clock` is not
    used (leases go by the real time); it is accepted for callers that pass their own.
    """
    del clock
    with holding_lease(
        dataset,
        what,
        {MAINTENANCE: "maintenance (compaction or retention)"},
        writer_id=writer_id,
        advice=(
            "run one compaction or retention at a time on a dataset (a run that crashed is taken over as soon "
            f"as its process is gone: at once on the same host, after {LEASE_SECONDS:.0f} s from another)"
        ),
    ) as lease:
        yield lease

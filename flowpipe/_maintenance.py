"""What compaction and retention share: a table's files by partition (with sizes) and the maintenance lock."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.dataset import UNKNOWN_PARTITION, Dataset, PartitionKey, is_hidden_name
from flowpipe.errors import DatasetWriteError

log = logging.getLogger(__name__)

LOCK_STATE = "maintenance-lock.json"
"""`_state/` file held while `compact` or `retention --apply` runs."""
LOCK_TTL = timedelta(hours=1)
"""A lock not renewed for this long belongs to a run that died; the next run takes it over."""

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
        if self.key.date == UNKNOWN_PARTITION:
            return None
        try:
            return datetime.strptime(f"{self.key.date} {self.key.hour}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        except ValueError:
            return None


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


@dataclass(slots=True)
class MaintenanceLock:
    """The held lock: who holds it and until when (renew it during long runs)."""

    dataset: Dataset
    owner: str
    what: str
    clock: Clock

    def renew(self) -> None:
        """Push the lock's expiry one `LOCK_TTL` past now."""
        self.dataset.write_state(LOCK_STATE, _lock_document(self.owner, self.what, self.clock()))


def _lock_document(owner: str, what: str, now: datetime) -> dict[str, str]:
    return {
        "owner": owner,
        "what": what,
        "renewed": now.isoformat(),
        "expires": (now + LOCK_TTL).isoformat(),
    }


@contextmanager
def maintenance_lock(
    dataset: Dataset, what: str, *, clock: Clock = lambda: datetime.now(UTC)
) -> Iterator[MaintenanceLock]:
    """Hold `_state/maintenance-lock.json` while compaction or retention changes the dataset.

    Only one of them runs at a time on a dataset. A lock that has expired (its run died) is taken over with a
    warning. On a local folder the lock is created atomically; on an object store it is written, then read
    back to check that this run owns it (good against accidents, not a consensus protocol: schedule one
    maintenance job per dataset, e.g. a CronJob with `concurrencyPolicy: Forbid`).
    """
    owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    path = dataset.state_path(LOCK_STATE)
    now = clock()
    current = dataset.read_state(LOCK_STATE)
    if current is not None:
        expires = _parse_time(current.get("expires"))
        if expires is not None and expires > now:
            raise DatasetWriteError(
                f"{path}: {current.get('what', 'maintenance')} by {current.get('owner', '?')} is running on "
                f"this dataset (lock renewed {current.get('renewed', '?')}, expires {current.get('expires')}); "
                "run one compaction or retention at a time, or remove the file if that run is gone",
                path=path,
            )
        log.warning("taking over the expired maintenance lock of %s (%s)", current.get("owner"), path)
        dataset.discard(path)
    document = _lock_document(owner, what, now)
    if dataset.is_local:
        dataset.make_dirs(os.path.dirname(path))
        try:
            with open(path, "x", encoding="utf-8") as handle:
                json.dump(document, handle)
        except FileExistsError as exc:
            raise DatasetWriteError(
                f"{path}: another maintenance run took the lock just now", path=path
            ) from exc
    else:
        dataset.write_state(LOCK_STATE, document)
        if (dataset.read_state(LOCK_STATE) or {}).get("owner") != owner:
            raise DatasetWriteError(f"{path}: another maintenance run took the lock just now", path=path)
    try:
        yield MaintenanceLock(dataset, owner, what, clock)
    finally:
        if (dataset.read_state(LOCK_STATE) or {}).get("owner") == owner:
            dataset.discard(path)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

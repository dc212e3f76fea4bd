"""The dataset on storage: table folders, Hive partitions, part-file names, atomic writes and `_state/` JSON.

```
<root>/flows/date=YYYY-MM-DD/hour=HH/part-<start>-<writer id>-<seq>.parquet
<root>/lost_events/date=YYYY-MM-DD/hour=HH/part-<start>-<writer id>-<seq>.parquet
<root>/_state/<name>.json                       checkpoints and other small state
```

Every file goes through a `pyarrow.fs.FileSystem`, so the same code serves a local folder and an object store
(`s3://bucket/prefix`). On a local folder a part file is written under a temporary name (a leading `.` and a
trailing `.tmp`, which every reader skips), fsynced, then renamed into place, so a reader never sees half a file
and a crash leaves at most a temporary file behind, which the next writer with the same id (or any writer,
once the file is older than an hour, or whose writer's lease shows it gone) removes. On an object store (no
rename) a small file is held in memory and sent to its final key in one PUT; a larger one's temporary object is
copied server-side to its final key, which appears complete or not at all, then deleted (`flowpipe.dataset.storage` says
why).

Rows whose `time` is NULL are kept rather than dropped, in the partition whose `date` and `hour` are both
`__HIVE_DEFAULT_PARTITION__` (Hive's spelling of NULL, which DuckDB, Spark and pyarrow read as NULL).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flowpipe.dataset.storage import is_object_store, resolve_dataset
from flowpipe.errors import ConfigError, DatasetWriteError

FLOWS_TABLE = "flows"
LOST_EVENTS_TABLE = "lost_events"
TABLES: tuple[str, ...] = (FLOWS_TABLE, LOST_EVENTS_TABLE)
STATE_DIR = "_state"
UNKNOWN_PARTITION = "__HIVE_DEFAULT_PARTITION__"
"""Partition value for rows without a time. It is Hive's name for a NULL partition value: DuckDB, Spark and
pyarrow read it as NULL, so `date` and `hour` keep their DATE and integer types when such rows exist."""

COMPACTED_PREFIX = "compacted-"
"""Compacted files are named `compacted-<start>-<run id>-<seq>.parquet` (see `flowpipe.dataset.compact`)."""
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 3600.0
"""A temporary file older than this belongs to a writer that died; any writer may remove it."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_START_FORMAT = "%Y%m%dT%H%M%S%fZ"
_PART_RE = re.compile(
    r"^part-(?P<start>\d{8}T\d{12}Z)-(?P<writer>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<seq>\d{6,})\.parquet$"
)


KILL_AT_VARIABLE = "FLOWPIPE_TEST_KILL_AT"
"""Test hook: `STEP` or `STEP@N` kills this process (SIGKILL) at the Nth time it reaches that step of a
publish (`publish:written`, `publish:copied`, `publish:done`), or before the edge rollup of a published flow
file (`rollup:before`); tests use it to crash a real writer there."""
_kill_counts: dict[str, int] = {}


def kill_point(step: str) -> None:
    """Kill this process here when `FLOWPIPE_TEST_KILL_AT` names `step` (see `KILL_AT_VARIABLE`)."""
    wanted = os.environ.get(KILL_AT_VARIABLE)
    if not wanted or not wanted.startswith(step):
        return
    name, _, nth = wanted.partition("@")
    if name != step:
        return
    _kill_counts[step] = _kill_counts.get(step, 0) + 1
    if _kill_counts[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


SINGLE_PUT_BYTES = 5 * 1024 * 1024
"""On an object store, a part file up to this size is held in memory and published with one PUT (below the
smallest multipart upload part, so the store receives it whole in one request or not at all)."""
SINGLE_PUT_VARIABLE = "FLOWPIPE_TEST_SINGLE_PUT_BYTES"
"""Test hook: another `SINGLE_PUT_BYTES` (0: every file through a temporary object, a copy and a delete)."""


class _HeldFile:
    """A file written for an object store: in memory up to `limit` bytes, then streamed to its temporary key.

    A Python file object (pyarrow's Parquet writer writes into it through `pa.PythonFile`).
    """

    def __init__(self, filesystem: pafs.FileSystem, temp: str, limit: int) -> None:
        self._filesystem, self._temp, self._limit = filesystem, temp, limit
        self._buffer = bytearray()
        self._stream: Any = None
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if self._stream is None and len(self._buffer) + size > self._limit:
            self._stream = self._filesystem.open_output_stream(self._temp)
            self._stream.write(bytes(self._buffer))
            self._buffer = bytearray()
        if self._stream is None:
            self._buffer += data
        else:
            self._stream.write(data)
        self._position += size
        return size

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed and self._stream is not None:
            self._stream.close()
        self.closed = True

    @property
    def held(self) -> bytes | None:
        """The whole file, when it never left memory."""
        return bytes(self._buffer) if self._stream is None else None


def _close_quietly(handle: Any) -> None:
    try:
        handle.close()
    except (OSError, pa.ArrowException):
        pass


def is_hidden_name(name: str) -> bool:
    """True for names every reader skips: temporary and private files (`.x`, `_x`, `x.tmp`)."""
    return name.startswith((".", "_")) or name.endswith(TEMP_SUFFIX)


@dataclass(frozen=True, slots=True, order=True)
class PartitionKey:
    """One Hive partition: `date=YYYY-MM-DD/hour=HH`, or `UNKNOWN_PARTITION` for both when rows have no time."""

    date: str
    hour: str

    @classmethod
    def from_hour_index(cls, index: int | None) -> PartitionKey:
        """The partition of hour number `index` since the epoch (None: the unknown partition)."""
        if index is None:
            return cls(UNKNOWN_PARTITION, UNKNOWN_PARTITION)
        start = _EPOCH + timedelta(hours=index)
        return cls(start.strftime("%Y-%m-%d"), f"{start.hour:02d}")

    @classmethod
    def from_time(cls, when: datetime | None) -> PartitionKey:
        """The partition a row with this time belongs to."""
        if when is None:
            return cls.from_hour_index(None)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return cls.from_hour_index(int((when - _EPOCH) // timedelta(hours=1)))

    def start(self) -> datetime | None:
        """When the partition's hour begins (None for the partition of rows without a time, or a malformed one)."""
        if self.date == UNKNOWN_PARTITION:
            return None
        try:
            return datetime.strptime(f"{self.date} {self.hour}", "%Y-%m-%d %H").replace(tzinfo=UTC)
        except ValueError:
            return None

    @property
    def path(self) -> str:
        """The relative folder, e.g. `date=2024-03-22/hour=17`."""
        return f"date={self.date}/hour={self.hour}"


@dataclass(frozen=True, slots=True)
class PartName:
    """The parts of a part-file name."""

    start: datetime
    writer_id: str
    seq: int


def part_file_name(start: datetime, writer_id: str, seq: int) -> str:
    """`part-<start>-<writer id>-<seq>.parquet`; `start` (UTC, microseconds) makes names sort by time."""
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    stamp = start.astimezone(UTC).strftime(_START_FORMAT)
    return f"part-{stamp}-{writer_id}-{seq:06d}.parquet"


def parse_part_file_name(name: str) -> PartName | None:
    """The start, writer id and sequence number of a part-file name; None if it is not one."""
    match = _PART_RE.match(name)
    if match is None:
        return None
    start = datetime.strptime(match["start"], _START_FORMAT).replace(tzinfo=UTC)
    return PartName(start=start, writer_id=match["writer"], seq=int(match["seq"]))


def temp_file_name(final_name: str) -> str:
    """The temporary name a file is written under before it is renamed to `final_name`."""
    return f"{TEMP_PREFIX}{final_name}{TEMP_SUFFIX}"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno)} (errno {errno.errorcode.get(exc.errno, exc.errno)})"
    return str(exc) or type(exc).__name__


@contextmanager
def translate_write_errors(path: str) -> Iterator[None]:
    """Turn an OS or Arrow I/O error while writing `path` into `DatasetWriteError` naming the path."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise DatasetWriteError(f"cannot write {path}: {_describe(exc)}", path=path) from exc


class Dataset:
    """A dataset root on a pyarrow filesystem: where tables, partitions, part files and state live.

    >>> ds = Dataset("flowpipe-data")              # a local folder (created on first write)
    >>> ds.list_part_files("flows")                # visible part files, sorted
    []
    """

    def __init__(self, root: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> None:
        text = os.fspath(root)
        if filesystem is not None:
            self.filesystem, self.root = filesystem, text.rstrip("/") or "/"
        elif "://" in text:
            # s3://bucket/prefix with endpoint, region and credentials from flags and environment
            self.filesystem, self.root = resolve_dataset(text)
        else:
            self.filesystem, self.root = pafs.LocalFileSystem(), os.path.abspath(text)
        self.uri = text
        self.is_local = isinstance(self.filesystem, pafs.LocalFileSystem)
        self.single_put_bytes = int(os.environ.get(SINGLE_PUT_VARIABLE) or SINGLE_PUT_BYTES)
        self._held: dict[str, bytes] = {}
        """Finished files kept in memory until published (see `open_temp`), by temporary path."""

    def __repr__(self) -> str:
        return f"Dataset({self.uri!r})"

    # -- layout -------------------------------------------------------------------------------------------

    def table_dir(self, table: str) -> str:
        """The folder of one table (`flows` or `lost_events`)."""
        return _join(self.root, table)

    def partition_dir(self, table: str, key: PartitionKey) -> str:
        """The folder of one partition of a table."""
        return _join(self.root, table, key.path)

    def state_path(self, name: str) -> str:
        """The path of the state file `_state/<name>` (e.g. `files.json`)."""
        return _join(self.root, STATE_DIR, name)

    def local_path(self, path: str) -> Path:
        """A dataset path as a local `Path`; only for a local dataset."""
        if not self.is_local:
            raise ConfigError(f"dataset {self.uri} is not a local folder")
        return Path(path)

    # -- listing ------------------------------------------------------------------------------------------

    def _walk(self, folder: str) -> list[pafs.FileInfo]:
        try:
            infos = self.filesystem.get_file_info(
                pafs.FileSelector(folder, recursive=True, allow_not_found=True)
            )
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(f"cannot list {folder}: {_describe(exc)}", path=folder) from exc
        return [info for info in infos if info.type == pafs.FileType.File]

    def list_part_files(self, table: str, partition: PartitionKey | None = None) -> list[str]:
        """Paths of the visible part files of a table (or of one partition), sorted by path."""
        folder = self.table_dir(table) if partition is None else self.partition_dir(table, partition)
        paths = []
        for info in self._walk(folder):
            relative = info.path[len(folder) :].strip("/")
            if not any(is_hidden_name(part) for part in relative.split("/")) and info.path.endswith(
                ".parquet"
            ):
                paths.append(info.path)
        return sorted(paths)

    def list_partitions(self, table: str) -> list[PartitionKey]:
        """The partitions of a table that hold at least one visible part file, sorted."""
        keys: set[PartitionKey] = set()
        prefix = self.table_dir(table)
        for path in self.list_part_files(table):
            date_part, hour_part, *_ = path[len(prefix) :].strip("/").split("/")
            if date_part.startswith("date=") and hour_part.startswith("hour="):
                keys.add(PartitionKey(date_part[5:], hour_part[5:]))
        return sorted(keys)

    def list_temp_files(self, table: str) -> list[pafs.FileInfo]:
        """The temporary files of a table (writes in progress, or left by a writer that died)."""
        return [
            info
            for info in self._walk(self.table_dir(table))
            if info.base_name.startswith(TEMP_PREFIX) and info.base_name.endswith(TEMP_SUFFIX)
        ]

    def clean_temp_files(
        self,
        *,
        writer_id: str | None = None,
        writer_ids: Collection[str] = (),
        stale_after_seconds: float = STALE_TEMP_SECONDS,
    ) -> list[str]:
        """Remove temporary files left by a crash; returns their paths.

        A temporary file is removed when its name carries `writer_id` or one of `writer_ids` (this writer's
        own leftovers, or those of writers whose lease shows them gone: one writer id is never used by two
        running writers) or when it is older than `stale_after_seconds` (its writer is gone: no part file
        takes that long to write). Others' writes in progress are kept.
        """
        now = time.time()
        gone = set(writer_ids) | ({writer_id} if writer_id else set())
        removed = []
        from flowpipe.dataset.rollups import ROLLUP_TABLES  # their temporary files carry the flow file's name

        for table in (*TABLES, *ROLLUP_TABLES):
            for info in self.list_temp_files(table):
                name = info.base_name[len(TEMP_PREFIX) : -len(TEMP_SUFFIX)]
                if name.startswith(COMPACTED_PREFIX):
                    name = "part-" + name.removeprefix(COMPACTED_PREFIX)
                parsed = parse_part_file_name(name)
                mine = parsed is not None and parsed.writer_id in gone
                mtime = info.mtime.timestamp() if info.mtime is not None else now
                if mine or now - mtime > stale_after_seconds:
                    try:
                        self.filesystem.delete_file(info.path)
                    except FileNotFoundError:
                        continue
                    removed.append(info.path)
        return removed

    # -- writing part files ---------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        """True if a file exists at `path`."""
        return bool(self.filesystem.get_file_info(path).type == pafs.FileType.File)

    def make_dirs(self, folder: str) -> None:
        """Create `folder` and its parents; nothing on an object store, which has no folders (pyarrow would
        write a zero-byte marker object per level: requests that cost and that no reader needs)."""
        if is_object_store(self.filesystem):
            return
        with translate_write_errors(folder):
            self.filesystem.create_dir(folder, recursive=True)

    def write_parquet_temp(
        self, table: pa.Table, folder: str, final_name: str, *, hold: bool = False, **options: Any
    ) -> str:
        """Write `table` as Parquet under the temporary name of `final_name` in `folder`; returns its path.

        On a local folder the file is fsynced before this returns. `hold` as in `open_temp`. On failure the
        temporary file is removed and `DatasetWriteError` names the path.
        """
        temp, handle = self.open_temp(folder, final_name, hold=hold)
        try:
            with translate_write_errors(temp):
                pq.write_table(table, handle, **options)
        except DatasetWriteError:
            _close_quietly(handle)
            self.discard(temp)
            raise
        self.finish_temp(temp, handle)
        return temp

    def open_temp(self, folder: str, final_name: str, *, hold: bool = False) -> tuple[str, Any]:
        """Open the temporary file of `final_name` in `folder` for writing; returns (path, binary stream).

        With `hold`, on an object store, the file stays in memory while it is at most `single_put_bytes`
        long; `publish` then sends it to its final key in one PUT (no temporary object, no copy, no delete,
        and a crash leaves nothing). A longer one goes to its temporary object as it grows.
        """
        self.make_dirs(folder)
        temp = _join(folder, temp_file_name(final_name))
        with translate_write_errors(temp):
            if self.is_local:
                return temp, open(temp, "wb")  # closed by finish_temp
            if hold:
                return temp, _HeldFile(self.filesystem, temp, self.single_put_bytes)
            return temp, self.filesystem.open_output_stream(temp)

    def finish_temp(self, temp: str, handle: Any) -> None:
        """Flush, fsync (local folder) and close a stream from `open_temp`; on failure remove the file."""
        try:
            with translate_write_errors(temp):
                try:
                    if self.is_local:
                        handle.flush()
                        os.fsync(handle.fileno())
                finally:
                    handle.close()
        except DatasetWriteError:
            self.discard(temp)
            raise
        if isinstance(handle, _HeldFile) and handle.held is not None:
            self._held[temp] = handle.held

    def publish(self, temp: str, final: str) -> None:
        """Rename a finished temporary file to its final name (atomic on a local folder).

        On an object store: a server-side copy (the final object appears whole or not at all), then the
        temporary object is deleted. A writer killed between the two leaves the temporary object, which the
        same writer removes when it starts again (`clean_temp_files`).
        """
        kill_point("publish:written")
        held = self._held.pop(temp, None)
        with translate_write_errors(final):
            if held is not None:  # complete in memory: one PUT, atomic (small: no multipart upload)
                with self.filesystem.open_output_stream(final) as stream:
                    stream.write(held)
            elif self.is_local:
                os.replace(temp, final)
            elif is_object_store(self.filesystem):
                self.filesystem.copy_file(temp, final)
                kill_point("publish:copied")
                self.filesystem.delete_file(temp)
            else:
                self.filesystem.move(temp, final)
        kill_point("publish:done")

    def sync_dirs(self, folders: set[str]) -> None:
        """fsync folders (and the table folders above new partitions) so that renames survive a power cut."""
        if not self.is_local:
            return
        seen: set[str] = set()
        for folder in folders:
            for path in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
                if path in seen or not path.startswith(self.root):
                    continue
                seen.add(path)
                with translate_write_errors(path):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def discard(self, path: str) -> None:
        """Delete a file if it exists; errors are ignored (used to clean up after a failed write)."""
        if self._held.pop(path, None) is not None:
            return  # only ever in memory
        try:
            self.filesystem.delete_file(path)
        except (OSError, pa.ArrowException):
            pass

    # -- state ----------------------------------------------------------------------------------------------

    def read_state(self, name: str) -> dict[str, Any] | None:
        """The JSON object stored in `_state/<name>`, or None when there is none yet."""
        path = self.state_path(name)
        try:
            with self.filesystem.open_input_stream(path) as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(f"cannot read {path}: {_describe(exc)}", path=path) from exc
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise DatasetWriteError(f"{path} is not valid JSON: {exc}", path=path) from exc
        if not isinstance(value, dict):
            raise DatasetWriteError(f"{path} does not hold a JSON object", path=path)
        return value

    def write_state(self, name: str, value: Mapping[str, Any]) -> None:
        """Replace `_state/<name>` with `value` as JSON, atomically (temporary file, fsync, rename)."""
        path = self.state_path(name)
        folder = os.path.dirname(path) if self.is_local else _join(self.root, STATE_DIR)
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        self.make_dirs(folder)
        if not self.is_local:
            with translate_write_errors(path), self.filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
        temp = _join(folder, temp_file_name(os.path.basename(path)))
        try:
            with translate_write_errors(path):
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, path)
        except DatasetWriteError:
            self.discard(temp)
            raise
        self.sync_dirs({folder})


@dataclass(frozen=True, slots=True)
class StateFile:
    """One JSON document in a dataset's `_state/`, on whatever filesystem the dataset lives (local or S3).

    For code that keeps its own state document (the file source's checkpoint) without knowing where the dataset
    is: `load()` is `Dataset.read_state`, `save()` is `Dataset.write_state`.
    """

    dataset: Dataset
    name: str

    def load(self) -> dict[str, Any] | None:
        """The stored document, or None when there is none yet."""
        return self.dataset.read_state(self.name)

    def save(self, value: Mapping[str, Any]) -> None:
        """Replace the document (atomically)."""
        self.dataset.write_state(self.name, value)

    def __str__(self) -> str:
        return self.dataset.state_path(self.name)

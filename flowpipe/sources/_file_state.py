"""The file source's checkpoint: per file content, how many lines are already durable in the dataset.

A file is recognised by its content, not its name: the key is the SHA-256 of its first bytes (up to 64 KiB of
the decompressed content), so a rotated (`events.log` → `events-<time>.log`), renamed or gzipped copy of the
same content is the same file, and a file that grew (the exporter appends to `events.log`) is recognised by
its unchanged beginning and continues from the committed line. The state is one small JSON document written
atomically (temporary file, fsync, `os.replace`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowpipe.dataset import StateFile
from flowpipe.errors import FlowpipeError, SourceError

HEAD_BYTES = 64 * 1024
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class FilePosition:
    """Checkpoint token of the file source: this content has been read up to `records` lines.

    `offset` is the matching byte offset in the decompressed content and `partial` tells that the last line
    counted had no newline yet. `replaces` names an older key of the same content (it was shorter then).
    """

    path: str
    key: str
    records: int
    offset: int
    partial: bool = False
    replaces: str | None = None


@dataclass(slots=True)
class _Entry:
    head_bytes: int
    records: int
    offset: int
    partial: bool
    path: str
    updated: str


def content_key(head: bytes) -> str:
    """The key of a content whose first (up to HEAD_BYTES) bytes are `head`."""
    head = head[:HEAD_BYTES]
    return f"{hashlib.sha256(head).hexdigest()}:{len(head)}"


class FileState:
    """Committed progress per file content, loaded from and saved to one JSON file (or kept in memory).

    `path` is a local file, or a `StateFile` of a dataset on any filesystem (an object store).
    """

    def __init__(self, path: str | os.PathLike[str] | StateFile | None) -> None:
        self._store = path if isinstance(path, StateFile) else None
        self.path = Path(path) if path is not None and not isinstance(path, StateFile) else None
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # the pipeline commits from another thread than the one reading
        if self._store is not None:
            self._load(str(self._store), self._store.load)
        elif self.path is not None and self.path.exists():
            local = self.path
            self._load(str(local), lambda: json.loads(local.read_text(encoding="utf-8")))

    def _load(self, where: str, read: Callable[[], Any]) -> None:
        try:
            document = read()
            if document is None:  # a StateFile not written yet
                return
            files = document["files"]
            self._entries = {key: _Entry(**value) for key, value in files.items()}
        except (OSError, ValueError, KeyError, TypeError, FlowpipeError) as exc:
            raise SourceError(
                f"{where}: the file checkpoint cannot be read ({exc}); move it away to start over"
            ) from exc

    def find(self, head: bytes) -> tuple[str | None, int, int, bool]:
        """The committed key matching a content that starts with `head`: (key, records, offset, partial).

        A content matches an entry when its first `head_bytes` bytes hash alike; the longest match wins.
        """
        with self._lock:
            sizes = sorted({entry.head_bytes for entry in self._entries.values()}, reverse=True)
            for size in sizes:
                if size > len(head) or size == 0:
                    continue
                key = content_key(head[:size])
                entry = self._entries.get(key)
                if entry is not None:
                    return key, entry.records, entry.offset, entry.partial
        return None, 0, 0, False

    def commit(self, position: FilePosition) -> None:
        """Record `position` as durable and save the state."""
        self.commit_many([position])

    def commit_many(self, positions: Iterable[FilePosition]) -> None:
        """Record `positions` (in order) as durable and save the state once."""
        with self._lock:
            changed = [self._apply(position) for position in positions]
            if any(changed):
                self._save()

    def _apply(self, position: FilePosition) -> bool:
        current = self._entries.get(position.key)
        if current is not None and current.records >= position.records:
            return False
        self._entries[position.key] = _Entry(
            head_bytes=int(position.key.rsplit(":", 1)[1]),
            records=position.records,
            offset=position.offset,
            partial=position.partial,
            path=position.path,
            updated=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        if position.replaces and position.replaces != position.key:
            self._entries.pop(position.replaces, None)
        return True

    def _save(self) -> None:
        if self.path is None and self._store is None:
            return
        document: dict[str, Any] = {
            "version": STATE_VERSION,
            "files": {key: asdict(entry) for key, entry in sorted(self._entries.items())},
        }
        if self._store is not None:
            self._store.save(document)
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

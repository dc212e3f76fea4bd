"""The file source's checkpoint: per file content, how many lines are already durable in the dataset.

A file is recognised by its content, not its name: the key is the SHA-256 of its first bytes (up to 64 KiB of
the decompressed content), so a rotated (`events.log` → `events-<time>.log`), renamed or gzipped copy of the
same content is the same file, and a file that grew (the exporter appends to `events.log`) is recognised by
its unchanged beginning and continues from the committed line.

In a dataset (`ingest`) the state is a folder, `_state/files/`, of one small JSON document per file content
(`<sha256>-<bytes hashed>.json`), written only by the process that holds that content's lease (see
`flowpipe.dataset.leases`): several ingests into one dataset at once never overwrite each other's progress, on a local
folder or an object store alike. A `_state/files.json` of earlier versions is still read (the folder's documents
win where both know a content). A checkpoint given as a single path is one JSON document written atomically
(temporary file, fsync, `os.replace`), for one writer.
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

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.dataset.layout import STATE_DIR, Dataset, StateFile
from flowpipe.errors import DatasetWriteError, FlowpipeError, SourceError

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


@dataclass(frozen=True, slots=True)
class StateFolder:
    """The file source's checkpoint in a dataset: `_state/<name>/`, one document per file content."""

    dataset: Dataset
    name: str = "files"

    @property
    def folder(self) -> str:
        """Where the documents are."""
        return f"{self.dataset.root.rstrip('/')}/{STATE_DIR}/{self.name}"

    def document(self, key: str) -> StateFile:
        """The document of one content key (`sha256:bytes` → `<name>/sha256-bytes.json`)."""
        return StateFile(self.dataset, f"{self.name}/{key.replace(':', '-')}.json")

    def keys(self) -> set[str]:
        """The content keys that have a document."""
        try:
            infos = self.dataset.filesystem.get_file_info(
                pafs.FileSelector(self.folder, allow_not_found=True)
            )
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(f"cannot list {self.folder}: {exc}", path=self.folder) from exc
        found = set()
        for info in infos:
            stem = info.base_name.removesuffix(".json")
            digest, _, size = stem.partition("-")
            if info.base_name.endswith(".json") and len(digest) == 64 and size.isdigit():
                found.add(f"{digest}:{size}")
        return found

    def __str__(self) -> str:
        return self.folder


def content_key(head: bytes) -> str:
    """The key of a content whose first (up to HEAD_BYTES) bytes are `head`."""
    head = head[:HEAD_BYTES]
    return f"{hashlib.sha256(head).hexdigest()}:{len(head)}"


class FileState:
    """Committed progress per file content, loaded from and saved to one JSON file (or kept in memory).

    `path` is a local file or a `StateFile` (one document), or a `StateFolder` of a dataset (one document per
    content, on any filesystem).
    """

    def __init__(self, path: str | os.PathLike[str] | StateFile | StateFolder | None) -> None:
        self._folder = path if isinstance(path, StateFolder) else None
        self._store = path if isinstance(path, StateFile) else None
        if self._folder is not None:
            self._store = StateFile(self._folder.dataset, f"{self._folder.name}.json")  # earlier versions'
        local = path is not None and not isinstance(path, StateFile | StateFolder)
        self.path = Path(path) if local else None  # type: ignore[arg-type]
        self._entries: dict[str, _Entry] = {}
        self._documents: set[str] = set()
        """Keys with a document in the folder not read yet (read when a content matches)."""
        self._changed: set[str] = set()
        self._lock = threading.Lock()  # the pipeline commits from another thread than the one reading
        if self._store is not None:
            self._entries = self._load(str(self._store), self._store.load)
        elif self.path is not None and self.path.exists():
            file = self.path
            self._entries = self._load(str(file), lambda: json.loads(file.read_text(encoding="utf-8")))
        if self._folder is not None:
            self._documents = self._folder.keys()

    @staticmethod
    def _load(where: str, read: Callable[[], Any]) -> dict[str, _Entry]:
        try:
            document = read()
            if document is None:  # a StateFile not written yet
                return {}
            files = document["files"]
            return {key: _Entry(**value) for key, value in files.items()}
        except (OSError, ValueError, KeyError, TypeError, FlowpipeError) as exc:
            raise SourceError(
                f"{where}: the file checkpoint cannot be read ({exc}); move it away to start over"
            ) from exc

    def _entry(self, key: str) -> _Entry | None:
        """The entry of `key`, reading its document from the folder the first time."""
        if key in self._documents:
            self._documents.discard(key)
            assert self._folder is not None
            state = self._folder.document(key)

            def read() -> dict[str, Any]:
                document = state.load()  # None: removed since the listing (replaced by a longer key)
                return {"files": {key: document} if document else {}}

            stored = self._load(str(state), read)
            held = self._entries.get(key)
            if key in stored and (held is None or stored[key].records > held.records):
                self._entries[key] = stored[key]
        return self._entries.get(key)

    def find(self, head: bytes) -> tuple[str | None, int, int, bool]:
        """The committed key matching a content that starts with `head`: (key, records, offset, partial).

        A content matches an entry when its first `head_bytes` bytes hash alike; the longest match wins.
        """
        with self._lock:
            known = {entry.head_bytes for entry in self._entries.values()}
            sizes = sorted(known | {int(key.rsplit(":", 1)[1]) for key in self._documents}, reverse=True)
            for size in sizes:
                if size > len(head) or size == 0:
                    continue
                key = content_key(head[:size])
                entry = self._entry(key)
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
        current = self._entry(position.key)
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
        self._changed.add(position.key)
        if position.replaces and position.replaces != position.key:
            self._entries.pop(position.replaces, None)
            self._changed.add(position.replaces)
        return True

    def _save(self) -> None:
        changed, self._changed = self._changed, set()
        if self._folder is not None:
            self._save_documents(self._folder, changed)
            return
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

    def _save_documents(self, folder: StateFolder, keys: set[str]) -> None:
        """Write the document of every changed content; remove those of contents replaced by a longer key."""
        for key in sorted(keys):
            entry = self._entries.get(key)
            if entry is not None:
                folder.document(key).save(asdict(entry))
            else:
                folder.dataset.discard(str(folder.document(key)))

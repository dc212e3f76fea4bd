"""Leases: which process writes which source of a dataset, and which one runs maintenance, at a time.

Every flowpipe process that writes a dataset (`collect`, `ingest`, `compact`, `retention --apply`) holds one
lease while it runs, the JSON document `<root>/_state/leases/<holder>.json`:

```json
{"holder": "k8s-node-3-4711-9f2c01ab", "host": "k8s-node-3", "pid": 4711, "command": "collect",
 "writer_id": "relay", "since": "...", "renewed": "...", "expires": "...",
 "claims": {"relay/relay.json": "the relay checkpoint relay.json (127.0.0.1:4245)"}}
```

Its `claims` name what the process works on, and no two live leases claim the same thing: `relay/<checkpoint>`
(a collector and its checkpoint), `file/<content>` (a file being ingested, by the hash of its first 4 KiB, so a
renamed or rotated copy is the same file), `maintenance` (compaction or retention). A process that asks for a
claim another live lease holds is refused with a `SourceClaimedError` naming the holder: command, host, pid and
since when.

A lease is **live** while it is renewed (a thread rewrites it every `RENEW_SECONDS`; it expires
`LEASE_SECONDS` after the last renewal) and, when it was taken on this host, while its process exists. So a
holder that crashed on this host is taken over at once, one on another host (a rescheduled pod) once its lease
expired. Dead leases are removed by the next process that takes a lease, which also removes the temporary files
their writer left (`dead_writers`).

What is guaranteed:

- **Local folder**: taking a lease happens under `flock` on the `leases` folder (the check and the write are one
  step), so two processes never both hold one claim. This holds on a network filesystem only where `flock` is
  shared between its clients (NFSv4 does, some others do not).
- **Object store** (no lock, no rename, no conditional write through pyarrow): a process writes its lease,
  waits `SETTLE_SECONDS`, and reads every lease again; where two live leases claim the same thing, the older
  one (by `since`, then holder) keeps it and the younger withdraws and is refused. With read-after-write
  consistency (S3, MinIO, ...) two processes that both see both leases decide alike. A process that did not see
  the other's lease after waiting holds its claim; the other one read the leases before that lease was written
  and wrote its own more than `SETTLE_SECONDS` later: only a process that stalls that long between reading the
  leases and writing its own can hold a claim together with another. It guards against accidents (a second
  collector started by mistake, a rerun while one is still running), not against a hostile writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from flowpipe.dataset.layout import STATE_DIR, Dataset, translate_write_errors
from flowpipe.errors import DatasetWriteError

log = logging.getLogger(__name__)

LEASES_DIR = "leases"
LEASE_SECONDS = 60.0
"""A lease not renewed for this long belongs to a process that is gone (on another host); it is taken over."""
RENEW_SECONDS = 15.0
"""How often a live process renews its lease."""
SETTLE_SECONDS = 1.0
"""On an object store: how long a process waits between writing its lease and reading the others back."""
MAINTENANCE = "maintenance"


class SourceClaimedError(DatasetWriteError):
    """Another live process holds a claim this one asked for (a source being written, or maintenance)."""

    def __init__(self, message: str, *, path: str, holder: Mapping[str, Any]) -> None:
        super().__init__(message, path=path)
        self.holder = dict(holder)


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_live(document: Mapping[str, Any], now: datetime | None = None) -> bool:
    """True while a lease is renewed and, taken on this host, its process exists."""
    expires = _parse_time(document.get("expires"))
    if expires is None or expires <= (now or _now()):
        return False
    if document.get("host") == socket.gethostname():
        pid = document.get("pid")
        return isinstance(pid, int) and _pid_exists(pid)
    return True


def describe_holder(document: Mapping[str, Any]) -> str:
    """`flowpipe collect on host X, pid 4711, since ... (renewed ...)` for messages."""
    return (
        f"flowpipe {document.get('command', '?')} on host {document.get('host', '?')}, "
        f"pid {document.get('pid', '?')}, since {document.get('since', '?')} "
        f"(lease renewed {document.get('renewed', '?')})"
    )


@dataclass(slots=True)
class Lease:
    """This process's lease on a dataset; see the module docstring. Use `take_lease`."""

    dataset: Dataset
    command: str
    writer_id: str | None
    claims: dict[str, str]
    holder: str = field(default_factory=lambda: _holder_token())
    since: str = field(default_factory=lambda: _now().isoformat())
    dead_writers: list[str] = field(default_factory=list)
    """Writer ids of dead leases found (and removed) when this one was taken."""
    lost: bool = False
    """Set when a renewal found the lease gone (taken over after a stall): others may now hold its claims."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """Where the lease document is stored."""
        return _lease_path(self.dataset, self.holder)

    def document(self) -> dict[str, Any]:
        """The lease document as stored (renewed now)."""
        now = _now()
        return {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.command,
            "writer_id": self.writer_id,
            "since": self.since,
            "renewed": now.isoformat(),
            "expires": (now + timedelta(seconds=LEASE_SECONDS)).isoformat(),
            "claims": dict(sorted(self.claims.items())),
        }

    def write(self) -> None:
        """Store the lease document (renewing it)."""
        _write_json(self.dataset, self.path, self.document())

    def renew(self) -> None:
        """Renew now; notes (and logs) a lease that another process removed as dead meanwhile."""
        if not self.dataset.exists(self.path) and not self.lost:
            self.lost = True
            log.error(
                "the lease %s was removed by another process (this one did not renew it for %.0f s); "
                "another process may now write the same sources",
                self.path,
                LEASE_SECONDS,
            )
        self.write()

    def start_renewing(self) -> None:
        """Renew every `RENEW_SECONDS` in a daemon thread until `release()`."""

        def loop() -> None:
            while not self._stop.wait(RENEW_SECONDS):
                try:
                    self.renew()
                except (DatasetWriteError, OSError, pa.ArrowException) as exc:
                    log.warning("cannot renew the lease %s: %s", self.path, exc)

        self._thread = threading.Thread(target=loop, name="flowpipe-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease document."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30.0)
        self.dataset.discard(self.path)


def _holder_token() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _leases_dir(dataset: Dataset) -> str:
    return f"{dataset.root.rstrip('/')}/{STATE_DIR}/{LEASES_DIR}"


def _lease_path(dataset: Dataset, holder: str) -> str:
    return f"{_leases_dir(dataset)}/{holder}.json"


def _write_json(dataset: Dataset, path: str, value: Mapping[str, Any]) -> None:
    data = json.dumps(value, indent=1, sort_keys=True).encode()
    if dataset.is_local:
        temp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
        with translate_write_errors(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temp, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        return
    with translate_write_errors(path), dataset.filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_leases(dataset: Dataset) -> list[dict[str, Any]]:
    """Every lease document of the dataset (live or not); unreadable or vanished ones are left out."""
    folder = _leases_dir(dataset)
    try:
        infos = dataset.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetWriteError(f"cannot list {folder}: {exc}", path=folder) from exc
    documents = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        if info.base_name.startswith("."):
            continue
        try:
            with dataset.filesystem.open_input_stream(info.path) as stream:
                value = json.loads(stream.read())
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException, ValueError) as exc:
            log.warning("ignoring the unreadable lease %s: %s", info.path, exc)
            continue
        if isinstance(value, dict) and isinstance(value.get("holder"), str):
            documents.append(value)
    return documents


@contextlib.contextmanager
def _leases_locked(dataset: Dataset) -> Iterator[None]:
    """On a local folder: hold `flock` on the leases folder (nothing on an object store)."""
    if not dataset.is_local:
        yield
        return
    folder = _leases_dir(dataset)
    with translate_write_errors(folder):
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _conflicts(lease: Lease, documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(claim, other live lease) for every claim of `lease` that another live lease also holds."""
    now = _now()
    found = []
    for document in documents:
        if document.get("holder") == lease.holder or not is_live(document, now):
            continue
        for claim in document.get("claims") or {}:
            if claim in lease.claims:
                found.append((claim, document))
    return found


def _refuse(lease: Lease, claim: str, holder: Mapping[str, Any], advice: str) -> SourceClaimedError:
    return SourceClaimedError(
        f"{lease.claims[claim]} in {lease.dataset.uri} is taken by {describe_holder(holder)}; {advice}",
        path=_lease_path(lease.dataset, str(holder.get("holder"))),
        holder=holder,
    )


def _remove_dead(lease: Lease, documents: list[dict[str, Any]]) -> None:
    now = _now()
    for document in documents:
        if document.get("holder") == lease.holder or is_live(document, now):
            continue
        writer = document.get("writer_id")
        if isinstance(writer, str) and writer:
            lease.dead_writers.append(writer)
        log.info("removing the lease of a process that is gone: %s", describe_holder(document))
        lease.dataset.discard(_lease_path(lease.dataset, str(document["holder"])))


def take_lease(
    dataset: Dataset,
    command: str,
    claims: Mapping[str, str],
    *,
    writer_id: str | None = None,
    advice: str = "wait for it to finish, or stop it",
    renew: bool = True,
) -> Lease:
    """Take a lease with `claims` (claim -> what it is, for messages); `SourceClaimedError` when one is held.

    `advice` ends the refusal message. The lease is renewed in the background until `release()`.
    """
    lease = Lease(dataset, command, writer_id, dict(claims))
    with _leases_locked(dataset):
        documents = read_leases(dataset)
        for claim, holder in _conflicts(lease, documents):
            raise _refuse(lease, claim, holder, advice)
        _remove_dead(lease, documents)
        lease.write()
    if not dataset.is_local and lease.claims:
        time.sleep(SETTLE_SECONDS)
        mine = (lease.since, lease.holder)
        for claim, holder in _conflicts(lease, read_leases(dataset)):
            if (str(holder.get("since")), str(holder.get("holder"))) < mine:
                lease.release()
                raise _refuse(lease, claim, holder, advice)
    if renew:
        lease.start_renewing()
    return lease


@contextlib.contextmanager
def holding_lease(
    dataset: Dataset, command: str, claims: Mapping[str, str], **options: Any
) -> Iterator[Lease]:
    """`take_lease` (same arguments) as a context manager: released on the way out, whatever happens."""
    lease = take_lease(dataset, command, claims, **options)
    try:
        yield lease
    finally:
        lease.release()

"""The file source: Hubble JSON exports (`hubble observe -o jsonpb`, exporter files, legacy lines, JSON arrays).

Reads each file as a stream of blocks of whole lines (`.gz` decompressed on the fly, whatever the name), so
memory stays flat for any file size, and hands each block to `normalize` (vectorized, with a per-line fallback
for blocks holding a bad line). Accepted inputs:

- one event per line: `GetFlowsResponse` / `ExportEvent` envelopes (`flow`, `lost_events`, `node_status`,
  `agent_event`, `debug_event`) or legacy bare `Flow` objects;
- a JSON array of such objects (`[ {...}, {...} ]`, any layout);
- such objects pretty-printed (over several lines each: a flow saved from a browser, `jq .` output), one or
  several one after the other;
- Hubble exporter files: `events.log`, rotated backups `events-2024-01-01T00-00-00.000.log`, `.gz` backups,
  given one by one or as the directory holding them (read oldest first);
- `-` for standard input; a live one (`hubble observe -f -o jsonpb | flowpipe ingest -`) is ingested as it
  arrives: after a second of quiet, the whole lines read so far are decoded without waiting for a full block.

Bad lines are reported as `FlowDecodeError` (path, line, reason) and skipped; `strict=True` raises the first.
With a `checkpoint_path`, content already made durable is skipped (see `_file_state`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from flowpipe.dataset.layout import StateFile
from flowpipe.errors import ConfigError, FlowDecodeError, SourceError
from flowpipe.model import EventBatch, empty_flows
from flowpipe.sources.file._reader import (
    PAUSE,
    REASON_TRUNCATED,
    Block,
    LineBlocks,
    Reader,
    Truncated,
    array_items,
    decode_in_order,
    looks_pretty_printed,
    object_items,
)
from flowpipe.sources.file._state import HEAD_BYTES, FilePosition, FileState, StateFolder, content_key
from flowpipe.transforms._json import DecodedEvents, decode_lines, decode_objects, guess_block_layout
from flowpipe.transforms._json_schema import ENVELOPE

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 * 1024 * 1024
"""Bytes of whole lines decoded at once (and the size of one EventBatch's input). Each block also costs a few
milliseconds whatever its size (parser set-up, a few hundred column operations): 16 MiB blocks measured about 5%
less CPU per flow for about 100 MB more peak RSS."""
MAX_LINE_BYTES = 64 * 1024 * 1024
"""A longer line is reported (`line_too_long`) and skipped instead of growing memory without bound."""
ARRAY_BATCH_ITEMS = 10_000
MAX_LOGGED_ERRORS = 20
"""Decode errors logged (as warnings) per source; the rest are only counted in the summary."""
DECODE_THREADS = 2
"""Blocks decoded at once (memory grows with it); on machines with more cores each block's parse is threaded."""
STDIN = "-"

REASON_UNKNOWN_EVENT = "unknown_event"

_UTF8_BOM = b"\xef\xbb\xbf"
_INPUT_SUFFIXES = (".log", ".json", ".jsonl", ".ndjson", ".jsonpb")
# lumberjack's rotated backups: <name>-<YYYY-MM-DDTHH-MM-SS.mmm><ext>[.gz]
_BACKUP = re.compile(
    r"(?P<stem>.+)-(?P<time>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})(?P<ext>\.[^.]+)(\.gz)?"
)


@dataclass(slots=True)
class FileIngestSummary:
    """What the file source read: flows, counted events, and lines skipped by reason."""

    files: int = 0
    flows: int = 0
    lost_event_records: Counter[str] = field(default_factory=Counter)
    """`lost_events` records by source (HUBBLE_RING_BUFFER, PERF_EVENT_RING_BUFFER, ...)."""
    events_lost: Counter[str] = field(default_factory=Counter)
    """Sum of `num_events_lost` by source."""
    node_status: int = 0
    agent_events: int = 0
    debug_events: int = 0
    lines_skipped: Counter[str] = field(default_factory=Counter)
    """Lines not ingested, by reason: invalid_json, not_an_object, invalid_value, truncated, line_too_long,
    unknown_event (valid JSON of an event kind flowpipe does not read)."""
    lines_already_ingested: int = 0
    """Lines skipped because the checkpoint says they are already in the dataset."""
    unreadable: list[str] = field(default_factory=list)
    """One message per input from which nothing could be read (it had lines, and every one was skipped)."""

    @property
    def decode_errors(self) -> int:
        """Lines skipped because they could not be decoded (everything but unknown events)."""
        return sum(n for reason, n in self.lines_skipped.items() if reason != REASON_UNKNOWN_EVENT)


class FileSource:
    """Hubble JSON files (or stdin) → EventBatches, one per block; `commit` records durable progress.

    >>> source = FileSource(["events.log"], checkpoint_path="data/_state/files.json")  # doctest: +SKIP
    >>> for batch in source.batches():  # doctest: +SKIP
    ...     write(batch.flows); source.commit(batch.position)
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        checkpoint_path: str | os.PathLike[str] | StateFile | StateFolder | None = None,
        cluster_name: str | None = None,
        strict: bool = False,
        block_bytes: int = BLOCK_BYTES,
        stdin: BinaryIO | None = None,
    ) -> None:
        if not paths:
            raise ConfigError("no input files given")
        if block_bytes <= 0:
            raise ConfigError(f"block_bytes must be > 0, got {block_bytes}")
        self.paths = expand_paths(paths)
        self.cluster_name = cluster_name or None
        self.strict = strict
        self.block_bytes = block_bytes
        self.summary = FileIngestSummary()
        self._state = FileState(checkpoint_path)
        # Per content key, (records, offset, partial) read in this run: the same content given twice (a file and
        # its .gz copy, say) is read once even before anything is durable.
        self._read: dict[str, tuple[int, int, bool]] = {}
        self._stdin = stdin
        self._closed = threading.Event()
        self._logged_errors = 0
        self._first_error: dict[str, str] = {}
        # Blocks are decoded this many at a time (pyarrow parses and computes without the GIL).
        self.decode_threads = max(1, min(DECODE_THREADS, os.cpu_count() or 1))

    # -- Source protocol -------------------------------------------------------------------------------

    def batches(self) -> Iterator[EventBatch]:
        """Yield one EventBatch per block of every file, in order; each carries its `FilePosition`."""
        for path in self.paths:
            if self._closed.is_set():
                return
            yield from self._read_file(path)

    def commit(self, position: object) -> None:
        """Record that everything up to `position` (a FilePosition from a batch) is durable."""
        self.commit_many([position])

    def commit_many(self, positions: Sequence[object]) -> None:
        """Record several positions (in batch order) at once: the checkpoint is written once for all of them."""
        durable: list[FilePosition] = []
        for position in positions:
            if position is None:
                continue
            if not isinstance(position, FilePosition):
                raise TypeError(f"not a file position: {position!r}")
            durable.append(position)
        if durable:
            self._state.commit_many(durable)

    def close(self) -> None:
        """Stop reading after the current block (safe to call from another thread)."""
        self._closed.set()

    # -- one file --------------------------------------------------------------------------------------

    def _read_file(self, path: str) -> Iterator[EventBatch]:
        name = "<stdin>" if path == STDIN else path
        try:
            raw: BinaryIO = self._stdin_buffer() if path == STDIN else open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        self.summary.files += 1
        try:
            reader = Reader(raw, self.block_bytes)
            head = reader.head(HEAD_BYTES)
            key = content_key(head)
            old_key, records, offset, partial = self._state.find(head)
            in_run = self._read.get(key)
            if in_run is not None and in_run[0] > records:
                records, offset, partial = in_run
            start = _Start(
                path=name,
                key=key,
                replaces=old_key if old_key not in (None, key) else None,
                records=records,
                offset=offset,
                partial=partial,
            )
            before = self._read_counts()
            if head.removeprefix(_UTF8_BOM).lstrip()[:1] == b"[":
                yield from self._read_items(reader, start, array_items(reader, name))
            elif looks_pretty_printed(head):
                yield from self._read_items(reader, start, object_items(reader, name))
            else:
                yield from self._read_lines(reader, start)
            if not self._closed.is_set():
                self._check_something_read(name, before)
        except OSError as exc:
            raise SourceError(f"{name}: read failed: {exc.strerror or exc}") from exc
        finally:
            if path != STDIN:
                raw.close()

    def _stdin_buffer(self) -> BinaryIO:
        if self._stdin is not None:
            return self._stdin
        if sys.stdin is None:  # the process was started with standard input closed
            raise SourceError(
                "<stdin>: standard input is closed, nothing to read (`-` reads flows piped in, "
                "e.g. `hubble observe -o jsonpb | flowpipe ingest -`)"
            )
        return sys.stdin.buffer

    def _read_lines(self, reader: Reader, start: _Start) -> Iterator[EventBatch]:
        name = start.path
        split = LineBlocks(reader, name, self.block_bytes, MAX_LINE_BYTES)
        if start.records:
            try:
                split.offset = reader.skip(start.offset, start.partial)
            except Truncated as exc:
                split.truncated = exc
            split.records = start.records
            self.summary.lines_already_ingested += start.records
        layout: list[str] = []  # guessed from the first block, then kept for the file

        def guessed(blocks: Iterator[Block]) -> Iterator[Block]:
            for block in blocks:
                if not layout and block.error is None:
                    layout.append(guess_block_layout(block.data))
                yield block

        def decode(block: Block) -> DecodedEvents:
            if block.error is not None:
                return DecodedEvents(errors=[block.error])
            return decode_lines(
                block.data,
                path=name,
                first_line=block.first_line,
                cluster_name=self.cluster_name,
                layout=layout[0] if layout else ENVELOPE,
                threads=self.decode_threads <= 1 or (os.cpu_count() or 1) > DECODE_THREADS,
                line_count=block.records - block.first_line + 1,
            )

        for block, decoded in decode_in_order(
            decode, guessed(split.blocks(self._closed)), self.decode_threads
        ):
            if self._closed.is_set():
                return  # blocks decoded ahead are dropped: their position was never handed out
            yield self._emit(decoded, start, block.records, block.offset)
        if split.discarding or self._closed.is_set():
            return
        records, offset = split.records, split.offset
        partial = False
        errors: list[FlowDecodeError] = []
        decoded = DecodedEvents()
        if split.carry.strip():
            # The last line has no newline: a file still being written, or cut short.
            decoded = decode_lines(
                split.carry,
                path=name,
                first_line=records + 1,
                cluster_name=self.cluster_name,
                layout=layout[0] if layout else ENVELOPE,
            )
            if decoded.errors:
                decoded = DecodedEvents()
                if split.truncated is None:
                    errors.append(
                        FlowDecodeError(
                            "the last line is incomplete (no newline at the end of the file and not valid JSON); "
                            "it is read again next time",
                            path=name,
                            line_number=records + 1,
                            reason=REASON_TRUNCATED,
                        )
                    )
            else:
                records += 1
                offset += len(split.carry)
                partial = True
        if split.truncated is not None:
            errors.append(
                FlowDecodeError(
                    f"{split.truncated}; every line up to line {records} was read, the rest of the file is lost",
                    path=name,
                    line_number=records + 1,
                    reason=REASON_TRUNCATED,
                )
            )
        decoded.errors.extend(errors)
        if decoded.flows.num_rows or decoded.errors or decoded.lost_events or partial:
            yield self._emit(decoded, start, records, offset, partial=partial)

    def _read_items(
        self, reader: Reader, start: _Start, values: Iterator[tuple[int, object | FlowDecodeError]]
    ) -> Iterator[EventBatch]:
        """Batches of the JSON values of an array or of pretty-printed objects; records are values, not lines.

        A FlowDecodeError among the values is a value skipped (pretty-printed objects go on after it); one
        raised ends the file (an array cannot be read past a syntax error).
        """
        name = start.path
        records = 0
        items: list[tuple[int, object]] = []
        errors: list[FlowDecodeError] = []
        skipped = 0

        def decoded() -> DecodedEvents:
            events = decode_objects(items, path=name, cluster_name=self.cluster_name)
            events.errors.extend(errors)
            return events

        try:
            for line_number, item in values:
                if records < start.records and item is not PAUSE:
                    records += 1
                    skipped += 1
                    continue
                if item is PAUSE:  # a live stream paused: hand on what was read
                    if items or errors:
                        yield self._emit(decoded(), start, records, 0)
                        items, errors = [], []
                    continue
                records += 1
                if isinstance(item, FlowDecodeError):
                    errors.append(item)
                else:
                    items.append((line_number, item))
                if len(items) + len(errors) >= ARRAY_BATCH_ITEMS:
                    yield self._emit(decoded(), start, records, 0)
                    items, errors = [], []
                    if self._closed.is_set():
                        return
        except FlowDecodeError as exc:
            errors.append(exc)
            self.summary.lines_already_ingested += skipped
            yield self._emit(decoded(), start, records, 0)
            return
        self.summary.lines_already_ingested += skipped
        if items or errors:
            yield self._emit(decoded(), start, records, 0)

    def _read_counts(self) -> tuple[int, int, int]:
        """Events read, lines skipped and lines already ingested so far."""
        summary = self.summary
        events = summary.flows + sum(summary.lost_event_records.values()) + summary.node_status
        events += summary.agent_events + summary.debug_events
        return events, sum(summary.lines_skipped.values()), summary.lines_already_ingested

    def _check_something_read(self, name: str, before: tuple[int, int, int]) -> None:
        """Note an input of which every line was skipped (not one event read): the ingest fails for it."""
        events, skipped, already = (now - then for now, then in zip(self._read_counts(), before, strict=True))
        if events or already or not skipped:
            return
        first = self._first_error.get(name)
        self.summary.unreadable.append(
            f"{name}: nothing could be read: {skipped:,} line(s) or value(s) skipped, none held a Hubble event"
            + (f" (first: {first})" if first else " (valid JSON of no event kind flowpipe reads)")
            + "; expected `hubble observe -o jsonpb` or `-o json` lines, a Hubble exporter file, a JSON array of "
            "flows, or pretty-printed flow objects"
        )

    def _emit(
        self, decoded: DecodedEvents, start: _Start, records: int, offset: int, *, partial: bool = False
    ) -> EventBatch:
        """Account a decoded block in the summary and wrap it as an EventBatch (strict: raise its first error)."""
        if decoded.errors and self.strict:
            raise decoded.errors[0]
        summary = self.summary
        summary.flows += decoded.flows.num_rows
        for lost in decoded.lost_events:
            summary.lost_event_records[lost.source] += 1
            summary.events_lost[lost.source] += lost.num_events_lost
        summary.node_status += decoded.node_status
        summary.agent_events += decoded.agent_events
        summary.debug_events += decoded.debug_events
        if decoded.unknown_events:
            summary.lines_skipped[REASON_UNKNOWN_EVENT] += decoded.unknown_events
        for error in decoded.errors:
            summary.lines_skipped[error.reason] += 1
            self._first_error.setdefault(start.path, str(error))
            self._logged_errors += 1
            if self._logged_errors <= MAX_LOGGED_ERRORS:
                log.warning("%s", error)
            elif self._logged_errors == MAX_LOGGED_ERRORS + 1:
                log.warning("more lines could not be decoded; they are counted in the summary, not logged")
        if records > self._read.get(start.key, (0, 0, False))[0]:
            self._read[start.key] = (records, offset, partial)
        position = FilePosition(
            path=start.path,
            key=start.key,
            records=records,
            offset=offset,
            partial=partial,
            replaces=start.replaces,
        )
        return EventBatch(
            flows=decoded.flows if decoded.flows.num_rows else empty_flows(),
            lost_events=decoded.lost_events,
            node_status=decoded.node_status,
            decode_errors=list(decoded.errors),
            position=position,
        )


def read_events(
    paths: Sequence[str | os.PathLike[str]],
    *,
    cluster_name: str | None = None,
    strict: bool = False,
    checkpoint_path: str | os.PathLike[str] | StateFile | StateFolder | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Iterator[EventBatch]:
    """Event batches of Hubble JSON files, without a pipeline (benchmarks, notebooks, tests).

    >>> flows = sum(batch.flows.num_rows for batch in read_events(["flows.json"]))  # doctest: +SKIP
    """
    source = FileSource(
        paths,
        cluster_name=cluster_name,
        strict=strict,
        checkpoint_path=checkpoint_path,
        block_bytes=block_bytes,
    )
    return source.batches()


CLAIM_BYTES = 4096
"""An input file is claimed (one ingest at a time) by the hash of this many first bytes of its content."""


def input_claims(paths: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """The lease claims of the input files (`file/<hash of the first 4 KiB of the content>` -> "the input file
    PATH"), so that two ingests never read the same content at once, whatever its name (see `flowpipe.dataset.leases`).
    Standard input and empty or unreadable files claim nothing (the source reports what it cannot read)."""
    claims: dict[str, str] = {}
    for path in expand_paths(paths):
        if path == STDIN:
            continue
        try:
            with open(path, "rb") as raw:
                head = Reader(raw, CLAIM_BYTES).head(CLAIM_BYTES)
        except OSError:
            continue
        if head:
            claims.setdefault(f"file/{content_key(head)}", f"the input file {path}")
    return claims


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Input paths as files to read: directories become their export files, oldest first; duplicates go.

    Raises ConfigError for a path that does not exist or a directory without export files, SourceError for a
    path the system refuses (a name too long).
    """
    out: list[str] = []
    seen: set[str] = set()
    for given in paths:
        text = os.fspath(given)
        if text == STDIN:
            out.append(STDIN)
            continue
        path = Path(text)
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):  # said below
            pass
        except OSError as exc:  # a name too long, a loop of links
            raise SourceError(f"{text}: cannot read: {exc.strerror or exc}") from exc
        if path.is_dir():
            files = export_files(path)
            if not files:
                raise ConfigError(
                    f"{text}: no Hubble export files in this directory "
                    f"(looked for {', '.join('*' + s for s in _INPUT_SUFFIXES)} and their .gz)"
                )
        elif path.exists():
            files = [text]
        else:
            raise ConfigError(f"{text}: no such file or directory")
        for file in files:
            real = os.path.realpath(file)
            if real not in seen:
                seen.add(real)
                out.append(file)
    return out


def export_files(directory: Path) -> list[str]:
    """The export files of a directory, oldest first.

    Rotated backups (`events-2024-01-01T00-00-00.000.log[.gz]`) come in time order before the active file
    (`events.log`) of the same name; other files follow their names. Hidden and `_`-prefixed files are skipped.
    """

    def order(name: str) -> tuple[str, int, str, str]:
        match = _BACKUP.fullmatch(name)
        if match:
            return (match["stem"] + match["ext"], 0, match["time"], name)
        return (name.removesuffix(".gz"), 1, "", name)

    names = [
        entry.name
        for entry in directory.iterdir()
        if entry.is_file()
        and not entry.name.startswith((".", "_"))
        and entry.name.removesuffix(".gz").endswith(_INPUT_SUFFIXES)
    ]
    return [str(directory / name) for name in sorted(names, key=order)]


@dataclass(frozen=True, slots=True)
class _Start:
    """Where reading a file starts: its content key and what is already read (durable or in this run)."""

    path: str
    key: str
    replaces: str | None
    records: int
    offset: int
    partial: bool

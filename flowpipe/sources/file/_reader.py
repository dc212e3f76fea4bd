"""Reading export files for the file source: decompression, blocks of whole lines, JSON array elements.

Everything here streams: a file is never held whole in memory, whatever its size. A live stream (a pipe, a
terminal: `hubble observe -f -o jsonpb | flowpipe ingest -`) is read as its data arrives; when it has been
quiet for `IDLE_SECONDS`, the whole lines read so far are handed on as a block instead of waiting for a full
one, so a slow stream is ingested continuously.
"""

from __future__ import annotations

import codecs
import json
import os
import select
import stat
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from flowpipe.errors import FlowDecodeError
from flowpipe.transforms._json import TOO_DEEP, loads

GZIP_MAGIC = b"\x1f\x8b"
COMPRESSED_READ_BYTES = 1024 * 1024
STREAM_READ_BYTES = 1024 * 1024
IDLE_SECONDS = 1.0
"""A live stream quiet for this long has its whole lines read so far decoded (a partial block)."""
MAX_VALUE_BYTES = 64 * 1024 * 1024
"""A JSON value (an array element, a pretty-printed object) longer than this is reported, not read into memory."""
REASON_TRUNCATED = "truncated"
REASON_LINE_TOO_LONG = "line_too_long"

IDLE = None
"""Marks a pause in a live stream among the chunks of content (`Chunk`)."""
PAUSE = "\x00pause"
"""Marks a pause of a live stream among JSON values (`object_items`)."""
Chunk = bytes | None

T = TypeVar("T")


class Truncated(Exception):
    """The compressed stream ended early or is corrupt; everything before it was delivered."""


@dataclass(frozen=True, slots=True)
class Block:
    """Whole lines to decode (or a line-level error), with the line count and offset after them."""

    data: bytes
    first_line: int
    records: int
    offset: int
    error: FlowDecodeError | None = None
    flush: bool = False
    """The input paused after this block: decode and deliver it (and those before it) before reading on."""


class LineBlocks:
    """Cuts a content into blocks of whole lines; what is left at the end stays in `carry`."""

    def __init__(self, reader: Reader, name: str, block_bytes: int, max_line_bytes: int) -> None:
        self.reader = reader
        self.name = name
        self.block_bytes = block_bytes
        self.max_line_bytes = max_line_bytes
        self.records = 0
        self.offset = 0
        self.carry = b""
        self.discarding = False  # inside a line that is too long, until its newline
        self.truncated: Truncated | None = None
        self._held = False  # a block was handed on since the input last paused

    def blocks(self, closed: threading.Event) -> Iterator[Block]:
        """The blocks, in order; a compressed stream's break ends them and is kept in `truncated`.

        Content is gathered up to `block_bytes` (or up to a pause of a live stream) and cut after its last
        newline; what follows the cut waits in `carry` for the rest of its line.
        """
        if self.truncated is not None:
            return
        pieces: list[bytes] = []
        size = 0
        try:
            for chunk in self.reader.chunks():
                if closed.is_set():
                    return
                if chunk is not IDLE:
                    pieces.append(chunk)
                    size += len(chunk)
                    if size < self.block_bytes:
                        continue
                if pieces:
                    for block in self._cut(pieces, flush=chunk is IDLE):
                        self._held = not block.flush
                        yield block
                    pieces, size = [], 0
                if chunk is IDLE and self._held:
                    # A pause with no new whole line: the blocks handed on before it must not wait for more.
                    self._held = False
                    yield Block(b"", self.records + 1, self.records, self.offset, flush=True)
        except Truncated as exc:
            self.truncated = exc
        if pieces:  # the end of the content, or the last bytes before a break
            yield from self._cut(pieces, flush=False)

    def _cut(self, pieces: list[bytes], *, flush: bool) -> Iterator[Block]:
        chunk = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self.discarding:
            cut = chunk.find(b"\n")
            if cut < 0:
                self.offset += len(chunk)
                return
            self.offset += cut + 1
            self.records += 1
            chunk, self.discarding = chunk[cut + 1 :], False
        while True:
            # `carry` never holds a newline, so the last newline of carry + chunk is the last one of chunk.
            cut = chunk.rfind(b"\n")
            if cut < 0:
                if len(self.carry) + len(chunk) > self.max_line_bytes:
                    # Too long already: let it go before it is joined (memory stays within the cap).
                    self.offset += len(self.carry) + len(chunk)
                    self.carry, self.discarding = b"", True
                    yield Block(
                        b"", self.records + 1, self.records, self.offset, self._too_long(), flush=flush
                    )
                else:
                    self.carry += chunk
                return
            long_line = self._long_line(chunk, cut)
            if long_line is None:
                break
            # Whole lines before the long one go on as a block; the long one is an error; the rest is cut again.
            begin, newline = long_line
            if begin:
                yield self._block(chunk, begin - 1, flush=flush)
                self.carry = b""  # the long line begins in `chunk`
            line_number = self.records + 1
            self.records += 1
            self.offset += len(self.carry) + newline + 1 - begin
            self.carry, chunk = b"", chunk[newline + 1 :]
            yield Block(b"", line_number, self.records, self.offset, self._too_long(line_number), flush=flush)
        yield self._block(chunk, cut, flush=flush)

    def _block(self, chunk: bytes, cut: int, *, flush: bool) -> Block:
        """`carry` and the whole lines of `chunk` up to its newline at `cut`, as a block; the rest is carried."""
        head = memoryview(chunk)[: cut + 1]
        data = b"".join((self.carry, head)) if self.carry else bytes(head) if cut + 1 < len(chunk) else chunk
        self.carry = chunk[cut + 1 :]
        first = self.records + 1
        self.records += data.count(b"\n")
        self.offset += len(data)
        return Block(data, first, self.records, self.offset, flush=flush)

    def _long_line(self, chunk: bytes, cut: int) -> tuple[int, int] | None:
        """The first line longer than the cap among `carry` + `chunk[: cut + 1]`, as (where it begins in `chunk`,
        its newline), or None. Only the first line (it continues `carry`) can be long when the chunk is
        shorter than the cap; a longer chunk is searched line by line."""
        newline = chunk.find(b"\n")
        if len(self.carry) + newline > self.max_line_bytes:
            return 0, newline
        if cut - newline <= self.max_line_bytes:
            return None
        begin = newline + 1
        while begin <= cut:
            newline = chunk.find(b"\n", begin)
            if newline - begin > self.max_line_bytes:
                return begin, newline
            begin = newline + 1
        return None

    def _too_long(self, line_number: int | None = None) -> FlowDecodeError:
        return FlowDecodeError(
            f"line longer than {self.max_line_bytes} bytes; skipped",
            path=self.name,
            line_number=self.records + 1 if line_number is None else line_number,
            reason=REASON_LINE_TOO_LONG,
        )


def decode_in_order(
    decode: Callable[[Block], T], blocks: Iterator[Block], threads: int
) -> Iterator[tuple[Block, T]]:
    """Decode blocks on `threads` threads (the parsers release the GIL), yielding results in input order.

    A block marked `flush` (the input paused) is delivered with every block before it before reading on; an
    empty one only delivers those before it.
    """
    if threads <= 1:
        for block in blocks:
            if block.data or block.error is not None:
                yield block, decode(block)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flowpipe-decode")
    pending: deque[tuple[Block, Future[T]]] = deque()
    try:
        for block in blocks:
            if block.data or block.error is not None:
                pending.append((block, pool.submit(decode, block)))
            while pending and (len(pending) >= threads or block.flush):
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Reader:
    """A file's decompressed content as chunks, with look-ahead (`head`) and skipping of what is read.

    The chunks of a live stream include `IDLE` marks where it paused (see `raw_chunks`).
    """

    def __init__(self, raw: BinaryIO, block_bytes: int) -> None:
        self._stream = decompressed(raw_chunks(raw, block_bytes), block_bytes)
        self._pending: list[Chunk] = []
        self._error: Truncated | None = None

    def head(self, size: int) -> bytes:
        """The first `size` bytes of the content (or all of it, or what a live stream had when it paused),
        without consuming them."""
        have = sum(len(chunk) for chunk in self._pending if chunk is not IDLE)
        while have < size and self._error is None:
            try:
                chunk = next(self._stream)
            except StopIteration:
                break
            except Truncated as exc:
                self._error = exc  # raised again, in order, by chunks()
                break
            self._pending.append(chunk)
            if chunk is IDLE:
                if have:
                    break
                continue
            have += len(chunk)
        return b"".join(chunk for chunk in self._pending if chunk is not IDLE)[:size]

    def chunks(self) -> Iterator[Chunk]:
        """The content from the current position on; raises Truncated where the compressed data breaks."""
        # No `yield from self._stream`: a caller that stops early (skip) closes this generator, and that must
        # not close the underlying stream, which later calls go on reading.
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            if self._error is not None:
                raise self._error
            try:
                chunk = next(self._stream)
            except StopIteration:
                return
            yield chunk

    def skip(self, offset: int, partial: bool) -> int:
        """Consume the first `offset` bytes (and the newline that ends a partial last line); bytes consumed."""
        left = offset
        for chunk in self.chunks():
            if chunk is IDLE:
                continue
            if len(chunk) > left:
                self._pending.insert(0, chunk[left:])
                left = 0
                break
            left -= len(chunk)
            if left == 0:
                break
        consumed = offset - left
        if partial:
            # The last line read had no newline then; if it has one now, it belongs to that line.
            for chunk in self.chunks():
                if chunk is IDLE:
                    continue
                if chunk[:1] == b"\n":
                    chunk, consumed = chunk[1:], consumed + 1
                if chunk:
                    self._pending.insert(0, chunk)
                break
        return consumed


def raw_chunks(raw: BinaryIO, block_bytes: int) -> Iterator[Chunk]:
    """The bytes of an open file: `block_bytes` reads of a regular file; what a live stream (pipe, terminal)
    has as it arrives, with `IDLE` each time it has been quiet for `IDLE_SECONDS`."""
    try:
        fd = raw.fileno()
        live = not stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        live = False
    if not live:
        while chunk := raw.read(block_bytes):
            yield chunk
        return
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], IDLE_SECONDS)
        except (OSError, ValueError):  # not selectable here: plain blocking reads
            ready = [fd]
        if not ready:
            yield IDLE
            continue
        chunk = os.read(fd, STREAM_READ_BYTES)
        if not chunk:
            return
        yield chunk


def decompressed(chunks: Iterator[Chunk], block_bytes: int) -> Iterator[Chunk]:
    """The content of plain or gzip chunks (detected by the magic bytes, multi-member aware), in chunks.

    `IDLE` marks pass through. Every byte that can be decompressed is yielded before `Truncated` is raised
    for a cut or corrupt file.
    """
    data = b""
    for chunk in chunks:  # enough bytes to see the magic
        if chunk is IDLE:
            continue
        data += chunk
        if len(data) >= len(GZIP_MAGIC):
            break
    if not data.startswith(GZIP_MAGIC):
        if data:
            yield data
        yield from chunks
        return
    decompressor = zlib.decompressobj(wbits=31)
    in_member = True
    while True:
        if not data:
            chunk = next(chunks, b"")
            if chunk is IDLE:
                yield IDLE
                continue
            data = chunk
            if not data:
                if in_member:
                    tail = decompressor.flush()
                    if tail:
                        yield tail
                    if not decompressor.eof:
                        raise Truncated("compressed data ends early (truncated .gz file)")
                return
        if not in_member:
            if not data.strip(b"\x00"):  # zero padding after the last member
                data = b""
                continue
            decompressor, in_member = zlib.decompressobj(wbits=31), True
        try:
            out = decompressor.decompress(data, block_bytes)
        except zlib.error as exc:
            raise Truncated(f"corrupt compressed data ({exc})") from exc
        if out:
            yield out
        if decompressor.eof:
            data, in_member = decompressor.unused_data, False
        else:
            data = decompressor.unconsumed_tail


class _Paused(Exception):
    """A live stream paused in the middle of a JSON value (it is read again from its start)."""


class _JsonText:
    """The decoded text of a content, read on demand, with the line number of the current position."""

    def __init__(self, reader: Reader, name: str, *, pauses: bool = False) -> None:
        self.name = name
        self.decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self.chunks = reader.chunks()
        self.text, self.pos, self.line, self.eof = "", 0, 1, False
        self.pauses = pauses
        """Whether `peek` reports a pause of a live stream (as `PAUSE`) instead of waiting for more."""
        self.paused = False

    def more(self) -> bool:
        """Read the next chunk (False at the end); text before the position is let go.

        With `pauses`, a pause of a live stream returns True with no new text and sets `paused`.
        """
        if self.eof:
            return False
        try:
            chunk = next(self.chunks)
            while chunk is IDLE:
                if self.pauses:
                    self.paused = True
                    return True
                chunk = next(self.chunks)
        except StopIteration:
            self.eof = True
            return False
        except Truncated as exc:
            raise FlowDecodeError(
                f"{exc}; the file is read up to here",
                path=self.name,
                line_number=self.line_number(),
                reason=REASON_TRUNCATED,
            ) from exc
        self.line += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :] + self.utf8.decode(chunk), 0
        return True

    def line_number(self, pos: int | None = None) -> int:
        """The line of `pos` (default: the current position)."""
        return self.line + self.text.count("\n", 0, self.pos if pos is None else pos)

    def peek(self) -> str:
        """The next non-blank character ("" at the end, `PAUSE` at a pause with `pauses`), skipping blanks."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]
            if self.paused:
                self.paused = False
                return PAUSE

    def fail(self, message: str) -> FlowDecodeError:
        return FlowDecodeError(
            message,
            path=self.name,
            line_number=self.line_number(),
            reason=REASON_TRUNCATED if self.eof and self.pos >= len(self.text) else "invalid_json",
        )

    def value(self, what: str, max_bytes: int) -> tuple[int, object]:
        """The JSON value at the position (after `peek`), with the line it starts on; the position moves past it.

        Invalid JSON raises a FlowDecodeError naming the line of the error; so does a value longer than
        `max_bytes` (it is not read further).
        """
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except RecursionError:
                raise FlowDecodeError(
                    f"invalid JSON {what}: {TOO_DEEP}",
                    path=self.name,
                    line_number=self.line_number(),
                    reason="invalid_json",
                ) from None
            except json.JSONDecodeError as exc:
                if len(self.text) - self.pos <= max_bytes and self.more():
                    if self.paused:  # a live stream paused inside the value: say so, read it again later
                        self.paused = False
                        raise _Paused from None
                    continue
                line, start = self.line + exc.lineno - 1, self.line_number()
                where = "" if line == start else f" (in the value that starts on line {start})"
                error = FlowDecodeError(
                    f"invalid JSON {what}: {exc.msg}{where}",
                    path=self.name,
                    line_number=line,
                    reason=REASON_TRUNCATED
                    if self.eof and exc.pos >= len(self.text.rstrip())
                    else "invalid_json",
                )
                raise error from exc
            if end == len(self.text) and self.more():
                if self.paused:  # the stream paused right after the value: it is whole
                    self.paused = False
                    break
                continue  # a value cut at the end of a chunk (a number, say): read on and decode it again
            break
        line = self.line_number()
        self.pos = end
        return line, value

    def skip_to_line_starting(self, char: str) -> bool:
        """Move to the next line that starts with `char` (False at the end: nothing left)."""
        while True:
            found = self.text.find("\n" + char, self.pos)
            if found >= 0:
                self.pos = found + 1
                return True
            self.pos = max(self.pos, len(self.text) - 1)
            if not self.more():
                self.pos = len(self.text)
                return False


def array_items(reader: Reader, name: str) -> Iterator[tuple[int, object]]:
    """The elements of a JSON array, streamed, each with the line it starts on.

    A syntax error ends the array (there is no way to find the next element); it is raised as a
    FlowDecodeError after every element before it was yielded.
    """
    text = _JsonText(reader, name)
    if text.peek() != "[":
        raise text.fail("expected a JSON array")
    text.pos += 1
    first = True
    while True:
        char = text.peek()
        if char == "]":
            return
        if not first:
            if char != ",":
                raise text.fail(
                    "invalid JSON array: expected ',' or ']'" if char else "the JSON array is not closed"
                )
            text.pos += 1
            char = text.peek()
        if not char:
            raise text.fail("the JSON array is not closed")
        yield text.value("in array", MAX_VALUE_BYTES)
        first = False


def object_items(reader: Reader, name: str) -> Iterator[tuple[int, object | FlowDecodeError]]:
    """The JSON values of a content of values one after the other (pretty-printed objects, `jq .` output), each
    with the line it starts on.

    A value that is not valid JSON is yielded as a FlowDecodeError naming its line; reading goes on at the next
    line that starts with `{` (a top-level object of a pretty-printed file starts a line). Where a live stream
    paused (`hubble observe -f -o json | jq .`), `PAUSE` is yielded in place of a value.
    """
    text = _JsonText(reader, name, pauses=True)
    while char := text.peek():
        if char == PAUSE:
            yield 0, PAUSE  # a live stream paused: what was read so far is handed on now
            continue
        try:
            yield text.value("object", MAX_VALUE_BYTES)
        except _Paused:
            yield 0, PAUSE
        except FlowDecodeError as exc:
            yield exc.line_number or 0, exc
            if exc.reason == REASON_TRUNCATED or not text.skip_to_line_starting("{"):
                return


def looks_pretty_printed(head: bytes) -> bool:
    """Whether a content starting with `head` holds JSON objects spread over several lines each (pretty-printed:
    a flow saved from a browser, `jq .` output), rather than one object per line."""
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if not text.startswith("{"):
        return False
    first, newline, _ = text.partition("\n")
    if not newline:
        return False
    if first.rstrip().endswith(("{", "[", ",", ":")):
        return True  # a line of JSON lines ends its object with `}`
    try:
        loads(first)
        return False
    except ValueError:
        pass
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return False
    return "\n" in text[:end]

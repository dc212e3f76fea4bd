"""Frames between the collector and its receiving process, over one end each of a Unix socketpair.

```
frame   = kind (1 byte) | count (u32) | size (u64) | payload (size bytes)
batch   = kind b"B": payload = count message lengths (u32 each) | the messages back to back
decoded = kind b"D": payload = an Arrow IPC stream of count rows of the flow table
others  = a JSON document (kind b"E": a call ended), or a serialised request (kind b"S"), or nothing
```

The receiving process decodes the flows it reads and hands them over as flow-table rows (`D`); the responses
that are not flows (lost events, node status), and a batch it cannot decode, cross as messages (`B`), which
the collector decodes as the single process does. A frame of messages crosses with one `sendall`; decoded
rows are written into the socket as an IPC stream, with no buffer of the whole frame on the sending side. Each
frame is read into one buffer (a large one straight into an uninitialised Arrow buffer); the reading side takes a
batch as an Arrow binary array over that buffer, and decoded rows as a table over it (no copy, no Python object
per message or row).
Both ends ask for `SOCKET_BUFFER_BYTES` of kernel buffer, so that a whole batch waits there while the previous
one is decoded (a smaller buffer makes the sender wait for the reader at every batch).
"""

from __future__ import annotations

import json
import select
import socket
import struct
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
"""Kernel buffer asked for on each end of the socketpair (the system may grant less)."""

FRAME_MAX_BYTES = 3 * 1024 * 1024
"""Most message bytes a batch frame holds: a batch of whole flows is cut into frames that fit the buffer."""

_HEADER = struct.Struct("<cIQ")

BATCH = b"B"
DECODED = b"D"
END = b"E"
START = b"S"
CANCEL = b"C"


class HandoffClosed(EOFError):
    """The other end of the socketpair is gone (its process ended)."""


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets with large buffers: (this process's end, the other's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:  # the system caps it: a smaller buffer still works, only slower
                pass
    return ours, theirs


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"", count: int = 0) -> None:
    """Send one frame (blocks while the other end's buffer is full: that is the backpressure)."""
    sock.sendall(_HEADER.pack(kind, count, len(payload)) + payload)


def send_json(sock: socket.socket, kind: bytes, document: dict[str, Any]) -> None:
    """Send one frame whose payload is a JSON document."""
    send_frame(sock, kind, json.dumps(document).encode())


def send_batch(sock: socket.socket, messages: Sequence[bytes]) -> None:
    """Send messages as batch frames of at most `FRAME_MAX_BYTES` of messages each (at least one message)."""
    start, total = 0, 0
    for index, message in enumerate(messages):
        total += len(message)
        if total > FRAME_MAX_BYTES and index > start:
            _send_batch_frame(sock, messages[start:index])
            start, total = index, len(message)
    if start < len(messages):
        _send_batch_frame(sock, messages[start:])


def send_table(sock: socket.socket, table: pa.Table) -> None:
    """Send flow-table rows as one decoded frame: an Arrow IPC stream written straight into the socket (its size
    counted first), so that no buffer of the whole frame is allocated, filled and freed at every batch."""
    import pyarrow as pa

    counter = pa.MockOutputStream()
    _write_ipc(counter, table)
    sock.sendall(_HEADER.pack(DECODED, table.num_rows, counter.size()))
    with sock.makefile("wb", buffering=_IPC_WRITE_BUFFER) as out:
        _write_ipc(out, table)


_IPC_WRITE_BUFFER = 256 * 1024
"""Buffer that gathers the small pieces of an IPC stream (metadata, short columns) into fewer writes."""


def _write_ipc(sink: Any, table: pa.Table) -> None:
    import pyarrow as pa

    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _send_batch_frame(sock: socket.socket, messages: Sequence[bytes]) -> None:
    lengths = array("I", map(len, messages))
    size = 4 * len(messages) + sum(lengths)
    sock.sendall(b"".join([_HEADER.pack(BATCH, len(messages), size), lengths.tobytes(), *messages]))


_LARGE_FRAME_BYTES = 1024 * 1024
"""A frame this large is read straight into a buffer of its own (no first read, no zeroed buffer)."""


def _read_exactly(sock: socket.socket, size: int) -> bytes | bytearray | pa.Buffer:
    if size >= _LARGE_FRAME_BYTES:
        # batches (only the collector reads them, with Arrow loaded): into an uninitialised Arrow buffer, which
        # the batch's arrays then use as they are; a first recv would copy the bytes it got once more
        import pyarrow as pa

        buffer: bytearray | pa.Buffer = pa.allocate_buffer(size)
        done = 0
    else:
        # one recv mostly gets the whole frame (waiting in the socket's buffer): then nothing is zeroed or copied
        first = sock.recv(size)
        if len(first) == size:
            return first
        if not first:
            raise HandoffClosed("the other process closed the socket in the middle of a frame")
        buffer = bytearray(size)
        buffer[: len(first)] = first
        done = len(first)
    view = memoryview(buffer)  # type: ignore[arg-type]
    while done < size:
        got = sock.recv_into(view[done:])
        if not got:
            raise HandoffClosed("the other process closed the socket in the middle of a frame")
        done += got
    return buffer


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Whether something (a frame, or the end of the connection) can be read within `timeout` seconds."""
    poller = select.poll()  # (not select(): a busy process may hold descriptors above its 1024 limit)
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def read_frame(sock: socket.socket) -> tuple[bytes, int, bytes | bytearray | pa.Buffer]:
    """Read the next frame: (kind, count, payload). Raises HandoffClosed at the end of the connection."""
    first = sock.recv(_HEADER.size)
    if not first:
        raise HandoffClosed("the other process closed the socket")
    header = first if len(first) == _HEADER.size else first + _read_exactly(sock, _HEADER.size - len(first))
    kind, count, size = _HEADER.unpack(header)
    return kind, count, _read_exactly(sock, size) if size else b""


def batch_messages(count: int, payload: bytes | bytearray | pa.Buffer) -> pa.BinaryArray:
    """A batch frame's payload as an Arrow binary array of its messages, over the payload itself (no copy)."""
    import numpy as np  # (here: the receiving process never needs them)
    import pyarrow as pa

    lengths = np.frombuffer(payload, dtype=np.uint32, count=count)
    offsets = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = pa.py_buffer(payload)[4 * count :]
    array: pa.BinaryArray = pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), data])
    return array


def decoded_rows(payload: bytes | bytearray | pa.Buffer) -> pa.Table:
    """A decoded frame's flow-table rows, over the payload itself (no copy)."""
    import pyarrow as pa

    table: pa.Table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    return table


def json_payload(payload: bytes | bytearray | pa.Buffer) -> dict[str, Any]:
    """A frame's JSON document."""
    document: dict[str, Any] = json.loads(bytes(payload))
    return document

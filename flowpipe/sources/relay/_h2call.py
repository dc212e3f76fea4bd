"""One GetFlows call over HTTP/2 on a socket of its own (h2): how the receiving process reads the stream.

grpcio hands a streamed message to Python for several microseconds each (a completion-queue event, a lock,
a Python object); the receiving process wants only the bytes of the messages, in order, as fast as they come.
`FlowsCall` speaks the same gRPC over HTTP/2 as grpcio (length-prefixed messages in DATA frames, the status
in trailers), reads the socket in large pieces and cuts the messages out of them: the cost per message is a
slice. It advertises DATA frames of up to `RECEIVE_WINDOW_BYTES` (a server that honours it writes few, large
frames; grpc-go's keep to 16 KiB, which h2 reads as well) and a receive window of `STREAM_WINDOW_BYTES`, several
such frames: the relay goes on sending while the receiving process decodes and hands over a batch (with a window
of one frame, relay and reader took turns).

- **Backpressure**: received data is acknowledged (a WINDOW_UPDATE) as it is read; a reader that stops
  calling `read` stops reading the socket, so the relay's window closes and its stream waits.
- **How it ends**: `status` is set once the call is over, as grpcio reports it: the code and details of the
  trailers, UNAVAILABLE when the connection cannot be made or breaks (reset, GOAWAY, closed), CANCELLED
  after `cancel()`; a response gRPC cannot read (not HTTP 200 `application/grpc`, compressed or oversized
  messages) ends it too, with the code grpcio would give.
- **Runs of messages**: `read` cuts each message out as bytes (a copy each); the receiving process takes the
  messages received so far as one `MessageRun` instead (`receive`, then `take`): the buffer they arrived in
  and where each starts, which `MessageRun.array` turns into an Arrow binary array over that very buffer
  (no copy, no Python object per message).
- **Keepalive**: after `KEEPALIVE_SECONDS` without a frame it sends a PING and ends the call as UNAVAILABLE if
  no answer comes within `KEEPALIVE_TIMEOUT_SECONDS` (grpcio's channel does the same with the settings of
  `_connect.open_channel`).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
import urllib.parse
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from flowpipe import __version__
from flowpipe.sources.relay._address import (
    MAX_MESSAGE_BYTES,
    RECEIVE_WINDOW_BYTES,
    split_address,
    tls_context,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from flowpipe.sources.relay._address import RelayTLS

KEEPALIVE_SECONDS = 300.0
KEEPALIVE_TIMEOUT_SECONDS = 20.0
CONNECT_TIMEOUT_SECONDS = 20.0
_READ_BYTES = 1 << 20
STREAM_WINDOW_BYTES = 8 * RECEIVE_WINDOW_BYTES
"""The receive window this reader advertises: more than a batch of responses, so that the relay goes on sending
the next batch while this one is decoded and handed over (the bytes wait in the kernel's socket buffers, not in
this process); a reader that stops reading still stops the relay once that much is on its way."""
_PREFIX = struct.Struct(">BI")
PREFIX_BYTES = _PREFIX.size
"""Bytes before each message in the stream: a compressed flag and the message's length."""
# What `MessageRun.array` writes over each message's prefix: the key of a length-delimited field that no
# response type has (15, wire type 2) and a length of the 3 bytes left, so that prefix and message together are
# still the same message to a protobuf decoder, which skips unknown fields.
_SKIPPED_FIELD = (15 << 3 | 2, PREFIX_BYTES - 2)

# gRPC's mapping of RST_STREAM codes to status codes (what grpcio reports for a reset stream)
_RESET_CODES = {
    h2.errors.ErrorCodes.REFUSED_STREAM: "UNAVAILABLE",
    h2.errors.ErrorCodes.CANCEL: "CANCELLED",
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: "RESOURCE_EXHAUSTED",
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: "PERMISSION_DENIED",
}
# and of HTTP statuses, for a response that is not gRPC's
_HTTP_CODES = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
               429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}  # fmt: skip
_STATUS_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
                 5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
                 9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
                 13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}  # fmt: skip


def _data_frame_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"data=<{len(frame.data)} bytes>"


# h2 logs every frame it receives with `repr(frame)`, computed whether or not anything is logged, and
# hyperframe's repr of a DATA frame serialises its data again and hex-encodes all of it: three passes over
# every byte received. Its length says as much in a log.
hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign]


class FlowsCall:
    """A server-streaming call (`path`, one serialised request) read as raw response messages.

    >>> call = FlowsCall("127.0.0.1:4245", None, "/observer.Observer/GetFlows", request)
    >>> while call.status is None:
    ...     messages = call.read(0.1)      # the messages that arrived within 0.1 s (bytes each)
    >>> call.status                        # ("OK", "") or (code name, details)
    """

    def __init__(self, address: str, tls: RelayTLS | None, path: str, request: bytes) -> None:
        self.address = address
        self.status: tuple[str, str] | None = None
        """(status code name, details) once the call is over."""
        self._pending = bytearray()
        self._starts: list[int] = []
        """Where each complete message not yet taken starts in `_pending` (at its prefix)."""
        self._complete = 0
        """The end of the last complete message in `_pending`."""
        self._headers: dict[bytes, bytes] = {}
        self._sock: socket.socket | None = None
        self._stream_id = 0
        self._last_frame = time.monotonic()
        self._ping_sent: float | None = None
        self._interrupted = False
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        try:
            self._open(tls, path, request)
        except (OSError, h2.exceptions.H2Error) as exc:
            self._end("UNAVAILABLE", f"failed to connect to {address}: {_reason(exc)}")

    # -- opening -------------------------------------------------------------------------------------------

    def _open(self, tls: RelayTLS | None, path: str, request: bytes) -> None:
        host, port = split_address(self.address)
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if tls is not None:
                sock = tls_context(tls).wrap_socket(sock, server_hostname=tls.server_name or host)
                if sock.selected_alpn_protocol() != "h2":
                    raise OSError("the relay did not agree to HTTP/2 over TLS (ALPN)")
                authority = tls.server_name or authority
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        conn = self._conn
        conn.initiate_connection()
        conn.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: RECEIVE_WINDOW_BYTES,
            }
        )
        # Frames that large are taken from now on (a server may send them once it has our settings): h2 would
        # take them only after the server's acknowledgement, and refuses one read that holds both.
        conn.max_inbound_frame_size = RECEIVE_WINDOW_BYTES
        conn.increment_flow_control_window(STREAM_WINDOW_BYTES - 65_535)  # the connection's, as the stream's
        self._stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            self._stream_id,
            [
                (b":method", b"POST"),
                (b":scheme", b"https" if tls is not None else b"http"),
                (b":path", path.encode()),
                (b":authority", authority.encode("idna")),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"user-agent", f"flowpipe/{__version__}".encode()),
            ],
        )
        conn.send_data(self._stream_id, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        self._flush()

    # -- reading -------------------------------------------------------------------------------------------

    def read(self, timeout: float) -> list[bytes]:
        """The messages that arrive within `timeout` seconds (at most one read of the socket); [] once over."""
        self.receive(timeout)
        run = self.take()
        return [] if run is None else run.messages()

    @property
    def held(self) -> int:
        """How many complete messages were received and not yet taken (`read`, `take`)."""
        return len(self._starts)

    @property
    def held_bytes(self) -> int:
        """The bytes of the messages held (prefixes included)."""
        return self._complete

    def take(self) -> MessageRun | None:
        """The messages received and not yet taken, as one run over the buffer they arrived in (None: none);
        what follows them (the start of a message) moves to a new buffer."""
        count = len(self._starts)
        if not count:
            return None
        pending, end = self._pending, self._complete
        self._pending = bytearray(memoryview(pending)[end:])
        run = MessageRun(pending, self._starts, end)
        self._starts, self._complete = [], 0
        return run

    def receive(self, timeout: float) -> None:
        """Read what arrives within `timeout` seconds (at most one read of the socket) and hold its complete
        messages (`held`) until they are taken; nothing once over."""
        sock = self._sock
        if self.status is not None or sock is None:
            return
        try:
            sock.settimeout(max(timeout, 0.0))
            data = sock.recv(_READ_BYTES)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            if self._interrupted:
                self.cancel()
            else:
                self._keepalive()
            return
        except OSError as exc:
            if self._interrupted:
                self.cancel()
                return
            self._end("UNAVAILABLE", f"the connection to {self.address} broke: {_reason(exc)}")
            return
        if self._interrupted:
            self.cancel()
            return
        if not data:
            self._end("UNAVAILABLE", f"the relay {self.address} closed the connection")
            return
        self._last_frame, self._ping_sent = time.monotonic(), None
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._end("UNAVAILABLE", f"the relay {self.address} broke HTTP/2: {exc}")
            return
        for event in events:
            self._event(event)
            if self.status is not None:
                break
        if self.status is None:
            try:
                self._flush()
            except OSError as exc:
                self._end("UNAVAILABLE", f"the connection to {self.address} broke: {_reason(exc)}")

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.stream_id == self._stream_id:
                self._pending += event.data or b""
                self._cut()
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self._headers.update((bytes(k), bytes(v)) for k, v in event.headers or [])
            if isinstance(event, h2.events.ResponseReceived):
                self._check_response()
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == self._stream_id:
            self._trailers()
        elif isinstance(event, h2.events.StreamReset) and event.stream_id == self._stream_id:
            code = _RESET_CODES.get(event.error_code, "INTERNAL")  # type: ignore[call-overload]
            self._end(code, f"stream reset by the relay (HTTP/2 error {event.error_code})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.last_stream_id is not None and event.last_stream_id >= self._stream_id:
                return  # a graceful GOAWAY: this stream still ends on its own
            self._end("UNAVAILABLE", f"the relay {self.address} closed the connection (GOAWAY)")

    def _cut(self) -> None:
        """Find the complete messages after those already found in the pending bytes (where each starts)."""
        pending, starts = self._pending, self._starts
        end, at = len(pending), self._complete
        unpack, append = _PREFIX.unpack_from, starts.append
        while end - at >= PREFIX_BYTES:
            compressed, size = unpack(pending, at)
            if compressed or size > MAX_MESSAGE_BYTES:
                self._refuse(compressed, size)
                return
            stop = at + PREFIX_BYTES + size
            if stop > end:
                break
            append(at)
            at = stop
        self._complete = at

    def _refuse(self, compressed: int, size: int) -> None:
        if compressed:
            self._end("INTERNAL", "the relay sent a compressed message, which was not asked for")
        else:
            self._end(
                "RESOURCE_EXHAUSTED", f"received message larger than max ({size} vs. {MAX_MESSAGE_BYTES})"
            )

    def _check_response(self) -> None:
        status = self._headers.get(b":status", b"")
        if status != b"200":
            number = int(status) if status.isdigit() else 0
            code = _HTTP_CODES.get(number, "UNKNOWN")
            self._end(code, f"the relay answered HTTP status {status.decode('latin-1') or '?'}")
        elif not self._headers.get(b"content-type", b"").startswith(b"application/grpc"):
            self._end("UNKNOWN", "the relay's answer is not gRPC (content-type)")

    def _trailers(self) -> None:
        value = self._headers.get(b"grpc-status")
        if value is None:
            self._end("UNKNOWN", "the relay ended the stream without a gRPC status")
            return
        number = int(value) if value.isdigit() else 2
        details = urllib.parse.unquote(self._headers.get(b"grpc-message", b"").decode("latin-1"))
        if len(self._pending) > self._complete and number == 0:
            self._end("INTERNAL", "the stream ended in the middle of a message")
            return
        self._end(_STATUS_NAMES.get(number, "UNKNOWN"), details)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if self._ping_sent is not None:
            if now - self._ping_sent > KEEPALIVE_TIMEOUT_SECONDS:
                self._end("UNAVAILABLE", f"the relay {self.address} did not answer a keepalive ping")
        elif now - self._last_frame > KEEPALIVE_SECONDS:
            self._ping_sent = now
            try:
                self._conn.ping(b"flowpipe")
                self._flush()
            except OSError as exc:
                self._end("UNAVAILABLE", f"the connection to {self.address} broke: {_reason(exc)}")

    # -- ending --------------------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Have the call cancelled (from another thread than the one reading it): the connection is shut down,
        which wakes a `read` in progress, and the reading thread ends the call as CANCELLED."""
        self._interrupted = True
        sock = self._sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket's, under any TLS
            except OSError:
                pass

    def cancel(self) -> None:
        """End the call (RST_STREAM CANCEL) and close the connection; `status` becomes CANCELLED."""
        if self.status is None and self._sock is not None:
            try:
                self._conn.reset_stream(self._stream_id, h2.errors.ErrorCodes.CANCEL)
                self._flush()
            except (OSError, h2.exceptions.H2Error):
                pass
        self._end("CANCELLED", "cancelled by the collector")

    def _end(self, code: str, details: str) -> None:
        if self.status is None:
            self.status = (code, details)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._sock is not None:
            self._sock.settimeout(None)
            self._sock.sendall(data)


class MessageRun:
    """Complete messages as they arrived: `buffer[starts[i]:starts[i + 1]]` is message i with its prefix (the
    last one ends at `end`). The run owns its buffer (the call reads on into another)."""

    __slots__ = ("buffer", "end", "starts")

    def __init__(self, buffer: bytearray, starts: list[int], end: int) -> None:
        self.buffer = buffer
        self.starts = starts
        self.end = end

    def __len__(self) -> int:
        return len(self.starts)

    def messages(self) -> list[bytes]:
        """The messages as bytes (a copy each, without their prefixes)."""
        view = memoryview(self.buffer)
        try:
            bounds = [*self.starts[1:], self.end]
            return [
                bytes(view[at + PREFIX_BYTES : stop]) for at, stop in zip(self.starts, bounds, strict=True)
            ]
        finally:
            view.release()

    def array(self) -> pa.BinaryArray:
        """The messages as an Arrow binary array over the run's own buffer (no copy): each element is the
        message with its prefix rewritten into a field no response has (`_SKIPPED_FIELD`), which decodes as the
        message alone (`messages()` still gives them as they came). The run must be under 2 GiB."""
        import numpy as np  # (here: the module itself loads no data library)
        import pyarrow as pa

        count = len(self.starts)
        offsets = np.empty(count + 1, dtype=np.int32)
        offsets[:count] = self.starts
        offsets[count] = self.end
        prefixes = offsets[:count]
        data = np.frombuffer(self.buffer, dtype=np.uint8)
        data[prefixes], data[prefixes + 1] = _SKIPPED_FIELD
        array: pa.BinaryArray = pa.Array.from_buffers(
            pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(self.buffer)]
        )
        return array


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

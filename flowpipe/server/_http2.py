"""gRPC over HTTP/2 on asyncio (h2): the built-in Observer server's transport, built for streaming throughput.

grpcio's Python server pays tens of microseconds per streamed message; Hubble streams are millions of small
messages. This transport writes already framed messages in large HTTP/2 DATA frames, so a stored flow costs
a byte copy. It speaks standard gRPC (length-prefixed messages, `grpc-status` trailers, trailers-only error
responses), so grpcio, grpc-go (the `hubble` CLI) and grpcurl clients talk to it unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
_RECEIVE_WINDOW = 1 << 20


class GrpcAbort(Exception):
    """Raised by a handler to end its call with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StreamClosed(Exception):
    """The client went away (reset the stream or closed the connection)."""


UnaryHandler = Callable[[bytes], bytes]
StreamHandler = Callable[[bytes, "ServerStream"], Awaitable[None]]


@dataclass(frozen=True)
class RpcMethod:
    """A method: `streaming` handlers get a ServerStream, unary ones return the response message bytes.

    A `bidi` method (client and server streaming, like gRPC reflection) has a unary-style handler, called for
    each request message as it arrives to answer it with one response message; the call ends when the client
    ends its side.
    """

    streaming: bool
    handler: Any  # UnaryHandler | StreamHandler
    bidi: bool = False


def _status_value(code: grpc.StatusCode) -> bytes:
    return str(code.value[0]).encode()


def _encode_grpc_message(message: str) -> bytes:
    # gRPC percent-encodes bytes outside printable ASCII, and '%' itself.
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class _Call:
    __slots__ = ("abort", "body", "ended", "headers_sent", "messages", "path", "stream_id", "task", "wakeup")

    def __init__(self, stream_id: int, path: str) -> None:
        self.stream_id = stream_id
        self.path = path
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.ended = False
        self.abort: tuple[grpc.StatusCode, str] | None = None
        self.wakeup = asyncio.Event()
        # bidi calls: request messages as they arrive, None once the client ended its side
        self.messages: asyncio.Queue[bytes | None] | None = None


class ServerStream:
    """The response side of one server-streaming call."""

    def __init__(self, connection: _Connection, call: _Call) -> None:
        self._connection = connection
        self._call = call

    @property
    def peer(self) -> str:
        """The client's address, `host:port`."""
        return self._connection.peer

    async def send(self, data: bytes | memoryview) -> None:
        """Send one or more gRPC-framed messages, waiting for HTTP/2 flow control and any stall."""
        await self._connection.send_stream_data(self._call, data)


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.writable = asyncio.Event()
        self.writable.set()
        self.peer = "?"
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _RECEIVE_WINDOW,
            }
        )
        self.conn.increment_flow_control_window(_RECEIVE_WINDOW)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            call.ended = True
            if call.task is not None:
                call.task.cancel()
            call.wakeup.set()
        self.calls.clear()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("closing connection from %s: not HTTP/2 gRPC (%s)", self.peer, exc)
            self.flush()
            self.close_transport()
            return
        for event in events:
            self._handle(event)
        self.flush()

    # -- HTTP/2 events ---------------------------------------------------------------------------------

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            call = self.calls.get(event.stream_id)
            if call is not None and (call.task is None or call.messages is not None):
                call.body += event.data or b""
                if len(call.body) > MAX_REQUEST_BYTES:
                    self.finish(call, grpc.StatusCode.RESOURCE_EXHAUSTED, "request message too large")
                elif call.messages is not None:
                    self._take_messages(call)
        elif isinstance(event, h2.events.StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None and call.messages is not None:
                call.messages.put_nowait(None)
            elif call is not None and call.task is None and not call.ended:
                call.task = asyncio.get_running_loop().create_task(self._run(call))
        elif isinstance(event, h2.events.StreamReset):
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                call.ended = True
                if call.task is not None:
                    call.task.cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for call in self.calls.values():
                call.wakeup.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close_transport()

    def _request(self, stream_id: int, raw_headers: Sequence[tuple[bytes, bytes]]) -> None:
        headers = {bytes(k): bytes(v) for k, v in raw_headers}
        path = headers.get(b":path", b"").decode("latin-1")
        if headers.get(b":method") != b"POST":
            self._http_error(stream_id, b"405")
            return
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            self._http_error(stream_id, b"415")
            return
        call = _Call(stream_id, path)
        self.calls[stream_id] = call
        method = self.server.methods.get(path)
        if method is None:
            self.finish(call, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}")
        elif method.bidi:  # answered message by message while the client is still sending
            call.messages = asyncio.Queue()
            call.task = asyncio.get_running_loop().create_task(self._run(call))

    def _take_messages(self, call: _Call) -> None:
        """Move the complete request messages of a bidi call from its body to its queue."""
        assert call.messages is not None
        body = call.body
        while len(body) >= 5:
            if body[0] != 0:
                self.finish(call, grpc.StatusCode.UNIMPLEMENTED, "compressed requests are not supported")
                if call.task is not None:
                    call.task.cancel()
                return
            end = 5 + int.from_bytes(body[1:5], "big")
            if len(body) < end:
                return
            call.messages.put_nowait(bytes(body[5:end]))
            del body[:end]

    def _http_error(self, stream_id: int, status: bytes) -> None:
        try:
            self.conn.send_headers(stream_id, [(b":status", status)], end_stream=True)
        except h2.exceptions.H2Error:
            pass

    # -- calls -----------------------------------------------------------------------------------------

    async def _run(self, call: _Call) -> None:
        method = self.server.methods[call.path]
        status, message = grpc.StatusCode.OK, ""
        try:
            if method.bidi:
                await self._answer_each(call, method.handler)
            elif method.streaming:
                await method.handler(_unframe_request(bytes(call.body)), ServerStream(self, call))
            else:
                request = _unframe_request(bytes(call.body))
                response = method.handler(request)
                await self.send_stream_data(call, b"\x00" + len(response).to_bytes(4, "big") + response)
        except GrpcAbort as exc:
            status, message = exc.code, exc.message
        except asyncio.CancelledError:
            if call.abort is None or call.ended:
                return
            status, message = call.abort
        except StreamClosed:
            return
        except Exception as exc:
            log.exception("handler of %s failed", call.path)
            status, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        self.finish(call, status, message)

    async def _answer_each(self, call: _Call, handler: UnaryHandler) -> None:
        """A bidi call: one response per request message, until the client ends its side."""
        assert call.messages is not None
        while (request := await call.messages.get()) is not None:
            response = handler(request)
            await self.send_stream_data(call, b"\x00" + len(response).to_bytes(4, "big") + response)
        if call.body:
            raise GrpcAbort(grpc.StatusCode.INTERNAL, "the last request message is incomplete")

    def _response_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b":status", b"200"), (b"content-type", b"application/grpc"), *self.server.initial_metadata]

    def finish(self, call: _Call, code: grpc.StatusCode, message: str = "") -> None:
        """End a call with a status (trailers, or a trailers-only response if nothing was sent yet)."""
        if call.ended or self.closed:
            return
        call.ended = True
        self.calls.pop(call.stream_id, None)
        trailers = [(b"grpc-status", _status_value(code))]
        if message:
            trailers.append((b"grpc-message", _encode_grpc_message(message)))
        headers = trailers if call.headers_sent else self._response_headers() + trailers
        try:
            self.conn.send_headers(call.stream_id, headers, end_stream=True)
        except h2.exceptions.H2Error:
            pass
        self.flush()

    async def send_stream_data(self, call: _Call, data: bytes | memoryview) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        offset, total = 0, len(data)
        while True:
            delay = server.stalled_until - loop.time()
            if delay > 0:
                server.unstalled.clear()
                try:
                    await asyncio.wait_for(server.unstalled.wait(), None if delay == float("inf") else delay)
                except TimeoutError:
                    pass
                continue
            if call.ended or self.closed:
                raise StreamClosed()
            if not call.headers_sent:
                self.conn.send_headers(call.stream_id, self._response_headers())
                call.headers_sent = True
            if offset >= total:
                self.flush()
                return
            if not self.writable.is_set():
                await self.writable.wait()
                continue
            try:
                window = self.conn.local_flow_control_window(call.stream_id)
            except (h2.exceptions.StreamClosedError, KeyError):
                raise StreamClosed() from None
            if window <= 0:
                call.wakeup.clear()
                self.flush()
                await call.wakeup.wait()
                continue
            frame_size = self.conn.max_outbound_frame_size
            end = offset + min(window, total - offset)
            try:
                while offset < end:
                    step = min(frame_size, end - offset)
                    self.conn.send_data(call.stream_id, data[offset : offset + step])
                    offset += step
            except h2.exceptions.StreamClosedError:
                raise StreamClosed() from None
            self.flush()
            if offset < total:
                await asyncio.sleep(0)  # let other calls and the reader run between large chunks

    def flush(self) -> None:
        if self.transport is not None and not self.closed:
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)

    def close_transport(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def end_calls(
        self, code: grpc.StatusCode, message: str, streaming_only: bool
    ) -> list[asyncio.Task[None]]:
        tasks = []
        for call in list(self.calls.values()):
            if call.task is None or call.ended:
                continue
            if streaming_only and not self.server.methods[call.path].streaming:
                continue
            call.abort = (code, message)
            call.task.cancel()
            tasks.append(call.task)
        return tasks

    def go_away(self) -> None:
        if not self.closed:
            try:
                self.conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.H2Error:
                pass
            self.flush()
            self.close_transport()


def _unframe_request(body: bytes) -> bytes:
    if len(body) < 5:
        raise GrpcAbort(grpc.StatusCode.INTERNAL, "request message missing")
    if body[0] != 0:
        raise GrpcAbort(grpc.StatusCode.UNIMPLEMENTED, "compressed requests are not supported")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise GrpcAbort(grpc.StatusCode.INTERNAL, "request must be exactly one message")
    return body[5:]


class GrpcServer:
    """An asyncio gRPC server for unary, server-streaming and bidi methods, plaintext or TLS (ALPN h2).

    Run it on an event loop: `port = await server.start("127.0.0.1", 0)`, later `await server.stop()`.
    """

    def __init__(
        self,
        methods: Mapping[str, RpcMethod],
        *,
        ssl_context: ssl.SSLContext | None = None,
        initial_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.methods = dict(methods)
        self.ssl_context = ssl_context
        self.initial_metadata = [(k.encode(), v.encode()) for k, v in initial_metadata]
        self.connections: set[_Connection] = set()
        self.stalled_until = 0.0
        self.unstalled = asyncio.Event()
        self._listener: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port) and return the port."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=self.ssl_context, reuse_address=True
        )
        sockets = self._listener.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def wake_stalled(self) -> None:
        """Let stalled sends re-check `stalled_until` now."""
        self.unstalled.set()

    def active_streams(self) -> int:
        """Server-streaming calls in progress."""
        return sum(
            1
            for c in self.connections
            for call in c.calls.values()
            if call.task is not None and not call.ended and self.methods[call.path].streaming
        )

    async def end_streams(self, code: grpc.StatusCode, message: str) -> int:
        """End every streaming call in progress with `code`; returns how many were ended."""
        tasks = [t for c in list(self.connections) for t in c.end_calls(code, message, streaming_only=True)]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        return len(tasks)

    async def stop(self, message: str = "server is shutting down") -> None:
        """Stop listening, end calls with UNAVAILABLE, say GOAWAY and close every connection."""
        if self._listener is not None:
            self._listener.close()
        tasks = [
            t
            for c in list(self.connections)
            for t in c.end_calls(grpc.StatusCode.UNAVAILABLE, message, False)
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for connection in list(self.connections):
            connection.go_away()
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

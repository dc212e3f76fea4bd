"""The built-in Observer server: hubble-relay's `observer.Observer` API over the per-node flow buffers.

`ObserverServer` runs on its own event-loop thread, so tests and commands drive it synchronously::

    with ObserverServer(port=0) as server:          # 127.0.0.1, a free port
        server.publish(flows)                       # flow_pb2.Flow messages with node_name set
        channel = grpc.insecure_channel(server.address)
        ...
        server.restart()                            # streams end with UNAVAILABLE; buffers are kept

GetFlows follows the semantics of Hubble v1.19's servers and relay: `number` per node, `first`, `follow`, `since`
(wins over `number` for the start), `until`, whitelist/blacklist, `field_mask`, `node_status` first,
`lost_events` when a follower falls so far behind that its node's ring buffer overwrote flows it had not read.
gRPC server reflection is served as well (`flowpipe.server.reflection`), and the standard health check
(`flowpipe.server.health`), which `hubble status` calls first.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Self, TypeVar, cast

import grpc
import numpy as np
from google.protobuf import wrappers_pb2
from google.protobuf.message import DecodeError, Message

from flowpipe import __version__
from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe._proto.relay import relay_pb2
from flowpipe.errors import ConfigError, ObserverServerError
from flowpipe.server._http2 import GrpcAbort, GrpcServer, RpcMethod, ServerStream
from flowpipe.server.buffer import DEFAULT_BUFFER_SIZE, BufferedFlow, FlowStore, frame_message
from flowpipe.server.fieldmask import MaskPlan, apply_field_mask, compile_field_mask
from flowpipe.server.filters import FlowMatcher, NodeMatcher
from flowpipe.server.health import HealthService
from flowpipe.server.reflection import ReflectionService
from flowpipe.server.tls import ServerTLSConfig
from flowpipe.transforms.wire import encode_varint

DEFAULT_VERSION = f"{__version__}-flowpipe"
"""What ServerStatus, GetNodes and the `hubble-relay-version` header report."""

DEFAULT_RELAY_NAME = "flowpipe-relay"
"""The relay's own node name, carried by `node_status` responses."""

_SEND_FLOWS = 512  # flows per write: one HTTP/2 write carries a few hundred kB
_SCAN_CHUNK = 4096  # flows examined between yields to the event loop
_FOLLOW_CHUNK = 8192  # flows read per node per follow step
_SERVICE = "/observer.Observer/"

M = TypeVar("M", bound=Message)


def _decode(cls: type[M], data: bytes) -> M:
    try:
        return cast(M, cls.FromString(data))
    except DecodeError as exc:
        raise GrpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode {cls.DESCRIPTOR.full_name}: {exc}"
        ) from exc


def _timestamp_ns(message: Any) -> int:
    return int(message.seconds) * 1_000_000_000 + int(message.nanos)


def _time_ordered(entries: list[BufferedFlow]) -> list[BufferedFlow]:
    """`entries` by time, then by publish order (a sort of two integer columns: no key tuple per flow)."""
    try:
        times = np.fromiter([entry.time_ns for entry in entries], dtype=np.int64, count=len(entries))
    except OverflowError:  # a time past 2262 (a Timestamp may say up to year 9999)
        return sorted(entries, key=operator.attrgetter("time_ns", "seq"))
    seqs = np.fromiter([entry.seq for entry in entries], dtype=np.int64, count=len(entries))
    order = np.lexsort((seqs, times))
    return [entries[i] for i in order.tolist()]


class _Request:
    """A validated GetFlowsRequest."""

    def __init__(self, data: bytes) -> None:
        req = _decode(observer_pb2.GetFlowsRequest, data)
        if req.first and req.follow:
            raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be specified with follow")
        try:
            self.matcher = FlowMatcher(req.whitelist, req.blacklist)
            self.mask: MaskPlan | None = (
                compile_field_mask(list(req.field_mask.paths)) if req.HasField("field_mask") else None
            )
        except ConfigError as exc:
            raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        self.number = req.number
        self.first = req.first
        self.follow = req.follow
        self.since = _timestamp_ns(req.since) if req.HasField("since") else None
        self.until = _timestamp_ns(req.until) if req.HasField("until") else None

    def start_index(self, entries: Sequence[BufferedFlow], matcher: NodeMatcher) -> int:
        """Where one node's backlog starts (Hubble's rules for `first`, `follow`, `number` and `since`)."""
        if self.first and self.since is None:
            return 0
        if self.follow and self.number == 0 and self.since is None:
            return len(entries)  # only new flows
        i = len(entries)
        if self.since is not None:
            # A `since` wins over `number`: walk back until the first flow older than since.
            while i > 0 and entries[i - 1].time_ns >= self.since:
                i -= 1
            return i
        if self.number == 0:
            return 0
        count, until = 0, self.until
        if until is None and matcher.accepts_all:
            return max(0, len(entries) - self.number)
        while i > 0:
            i -= 1
            entry = entries[i]
            if until is not None and entry.time_ns > until:
                continue
            if matcher.accepts_all or matcher(entry):
                count += 1
                if count >= self.number:
                    return i
        return 0

    def takes_all(self, matcher: NodeMatcher) -> bool:
        """Whether `select` takes every flow of a node's backlog from its start (no time bound, no count,
        no filter): the backlog is then a slice."""
        limit = 0 if self.follow else self.number
        return self.since is None and self.until is None and not limit and matcher.accepts_all

    def select(
        self, entries: Sequence[BufferedFlow], start: int, matcher: NodeMatcher, hit_until: list[bool]
    ) -> Iterator[BufferedFlow]:
        """The flows of one node's backlog from `start`, filtered, stopping at `until` and after `number`."""
        limit = 0 if self.follow else self.number
        since, until = self.since, self.until
        if since is None and until is None and not limit and matcher.accepts_all:
            yield from entries[start:]
            return
        count = 0
        for index in range(start, len(entries)):
            entry = entries[index]
            if until is not None and entry.time_ns > until:
                hit_until[0] = True
                return
            if since is not None and entry.time_ns < since:
                continue
            if matcher.accepts_all or matcher(entry):
                yield entry
                count += 1
                if limit and count >= limit:
                    return


class ObserverService:
    """The RPC handlers of `observer.Observer`, reading a FlowStore like hubble-relay reads its nodes."""

    def __init__(self, store: FlowStore, *, relay_name: str, version: str, tls_enabled: bool) -> None:
        self.store = store
        self.relay_name = relay_name
        self.version = version
        self.tls_enabled = tls_enabled
        self.started_ns = time.time_ns()
        self._waiters: set[asyncio.Event] = set()

    def methods(self) -> dict[str, RpcMethod]:
        """The method table for GrpcServer."""
        return {
            _SERVICE + "GetFlows": RpcMethod(True, self.get_flows),
            _SERVICE + "GetAgentEvents": RpcMethod(True, self._relay_unimplemented("GetAgentEvents")),
            _SERVICE + "GetDebugEvents": RpcMethod(True, self._relay_unimplemented("GetDebugEvents")),
            _SERVICE + "GetNodes": RpcMethod(False, self.get_nodes),
            _SERVICE + "GetNamespaces": RpcMethod(False, self.get_namespaces),
            _SERVICE + "ServerStatus": RpcMethod(False, self.server_status),
        }

    def wake_followers(self) -> None:
        """Wake every following GetFlows call (runs on the event loop)."""
        for waiter in self._waiters:
            waiter.set()

    # -- unary calls -------------------------------------------------------------------------------------

    def server_status(self, data: bytes) -> bytes:
        """ServerStatus: buffer figures summed over nodes, like the relay."""
        _decode(observer_pb2.ServerStatusRequest, data)
        nodes = self.store.node_stats()
        response = observer_pb2.ServerStatusResponse(
            num_flows=sum(n.num_flows for n in nodes),
            max_flows=sum(n.max_flows for n in nodes),
            seen_flows=sum(n.seen_flows for n in nodes),
            uptime_ns=time.time_ns() - self.started_ns,
            num_connected_nodes=wrappers_pb2.UInt32Value(value=len(nodes)),
            num_unavailable_nodes=wrappers_pb2.UInt32Value(value=0),
            version=self.version,
            flows_rate=self.store.flows_rate(),
        )
        return bytes(response.SerializeToString())

    def get_nodes(self, data: bytes) -> bytes:
        """GetNodes: every node with its buffer figures, all connected."""
        _decode(observer_pb2.GetNodesRequest, data)
        response = observer_pb2.GetNodesResponse()
        for stats in self.store.node_stats():
            response.nodes.add(
                name=stats.name,
                version=self.version,
                state=relay_pb2.NODE_CONNECTED,
                tls=observer_pb2.TLS(enabled=self.tls_enabled),
                uptime_ns=stats.uptime_ns,
                num_flows=stats.num_flows,
                max_flows=stats.max_flows,
                seen_flows=stats.seen_flows,
            )
        return bytes(response.SerializeToString())

    def get_namespaces(self, data: bytes) -> bytes:
        """GetNamespaces: (cluster, namespace) pairs seen in flows."""
        _decode(observer_pb2.GetNamespacesRequest, data)
        response = observer_pb2.GetNamespacesResponse()
        for cluster, namespace in self.store.namespaces():
            response.namespaces.add(cluster=cluster, namespace=namespace)
        return bytes(response.SerializeToString())

    @staticmethod
    def _relay_unimplemented(name: str) -> Any:
        async def handler(data: bytes, stream: ServerStream) -> None:
            raise GrpcAbort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by hubble-relay")

        return handler

    # -- GetFlows ----------------------------------------------------------------------------------------

    def _envelope(self, response: observer_pb2.GetFlowsResponse, node_name: str) -> bytes:
        response.node_name = node_name
        response.time.FromNanoseconds(time.time_ns())
        return frame_message(response.SerializeToString())

    def node_status(self, nodes: Sequence[str]) -> bytes:
        """The framed NODE_CONNECTED response the relay sends before any flow."""
        status = relay_pb2.NodeStatusEvent(state_change=relay_pb2.NODE_CONNECTED, node_names=nodes)
        return self._envelope(observer_pb2.GetFlowsResponse(node_status=status), self.relay_name)

    def lost_events(self, node: str, count: int) -> bytes:
        """A framed lost_events response: `count` flows of `node` were overwritten before this reader got them."""
        lost = flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=count)
        return self._envelope(observer_pb2.GetFlowsResponse(lost_events=lost), node)

    @staticmethod
    def _masked(entry: BufferedFlow, mask: MaskPlan) -> bytes:
        flow = entry.parse()
        apply_field_mask(flow, mask)
        data = flow.SerializeToString()
        return frame_message(b"\x0a" + encode_varint(len(data)) + data + entry.tail())

    async def get_flows(self, data: bytes, stream: ServerStream) -> None:
        """GetFlows: node_status, then the backlog merged by time, then (with follow) new flows as published."""
        req = _Request(data)
        snapshot = self.store.snapshot()
        nodes = sorted(snapshot)
        positions = {node: head for node, (_, head) in snapshot.items()}
        await stream.send(self.node_status(nodes) if nodes else b"")
        mask = req.mask
        hit_until = [False]
        backlog: list[BufferedFlow] = []
        runs = 0
        for node in nodes:
            matcher = req.matcher.for_node(node)
            if matcher is None:
                continue
            entries = snapshot[node][0]
            start = req.start_index(entries, matcher)
            before = len(backlog)
            if req.takes_all(matcher):
                backlog += entries[start:]
            else:
                selection = req.select(entries, start, matcher, hit_until)
                while chunk := list(itertools.islice(selection, _SCAN_CHUNK)):
                    backlog.extend(chunk)
                    await asyncio.sleep(0)  # long filtered scans must not starve other calls
            runs += len(backlog) > before
        del snapshot
        if runs > 1:
            backlog = _time_ordered(backlog)  # merge the per-node runs by time, like the relay's merge
        for i in range(0, len(backlog), _SEND_FLOWS):
            chunk = backlog[i : i + _SEND_FLOWS]
            if mask is None:
                await stream.send(b"".join([entry.message for entry in chunk]))
            else:
                await stream.send(b"".join([self._masked(entry, mask) for entry in chunk]))
        del backlog
        if req.follow and not (hit_until[0] and req.until is not None):
            await self._follow(req, stream, positions)

    async def _follow(self, req: _Request, stream: ServerStream, positions: dict[str, int]) -> None:
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        matchers: dict[str, NodeMatcher | None] = {}
        mask, since, until = req.mask, req.since, req.until
        try:
            while True:
                waiter.clear()
                lost, entries = self.store.read_since(positions, _FOLLOW_CHUNK)
                if not lost and not entries:
                    await waiter.wait()
                    continue
                out = [self.lost_events(node, count) for node, count in lost]
                ended = False
                for entry in entries:
                    if until is not None and entry.time_ns > until:
                        ended = True
                        break
                    if since is not None and entry.time_ns < since:
                        continue
                    node = entry.node_name
                    if node not in matchers:
                        matchers[node] = req.matcher.for_node(node)
                    matcher = matchers[node]
                    if matcher is None or not (matcher.accepts_all or matcher(entry)):
                        continue
                    out.append(entry.message if mask is None else self._masked(entry, mask))
                if out:
                    await stream.send(b"".join(out))
                if ended:
                    return
        finally:
            self._waiters.discard(waiter)


class ObserverServer:
    """hubble-relay's Observer API on 127.0.0.1 (by default), fed by `publish`, with faults for tests.

    Plaintext by default; `tls=ServerTLSConfig(cert, key)` for TLS, plus `client_ca_path` for mutual TLS.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        store: FlowStore | None = None,
        tls: ServerTLSConfig | None = None,
        relay_name: str = DEFAULT_RELAY_NAME,
        version: str = DEFAULT_VERSION,
        nodes: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.store = store if store is not None else FlowStore(buffer_size)
        if nodes:
            self.store.add_nodes(nodes)
        self.service = ObserverService(
            self.store, relay_name=relay_name, version=version, tls_enabled=tls is not None
        )
        self._ssl_context = tls.ssl_context() if tls is not None else None
        self._metadata = [("hubble-relay-version", version)]
        self._grpc: GrpcServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake_pending = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """`host:port` to dial (the chosen port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._grpc is not None

    def start(self) -> Self:
        """Start listening (in a background thread); returns self. Raises ObserverServerError if it cannot bind."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="flowpipe-observer-server", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
            self.store.add_listener(self._on_publish)
        if self._grpc is None:
            try:
                self._call(self._listen())
            except BaseException:
                self.stop()
                raise
        return self

    async def _listen(self) -> None:
        # gRPC reflection too, as hubble-relay has it: grpcurl then needs no .proto files.
        methods = {
            **self.service.methods(),
            **ReflectionService(["observer.Observer"]).methods(),
            **HealthService(["observer.Observer"]).methods(),
        }
        server = GrpcServer(methods, ssl_context=self._ssl_context, initial_metadata=self._metadata)
        try:
            self.port = await server.start(self.host, self.port)
        except OSError as exc:
            raise ObserverServerError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        self._grpc = server

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        if self._loop is None:
            raise ObserverServerError("the Observer server is not started")
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _shutdown(self, message: str) -> None:
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(message)

    def stop(self) -> None:
        """End every call with UNAVAILABLE, close connections, stop the thread. The buffers are kept."""
        if self._loop is None:
            return
        self.store.remove_listener(self._on_publish)
        self._call(self._shutdown("server is shutting down"))
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        loop.close()

    def restart(self, downtime_seconds: float = 0.0) -> None:
        """Stop and listen again on the same port, keeping the buffers; active streams end with UNAVAILABLE."""
        self._call(self._shutdown("server is restarting"))
        if downtime_seconds > 0:
            time.sleep(downtime_seconds)
        self._call(self._listen())

    def close_streams(self, message: str = "stream closed by the server") -> int:
        """End every GetFlows stream with UNAVAILABLE; the server keeps listening. Returns how many ended."""
        if self._grpc is None:
            return 0
        grpc_server = self._grpc
        return int(self._call(grpc_server.end_streams(grpc.StatusCode.UNAVAILABLE, message)))

    def stall(self, seconds: float | None = None) -> None:
        """Stop sending on every stream for `seconds` (None: until `resume()`); connections stay open."""
        if self._grpc is not None and self._loop is not None:
            self._grpc.stalled_until = float("inf") if seconds is None else self._loop.time() + seconds

    def resume(self) -> None:
        """End a stall early."""
        if self._grpc is not None and self._loop is not None:
            self._call(self._resume(self._grpc))

    @staticmethod
    async def _resume(server: GrpcServer) -> None:
        server.stalled_until = 0.0
        server.wake_stalled()

    def active_streams(self) -> int:
        """Streaming calls in progress."""
        if self._grpc is None:
            return 0
        grpc_server = self._grpc

        async def count() -> int:
            return grpc_server.active_streams()

        return int(self._call(count()))

    def wait_for_streams(self, count: int, timeout_seconds: float = 10.0) -> bool:
        """Wait until exactly `count` streams are active; returns whether that happened in time."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            if self.active_streams() == count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- flows -------------------------------------------------------------------------------------------

    def publish(self, flows: Iterable[flow_pb2.Flow | bytes]) -> int:
        """Add flows to their nodes' buffers (thread-safe); following streams get them at once."""
        return self.store.publish(flows)

    def add_nodes(self, names: Iterable[str]) -> None:
        """Declare nodes before they have flows."""
        self.store.add_nodes(names)

    def _on_publish(self) -> None:
        # Called from publishing threads; wake-ups are coalesced into one loop callback.
        loop = self._loop
        if loop is None or self._wake_pending:
            return
        self._wake_pending = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closing
            self._wake_pending = False

    def _wake(self) -> None:
        self._wake_pending = False
        self.service.wake_followers()

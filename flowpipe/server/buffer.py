"""Per-node ring buffers of pre-serialised flows: what the built-in Observer server remembers and serves."""

from __future__ import annotations

import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flowpipe._proto.flow import flow_pb2
from flowpipe.errors import ObserverServerError
from flowpipe.transforms.wire import encode_varint

DEFAULT_BUFFER_SIZE = 4095
"""Flows kept per node, Hubble's default ring buffer capacity."""

_FLOWS_RATE_WINDOW_SECONDS = 60
_SEQ_KEY = operator.attrgetter("seq")


_SMALL_VARINTS = [encode_varint(n) for n in range(1 << 14)]


def varint(value: int) -> bytes:
    """`encode_varint`, from a table for values below 16384 (lengths)."""
    return _SMALL_VARINTS[value] if 0 <= value < 16384 else encode_varint(value)


def timestamp_bytes(time_ns: int) -> bytes:
    """A google.protobuf.Timestamp's serialised fields for `time_ns`."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    body = b""
    if seconds:
        body += b"\x08" + encode_varint(seconds)
    if nanos:
        body += b"\x10" + encode_varint(nanos)
    return body


# GetFlowsResponse: flow = 1 (length-delimited), node_name = 1000, time = 1001 (the same numbers in ExportEvent).
_FLOW_KEY = b"\x0a"
_NODE_NAME_KEY = encode_varint((1000 << 3) | 2)
_TIME_KEY = encode_varint((1001 << 3) | 2)
_node_name_fields: dict[str, bytes] = {}


def _node_name_field(node_name: str) -> bytes:
    field = _node_name_fields.get(node_name)
    if field is None:
        name = node_name.encode()
        field = _NODE_NAME_KEY + varint(len(name)) + name if name else b""
        if len(_node_name_fields) < 100_000:
            _node_name_fields[node_name] = field
    return field


def envelope_tail(node_name: str, time_ns: int, timestamp: bytes | None = None) -> bytes:
    """The serialised `node_name` and `time` fields of a GetFlowsResponse (`timestamp`: serialised time)."""
    if timestamp is None:
        timestamp = timestamp_bytes(time_ns)
    return _node_name_field(node_name) + _TIME_KEY + varint(len(timestamp)) + timestamp


def frame_message(message: bytes) -> bytes:
    """A protobuf message in gRPC's length-prefixed framing (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class BufferedFlow:
    """One flow as stored: the framed GetFlowsResponse bytes plus the few fields used to order and filter.

    `message` holds the complete gRPC frame (5-byte prefix + GetFlowsResponse), so serving an unfiltered,
    unmasked flow is a byte copy; `flow_start`/`flow_end` locate the serialised `flow.Flow` inside it.
    """

    __slots__ = (
        "destination_namespace",
        "flow_end",
        "flow_start",
        "message",
        "node_name",
        "seq",
        "source_namespace",
        "time_ns",
        "verdict",
    )

    def __init__(
        self,
        seq: int,
        time_ns: int,
        node_name: str,
        verdict: int,
        source_namespace: str,
        destination_namespace: str,
        message: bytes,
        flow_start: int,
        flow_end: int,
    ) -> None:
        self.seq = seq
        self.time_ns = time_ns
        self.node_name = node_name
        self.verdict = verdict
        self.source_namespace = source_namespace
        self.destination_namespace = destination_namespace
        self.message = message
        self.flow_start = flow_start
        self.flow_end = flow_end

    def flow_bytes(self) -> bytes:
        """The serialised `flow.Flow`."""
        return self.message[self.flow_start : self.flow_end]

    def tail(self) -> bytes:
        """The serialised envelope fields that follow the flow (`node_name`, `time`)."""
        return self.message[self.flow_end :]

    def parse(self) -> flow_pb2.Flow:
        """A fresh `flow.Flow` decoded from the stored bytes."""
        flow: flow_pb2.Flow = flow_pb2.Flow.FromString(
            memoryview(self.message)[self.flow_start : self.flow_end]
        )
        return flow


def build_entry(
    seq: int, flow: flow_pb2.Flow, data: bytes | None = None, now_ns: int | None = None
) -> BufferedFlow:
    """A BufferedFlow for `flow`; `data` is its serialisation when the caller already has it."""
    if data is None:
        data = flow.SerializeToString()
    if flow.HasField("time"):
        stamp = flow.time
        time_ns = stamp.seconds * 1_000_000_000 + stamp.nanos
        tail = envelope_tail(flow.node_name, time_ns, stamp.SerializeToString())
    else:
        time_ns = time.time_ns() if now_ns is None else now_ns
        tail = envelope_tail(flow.node_name, time_ns)
    header = _FLOW_KEY + varint(len(data))
    body_len = len(header) + len(data)
    message = b"".join((b"\x00", (body_len + len(tail)).to_bytes(4, "big"), header, data, tail))
    flow_start = 5 + len(header)
    return BufferedFlow(
        seq,
        time_ns,
        flow.node_name,
        flow.verdict,
        flow.source.namespace,
        flow.destination.namespace,
        message,
        flow_start,
        flow_start + len(data),
    )


class NodeRing:
    """A fixed-capacity ring of one node's flows, addressed by absolute position (0 = first ever written)."""

    __slots__ = ("_slots", "capacity", "first_seen_ns", "last_seen_ns", "name", "written")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.written = 0
        self._slots: list[BufferedFlow] = []
        self.first_seen_ns = time.time_ns()
        self.last_seen_ns = 0

    @property
    def oldest(self) -> int:
        """Position of the oldest flow still held."""
        return max(0, self.written - self.capacity)

    def __len__(self) -> int:
        return self.written - self.oldest

    def append(self, entry: BufferedFlow) -> None:
        """Store a flow, overwriting the oldest one when full."""
        if len(self._slots) < self.capacity:
            self._slots.append(entry)
        else:
            self._slots[self.written % self.capacity] = entry
        self.written += 1

    def slice(self, start: int, stop: int) -> list[BufferedFlow]:
        """Flows at positions [start, stop), clamped to what is held, oldest first."""
        start = max(start, self.oldest)
        stop = min(stop, self.written)
        if start >= stop:
            return []
        cap = self.capacity
        i, j = start % cap, stop % cap
        if i < j or (j == 0 and stop - start == cap - i):
            return self._slots[i : j or None]
        return self._slots[i:] + self._slots[:j]


@dataclass(frozen=True, slots=True)
class NodeStats:
    """Buffer figures of one node, as ServerStatus and GetNodes report them."""

    name: str
    num_flows: int
    max_flows: int
    seen_flows: int
    uptime_ns: int


class FlowStore:
    """Thread-safe per-node ring buffers; `publish` adds flows, readers take snapshots and follow positions.

    Example::

        store = FlowStore(capacity_per_node=4095)
        store.publish(flows)                  # flow_pb2.Flow messages (node_name set) or their bytes
        snapshot = store.snapshot()           # {node: (entries oldest first, position after the last)}
    """

    def __init__(self, capacity_per_node: int = DEFAULT_BUFFER_SIZE) -> None:
        if capacity_per_node <= 0:
            raise ObserverServerError(f"buffer size must be > 0, got {capacity_per_node}")
        self.capacity_per_node = capacity_per_node
        self._lock = threading.Lock()
        self._rings: dict[str, NodeRing] = {}
        self._seq = 0
        self._namespaces: set[tuple[str, str]] = set()
        self._listeners: list[Callable[[], None]] = []
        self._rate: deque[tuple[int, int]] = deque()
        self.started_ns = time.time_ns()

    # -- writing -------------------------------------------------------------------------------------

    def add_nodes(self, names: Iterable[str]) -> None:
        """Declare nodes that exist even before they have flows (they appear in node lists)."""
        with self._lock:
            for name in names:
                if name not in self._rings:
                    self._rings[name] = NodeRing(name, self.capacity_per_node)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from the publishing thread) after every publish."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Stop calling a listener added with `add_listener`."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    def publish(self, flows: Iterable[flow_pb2.Flow | bytes]) -> int:
        """Add flows (messages, or serialised `flow.Flow` bytes) to their nodes' buffers; returns how many.

        Each flow is serialised once here; readers then serve the stored bytes.
        """
        prepared: list[tuple[flow_pb2.Flow, bytes | None]] = []
        for index, item in enumerate(flows):
            if isinstance(item, (bytes, bytearray, memoryview)):
                data = bytes(item)
                try:
                    message = flow_pb2.Flow.FromString(data)
                except Exception as exc:  # protobuf raises DecodeError; any failure means unusable bytes
                    raise ObserverServerError(
                        f"published item {index} is not a serialised flow.Flow: {exc}"
                    ) from exc
                prepared.append((message, data))
            elif isinstance(item, flow_pb2.Flow):
                prepared.append((item, None))
            else:
                raise ObserverServerError(
                    f"published item {index} is a {type(item).__name__}, expected flow.Flow or its bytes"
                )
        if not prepared:
            return 0
        now_ns = time.time_ns()
        entries = [build_entry(0, message, data, now_ns) for message, data in prepared]
        namespaces = set()
        for message, _ in prepared:
            src, dst = message.source, message.destination
            if src.namespace:
                namespaces.add((src.cluster_name, src.namespace))
            if dst.namespace:
                namespaces.add((dst.cluster_name, dst.namespace))
        with self._lock:
            for entry in entries:
                ring = self._rings.get(entry.node_name)
                if ring is None:
                    ring = self._rings[entry.node_name] = NodeRing(entry.node_name, self.capacity_per_node)
                entry.seq = self._seq
                self._seq += 1
                ring.append(entry)
                ring.last_seen_ns = now_ns
            self._namespaces |= namespaces
            self._count_rate(len(entries))
        for callback in list(self._listeners):
            callback()
        return len(entries)

    def _count_rate(self, count: int) -> None:
        second = int(time.monotonic())
        if self._rate and self._rate[-1][0] == second:
            self._rate[-1] = (second, self._rate[-1][1] + count)
        else:
            self._rate.append((second, count))
        while self._rate and self._rate[0][0] <= second - _FLOWS_RATE_WINDOW_SECONDS:
            self._rate.popleft()

    # -- reading -------------------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        """Known node names, sorted."""
        with self._lock:
            return sorted(self._rings)

    def snapshot(self) -> dict[str, tuple[list[BufferedFlow], int]]:
        """Every node's buffered flows (oldest first) and the position just after the newest one."""
        with self._lock:
            return {
                name: (ring.slice(ring.oldest, ring.written), ring.written)
                for name, ring in self._rings.items()
            }

    def heads(self) -> dict[str, int]:
        """The position after each node's newest flow (how many flows each node has written)."""
        with self._lock:
            return {name: ring.written for name, ring in self._rings.items()}

    def read_since(
        self, positions: dict[str, int], max_per_node: int
    ) -> tuple[list[tuple[str, int]], list[BufferedFlow]]:
        """Flows written after `positions` (updated in place), up to `max_per_node` per node.

        Returns the losses (node, count) where the ring overwrote flows before they were read, and the flows
        in publish order. Nodes missing from `positions` are read from their oldest flow.
        """
        lost: list[tuple[str, int]] = []
        chunks: list[list[BufferedFlow]] = []
        with self._lock:
            for name, ring in self._rings.items():
                position = positions.get(name, ring.oldest)
                if position < ring.oldest:
                    lost.append((name, ring.oldest - position))
                    position = ring.oldest
                if position < ring.written:
                    chunk = ring.slice(position, position + max_per_node)
                    chunks.append(chunk)
                    position += len(chunk)
                positions[name] = position
        if len(chunks) == 1:
            return lost, chunks[0]
        merged = [entry for chunk in chunks for entry in chunk]
        merged.sort(key=_SEQ_KEY)
        return lost, merged

    def has_unread(self, positions: dict[str, int]) -> bool:
        """Whether any node wrote past `positions`."""
        with self._lock:
            return any(ring.written > positions.get(name, ring.oldest) for name, ring in self._rings.items())

    def node_stats(self) -> list[NodeStats]:
        """Per-node buffer figures, sorted by node name."""
        now = time.time_ns()
        with self._lock:
            return [
                NodeStats(name, len(ring), ring.capacity, ring.written, now - ring.first_seen_ns)
                for name, ring in sorted(self._rings.items())
            ]

    def flows_rate(self) -> float:
        """Flows per second published over the last minute."""
        with self._lock:
            second = int(time.monotonic())
            total = sum(count for sec, count in self._rate if sec > second - _FLOWS_RATE_WINDOW_SECONDS)
        uptime = max(1.0, min(float(_FLOWS_RATE_WINDOW_SECONDS), (time.time_ns() - self.started_ns) / 1e9))
        return total / uptime

    def namespaces(self) -> list[tuple[str, str]]:
        """(cluster, namespace) pairs seen in source or destination endpoints, sorted."""
        with self._lock:
            return sorted(self._namespaces)

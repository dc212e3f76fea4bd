"""The relay of `flowpipe bench --only collect`: the built-in Observer server's transport, serving a long stream
of simulated flows from a small pool of encoded responses.

The stream is what the bench's relay always served: a pool of simulated flows repeated, each repeat shifted in
time by the pool's span, each flow with a fresh random (version 4) uuid. Holding millions of such flows in the
relay's ring buffers costs about 1.5 KB a flow in Python objects (4.8 GB for 3M) and minutes to fill; here the
pool is encoded once (the framed `GetFlowsResponse` bytes the buffers would hold) and each run of flows is
copied from it with its uuids and times written in place (numpy, a few bytes a flow), so 3M flows take no
memory of their own and serving costs the relay about a byte copy a flow, as a real relay's buffers do.

The span between repeats is a whole number of seconds, so that a flow's time differs from its pool flow's only in
its seconds (the same five varint bytes, in the flow and in the envelope). GetFlows serves `number`, `since`
and `follow` (what `collect` asks); ServerStatus, GetNodes and GetNamespaces are the built-in server's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import grpc
import numpy as np

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.errors import FlowpipeError
from flowpipe.server import ObserverServer
from flowpipe.server._http2 import GrpcAbort, ServerStream
from flowpipe.server.buffer import build_entry
from flowpipe.server.observer import ObserverService

_RUN_FLOWS = 512  # flows per write, as the built-in server's
_UUID_CHARS = 36
_SECONDS_BYTES = 5  # a varint of seconds between 2^28 (1978) and 2^35 (3058)
_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % byte for byte in range(256)), dtype=np.uint16)
_UUID_GROUPS = (0, 9, 14, 19, 24)  # where each group of hex digits starts in the text
_DIGIT_GROUPS = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))
_SHIFTS = np.arange(0, 7 * _SECONDS_BYTES, 7, dtype=np.int64)
_MORE = np.array([0x80] * (_SECONDS_BYTES - 1) + [0], dtype=np.int64)


class RepeatedPool:
    """`count` flows: pool flow `i % len(pool)`, `i // len(pool)` spans later, with a fresh random uuid."""

    def __init__(self, pool: Sequence[flow_pb2.Flow], count: int, seed: int) -> None:
        if not pool:
            raise FlowpipeError("the bench relay needs at least one flow in its pool")
        entries = [build_entry(index, flow) for index, flow in enumerate(pool)]
        messages = [entry.message for entry in entries]
        self.count = count
        self.size = len(pool)
        self.nodes = sorted({flow.node_name for flow in pool})
        self.template = np.frombuffer(b"".join(messages), dtype=np.uint8)
        self.starts = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum([len(m) for m in messages], out=self.starts[1:])
        uuid_at, first_at, second_at = [], [], []
        for flow, entry, start in zip(pool, entries, self.starts.tolist(), strict=False):
            message = entry.message
            uuid_at.append(start + _find_once(message, flow.uuid.encode(), "uuid"))
            stamp = flow.time.SerializeToString()
            if not (len(stamp) > _SECONDS_BYTES and all(b >= 0x80 for b in stamp[1:_SECONDS_BYTES])
                    and stamp[_SECONDS_BYTES] < 0x80):  # fmt: skip
                raise FlowpipeError(f"the bench relay needs flow times from 1978 to 3058 (got {flow.time})")
            # the flow's time is its first field; the envelope's follows the flow
            first = entry.flow_start + 2
            second = message.rfind(stamp, entry.flow_end)
            if message[first : first + len(stamp)] != stamp or second < 0:
                raise FlowpipeError("the bench relay cannot find a pool flow's time in its response")
            first_at.append(start + first + 1)
            second_at.append(start + second + 1)
        # the byte positions written for each flow: its uuid's characters, its two seconds varints
        self.uuid_bytes = np.array(uuid_at, dtype=np.int64)[:, None] + np.arange(_UUID_CHARS)
        self.seconds_bytes = np.concatenate(
            [
                np.array(where, dtype=np.int64)[:, None] + np.arange(_SECONDS_BYTES)
                for where in (first_at, second_at)
            ],
            axis=1,
        )
        self.seconds = np.array([flow.time.seconds for flow in pool], dtype=np.int64)
        self.times = self.seconds * 1_000_000_000 + np.array(
            [flow.time.nanos for flow in pool], dtype=np.int64
        )
        if np.any(np.diff(self.times) < 0):
            raise FlowpipeError("the bench relay's pool must be in time order")
        self.span_seconds = int(self.seconds[-1] - self.seconds[0]) + 1
        if int(self.seconds[-1]) + (count // self.size + 1) * self.span_seconds >= 1 << 35:
            raise FlowpipeError("the bench relay's flows would reach past 3058")
        self._random = np.random.default_rng(seed)

    def time_ns(self, index: int) -> int:
        """The time of flow `index`."""
        rounds, at = divmod(index, self.size)
        return int(self.times[at]) + rounds * self.span_seconds * 1_000_000_000

    def first_since(self, since_ns: int) -> int:
        """The first flow not older than `since_ns`."""
        span_ns = self.span_seconds * 1_000_000_000
        rounds = max(0, (since_ns - int(self.times[0])) // span_ns)
        while rounds * self.size < self.count:
            at = int(np.searchsorted(self.times + rounds * span_ns, since_ns, side="left"))
            if at < self.size:
                return min(self.count, rounds * self.size + at)
            rounds += 1
        return self.count

    def runs(self, start: int) -> Iterator[memoryview]:
        """The framed responses of flows `start` to the last, a few hundred at a time."""
        index = start
        while index < self.count:
            rounds, at = divmod(index, self.size)
            take = min(_RUN_FLOWS, self.size - at, self.count - index)
            yield self._run(rounds, at, take)
            index += take

    def _run(self, rounds: int, at: int, take: int) -> memoryview:
        low, high = int(self.starts[at]), int(self.starts[at + take])
        out = self.template[low:high].copy()
        # fresh version-4 uuids, in their text form (two hex digits a byte, dashes between the groups)
        raw = self._random.integers(0, 1 << 64, size=(take, 2), dtype=np.uint64).view(np.uint8)
        raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
        raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
        digits = _HEX_PAIRS[raw].view(np.uint8)  # (take, 32)
        text = np.full((take, _UUID_CHARS), ord("-"), dtype=np.uint8)
        for into, (first, last) in zip(_UUID_GROUPS, _DIGIT_GROUPS, strict=True):
            text[:, into : into + last - first] = digits[:, first:last]
        out[self.uuid_bytes[at : at + take] - low] = text
        # the seconds of the flow's time and of the envelope's
        seconds = self.seconds[at : at + take] + rounds * self.span_seconds
        varint = ((seconds[:, None] >> _SHIFTS) & 0x7F | _MORE).astype(np.uint8)
        out[self.seconds_bytes[at : at + take] - low] = np.concatenate([varint, varint], axis=1)
        return memoryview(out)


def _find_once(message: bytes, part: bytes, what: str) -> int:
    at = message.find(part)
    if at < 0 or message.find(part, at + 1) >= 0:
        raise FlowpipeError(f"the bench relay cannot find a pool flow's {what} once in its response")
    return at


class RepeatedPoolService(ObserverService):
    """The Observer service over a RepeatedPool: GetFlows serves the pool's stream, the rest as the built-in."""

    def __init__(self, flows: RepeatedPool, server: ObserverServer) -> None:
        super().__init__(server.store, relay_name=server.service.relay_name, version=server.service.version,
                         tls_enabled=False)  # fmt: skip
        self.flows = flows

    def server_status(self, data: bytes) -> bytes:
        """ServerStatus: the stream's flows as the buffered ones."""
        response = observer_pb2.ServerStatusResponse.FromString(super().server_status(data))
        response.num_flows = response.max_flows = response.seen_flows = self.flows.count
        return bytes(response.SerializeToString())

    async def get_flows(self, data: bytes, stream: ServerStream) -> None:
        """GetFlows: node_status, the flows from `since` (or the last `number`), then (with follow) nothing more."""
        request = observer_pb2.GetFlowsRequest.FromString(data)
        if (
            request.whitelist
            or request.blacklist
            or request.HasField("field_mask")
            or request.HasField("until")
        ):
            raise GrpcAbort(grpc.StatusCode.UNIMPLEMENTED, "the bench relay serves whole flows, unfiltered")
        flows = self.flows
        if request.HasField("since"):
            start = flows.first_since(request.since.ToNanoseconds())
        elif request.follow and request.number == 0:
            start = flows.count
        else:
            start = max(0, flows.count - request.number)
        await stream.send(self.node_status(flows.nodes))
        for run in flows.runs(start):
            await stream.send(run)
        if request.follow:
            await asyncio.Event().wait()  # nothing new ever comes: the call stays open until cancelled


def start_relay(pool: Sequence[flow_pb2.Flow], count: int, seed: int) -> ObserverServer:
    """The built-in server on 127.0.0.1 (a free port) serving `count` flows repeated from `pool`."""
    flows = RepeatedPool(pool, count, seed)
    server = ObserverServer(port=0, nodes=flows.nodes)
    server.service = RepeatedPoolService(flows, server)
    return server.start()

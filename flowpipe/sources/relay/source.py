"""The relay source: follows hubble-relay's GetFlows stream, resumes from its checkpoint, reconnects forever.

```
ServerStatus ─▶ (GetNodes: --node-shard) ─▶ GetFlows(follow, since, filters, field_mask)
   receiver thread (_connect.StreamReceiver; the call read over HTTP/2 by _h2call): raw response bytes
                    ─▶ bounded deque (backpressure reaches the relay through HTTP/2 flow control)
   (or the receiving process, `_worker`: the call read and decoded there ─▶ flow-table rows over a socket)
   batches(): deque ─▶ decode in bulk (transforms.from_proto) ─▶ skip repeats (_dedupe)
                    ─▶ move the resume point (_resume) ─▶ EventBatch(position)
```

- **First start** (no checkpoint): the whole buffer the relay still holds (`number` = 2^64-1, as `hubble observe
  --all`), then new flows. A bare follow request would start at "now" and miss what the relay still has.
- **Resume** (restart, reconnect): `since` = the resume time kept in the checkpoint (`_resume`: the
  oldest "newest flow" among recently active nodes, minus `resume_overlap_seconds`). The relay merges its nodes
  only nearly in time order, so the overlap takes back a few seconds already seen; those flows are recognised
  by uuid (a content hash without one) against what was received or is already in the dataset, and skipped.
  Flows with a uuid are also checked against every flow of the dataset's hours they fall in
  (`flowpipe.dataset.stored_flows`, the check every writer makes): a flow an ingest or another collector
  stored already is not stored again. The checkpoint (`<dataset>/_state/<state_name>`) is saved only for
  batches every sink made durable; a restart also reads the keys of flows written after the last save, so
  nothing is written twice.
- **Reconnect** with capped exponential backoff and jitter, forever once connected. Each failure is logged once
  per distinct reason (then a reminder every few minutes), and the recovery once (`_log`).
- **Startup**: ServerStatus first; a failure is diagnosed (`_connect.diagnose`). Permanent problems (not
  a Hubble server, HTTP/1, TLS versus plaintext, certificates) stop at once with a message saying what to change;
  an unreachable relay is retried (`startup_timeout_seconds` bounds that).
- **Sharding** (`node_shard=(i, n)`): nodes from GetNodes are split by a stable hash of their names; the
  stream asks only for this shard's nodes (node_name filter), and the node list is refreshed periodically.
- `lost_events` become `EventBatch.lost_events` (this shard's nodes only, each record once); `node_status`
  events are counted and their errors logged.
- **Receiving process** (`receive_process=True`, `collect --workers 2`): the GetFlows call is read by a process of
  its own (`_worker` drives it, `_receiver` runs in it), which decodes the flows there and hands them over as
  flow-table rows in batches (responses that are not flows as bytes, decoded here); skipping repeats, the
  resume point and everything else stays here, the same in both modes. A receiving process that dies ends the stream like a broken connection: a new one is started,
  and the stream resumes from the resume point with the repeats skipped.
- **Library client** (`receiver="grpcio"`, `collect --receiver grpcio`, one process): the receiver thread reads
  the call through grpcio (`_connect.library_call`) instead of `_h2call`: slower (several µs a message), for
  relays or proxies the built-in HTTP/2 reader has trouble with; the rest is the same.

This module is the connection loop and the batch assembly; the package's helpers are `_config` (the
options), `_address` (addresses, TLS settings), `_connect` (channels, diagnosis, the receiver thread),
`_worker`, `_receiver`, `_h2call` and `_handoff` (the receiving process, its HTTP/2 call and its hand-over), `_dedupe`, `_resume` (where a new stream starts, the checkpoint document) and `_log`
(what is logged about the relay); responses are decoded by `flowpipe.transforms.from_proto`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.stored_flows import StoredFlows
from flowpipe.errors import ConfigError, FlowDecodeError, FlowpipeError, RelayError, RelayUnavailableError
from flowpipe.model import EventBatch, LostEvent
from flowpipe.sources.relay._config import (
    ALL_EVENTS,
    RelaySourceConfig,
    backoff_seconds,
    iso_time,
    node_name_matches,
    node_shard_of,
    parse_node_shard,
    verdict_numbers,
)
from flowpipe.sources.relay._connect import (
    CallMessages,
    StreamReceiver,
    explain_call_error,
    library_call,
    open_channel,
    relay_error,
    status_code,
    status_details,
)
from flowpipe.sources.relay._dedupe import (
    Deduplicator,
    RecentFlows,
    SeenLostEvents,
    flow_keys,
    load_lost_event_keys,
    load_written_keys,
)
from flowpipe.sources.relay._log import ConnectionLog
from flowpipe.sources.relay._resume import RelayPosition, ResumeTracker, checkpoint_state, read_checkpoint
from flowpipe.sources.relay._worker import ReceivingProcess, RemoteStream
from flowpipe.transforms.from_proto import FIELD_MASK_PATHS, DecodedResponses, decode_responses

if TYPE_CHECKING:
    from flowpipe.metrics.families import PipelineMetrics

__all__ = [
    "ALL_EVENTS",
    "RelayPosition",
    "RelaySource",
    "RelaySourceConfig",
    "node_shard_of",
    "parse_node_shard",
    "verdict_numbers",
]

log = logging.getLogger(__name__)

_METHOD = "/observer.Observer/"


class RelaySource:
    """Follows hubble-relay; see the module docstring. Implements the `Source` protocol.

    >>> source = RelaySource(RelaySourceConfig(address="127.0.0.1:4245"), dataset=Dataset("flowpipe-data"))
    >>> for batch in source.batches(): ...      # runs until close() or the stop event
    """

    def __init__(
        self,
        config: RelaySourceConfig,
        *,
        dataset: Dataset,
        state_name: str = "relay.json",
        metrics: PipelineMetrics | None = None,
        stop: threading.Event | None = None,
        checkpoint_interval_seconds: float = 1.0,
        stored: StoredFlows | None = None,
        receive_process: bool = False,
    ) -> None:
        if receive_process and config.receiver == "grpcio":
            raise ConfigError(
                "the grpcio receiver reads the stream in the collecting process: use one worker"
            )
        self.config = config
        self.receive_process = receive_process
        """Whether the stream is read by a process of its own (`_worker`) instead of a thread."""
        self.dataset = dataset
        self.state_name = state_name
        self.metrics = metrics
        self.stop_event = stop or threading.Event()
        self.checkpoint_interval_seconds = checkpoint_interval_seconds
        self.address = config.address
        self.server_version: str | None = None
        self.connected = False
        self.ever_connected = False
        self.flows_received = 0
        self.reconnects = 0
        self._verdicts = verdict_numbers(config.verdicts)
        self._lock = threading.Lock()
        self._receiver: StreamReceiver | RemoteStream | None = None
        self._process: ReceivingProcess | None = None
        self.decode_seconds = 0.0
        """CPU time (of the thread that decodes) spent decoding, skipping repeats and tracking the resume point
        (with `receive_process`, the flows arrive decoded: only the rest)."""
        self.remote_decode_seconds = 0.0
        """CPU time the receiving process spent decoding (with `receive_process`; told at the end of each call)."""
        self.receive_seconds = 0.0
        """CPU time of this process spent taking batches from the receiving process (with `receive_process`)."""
        self._channel: grpc.Channel | None = None
        self._committed: RelayPosition | None = None
        self._saved: RelayPosition | None = None
        self._saved_at = 0.0
        self._overlap_ns = int(config.resume_overlap_seconds * 1e9)
        self._recent = RecentFlows()
        self._dedupe = Deduplicator(self._overlap_ns)
        self._lost_seen = SeenLostEvents()
        self._stored = stored if stored is not None else StoredFlows(dataset)
        self._dataset_checked = False
        self._my_nodes: list[str] | None = None
        self._nodes_read_at = 0.0
        self._field_mask = config.field_mask
        self._nodes_restart = False
        self._log = ConnectionLog(self.address)
        self.checkpoint = read_checkpoint(dataset, state_name)
        self._startup_deadline: float | None = None  # while connecting for the first time (startup timeout)
        self._resume = ResumeTracker(config.resume_overlap_seconds, self.checkpoint)

    # -- the Source protocol -------------------------------------------------------------------------------

    def batches(self) -> Iterator[EventBatch]:
        """Event batches from the relay, until `close()` or the stop event. Raises RelayError when the relay
        cannot be used at startup (wrong address kind, TLS mismatch, certificates, startup timeout)."""
        try:
            yield from self._batches()
        finally:
            self._close_channel()
            self._end_process()

    def _batches(self) -> Iterator[EventBatch]:
        startup = self.config.startup_timeout_seconds
        self._startup_deadline = time.monotonic() + startup if startup is not None else None
        attempt = 0
        while not self.stop_event.is_set():
            try:
                request = self._connect()
            except RelayError as exc:
                fatal = not isinstance(exc, RelayUnavailableError) and not self.ever_connected
                if fatal or self._startup_over():
                    raise
                attempt += 1
                self._log.failed(str(exc), attempt)
                self._sleep_backoff(attempt)
                if self._startup_over():
                    raise  # the last failure: another try would have no time left to tell what is wrong
                continue
            if request is None:  # sharded, and no node in this shard yet
                self.stop_event.wait(min(self.config.node_refresh_seconds, 5.0))
                continue
            self._log.connected()
            attempt = 0
            error = yield from self._follow(request)
            self._set_connected(False)
            if self.stop_event.is_set():
                break
            if self._nodes_restart:  # our own doing: ask again at once with the new node list
                self._nodes_restart = False
                continue
            if error is not None:
                code = status_code(error) if isinstance(error, grpc.RpcError) else None
                if code == grpc.StatusCode.INVALID_ARGUMENT and self._field_mask:
                    log.warning(
                        "hubble-relay %s rejected the field mask (%s); asking for whole flows",
                        self.address,
                        status_details(error),
                    )
                    self._field_mask = False
                elif code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise relay_error(self.address, error, what="GetFlows")
                reason = (
                    f"the stream ended: {code.name}: {status_details(error)}"
                    if code
                    else f"the stream failed: {error}"
                )
            else:
                reason = "the relay ended the stream"
            attempt = 1
            self.reconnects += 1
            if self.metrics is not None:
                self.metrics.record_reconnect()
                self.metrics.record_error("receiving", "relay_unavailable")
            self._log.failed(reason, attempt)
            self._sleep_backoff(attempt)

    def commit(self, position: object) -> None:
        """Record that the batches up to `position` are durable; the checkpoint is saved at most every second."""
        if not isinstance(position, RelayPosition):
            return
        with self._lock:
            self._committed = position
            due = time.monotonic() - self._saved_at >= self.checkpoint_interval_seconds
        if due:
            self.save_checkpoint()

    def close(self) -> None:
        """Stop following, end the call and save the last durable position."""
        self.stop_event.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.stop()
        try:
            self.save_checkpoint()
        except (
            FlowpipeError
        ) as exc:  # e.g. the disk is full: the error that stopped the pipeline matters more
            log.error("cannot save the relay checkpoint: %s", exc)

    @property
    def repeats_skipped(self) -> int:
        """Flows received again after a reconnect or restart and skipped (already received or written), and flows
        whose uuid the dataset already held (another writer, an ingest of the same capture)."""
        return self._dedupe.skipped + self._stored.repeats

    # -- checkpoint ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write the last durable position to `_state/` (no-op when it did not change)."""
        with self._lock:
            position = self._committed
            if position is None or position == self._saved:
                return
            self._saved, self._saved_at = position, time.monotonic()
        self.dataset.write_state(
            self.state_name, checkpoint_state(position, relay=self.address, shard=self.config.shard_label)
        )
        if self.metrics is not None:
            self.metrics.record_checkpoint()

    # -- connecting ----------------------------------------------------------------------------------------

    def _connect(self) -> observer_pb2.GetFlowsRequest | None:
        self._close_channel()
        channel = open_channel(self.address, self.config.tls)
        self._channel = channel
        status = self._unary(
            channel, "ServerStatus", observer_pb2.ServerStatusRequest(), observer_pb2.ServerStatusResponse
        )
        if not self.ever_connected:
            log.info(
                "hubble-relay %s: version %s, %d flows buffered on %s node(s)",
                self.address, status.version or "unknown", status.num_flows,
                status.num_connected_nodes.value if status.HasField("num_connected_nodes") else "?",
            )  # fmt: skip
        self.server_version = status.version or None
        nodes = self._shard_nodes(channel)
        if self.config.node_shard is not None and not nodes:
            self._set_connected(True)
            return None
        return self._request(nodes)

    def _unary(self, channel: grpc.Channel, method: str, request: Any, response_type: Any) -> Any:
        call = channel.unary_unary(
            _METHOD + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        # Before the first connection, the call and the diagnosis of its failure share what is left of the
        # startup timeout (half each, the most a silent peer can take of either).
        budget = self._time_left(self.config.call_timeout_seconds * 2)
        try:
            return call(request, timeout=max(0.05, min(self.config.call_timeout_seconds, budget / 2)))
        except grpc.RpcError as exc:
            diagnosis = max(0.05, min(5.0, self.config.call_timeout_seconds, self._time_left(budget / 2)))
            raise explain_call_error(self.address, self.config.tls, exc, method, timeout=diagnosis) from exc

    def _shard_nodes(self, channel: grpc.Channel) -> list[str] | None:
        """The node names to ask for: this shard's share of GetNodes (None without sharding)."""
        if self.config.node_shard is None:
            return None
        response = self._unary(
            channel, "GetNodes", observer_pb2.GetNodesRequest(), observer_pb2.GetNodesResponse
        )
        index, count = self.config.node_shard
        names = sorted({node.name for node in response.nodes if node.name})
        if self.config.nodes:
            names = [n for n in names if node_name_matches(n, self.config.nodes)]
        mine = [n for n in names if node_shard_of(n, count) == index]
        if mine != self._my_nodes:
            log.info(
                "shard %d/%d takes %d of %d node(s): %s",
                index,
                count,
                len(mine),
                len(names),
                ", ".join(mine) or "none yet",
            )
        self._my_nodes = mine
        self._nodes_read_at = time.monotonic()
        return mine

    def _request(self, shard_nodes: list[str] | None) -> observer_pb2.GetFlowsRequest:
        request = observer_pb2.GetFlowsRequest(number=ALL_EVENTS, follow=True)
        if self._resume.resume_ns is not None:
            request.since.FromNanoseconds(max(0, self._resume.resume_ns))
        if self._field_mask:
            request.field_mask.paths.extend(FIELD_MASK_PATHS)
        if shard_nodes is not None:
            # GetNodes may name nodes without their cluster; flows carry "<cluster>/<node>".
            patterns = sorted({p for n in shard_nodes for p in ((n,) if "/" in n else (n, f"*/{n}"))})
        else:
            patterns = list(self.config.nodes)
        base = flow_pb2.FlowFilter(verdict=self._verdicts, node_name=patterns)  # type: ignore[arg-type]
        if self.config.namespaces:
            prefixes = [f"{ns}/" for ns in self.config.namespaces]
            for side in ("source_pod", "destination_pod"):
                entry = request.whitelist.add()
                entry.CopyFrom(base)
                getattr(entry, side).extend(prefixes)
        elif base.ByteSize():
            request.whitelist.append(base)
        return request

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    # -- following -----------------------------------------------------------------------------------------

    def _follow(
        self, request: observer_pb2.GetFlowsRequest
    ) -> Generator[EventBatch, None, BaseException | None]:
        """Yield batches of one GetFlows call; returns the error that ended it (None: ended normally)."""
        assert self._channel is not None
        self._arm_dedupe()
        on_first = lambda: self._set_connected(True)
        receiver: StreamReceiver | RemoteStream
        if self.receive_process:
            try:
                receiver = self._receiving_process().follow(request.SerializeToString(), on_first)
            except OSError as exc:
                return exc  # cannot start the receiving process: retried with backoff
        else:
            call: Any
            if self.config.receiver == "grpcio":  # the library client, on the channel of ServerStatus
                call = library_call(self._channel, _METHOD + "GetFlows", request.SerializeToString())
            else:  # read over HTTP/2 directly, as the receiving process does (grpcio costs µs a message)
                call = CallMessages(
                    self.address, self.config.tls, _METHOD + "GetFlows", request.SerializeToString()
                )
            receiver = StreamReceiver(call, self.config.max_pending_flows, on_first)
            receiver.start()
        self._receiver = receiver
        resume_ns = self._resume.resume_ns
        since = "the whole buffer" if resume_ns is None else f"flows since {iso_time(resume_ns)}"
        log.info("following hubble-relay %s: %s, then new flows", self.address, since)
        next_refresh = time.monotonic() + self.config.node_refresh_seconds
        try:
            while True:
                messages, over = receiver.take(
                    self.config.batch_max_flows, self.config.batch_max_seconds, self.stop_event
                )
                if messages:
                    batch = self._batch(messages)
                    if batch is not None:
                        yield batch
                if over or self.stop_event.is_set():
                    break
                if self.config.node_shard is not None and time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.config.node_refresh_seconds
                    if self._nodes_changed():
                        log.info("the relay's node list changed: asking again with this shard's nodes")
                        self._nodes_restart = True
                        receiver.stop()
        finally:
            receiver.stop()
            receiver.join(5.0)
            self._receiver = None
            if isinstance(receiver, RemoteStream):
                self.receive_seconds += receiver.receive_seconds
                self.remote_decode_seconds += receiver.decode_seconds
        error = receiver.error
        if isinstance(error, grpc.RpcError) and status_code(error) == grpc.StatusCode.CANCELLED:
            return None  # we ended it ourselves (stop, or a node list change)
        return error

    def _receiving_process(self) -> ReceivingProcess:
        """The receiving process, started anew when there is none or it ended (killed, or failed)."""
        process = self._process
        if process is not None and not process.alive:
            log.info("the receiving process (pid %d) %s: starting another", process.pid, process.ended())
            self._end_process()
            process = None
        if process is None:
            process = self._process = ReceivingProcess(self.config)
        return process

    def _end_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.close()

    @property
    def receiver_pid(self) -> int | None:
        """The pid of the receiving process (None without one)."""
        return None if self._process is None else self._process.pid

    @property
    def receiving(self) -> bool:
        """Whether the stream's reader is up: always in one process; with a receiving process, while it runs."""
        return not self.receive_process or (self._process is not None and self._process.alive)

    def _nodes_changed(self) -> bool:
        before = self._my_nodes
        try:
            assert self._channel is not None
            self._shard_nodes(self._channel)
        except RelayError as exc:
            log.warning("cannot refresh the relay's node list: %s", exc)
            return False
        return self._my_nodes != before

    def _batch(self, messages: Sequence[bytes] | pa.BinaryArray | pa.Table) -> EventBatch | None:
        started = time.thread_time()
        try:
            return self._decoded_batch(messages)
        finally:
            self.decode_seconds += time.thread_time() - started

    def _decoded_batch(self, messages: Sequence[bytes] | pa.BinaryArray | pa.Table) -> EventBatch | None:
        if isinstance(messages, pa.Table):  # decoded by the receiving process
            decoded = DecodedResponses(messages)
        else:
            decoded = decode_responses(messages, cluster_name=self.config.cluster_name)
        errors = [
            FlowDecodeError(
                f"undecodable GetFlowsResponse: {why}",
                path=f"relay {self.address}",
                line_number=None,
                reason="protobuf",
            )
            for _, why in decoded.bad_messages
        ]
        flows = decoded.flows
        already_stored = 0
        if flows.num_rows:
            flows, already_stored = self._skip_repeats(flows)
        lost = self._own_lost_events(decoded.lost_events) if decoded.lost_events else []
        for state, names, message in decoded.node_status:
            self._log.node_status(state, names, message)
        if not flows.num_rows and not lost and not decoded.node_status and not errors and not already_stored:
            return None
        self.flows_received += flows.num_rows
        return EventBatch(
            flows=flows,
            lost_events=lost,
            node_status=len(decoded.node_status),
            decode_errors=list(errors),
            position=self._resume.position(),
            flows_already_stored=already_stored,
        )

    def _skip_repeats(self, flows: pa.Table) -> tuple[pa.Table, int]:
        """The flows not received or stored before, and how many of them the dataset already held by uuid.

        Flows the dataset already held still move the resume point: they were received.
        """
        keys = flow_keys(flows)
        if not self._dataset_checked:
            self._check_dataset(flows)
        flows, keys = self._dedupe.filter(flows, keys)
        if not flows.num_rows:
            return flows, 0
        self._recent.add(keys, flows.column("time"))
        resume_ns = self._resume.track(flows)
        if resume_ns is not None:
            self._recent.forget_before(resume_ns - self._overlap_ns)
        return self._stored.new_rows(flows)

    def _check_dataset(self, flows: pa.Table) -> None:
        """Once per process: skip flows the dataset already has (written before a restart)."""
        self._dataset_checked = True
        oldest = pc.min(pc.cast(flows.column("time"), pa.int64())).as_py()
        resume_ns = self._resume.resume_ns
        floor = (
            resume_ns if resume_ns is not None else (None if oldest is None else oldest - self._overlap_ns)
        )
        if floor is None:
            return
        nodes = self._my_nodes if self.config.node_shard is not None else None
        keys, newest = load_written_keys(self.dataset, floor, nodes)
        self._lost_seen.keys |= load_lost_event_keys(self.dataset, floor - 3_600_000_000_000)
        if len(keys):
            log.info(
                "%d flow(s) from %s on are already in the dataset: they are skipped if the relay sends them again",
                len(keys),
                iso_time(floor),
            )
            self._recent.add(keys, pa.array([newest], pa.int64()))
            self._dedupe.arm(*self._recent.keys_since(floor))

    def _arm_dedupe(self) -> None:
        if self._resume.resume_ns is None:
            return
        keys, newest = self._recent.keys_since(self._resume.resume_ns)
        self._dedupe.arm(keys, newest)

    def _own_lost_events(self, events: list[LostEvent]) -> list[LostEvent]:
        """This shard's lost-events records, each once (a resumed stream may send a record again)."""
        kept = []
        for event in events:
            if self.config.node_shard is not None:
                index, count = self.config.node_shard
                if node_shard_of(event.node_name or "", count) != index:
                    continue
            if self._lost_seen.first_time(event):
                kept.append(event)
                self._log.lost_events(event)
        return kept

    # -- state and backoff ---------------------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            self.ever_connected = True
        if self.metrics is not None:
            self.metrics.set_connected(connected)

    def _sleep_backoff(self, attempt: int) -> None:
        config = self.config
        wait = backoff_seconds(
            attempt, config.reconnect_backoff_initial_seconds, config.reconnect_backoff_max_seconds
        )
        self.stop_event.wait(self._time_left(wait))

    def _startup_over(self) -> bool:
        """Whether the startup timeout has passed without a connection."""
        deadline = self._startup_deadline
        return not self.ever_connected and deadline is not None and time.monotonic() >= deadline

    def _time_left(self, limit: float) -> float:
        """`limit`, or less while connecting for the first time: what is left of the startup timeout (so the
        timeout bounds the whole startup: calls, diagnosis and waits between tries)."""
        deadline = self._startup_deadline
        if self.ever_connected or deadline is None:
            return limit
        return max(0.0, min(limit, deadline - time.monotonic()))

"""The relay source: follows hubble-relay's GetFlows stream, resumes from its checkpoint, reconnects forever.

```
ServerStatus ─▶ (GetNodes: --node-shard) ─▶ GetFlows(follow, since, filters, field_mask)
   receiver thread: raw response bytes ─▶ pending list (bounded: backpressure reaches the relay)
   batches():       pending ─▶ decode in bulk (_relay_decode) ─▶ skip repeats (_relay_dedupe) ─▶ EventBatch
```

- **First start** (no checkpoint): the whole buffer the relay still holds (`number` = 2^64-1, as `hubble observe
  --all`), then new flows. A bare follow request would start at "now" and miss what the relay still has.
- **Resume** (restart, reconnect): `since` = the checkpoint time minus `resume_overlap_seconds`. The relay
  merges its nodes only nearly in time order, so the overlap takes back a few seconds already seen; those flows
  are recognised by uuid (a content hash without one) against what was received or is already in the dataset,
  and skipped. The checkpoint (`<dataset>/_state/<state_name>`) is saved only for batches every sink made
  durable; a restart also reads the keys of flows written after the last save, so nothing is written twice.
- **Reconnect** with capped exponential backoff and jitter, forever once connected. Each failure is logged once
  per distinct reason (then a reminder every few minutes), and the recovery once.
- **Startup**: ServerStatus first; a failure is diagnosed (`_relay_connect.diagnose`). Permanent problems (not
  a Hubble server, HTTP/1, TLS versus plaintext, certificates) stop at once with a message saying what to change;
  an unreachable relay is retried (`startup_timeout_seconds` bounds that).
- **Sharding** (`node_shard=(i, n)`): nodes from GetNodes are split by a stable hash of their names; the
  stream asks only for this shard's nodes (node_name filter), and the node list is refreshed periodically.
- `lost_events` become `EventBatch.lost_events` (this shard's nodes only, each record once); `node_status`
  events are counted and their errors logged.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import threading
import time
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.dataset import Dataset
from flowpipe.errors import FlowDecodeError, FlowpipeError, RelayError, RelayUnavailableError
from flowpipe.model import EventBatch, LostEvent
from flowpipe.sources._relay_config import (
    ALL_EVENTS,
    RelayPosition,
    RelaySourceConfig,
    iso_time,
    node_shard_of,
    parse_node_shard,
    verdict_numbers,
)
from flowpipe.sources._relay_connect import (
    StreamReceiver,
    diagnose,
    open_channel,
    relay_error,
    status_code,
    status_details,
)
from flowpipe.sources._relay_decode import FIELD_MASK_PATHS, decode_responses
from flowpipe.sources._relay_dedupe import (
    Deduplicator,
    LostKey,
    RecentFlows,
    flow_keys,
    load_lost_event_keys,
    load_written_keys,
    lost_event_key,
)

if TYPE_CHECKING:
    from flowpipe.metrics import PipelineMetrics

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
_REMINDER_SECONDS = 300.0
_LOST_KEYS_KEPT = 10_000


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
    ) -> None:
        self.config = config
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
        self._receiver: StreamReceiver | None = None
        self._channel: grpc.Channel | None = None
        self._committed: RelayPosition | None = None
        self._saved: RelayPosition | None = None
        self._saved_at = 0.0
        self._recent = RecentFlows()
        self._dedupe = Deduplicator(int(config.resume_overlap_seconds * 1e9))
        self._node_newest: dict[str, int] = {}
        self._node_seen: dict[str, float] = {}
        self._uuid_newest: str | None = None
        self._lost_keys: set[LostKey] = set()
        self._dataset_checked = False
        self._my_nodes: list[str] | None = None
        self._nodes_read_at = 0.0
        self._field_mask = config.field_mask
        self._failure_reason: str | None = None
        self._failure_since: float | None = None
        self._failures = 0
        self._last_reminder = 0.0
        self._status_logged: dict[str, float] = {}
        checkpoint = self._load_checkpoint()
        self.checkpoint = checkpoint
        self._resume_ns: int | None = checkpoint.resume_ns if checkpoint else None

    # -- the Source protocol -------------------------------------------------------------------------------

    def batches(self) -> Iterator[EventBatch]:
        """Event batches from the relay, until `close()` or the stop event. Raises RelayError when the relay
        cannot be used at startup (wrong address kind, TLS mismatch, certificates, startup timeout)."""
        try:
            yield from self._batches()
        finally:
            self._close_channel()

    def _batches(self) -> Iterator[EventBatch]:
        started = time.monotonic()
        attempt = 0
        while not self.stop_event.is_set():
            try:
                request = self._connect()
            except RelayError as exc:
                fatal = not isinstance(exc, RelayUnavailableError) and not self.ever_connected
                timed_out = (
                    not self.ever_connected
                    and self.config.startup_timeout_seconds is not None
                    and time.monotonic() - started >= self.config.startup_timeout_seconds
                )
                if fatal or timed_out:
                    raise
                attempt += 1
                self._note_failure(str(exc), attempt)
                self._sleep_backoff(attempt)
                continue
            if request is None:  # sharded, and no node in this shard yet
                self.stop_event.wait(min(self.config.node_refresh_seconds, 5.0))
                continue
            self._note_success(attempt)
            attempt = 0
            error = yield from self._follow(request)
            self._set_connected(False)
            if self.stop_event.is_set():
                break
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
            self._note_failure(reason, attempt)
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
        """Flows received again after a reconnect or restart and skipped (already received or written)."""
        return self._dedupe.skipped

    # -- checkpoint ----------------------------------------------------------------------------------------

    def _load_checkpoint(self) -> RelayPosition | None:
        state = self.dataset.read_state(self.state_name)
        if not state or state.get("resume_ns") is None:
            return None
        nodes = tuple(sorted((str(k), int(v)) for k, v in (state.get("nodes") or {}).items()))
        return RelayPosition(int(state["resume_ns"]), state.get("newest_ns"), state.get("uuid"), nodes)

    def save_checkpoint(self) -> None:
        """Write the last durable position to `_state/` (no-op when it did not change)."""
        with self._lock:
            position = self._committed
            if position is None or position == self._saved:
                return
            self._saved, self._saved_at = position, time.monotonic()
        newest = position.newest_ns
        self.dataset.write_state(
            self.state_name,
            {
                "relay": self.address,
                "shard": self.config.shard_label,
                "resume_ns": position.resume_ns,
                "newest_ns": newest,
                "newest_time": None if newest is None else iso_time(newest),
                "uuid": position.uuid,
                "nodes": dict(position.nodes),
                "saved_at": datetime.now(UTC).isoformat(),
            },
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
        try:
            return call(request, timeout=self.config.call_timeout_seconds)
        except grpc.RpcError as exc:
            raise self._explain(exc, method) from exc

    def _explain(self, exc: grpc.RpcError, method: str) -> RelayError:
        code = status_code(exc)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return RelayError(
                f"{self.address} answers gRPC but is not a Hubble relay: observer.Observer/{method} is not implemented "
                "(check --relay: hubble-relay listens on 4245, its Service on 80, or 443 with TLS)",
                address=self.address,
                code=code.name,
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL):  # fmt: skip
            found = diagnose(
                self.address, self.config.tls, timeout=min(5.0, self.config.call_timeout_seconds)
            )
            if found is not None:
                cls = RelayUnavailableError if found.retryable else RelayError
                return cls(
                    f"hubble-relay {self.address}: {found.message}", address=self.address, code=code.name
                )
        return relay_error(self.address, exc, what=method)

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
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.config.nodes)]
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
        if self._resume_ns is not None:
            request.since.FromNanoseconds(max(0, self._resume_ns))
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
        call = self._channel.unary_stream(
            _METHOD + "GetFlows",
            request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
            response_deserializer=None,
        )(request)
        self._arm_dedupe()
        receiver = StreamReceiver(call, self.config.max_pending_flows, lambda: self._set_connected(True))
        self._receiver = receiver
        receiver.start()
        since = "the whole buffer" if self._resume_ns is None else f"flows since {iso_time(self._resume_ns)}"
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
                        receiver.stop()
        finally:
            receiver.stop()
            receiver.join(5.0)
            self._receiver = None
        error = receiver.error
        if isinstance(error, grpc.RpcError) and status_code(error) == grpc.StatusCode.CANCELLED:
            return None  # we ended it ourselves (stop, or a node list change)
        return error

    def _nodes_changed(self) -> bool:
        before = self._my_nodes
        try:
            assert self._channel is not None
            self._shard_nodes(self._channel)
        except RelayError as exc:
            log.warning("cannot refresh the relay's node list: %s", exc)
            return False
        return self._my_nodes != before

    def _batch(self, messages: list[bytes]) -> EventBatch | None:
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
        if flows.num_rows:
            flows = self._skip_repeats(flows)
        lost = self._own_lost_events(decoded.lost_events)
        for state, names, message in decoded.node_status:
            self._log_node_status(state, names, message)
        if not flows.num_rows and not lost and not decoded.node_status and not errors:
            return None
        self.flows_received += flows.num_rows
        return EventBatch(
            flows=flows,
            lost_events=lost,
            node_status=len(decoded.node_status),
            decode_errors=list(errors),
            position=self._position(),
        )

    def _skip_repeats(self, flows: pa.Table) -> pa.Table:
        keys = flow_keys(flows)
        if not self._dataset_checked:
            self._check_dataset(flows)
        flows, keys = self._dedupe.filter(flows, keys)
        if not flows.num_rows:
            return flows
        times = flows.column("time")
        self._recent.add(keys, times)
        self._track_nodes(flows)
        return flows

    def _check_dataset(self, flows: pa.Table) -> None:
        """Once per process: skip flows the dataset already has (written before a restart)."""
        self._dataset_checked = True
        overlap = int(self.config.resume_overlap_seconds * 1e9)
        oldest = pc.min(pc.cast(flows.column("time"), pa.int64())).as_py()
        floor = (
            self._resume_ns if self._resume_ns is not None else (None if oldest is None else oldest - overlap)
        )
        if floor is None:
            return
        nodes = self._my_nodes if self.config.node_shard is not None else None
        keys, newest = load_written_keys(self.dataset, floor, nodes)
        self._lost_keys |= load_lost_event_keys(self.dataset, floor - 3_600_000_000_000)
        if len(keys):
            log.info(
                "%d flow(s) from %s on are already in the dataset: they are skipped if the relay sends them again",
                len(keys),
                iso_time(floor),
            )
            self._recent.add(keys, pa.array([newest], pa.int64()))
            self._dedupe.arm(*self._recent.keys_since(floor))

    def _arm_dedupe(self) -> None:
        if self._resume_ns is None:
            return
        keys, newest = self._recent.keys_since(self._resume_ns)
        self._dedupe.arm(keys, newest)

    def _track_nodes(self, flows: pa.Table) -> None:
        grouped = (
            pa.table(
                {
                    "node": pc.fill_null(flows.column("node_name"), ""),
                    "t": pc.cast(flows.column("time"), pa.int64()),
                }
            )
            .group_by("node")
            .aggregate([("t", "max")])
        )
        now = time.monotonic()
        for node, newest in zip(
            grouped.column("node").to_pylist(), grouped.column("t_max").to_pylist(), strict=True
        ):
            if newest is None:
                continue
            if newest > self._node_newest.get(node, -1):
                self._node_newest[node] = newest
            self._node_seen[node] = now
        overall = max(self._node_newest.values(), default=None)
        if overall is not None:
            times = pc.cast(flows.column("time"), pa.int64())
            index = pc.index(times, overall).as_py()
            if index >= 0:
                self._uuid_newest = flows.column("uuid")[index].as_py()
        self._resume_ns = self._resume_point(now)
        if self._resume_ns is not None:
            self._recent.forget_before(self._resume_ns - int(self.config.resume_overlap_seconds * 1e9))

    def _resume_point(self, now: float) -> int | None:
        """Where a new stream should start: the oldest "newest flow" among recently active nodes, minus the
        overlap (a node whose clock lags, or whose flows the relay still held back, is not skipped)."""
        active_window = max(60.0, 6 * self.config.resume_overlap_seconds)
        active = [
            t
            for node, t in self._node_newest.items()
            if now - self._node_seen.get(node, now) <= active_window
        ]
        if not active:
            return self._resume_ns
        return min(active) - int(self.config.resume_overlap_seconds * 1e9)

    def _position(self) -> RelayPosition:
        newest = max(self._node_newest.values(), default=None)
        return RelayPosition(
            self._resume_ns, newest, self._uuid_newest, tuple(sorted(self._node_newest.items()))
        )

    def _own_lost_events(self, events: list[LostEvent]) -> list[LostEvent]:
        kept = []
        for event in events:
            if self.config.node_shard is not None:
                index, count = self.config.node_shard
                if node_shard_of(event.node_name or "", count) != index:
                    continue
            key = lost_event_key(event)
            if key in self._lost_keys:
                continue
            if len(self._lost_keys) >= _LOST_KEYS_KEPT:
                self._lost_keys.clear()
            self._lost_keys.add(key)
            kept.append(event)
            log.warning(
                "Hubble lost %d event(s) on %s (%s)",
                event.num_events_lost,
                event.node_name or "the relay",
                event.source,
            )
        return kept

    def _log_node_status(self, state: str, names: list[str], message: str) -> None:
        text = f"{state}: {', '.join(names) or '-'}{': ' + message if message else ''}"
        now = time.monotonic()
        if now - self._status_logged.get(text, -1e9) < 60.0:
            return
        self._status_logged[text] = now
        level = logging.INFO if state == "NODE_CONNECTED" else logging.WARNING
        log.log(level, "hubble-relay %s node status %s", self.address, text)

    # -- state and logging ---------------------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        if connected:
            self.ever_connected = True
        if self.metrics is not None:
            self.metrics.set_connected(connected)

    def _note_failure(self, reason: str, attempt: int) -> None:
        now = time.monotonic()
        if self._failure_since is None:
            self._failure_since = now
        self._failures += 1
        if reason != self._failure_reason:
            self._failure_reason = reason
            self._last_reminder = now
            log.warning("%s; retrying with backoff (attempt %d)", reason, attempt)
        elif now - self._last_reminder >= _REMINDER_SECONDS:
            self._last_reminder = now
            log.warning(
                "still failing after %d attempts over %.0fs: %s",
                self._failures,
                now - self._failure_since,
                reason,
            )
        else:
            log.debug("attempt %d failed: %s", attempt, reason)

    def _note_success(self, attempts: int) -> None:
        if self._failure_since is not None:
            log.warning(
                "connected to hubble-relay %s again after %d failed attempt(s) over %.1fs",
                self.address, self._failures, time.monotonic() - self._failure_since,
            )  # fmt: skip
        self._failure_reason = None
        self._failure_since = None
        self._failures = 0

    def _sleep_backoff(self, attempt: int) -> None:
        cap = self.config.reconnect_backoff_max_seconds
        delay = min(cap, self.config.reconnect_backoff_initial_seconds * 2 ** min(attempt - 1, 30))
        self.stop_event.wait(random.uniform(delay / 2, delay))

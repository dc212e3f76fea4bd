"""Where the relay source's next GetFlows stream should start, and the checkpoint position of what it has.

The relay merges its nodes' flows only nearly in time order, and a node's clock may lag, so "the newest flow
received" is not a safe place to resume: a node still catching up would lose its flows between its own newest
and that time. `ResumeTracker` keeps, per node, the time of the newest flow received and when that node last
sent one; a new stream starts at the oldest of those newest times among recently active nodes, minus the
overlap (the flows received again are skipped by key, `_dedupe`). A node silent for longer than the
active window no longer holds the resume time back.

The checkpoint position (`RelayPosition`) is that resume time plus the newest flow's time and uuid and the
per-node times; `read_checkpoint` and `checkpoint_state` are its stored form in `<dataset>/_state/<name>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.dataset.layout import Dataset
from flowpipe.sources.relay._config import iso_time

_NO_TIME = np.iinfo(np.int64).min


@dataclass(frozen=True, slots=True)
class RelayPosition:
    """The checkpoint token of a batch: the resume time (ns) and the uuid of the newest flow so far."""

    resume_ns: int | None
    newest_ns: int | None
    uuid: str | None
    nodes: tuple[tuple[str, int], ...] = ()


class ResumeTracker:
    """Per node, the newest flow received; from them, where a new stream should start and the batch position.

    >>> tracker = ResumeTracker(overlap_seconds=5.0, checkpoint=read_checkpoint(...))  # None: the whole buffer
    >>> tracker.track(new_flows)    # each batch, once repeats are skipped; returns tracker.resume_ns
    >>> tracker.position()          # the batch's checkpoint token
    """

    def __init__(self, overlap_seconds: float, checkpoint: RelayPosition | None) -> None:
        """Start from a saved checkpoint, if any: its nodes count as seen now, so each holds the resume time
        back for the active window at most (a node gone since no longer does after that), and a position
        saved before the first new flow still names the newest flow and the nodes."""
        self.overlap_ns = int(overlap_seconds * 1e9)
        self.active_window_seconds = max(60.0, 6 * overlap_seconds)
        self.resume_ns = checkpoint.resume_ns if checkpoint else None
        now = time.monotonic()
        self._node_newest: dict[str, int] = dict(checkpoint.nodes) if checkpoint else {}
        self._node_seen: dict[str, float] = {node: now for node in self._node_newest}
        self._uuid_newest: str | None = checkpoint.uuid if checkpoint else None

    def track(self, flows: pa.Table) -> int | None:
        """Take in a batch of flows not received before; returns the (moved) resume time."""
        times = pc.cast(flows.column("time"), pa.int64())
        # the newest time of each node: node names as dictionary codes, a maximum per code (Arrow's group-by
        # costs about a millisecond a call, on its thread pool)
        nodes = pc.dictionary_encode(pc.fill_null(flows.column("node_name").combine_chunks(), ""))
        newest_of = np.full(len(nodes.dictionary), _NO_TIME, np.int64)
        np.maximum.at(
            newest_of, nodes.indices.to_numpy(), pc.fill_null(times, _NO_TIME).to_numpy().astype(np.int64)
        )
        now = time.monotonic()
        node_newest, node_seen = self._node_newest, self._node_seen
        for node, newest in zip(nodes.dictionary.to_pylist(), newest_of.tolist(), strict=True):
            if newest == _NO_TIME:  # (only flows without a time)
                continue
            if newest > node_newest.get(node, -1):
                node_newest[node] = newest
            node_seen[node] = now
        overall = max(node_newest.values(), default=None)
        if overall is not None:
            index = pc.index(times, overall).as_py()
            if index >= 0:
                self._uuid_newest = flows.column("uuid")[index].as_py()
        self.resume_ns = self._resume_point(now)
        return self.resume_ns

    def _resume_point(self, now: float) -> int | None:
        """The oldest "newest flow" among recently active nodes, minus the overlap (a node whose clock
        lags, or whose flows the relay still held back, is not skipped); unchanged with no active node."""
        active = [
            newest
            for node, newest in self._node_newest.items()
            if now - self._node_seen.get(node, now) <= self.active_window_seconds
        ]
        if not active:
            return self.resume_ns
        return min(active) - self.overlap_ns

    def position(self) -> RelayPosition:
        """The checkpoint token of everything received so far."""
        newest = max(self._node_newest.values(), default=None)
        return RelayPosition(
            self.resume_ns, newest, self._uuid_newest, tuple(sorted(self._node_newest.items()))
        )


def read_checkpoint(dataset: Dataset, state_name: str) -> RelayPosition | None:
    """The position saved in `_state/<state_name>`, or None (no checkpoint, or one saved before any flow)."""
    state = dataset.read_state(state_name)
    if not state or state.get("resume_ns") is None:
        return None
    nodes = tuple(sorted((str(k), int(v)) for k, v in (state.get("nodes") or {}).items()))
    return RelayPosition(int(state["resume_ns"]), state.get("newest_ns"), state.get("uuid"), nodes)


def checkpoint_state(position: RelayPosition, *, relay: str, shard: str | None) -> dict[str, Any]:
    """The JSON document saved for `position` (with the relay address and shard, for people reading it)."""
    newest = position.newest_ns
    return {
        "relay": relay,
        "shard": shard,
        "resume_ns": position.resume_ns,
        "newest_ns": newest,
        "newest_time": None if newest is None else iso_time(newest),
        "uuid": position.uuid,
        "nodes": dict(position.nodes),
        "saved_at": datetime.now(UTC).isoformat(),
    }

"""A background thread that publishes flows from an iterator into the Observer server at a chosen rate."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from flowpipe._proto.flow import flow_pb2

log = logging.getLogger(__name__)


class FlowSink(Protocol):
    """Anything with `publish(flows)`: an ObserverServer or a FlowStore."""

    def publish(self, flows: Iterable[flow_pb2.Flow | bytes]) -> int: ...


class FlowFeeder:
    """Publishes `flows` into `target` from a daemon thread.

    - `rate_per_second`: flows per second in real time; None publishes as fast as the target takes them.
    - `retime`: stamp each flow with the wall-clock time it is published at (evenly spaced at the rate), so
      time-based requests (`since`, `hubble observe --since 1m`) behave as against a live cluster.
    - `realtime`: publish each flow when the wall clock reaches its own `time` (flows in time order; those
      already in the past at once), as a cluster whose flows carry real timestamps would.

    Example::

        feeder = FlowFeeder(server, simulator_flows, rate_per_second=500, retime=True).start()
        ...
        feeder.stop()
    """

    def __init__(
        self,
        target: FlowSink,
        flows: Iterable[flow_pb2.Flow],
        *,
        rate_per_second: float | None = None,
        retime: bool = False,
        realtime: bool = False,
        tick_seconds: float = 0.05,
        max_batch: int = 5000,
    ) -> None:
        if rate_per_second is not None and rate_per_second <= 0:
            raise ValueError(f"rate_per_second must be > 0, got {rate_per_second}")
        self.target = target
        self.rate_per_second = rate_per_second
        self.retime = retime
        self.realtime = realtime
        if realtime and (retime or rate_per_second is not None):
            raise ValueError(
                "realtime pacing uses the flows' own times: no rate_per_second or retime with it"
            )
        self.tick_seconds = tick_seconds
        self.max_batch = max_batch
        self.published = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.caught_up = threading.Event()
        """Set once every flow due by now (realtime) has been published, or when finished."""
        self._flows: Iterator[flow_pb2.Flow] = iter(flows)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowpipe-flow-feeder", daemon=True)

    def start(self) -> FlowFeeder:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop publishing and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_seconds)

    def wait(self, timeout_seconds: float | None = None) -> bool:
        """Wait until the iterator is exhausted (or failed); returns whether it finished."""
        return self.finished.wait(timeout_seconds)

    def _run(self) -> None:
        try:
            self._feed()
        except BaseException as exc:  # reported through .error; the thread must not die silently
            log.exception("flow feeder stopped")
            self.error = exc
        finally:
            self.caught_up.set()
            self.finished.set()

    def _feed(self) -> None:
        if self.realtime:
            self._feed_realtime()
            return
        start_monotonic = time.monotonic()
        start_ns = time.time_ns()
        rate = self.rate_per_second
        while not self._stop.is_set():
            if rate is None:
                wanted = self.max_batch
            else:
                due = int((time.monotonic() - start_monotonic) * rate) + 1
                wanted = min(due - self.published, self.max_batch)
                if wanted <= 0:
                    self._stop.wait(min(self.tick_seconds, 1.0 / rate))
                    continue
            batch = list(itertools.islice(self._flows, wanted))
            if self.retime:
                for offset, flow in enumerate(batch):
                    index = self.published + offset
                    if rate is None:
                        stamp = time.time_ns() + offset
                    else:
                        stamp = start_ns + int(index * 1_000_000_000 / rate)
                    flow.time.FromNanoseconds(stamp)
            if batch:
                self.target.publish(batch)
                self.published += len(batch)
            if len(batch) < wanted:
                return

    def _feed_realtime(self) -> None:
        pending: flow_pb2.Flow | None = None
        while not self._stop.is_set():
            now_ns = time.time_ns()
            batch: list[flow_pb2.Flow] = []
            while len(batch) < self.max_batch:
                if pending is None:
                    pending = next(self._flows, None)
                    if pending is None:
                        break
                if pending.time.seconds * 1_000_000_000 + pending.time.nanos > now_ns:
                    break
                batch.append(pending)
                pending = None
            if batch:
                self.target.publish(batch)
                self.published += len(batch)
            if pending is None and len(batch) < self.max_batch:
                return  # the iterator is exhausted
            if len(batch) < self.max_batch:
                assert pending is not None
                self.caught_up.set()
                due_ns = pending.time.seconds * 1_000_000_000 + pending.time.nanos
                self._stop.wait(min(self.tick_seconds, max(0.0, (due_ns - time.time_ns()) / 1e9)))

"""Runs a source into sinks over a bounded buffer, moving the source's checkpoint only after sinks acknowledge.

```
source.batches() ──▶ [reader thread] ──▶ bounded buffer ──▶ [caller's thread] ──▶ sink.write() ... ──▶ acks
                                                                                         │
                         source.commit(position) ◀── once every sink acknowledged ───────┘
```

- The buffer holds at most `PipelineConfig.buffer_batches` batches. When it is full the reader thread waits
  (backpressure), so memory stays flat however fast the source is.
- Sinks acknowledge cumulatively (see `flowpipe.sinks`). A batch's position is committed to the source only
  when every sink has acknowledged it; every batch's position is committed, in order.
- Idle sinks are polled every `poll_interval_seconds` so their age-based flush happens without new input.
- Graceful stop: when the `stop` event is set (the CLI sets it on SIGINT/SIGTERM, see `handle_stop_signals`),
  the reader stops taking batches from the source, the batches already buffered are written, every sink is
  flushed, the last durable position is committed, and `run_pipeline` returns with `stopped=True`.
- A source error is raised after the batches before it are flushed and committed; a sink error is raised at
  once, committing nothing more (the batches not yet durable are read again on the next run).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from flowpipe.config import PipelineConfig
from flowpipe.model import EventBatch
from flowpipe.sinks import Ack, Sink
from flowpipe.sources import Source

log = logging.getLogger(__name__)

MAX_ERROR_SAMPLES = 5


@dataclass(slots=True)
class PipelineResult:
    """What one run moved: counts of batches, flows and counted events, the part files, and how it ended."""

    batches: int = 0
    flows: int = 0
    lost_event_records: int = 0
    events_lost: int = 0
    node_status: int = 0
    decode_errors: int = 0
    decode_error_samples: list[str] = field(default_factory=list)
    commits: int = 0
    last_position: object | None = None
    files: list[str] = field(default_factory=list)
    stopped: bool = False


class _End:
    """Marks the end of the source's batches: whether the source ran out, and the error that ended it."""

    def __init__(self, error: BaseException | None = None, *, complete: bool = False) -> None:
        self.error = error
        self.complete = complete


class _Reader(threading.Thread):
    """Pulls batches from the source into the bounded buffer until the source ends, or `stop` or `halt` is set."""

    def __init__(
        self, source: Source, buffer: queue.Queue[EventBatch | _End], tick: float, stop: threading.Event
    ) -> None:
        super().__init__(name="flowpipe-source", daemon=True)
        self.source = source
        self.buffer = buffer
        self.tick = tick
        self.stop = stop  # the caller's stop: seen here at once, so nothing read after it enters the buffer
        self.halt = threading.Event()
        self.consumer_gone = threading.Event()

    def _halted(self) -> bool:
        return self.halt.is_set() or self.stop.is_set()

    def _put(self, item: EventBatch | _End, *, until: Callable[[], bool]) -> bool:
        while not until():
            try:
                self.buffer.put(item, timeout=self.tick)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        error: BaseException | None = None
        complete = False
        batches = self.source.batches()
        try:
            for batch in batches:
                if self._halted() or not self._put(batch, until=self._halted):
                    break
            else:
                complete = True
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, which raises it)
            error = exc
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # the generator's own cleanup failing must not hide the real outcome
                    log.exception("closing the source's batch iterator failed")
            self._put(_End(error, complete=complete), until=self.consumer_gone.is_set)


class _Acks:
    """Tracks each sink's cumulative ack and the positions waiting for all of them."""

    def __init__(self, sinks: Sequence[Sink], source: Source, result: PipelineResult) -> None:
        self.acked = [0] * len(sinks)
        self.pending: deque[tuple[int, object | None]] = deque()
        self.source = source
        self.result = result

    def record(self, index: int, ack: Ack | None) -> None:
        if ack is not None:
            self.acked[index] = max(self.acked[index], ack.batches)
            self.result.files.extend(ack.files)

    def commit_durable(self, written: int) -> None:
        # Every position is committed, in order: positions need not be cumulative (the file source keeps one
        # per file, so a later file's position says nothing about an earlier file). A source that offers
        # `commit_many` gets all positions made durable by one flush in one call (one checkpoint write).
        durable = min(self.acked, default=written)
        positions: list[object] = []
        while self.pending and self.pending[0][0] <= durable:
            _, position = self.pending.popleft()
            if position is not None:
                positions.append(position)
        if not positions:
            return
        commit_many = getattr(self.source, "commit_many", None)
        if commit_many is not None:
            commit_many(positions)
        else:
            for position in positions:
                self.source.commit(position)
        self.result.commits += len(positions)
        self.result.last_position = positions[-1]


def run_pipeline(
    source: Source,
    sinks: Sequence[Sink],
    *,
    config: PipelineConfig | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable[[EventBatch], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PipelineResult:
    """Move every batch of `source` into `sinks`; returns when the source ends or `stop` is set.

    `on_batch` is called with each batch after the sinks took it (progress display). The source is closed
    on return; the sinks are flushed (`close()`) on a normal end or a stop, and left as they are after a
    sink error.

    >>> result = run_pipeline(FileSource(["flows.json"]), [ParquetSink(ParquetSinkConfig(path="data"))])
    """
    config = config or PipelineConfig()
    stop = stop or threading.Event()
    result = PipelineResult()
    buffer: queue.Queue[EventBatch | _End] = queue.Queue(maxsize=config.buffer_batches)
    reader = _Reader(source, buffer, tick=min(config.poll_interval_seconds, 0.1), stop=stop)
    acks = _Acks(sinks, source, result)
    written = 0
    source_error: BaseException | None = None
    reader.start()
    try:
        deadline: float | None = None
        last_poll = clock()
        while True:
            if stop.is_set() and deadline is None:
                log.info("stopping: writing buffered batches, flushing sinks")
                result.stopped = True
                reader.halt.set()
                deadline = clock() + config.stop_timeout_seconds
            try:
                item = buffer.get(timeout=config.poll_interval_seconds)
            except queue.Empty:
                item = None
            if isinstance(item, _End):
                source_error = item.error
                # a stop that came while the last batches were read still counts, unless the source ran out
                result.stopped = stop.is_set() and not item.complete
                break
            if item is not None:
                written += 1
                acks.pending.append((written, item.position))
                for index, sink in enumerate(sinks):
                    acks.record(index, sink.write(item))
                _count(result, item)
                if on_batch is not None:
                    on_batch(item)
            if clock() - last_poll >= config.poll_interval_seconds:
                last_poll = clock()
                for index, sink in enumerate(sinks):
                    acks.record(index, sink.poll())
            acks.commit_durable(written)
            if deadline is not None and item is None and clock() >= deadline:
                log.warning("the source did not stop within %.1fs; closing it", config.stop_timeout_seconds)
                break
        for index, sink in enumerate(sinks):
            acks.record(index, sink.close())
        acks.commit_durable(written)
    except BaseException:
        reader.halt.set()
        raise
    finally:
        reader.consumer_gone.set()
        reader.halt.set()
        source.close()
        # the reader is a daemon thread: after close() it normally ends at once; do not hold the caller long
        reader.join(timeout=min(config.stop_timeout_seconds, 2.0))
    if source_error is not None:
        raise source_error
    return result


def _count(result: PipelineResult, batch: EventBatch) -> None:
    result.batches += 1
    result.flows += batch.flows.num_rows
    result.lost_event_records += len(batch.lost_events)
    result.events_lost += sum(event.num_events_lost for event in batch.lost_events)
    result.node_status += batch.node_status
    result.decode_errors += len(batch.decode_errors)
    room = MAX_ERROR_SAMPLES - len(result.decode_error_samples)
    result.decode_error_samples.extend(str(error) for error in batch.decode_errors[: max(room, 0)])


@contextmanager
def handle_stop_signals(
    stop: threading.Event, *, doing: str = "finishing the current batch"
) -> Iterator[None]:
    """While active, SIGINT and SIGTERM set `stop` (a graceful stop, logged as `doing`); a second signal
    interrupts at once. Every command that runs until stopped uses this one handler.

    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("received %s: %s (send it again to abort)", signal.Signals(signum).name, doing)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

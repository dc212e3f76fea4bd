"""The Parquet sink, measured for the metrics and for readiness: what each flush wrote and how long flows wait.

`collect` wraps its Parquet sink in one; `/readyz` asks `keeping_up` whether flows still reach the dataset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import pyarrow.compute as pc

from flowpipe.errors import SinkError
from flowpipe.metrics.families import PipelineMetrics
from flowpipe.model import EventBatch
from flowpipe.sinks import Ack
from flowpipe.sinks.parquet import ParquetSink

READY_GRACE_SECONDS = 30.0
"""How much longer than the flush interval flows may wait unflushed before /readyz says not ready."""


class InstrumentedParquetSink:
    """The Parquet sink, measured: each flush's rows, bytes, duration and newest flow time go to the metrics."""

    name = "parquet"

    def __init__(
        self, inner: ParquetSink, metrics: PipelineMetrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self._clock = clock
        self._newest: datetime | None = None
        self.waiting_since: float | None = None
        self.failed = False

    def _measured(self, call: Callable[[], Ack | None]) -> Ack | None:
        started = time.perf_counter()
        try:
            ack = call()
        except SinkError:
            self.failed = True
            self.metrics.record_error("sending", "write_failed")
            raise
        if ack is not None and ack.files:
            size = sum(
                info.size or 0 for info in self.inner.dataset.filesystem.get_file_info(list(ack.files))
            )
            self.metrics.record_flush(
                ack.flows, size, time.perf_counter() - started, newest_flow_time=self._newest
            )
        if ack is not None and self.inner.buffered_rows == 0:
            self.waiting_since = None
        return ack

    def write(self, batch: EventBatch) -> Ack | None:
        """Hand the batch to the Parquet sink (which may flush)."""
        if batch.flows.num_rows:
            newest = pc.max(batch.flows.column("time")).as_py()
            if newest is not None and (self._newest is None or newest > self._newest):
                self._newest = newest
            if self.waiting_since is None:
                self.waiting_since = self._clock()
        return self._measured(lambda: self.inner.write(batch))

    def poll(self) -> Ack | None:
        """Flush on age."""
        return self._measured(self.inner.poll)

    def flush(self) -> Ack | None:
        """Flush what is open."""
        return self._measured(self.inner.flush)

    def close(self) -> Ack | None:
        """Flush what is open."""
        return self._measured(self.inner.close)

    def keeping_up(self, flush_interval_seconds: float) -> bool:
        """False when flows have waited unflushed far longer than the flush interval, or a flush failed."""
        if self.failed:
            return False
        if self.waiting_since is None:
            return True
        limit = max(2 * flush_interval_seconds, flush_interval_seconds + READY_GRACE_SECONDS)
        return self._clock() - self.waiting_since <= limit

"""Questions the metrics answer on an interval, beside the counters the sink keeps per batch.

`UnexpectedDropsRefresher` runs the `unexpected_drops` question on an interval and sets the gauges
`flowpipe_unexpected_drops{cluster,why}` and `flowpipe_expected_drops{cluster}`: one answer per cluster (a
collector given `--cluster` answers for its cluster only; of sharded collectors only shard 0 answers), so that
summing over collectors counts each drop once. While the question catalog has no such question it does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.errors import FlowpipeError
from flowpipe.metrics.families import NO_CLUSTER, UNKNOWN, PipelineMetrics

log = logging.getLogger(__name__)

UNEXPECTED_DROPS = "unexpected_drops"
DEFAULT_QUESTION_INTERVAL_SECONDS = 60.0

QuestionRunner = Callable[[], "pa.Table | None"]


def unexpected_drops_runner(
    dataset: str, params: Mapping[str, object] | None = None, *, cluster: str | None = None
) -> QuestionRunner:
    """A callable that runs the `unexpected_drops` question over `dataset` (expected drops shown too, for
    `flowpipe_expected_drops`), keeping the rows of `cluster` when given; it returns None while the question
    catalog has no such question."""

    def run() -> pa.Table | None:
        from flowpipe.query.catalog import load_questions
        from flowpipe.query.engine import open_engine

        catalog = load_questions()
        if UNEXPECTED_DROPS not in catalog:
            return None
        question = catalog.question(UNEXPECTED_DROPS)
        given = dict(params or {})
        if question.parameter("show_expected") is not None:
            given.setdefault("show_expected", "true")
        bound = question.bind(given)
        engine = open_engine(dataset, require_flows=False)
        try:
            result: pa.Table = engine.run(question.sql, bound, question=question.name)
        finally:
            engine.close()
        if cluster is not None and "cluster_name" in result.column_names:
            result = result.filter(pc.equal(result.column("cluster_name"), cluster))
        return result

    return run


def unexpected_drop_counts(result: pa.Table) -> dict[tuple[str, str], float]:
    """(cluster, why) → dropped flows, from an `unexpected_drops` result (its `flows` column, else one per
    row); a row without a cluster name counts for `NO_CLUSTER`."""
    if result.num_rows == 0:
        return {}

    def text(name: str, default: str) -> pa.Array:
        if name not in result.column_names:
            return pa.array([default] * result.num_rows, pa.string())
        return pc.fill_null(pc.cast(result.column(name), pa.string()), default)

    if "flows" in result.column_names:
        values = pc.fill_null(pc.cast(result.column("flows"), pa.float64()), 0.0)
    else:
        values = pa.array(np.ones(result.num_rows))
    table = pa.table(
        {"cluster": text("cluster_name", NO_CLUSTER), "why": text("why", UNKNOWN), "flows": values}
    )
    grouped = table.group_by(["cluster", "why"]).aggregate([("flows", "sum")])
    return {(row["cluster"], row["why"]): float(row["flows_sum"]) for row in grouped.to_pylist()}


class UnexpectedDropsRefresher:
    """Refreshes `flowpipe_unexpected_drops` from the `unexpected_drops` question every `interval_seconds`.

    `poll()` runs the question when it is due; `run_forever(stop)` loops until the event is set (for a thread
    beside `collect`). A failed run is logged and counted (`flowpipe_question_runs_total{outcome="failed"}`)
    and leaves the previous values in place. `available` turns False once the question was found missing.
    """

    def __init__(
        self,
        metrics: PipelineMetrics,
        runner: QuestionRunner,
        *,
        interval_seconds: float = DEFAULT_QUESTION_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        cluster: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.runner = runner
        self.cluster = cluster
        self.interval_seconds = interval_seconds
        self.available: bool | None = None
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        """True when the interval has passed since the last run (or nothing ran yet)."""
        return self._last is None or self._clock() - self._last >= self.interval_seconds

    def poll(self) -> bool:
        """Refresh if due; True when the gauge was set by this call."""
        return self.refresh() if self.due() else False

    def refresh(self) -> bool:
        """Run the question now; True when the gauge was set."""
        self._last = self._clock()
        try:
            result = self.runner()
        except FlowpipeError as exc:
            log.warning("question %s failed: %s", UNEXPECTED_DROPS, exc)
            self.metrics.record_question_run(UNEXPECTED_DROPS, ok=False)
            self.metrics.record_error("processing", "query_failed")
            return False
        if result is None:
            if self.available is not False:
                log.info(
                    "no %s question in the catalog: flowpipe_unexpected_drops is not exported",
                    UNEXPECTED_DROPS,
                )
            self.available = False
            return False
        self.available = True
        clusters = (self.cluster,) if self.cluster else ()
        self.metrics.set_unexpected_drops(unexpected_drop_counts(result), clusters=clusters)
        self.metrics.record_question_run(UNEXPECTED_DROPS, ok=True)
        return True

    def run_forever(self, stop: threading.Event) -> None:
        """Refresh on the interval until `stop` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(max(0.1, self.interval_seconds))


def unexpected_drops_refresher(
    metrics: PipelineMetrics,
    dataset: str,
    *,
    params: Mapping[str, object] | None = None,
    cluster: str | None = None,
    interval_seconds: float = DEFAULT_QUESTION_INTERVAL_SECONDS,
) -> UnexpectedDropsRefresher:
    """The refresher of `flowpipe_unexpected_drops` over `dataset` (of `cluster` only, when given): how both
    `collect` and `serve-metrics` answer the question."""
    return UnexpectedDropsRefresher(
        metrics,
        unexpected_drops_runner(dataset, params, cluster=cluster),
        interval_seconds=interval_seconds,
        cluster=cluster,
    )

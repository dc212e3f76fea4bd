"""Questions the metrics answer on an interval, beside the counters the sink keeps per batch.

Two questions refresh gauges, each through its own `QuestionRefresher`, run together by `QuestionRefreshers`:

- `unexpected_drops` sets `flowpipe_unexpected_drops{cluster,why}` and `flowpipe_expected_drops{cluster}`;
- `dns_failures` sets `flowpipe_dns_lookups{cluster,namespace}` and
  `flowpipe_dns_failed_lookups{cluster,namespace,reason}`: lookups as the question counts them (a client's
  answers for one name across its search-path expansions are one lookup, so NXDOMAIN answers to expansions of a
  name that resolved are no failure), which a counter fed flow by flow cannot tell.

Both give one answer per cluster (a collector given `--cluster` answers for its cluster only; of sharded
collectors only shard 0 answers), so that summing over collectors counts each drop and each lookup once. Every
row of the answer counts (the questions' `limit` is lifted). While the question catalog has no such question a
refresher does nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.errors import ConfigError, FlowpipeError
from flowpipe.metrics.families import NO_CLUSTER, NO_NAMESPACE, OTHER, UNKNOWN, PipelineMetrics
from flowpipe.sinks.prometheus import DEFAULT_MAX_NAMESPACES

log = logging.getLogger(__name__)

UNEXPECTED_DROPS = "unexpected_drops"
DNS_FAILURES = "dns_failures"
GAUGE_QUESTIONS = (UNEXPECTED_DROPS, DNS_FAILURES)
"""The questions behind the gauges, in the order they are run."""
DEFAULT_QUESTION_INTERVAL_SECONDS = 60.0
EVERY_ROW = 1 << 62
"""The `limit` a question runs with for the gauges: every row of the answer counts."""
DNS_FAILED_KINDS = ("rcode", "no_answer", "dropped", "unresolved_final_not_seen")
"""`kind`s of dns_failures rows that are failed lookups (`rcode`: the reason is the rcode name)."""
DNS_LOOKUPS_KIND = "lookups"
"""`kind` of the rows `show_lookups=true` adds: every client workload with its lookups."""

QuestionRunner = Callable[[], "pa.Table | None"]


def question_runner(
    name: str,
    dataset: str,
    params: Mapping[str, object] | None = None,
    *,
    cluster: str | None = None,
    options: Mapping[str, str] | None = None,
) -> QuestionRunner:
    """A callable that runs question `name` over `dataset` for the gauges: with the parameters of `params` the
    question declares, `options` (e.g. `show_expected=true`) and every row unless `params` say otherwise, keeping
    the rows of `cluster` when given; it returns None while the question catalog has no such question."""

    def run() -> pa.Table | None:
        from flowpipe.query.catalog import load_questions
        from flowpipe.query.engine import open_engine

        catalog = load_questions()
        if name not in catalog:
            return None
        question = catalog.question(name)
        given = {key: value for key, value in (params or {}).items() if question.parameter(key) is not None}
        for key, value in {**(options or {}), "limit": str(EVERY_ROW)}.items():
            if question.parameter(key) is not None:
                given.setdefault(key, value)
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


def unexpected_drops_runner(
    dataset: str, params: Mapping[str, object] | None = None, *, cluster: str | None = None
) -> QuestionRunner:
    """The `unexpected_drops` question over `dataset`, expected drops shown too (for `flowpipe_expected_drops`)."""
    return question_runner(
        UNEXPECTED_DROPS, dataset, params, cluster=cluster, options={"show_expected": "true"}
    )


def dns_failures_runner(
    dataset: str, params: Mapping[str, object] | None = None, *, cluster: str | None = None
) -> QuestionRunner:
    """The `dns_failures` question over `dataset`, every client workload's lookups shown too (for
    `flowpipe_dns_lookups`)."""
    return question_runner(DNS_FAILURES, dataset, params, cluster=cluster, options={"show_lookups": "true"})


def check_question_params(params: Mapping[str, object]) -> None:
    """`ConfigError` naming each parameter that no question behind the gauges declares."""
    if not params:
        return
    from flowpipe.query.catalog import load_questions

    catalog = load_questions()
    questions = [catalog.question(name) for name in GAUGE_QUESTIONS if name in catalog]
    declared = sorted({p.name for question in questions for p in question.parameters})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(
            f"question parameter {', '.join(unknown)}: no question behind the gauges "
            f"({', '.join(q.name for q in questions) or 'none in the catalog'}) has it "
            f"(their parameters: {', '.join(declared) or 'none'})"
        )


def _text(result: pa.Table, name: str, default: str) -> pa.Array:
    """A column of `result` as strings, nulls (or a missing column) as `default`."""
    if name not in result.column_names:
        return pa.array([default] * result.num_rows, pa.string())
    return pc.fill_null(pc.cast(result.column(name), pa.string()), default)


def _numbers(result: pa.Table, name: str) -> pa.Array:
    """A column of `result` as floats, nulls as 0; one per row when the column is missing."""
    if name not in result.column_names:
        return pa.array(np.ones(result.num_rows))
    return pc.fill_null(pc.cast(result.column(name), pa.float64()), 0.0)


def _sums(table: pa.Table, keys: list[str], value: str) -> dict[tuple[str, ...], float]:
    """`value` summed per distinct combination of the `keys` columns."""
    if table.num_rows == 0:
        return {}
    grouped = table.group_by(keys).aggregate([(value, "sum")])
    return {tuple(row[k] for k in keys): float(row[f"{value}_sum"]) for row in grouped.to_pylist()}


def unexpected_drop_counts(result: pa.Table) -> dict[tuple[str, str], float]:
    """(cluster, why) → dropped flows, from an `unexpected_drops` result (its `flows` column, else one per
    row); a row without a cluster name counts for `NO_CLUSTER`."""
    table = pa.table(
        {
            "cluster": _text(result, "cluster_name", NO_CLUSTER),
            "why": _text(result, "why", UNKNOWN),
            "flows": _numbers(result, "flows"),
        }
    )
    return {(cluster, why): n for (cluster, why), n in _sums(table, ["cluster", "why"], "flows").items()}


def dns_lookup_counts(
    result: pa.Table, *, max_namespaces: int = DEFAULT_MAX_NAMESPACES
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str, str], float]]:
    """(cluster, namespace) → lookups and (cluster, namespace, reason) → failed lookups, from a `dns_failures`
    result run with `show_lookups=true`.

    Lookups are the `lookups` of its `lookups` rows; failed lookups the `failures` of its failure rows, by reason:
    the rcode name for kind `rcode`, else the kind (`no_answer`, `dropped`, `unresolved_final_not_seen`).
    `no_l7_visibility` rows count nowhere (their `lookups` are L3/L4 packets). No cluster: `NO_CLUSTER`; no
    namespace: `NO_NAMESPACE`. The `max_namespaces` namespaces with the most lookups keep their name, the others
    count as `other` (`NO_NAMESPACE` always keeps its own)."""
    kind = _text(result, "kind", UNKNOWN)
    rcode = pc.equal(kind, "rcode")
    table = pa.table(
        {
            "cluster": _text(result, "cluster_name", NO_CLUSTER),
            "namespace": _text(result, "source_namespace", NO_NAMESPACE),
            "reason": pc.if_else(rcode, _text(result, "rcode_name", UNKNOWN), kind),
            "lookups": _numbers(result, "lookups"),
            "failures": _numbers(result, "failures"),
        }
    )
    looked = table.filter(pc.equal(kind, DNS_LOOKUPS_KIND))
    failed = table.filter(pc.is_in(kind, value_set=pa.array(DNS_FAILED_KINDS, pa.string())))
    by_namespace = _sums(looked, ["namespace"], "lookups")
    ranked = sorted(
        (ns for (ns,) in by_namespace if ns != NO_NAMESPACE), key=lambda ns: (-by_namespace[(ns,)], ns)
    )
    kept = {NO_NAMESPACE, *ranked[:max_namespaces]}

    def capped(namespace: str) -> str:
        return namespace if namespace in kept else OTHER

    lookups: dict[tuple[str, str], float] = {}
    for (cluster, namespace), n in _sums(looked, ["cluster", "namespace"], "lookups").items():
        key = (cluster, capped(namespace))
        lookups[key] = lookups.get(key, 0.0) + n
    failures: dict[tuple[str, str, str], float] = {}
    for (cluster, namespace, reason), n in _sums(
        failed, ["cluster", "namespace", "reason"], "failures"
    ).items():
        key = (cluster, capped(namespace), reason)
        failures[key] = failures.get(key, 0.0) + n
    return lookups, failures


class QuestionRefresher:
    """Refreshes gauges from one question every `interval_seconds`; subclasses say which (`apply`).

    `poll()` runs the question when it is due; `run_forever(stop)` loops until the event is set (for a thread
    beside `collect`). A failed run is logged and counted (`flowpipe_question_runs_total{outcome="failed"}`)
    and leaves the previous values in place. `available` turns False once the question was found missing.
    Gauges labelled by namespace keep the names of `max_namespaces` namespaces, the rest count as `other`.
    """

    question = ""
    gauges = ""
    """The gauge families it sets, for the log."""

    def __init__(
        self,
        metrics: PipelineMetrics,
        runner: QuestionRunner,
        *,
        interval_seconds: float = DEFAULT_QUESTION_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        cluster: str | None = None,
        max_namespaces: int = DEFAULT_MAX_NAMESPACES,
    ) -> None:
        self.metrics = metrics
        self.runner = runner
        self.cluster = cluster
        self.max_namespaces = max_namespaces
        self.interval_seconds = interval_seconds
        self.available: bool | None = None
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        """True when the interval has passed since the last run (or nothing ran yet)."""
        return self._last is None or self._clock() - self._last >= self.interval_seconds

    def poll(self) -> bool:
        """Refresh if due; True when the gauges were set by this call."""
        return self.refresh() if self.due() else False

    def refresh(self) -> bool:
        """Run the question now; True when the gauges were set."""
        self._last = self._clock()
        try:
            result = self.runner()
        except FlowpipeError as exc:
            log.warning("question %s failed: %s", self.question, exc)
            self.metrics.record_question_run(self.question, ok=False)
            self.metrics.record_error("processing", "query_failed")
            return False
        if result is None:
            if self.available is not False:
                log.info("no %s question in the catalog: %s not exported", self.question, self.gauges)
            self.available = False
            return False
        self.available = True
        self.apply(result, (self.cluster,) if self.cluster else ())
        self.metrics.record_question_run(self.question, ok=True)
        return True

    def apply(self, result: pa.Table, clusters: tuple[str, ...]) -> None:
        """Set the gauges from the question's answer (`clusters`: the clusters answered for, when known)."""
        raise NotImplementedError

    def run_forever(self, stop: threading.Event) -> None:
        """Refresh on the interval until `stop` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(max(0.1, self.interval_seconds))


class UnexpectedDropsRefresher(QuestionRefresher):
    """Refreshes `flowpipe_unexpected_drops` and `flowpipe_expected_drops` from `unexpected_drops`."""

    question = UNEXPECTED_DROPS
    gauges = "flowpipe_unexpected_drops"

    def apply(self, result: pa.Table, clusters: tuple[str, ...]) -> None:
        self.metrics.set_unexpected_drops(unexpected_drop_counts(result), clusters=clusters)


class DnsFailuresRefresher(QuestionRefresher):
    """Refreshes `flowpipe_dns_lookups` and `flowpipe_dns_failed_lookups` from `dns_failures` (run with
    `show_lookups=true`), the namespaces capped at `max_namespaces`."""

    question = DNS_FAILURES
    gauges = "flowpipe_dns_lookups and flowpipe_dns_failed_lookups"

    def apply(self, result: pa.Table, clusters: tuple[str, ...]) -> None:
        lookups, failed = dns_lookup_counts(result, max_namespaces=self.max_namespaces)
        self.metrics.set_dns_lookups(lookups, failed, clusters=clusters)


class QuestionRefreshers:
    """The refreshers of every question gauge, polled together: what `collect` and `serve-metrics` run."""

    def __init__(self, refreshers: Iterable[QuestionRefresher]) -> None:
        self.refreshers = tuple(refreshers)

    def __iter__(self) -> Iterator[QuestionRefresher]:
        return iter(self.refreshers)

    @property
    def interval_seconds(self) -> float:
        """The shortest interval of them."""
        return min((r.interval_seconds for r in self.refreshers), default=DEFAULT_QUESTION_INTERVAL_SECONDS)

    def poll(self) -> bool:
        """Refresh each one that is due; True when any gauge was set."""
        ran = [refresher.poll() for refresher in self.refreshers]  # every one, not up to the first
        return any(ran)

    def refresh(self) -> bool:
        """Run every question now; True when any gauge was set."""
        ran = [refresher.refresh() for refresher in self.refreshers]
        return any(ran)

    def run_forever(self, stop: threading.Event) -> None:
        """Refresh on the interval until `stop` is set."""
        while not stop.is_set():
            self.poll()
            stop.wait(max(0.1, self.interval_seconds))


def question_refreshers(
    metrics: PipelineMetrics,
    dataset: str,
    *,
    params: Mapping[str, object] | None = None,
    cluster: str | None = None,
    interval_seconds: float = DEFAULT_QUESTION_INTERVAL_SECONDS,
    max_namespaces: int = DEFAULT_MAX_NAMESPACES,
) -> QuestionRefreshers:
    """The refreshers of every question gauge over `dataset` (of `cluster` only, when given): how both `collect`
    and `serve-metrics` answer the questions. `params` go to each question that declares them."""
    return QuestionRefreshers(
        (
            UnexpectedDropsRefresher(
                metrics,
                unexpected_drops_runner(dataset, params, cluster=cluster),
                interval_seconds=interval_seconds,
                cluster=cluster,
            ),
            DnsFailuresRefresher(
                metrics,
                dns_failures_runner(dataset, params, cluster=cluster),
                interval_seconds=interval_seconds,
                cluster=cluster,
                max_namespaces=max_namespaces,
            ),
        )
    )

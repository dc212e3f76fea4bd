"""Run a question on an engine: check and bind its parameters, anchor relative times, return the rows.

Relative times (`since=1h`, `until=now`) count back from an anchor, chosen by `relative_to` (`relative_anchor`,
the one rule every command that takes `--since` follows):

- `"now"`: the clock (or the `now=` given, e.g. from `flowpipe query --now`).
- `"data"`: the time of the newest record in the dataset (flows and `lost_events` alike), so `since=1h` is the
  last hour of the capture.
- `"auto"` (the default): the clock, unless the newest record is older than the longest relative window asked
  for (e.g. a capture from 2021 and `since=1h`); then the newest record. A live dataset is thus queried against
  the clock, and an old capture still answers instead of returning nothing. `QuestionResult.anchored_to` says
  which was used, and the CLI prints a note when it was the data.

`all` is no bound (`since=all`: from the first record). A window whose end is not given (`until` left at its
default `now`) ends at the anchor or at the newest record, whichever is later (unless `now=` pins the clock), so
a capture's own records are never cut off: a lost-events record a second after the last flow is inside it.

Windows include both ends (`time >= $since AND time <= $until`), so the newest record is inside a window that
ends at a data anchor. `window_coverage` counts what a window leaves out of the data, for the note that says
how to see it all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.errors import ConfigError
from flowpipe.query.catalog import RELATIVE_TO, Question, RelativeTo
from flowpipe.query.engine import FLOWS_VIEW, LOST_EVENTS_VIEW, Engine
from flowpipe.query.timeparse import (
    EARLIEST_FLOW_TIME,
    LATEST_FLOW_TIME,
    format_datetime,
    is_relative_time,
    parse_duration,
    parse_time,
    to_utc,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class QuestionResult:
    """The rows a question returned, the parameter values bound, and the anchor of relative times."""

    question: Question
    table: pa.Table
    params: dict[str, object] = field(default_factory=dict)
    anchor: datetime | None = None
    anchored_to: Literal["now", "data"] = "now"


def newest_flow_time(engine: Engine) -> datetime | None:
    """The time of the newest flow in the engine's `flows` view, or None when there is none.

    Flow times have nanoseconds and Python datetimes (hence bound parameters) microseconds, so the time is
    rounded up to the next microsecond: a window ending there still includes the newest flow.
    """
    return _newest(engine, f"SELECT max(time) AS newest FROM {FLOWS_VIEW}")


def newest_record_time(engine: Engine) -> datetime | None:
    """The time of the newest record among flows and `lost_events` (rounded up to the microsecond), or None."""
    return _newest(
        engine,
        f"SELECT max(newest) AS newest FROM (SELECT max(time) AS newest FROM {FLOWS_VIEW} "
        f"UNION ALL SELECT max(time) FROM {LOST_EVENTS_VIEW})",
    )


def _newest(engine: Engine, sql: str) -> datetime | None:
    table = engine.run(sql, question="newest record time")
    if table.num_rows == 0:
        return None
    column = table.column("newest")
    if not pa.types.is_timestamp(column.type):
        return None
    unit = column.type.unit
    ticks = pc.cast(column, pa.int64())[0].as_py()
    if ticks is None:
        return None
    per_microsecond = {"s": None, "ms": None, "us": 1, "ns": 1000}[unit]
    if per_microsecond is None:
        return to_utc(column[0].as_py())
    return _EPOCH + timedelta(microseconds=-(-ticks // per_microsecond))


def relative_anchor(
    newest: datetime | None,
    span: timedelta | None,
    *,
    relative_to: RelativeTo = "auto",
    now: datetime | None = None,
) -> tuple[datetime, Literal["now", "data"]]:
    """What relative times count back from: the clock, or `newest` (the data's newest record).

    `span` is the longest relative window asked for (None: none is relative). With `auto`, the data is the
    anchor when it ends before the clock minus `span` (an old capture), else the clock.
    """
    if relative_to not in RELATIVE_TO:
        raise ConfigError(f"relative_to must be one of {', '.join(RELATIVE_TO)}, got {relative_to!r}")
    clock = to_utc(now) if now is not None else datetime.now(UTC)
    if relative_to == "now" or span is None or newest is None:
        return clock, "now"
    if relative_to == "data" or newest < clock - span:
        return newest, "data"
    return clock, "now"


def resolve_window(
    newest: datetime | None, since: str | None, until: str | None, *, now: datetime | None = None
) -> tuple[datetime | None, datetime | None, datetime | None]:
    """The (since, until) bounds, and the newest flow's time when relative values count back from it.

    Relative values count back from the clock, unless the dataset is older than the window asked for: then
    from the newest flow, so that an old capture still answers.
    """
    span = parse_duration(since) if since is not None and is_relative_time(since) else None
    anchor, anchored_to = relative_anchor(newest, span, now=now)
    start = parse_time(since, anchor=anchor, name="--since") if since is not None else None
    end = parse_time(until, anchor=anchor, name="--until", end=True) if until is not None else None
    return start, end, anchor if anchored_to == "data" else None


def bind_window(
    engine: Engine,
    question: Question,
    values: Mapping[str, object],
    *,
    relative_to: RelativeTo = "auto",
    now: datetime | None = None,
) -> tuple[dict[str, object], datetime, Literal["now", "data"]]:
    """The question's bound parameters, the anchor of its relative times (`relative_anchor`) and what it is.

    A time parameter `until` left at its default `now` ends the window at the anchor or at the newest record,
    whichever is later (records stamped ahead of the clock stay in), unless `now` pins the clock.
    """
    span = question.relative_span(values)
    newest = newest_record_time(engine) if relative_to != "now" and span is not None else None
    anchor, anchored_to = relative_anchor(newest, span, relative_to=relative_to, now=now)
    params = question.bind(values, anchor=anchor)
    until = question.parameter("until")
    if (
        until is not None
        and until.type == "time"
        and values.get("until") is None
        and now is None
        and (until.default or "").strip().lower() == "now"
    ):
        newest = newest_record_time(engine)
        params["until"] = max(anchor, newest) if newest is not None else anchor
    return params, anchor, anchored_to


@dataclass(frozen=True, slots=True)
class WindowCoverage:
    """How much of the data a window holds: flows and lost-events records in all and outside the window, and
    the span of the data (records with a time)."""

    flows: int = 0
    flows_outside: int = 0
    lost_events: int = 0
    lost_events_outside: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None

    @property
    def partial(self) -> bool:
        """Whether the window leaves some of the data out."""
        return bool(self.flows_outside or self.lost_events_outside)

    def note(self, since: object, until: object) -> str:
        """A note saying what the window leaves out and how to see it (`--since all`)."""
        parts = [f"{self.flows_outside:,} of {self.flows:,} flows"]
        if self.lost_events_outside:
            parts.append(f"{self.lost_events_outside:,} of {self.lost_events:,} lost-event records")
        window = " to ".join(_when(value) for value in (since, until))
        span = f"{_when(self.oldest)} to {_when(self.newest)}"
        return (
            f"note: the window ({window}) leaves out {' and '.join(parts)}; the data spans {span}. "
            "Use --since all to see all of it, or --since/--until to choose a window"
        )


def _when(value: object) -> str:
    return window_bound(value) if isinstance(value, datetime) else "?"


def window_bound(value: datetime) -> str:
    """A window's start or end for people: its time, or `the first record` / `the last record` for `all`."""
    if value == EARLIEST_FLOW_TIME:
        return "the first record"
    if value == LATEST_FLOW_TIME:
        return "the last record"
    return format_datetime(to_utc(value))


def window_coverage(engine: Engine, since: datetime | None, until: datetime | None) -> WindowCoverage:
    """Count the flows and lost-events records with a time outside `since`..`until` (None: unbounded)."""
    low = since if since is not None else EARLIEST_FLOW_TIME
    high = until if until is not None else LATEST_FLOW_TIME
    parts = [
        f"SELECT '{view}' AS kind, count(*) AS total, count(*) FILTER (WHERE time < $since OR time > $until) "
        f"AS outside, min(time) AS oldest, max(time) AS newest FROM {view} WHERE time IS NOT NULL"
        for view in (FLOWS_VIEW, LOST_EVENTS_VIEW)
    ]
    table = engine.run(" UNION ALL ".join(parts), {"since": low, "until": high}, question="window coverage")
    rows = {row["kind"]: row for row in table.to_pylist()}
    flows, lost = rows[FLOWS_VIEW], rows[LOST_EVENTS_VIEW]
    oldest = [r["oldest"] for r in (flows, lost) if r["oldest"] is not None]
    newest = [r["newest"] for r in (flows, lost) if r["newest"] is not None]
    return WindowCoverage(
        flows=int(flows["total"]),
        flows_outside=int(flows["outside"]),
        lost_events=int(lost["total"]),
        lost_events_outside=int(lost["outside"]),
        oldest=min(oldest) if oldest else None,
        newest=max(newest) if newest else None,
    )


def run_question(
    engine: Engine,
    question: Question,
    values: Mapping[str, object] | None = None,
    *,
    relative_to: RelativeTo = "auto",
    now: datetime | None = None,
) -> QuestionResult:
    """Run `question` with `values` (strings from the CLI or Python values); defaults fill the rest.

    >>> run_question(engine, catalog.question("top_talkers"), {"since": "1d", "limit": "5"})  # doctest: +SKIP

    Raises `QuestionParameterError` for unknown, missing or malformed parameters and `QueryError` when the SQL
    fails.
    """
    given = dict(values or {})
    question.check_values(given)
    params, anchor, anchored_to = bind_window(engine, question, given, relative_to=relative_to, now=now)
    table = engine.run(question.sql, params, question=question.name)
    return QuestionResult(
        question=question, table=table, params=params, anchor=anchor, anchored_to=anchored_to
    )

"""Run a question on an engine: check and bind its parameters, anchor relative times, return the rows.

Relative times (`since=1h`, `until=now`) count back from an anchor, chosen by `relative_to`:

- `"now"`: the clock (or the `now=` given, e.g. from `flowpipe query --now`).
- `"data"`: the time of the newest flow in the dataset, so `since=1h` is the last hour of the capture.
- `"auto"` (the default): the clock, unless the newest flow is older than the longest relative window asked for
  (e.g. a capture from 2021 and `since=1h`); then the newest flow. A live dataset is thus queried against the
  clock, and an old capture still answers instead of returning nothing. `QuestionResult.anchored_to` says which
  was used, and the CLI prints a note when it was the data.

Windows include both ends (`time >= $since AND time <= $until`), so the newest flow is inside a window that
ends at a data anchor.
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
from flowpipe.query.engine import FLOWS_VIEW, Engine
from flowpipe.query.timeparse import to_utc

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
    table = engine.run(f"SELECT max(time) AS newest FROM {FLOWS_VIEW}", question="newest flow time")
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


def resolve_anchor(
    engine: Engine,
    question: Question,
    values: Mapping[str, object],
    *,
    relative_to: RelativeTo = "auto",
    now: datetime | None = None,
) -> tuple[datetime, Literal["now", "data"]]:
    """The anchor for the question's relative time values, and whether it is the clock or the data."""
    if relative_to not in RELATIVE_TO:
        raise ConfigError(f"relative_to must be one of {', '.join(RELATIVE_TO)}, got {relative_to!r}")
    clock = to_utc(now) if now is not None else datetime.now(UTC)
    span = question.relative_span(values)
    if relative_to == "now" or span is None:
        return clock, "now"
    newest = newest_flow_time(engine)
    if newest is None:
        return clock, "now"
    if relative_to == "data" or newest < clock - span:
        return newest, "data"
    return clock, "now"


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
    anchor, anchored_to = resolve_anchor(engine, question, given, relative_to=relative_to, now=now)
    params = question.bind(given, anchor=anchor)
    table = engine.run(question.sql, params, question=question.name)
    return QuestionResult(
        question=question, table=table, params=params, anchor=anchor, anchored_to=anchored_to
    )

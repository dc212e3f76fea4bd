"""Parse the time values users give questions: `1h`, `30m`, `7d`, `45s`, `now` and ISO 8601 timestamps.

A relative value means "that long before the anchor". The anchor is normally the clock, but for an old capture
it is more useful to anchor at the newest flow of the dataset; `flowpipe.query.run` decides which (see its
docstring). Every result is an aware `datetime` in UTC.

Accepted forms:

- `now`: the anchor itself.
- `all`: no bound: as a window's start, the first flow; as its end (`end=True`), the last.
- `<number><unit>` with units `s`, `m`, `h`, `d`, `w`, combinable (`1h30m`), optionally with a leading `-`
  (`-1h` means the same as `1h`): that long before the anchor.
- ISO 8601 (`2024-05-01`, `2024-05-01T10:00`, `2024-05-01 10:00:00.5`, with `Z` or an offset such as `+02:00`).
  A timestamp without an offset is taken as UTC, the time zone of the dataset.

Results are clamped to `EARLIEST_FLOW_TIME` .. `LATEST_FLOW_TIME`, the range of the flow table's `time` (int64
nanoseconds): `--since 0001-01-01` or `--since 100000d` means "from the first flow", not an error, and DuckDB
never has to compare the column with a value it cannot represent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flowpipe.errors import ConfigError, QuestionParameterError

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^-?(?:\d+(?:\.\d+)?[smhdw])+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_ISO_START = re.compile(r"^\d{4}-\d{2}-\d{2}")
ALL = "all"
"""The time value of no bound: `--since all` selects from the first flow on."""

EARLIEST_FLOW_TIME = datetime(1677, 9, 22, tzinfo=UTC)
"""No flow time is earlier (a nanosecond timestamp in 64 bits starts on 1677-09-21)."""
LATEST_FLOW_TIME = datetime(2262, 4, 11, tzinfo=UTC)
"""No flow time is later (a nanosecond timestamp in 64 bits ends on 2262-04-11)."""
_LONGEST = LATEST_FLOW_TIME - EARLIEST_FLOW_TIME


def is_relative_time(text: str) -> bool:
    """True for values that depend on the anchor: `now` and durations such as `1h` or `1h30m`."""
    value = text.strip().lower()
    return value == "now" or bool(_RELATIVE.match(value))


def looks_like_time(text: str) -> bool:
    """True when `text` is a time value this module can parse (used to infer a parameter's type)."""
    value = text.strip()
    return is_relative_time(value) or value.lower() == ALL or bool(_ISO_START.match(value))


def parse_duration(text: str) -> timedelta:
    """The length of a duration such as `1h`, `30m`, `7d`, `45s` or `1h30m` (`now` is zero).

    A duration longer than the whole range of flow times is shortened to that range (it selects the same flows).
    """
    value = text.strip().lower()
    if value == "now":
        return timedelta(0)
    if not _RELATIVE.match(value):
        raise ValueError(f"not a duration: {text!r} (use e.g. 45s, 30m, 1h, 7d, 2w)")
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(value))
    return timedelta(seconds=min(seconds, _LONGEST.total_seconds()))


def parse_seconds(text: str, *, allow_zero: bool = False) -> float:
    """Seconds from a duration as `--since` takes it (`90s`, `10m`, `1h30m`, `2d`, `1w`: `parse_duration`) or a
    bare number of seconds (`90`); more than 0 unless `allow_zero`; raises ConfigError otherwise."""
    value = text.strip()
    try:
        if value.startswith("-") or value.lower() == "now":
            raise ValueError(value)
        seconds = float(value) if _SECONDS.fullmatch(value) else parse_duration(value).total_seconds()
    except ValueError:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90s, 10m, 1h30m, 2d, 1w") from None
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigError(f"invalid duration {text!r}: it must be more than 0 (e.g. 90s, 10m, 1h30m)")
    return seconds


def parse_time(
    text: str, *, anchor: datetime | None = None, name: str = "time", end: bool = False
) -> datetime:
    """Parse a time value into an aware UTC datetime; relative values count back from `anchor` (default: now).

    `all` is the earliest flow time, or with `end` (the value ends a window) the latest.

    >>> parse_time("1h", anchor=datetime(2024, 5, 1, 12, tzinfo=UTC))
    datetime.datetime(2024, 5, 1, 11, 0, tzinfo=datetime.timezone.utc)

    Raises `QuestionParameterError` naming the parameter (`name`) when the value is not a time. The result is
    clamped to `EARLIEST_FLOW_TIME` .. `LATEST_FLOW_TIME`.
    """
    value = text.strip()
    if value.lower() == ALL:
        return LATEST_FLOW_TIME if end else EARLIEST_FLOW_TIME
    if is_relative_time(value):
        base = to_utc(anchor) if anchor is not None else datetime.now(UTC)
        try:
            return clamp_to_flow_times(base - parse_duration(value))
        except OverflowError:  # before year 1
            return EARLIEST_FLOW_TIME
    try:
        # Python 3.11 accepts `Z`, offsets, a space instead of `T`, and dates alone.
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise QuestionParameterError(
            f"parameter {name}: {text!r} is not a time; use a duration back from now (45s, 30m, 1h, 7d), "
            "`now`, `all` (no bound), or an ISO timestamp such as 2024-05-01T10:00:00Z"
        ) from None
    return clamp_to_flow_times(to_utc(parsed))


def clamp_to_flow_times(value: datetime) -> datetime:
    """`value` (aware) moved into `EARLIEST_FLOW_TIME` .. `LATEST_FLOW_TIME` when it lies outside."""
    return min(max(value, EARLIEST_FLOW_TIME), LATEST_FLOW_TIME)


def to_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_datetime(value: datetime) -> str:
    """ISO 8601; aware values in UTC with `Z` (nanoseconds kept when the value has them)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
        text = value.isoformat()
        return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text
    return value.isoformat()

"""Render rows for people or scripts: a rich table, JSON (one array, or JSON Lines), or CSV with a header.

Every command that prints rows (`query`, `sql`, `schema`, and later `replay`, `suggest --explain`) goes through
`render()`, so the formats agree everywhere. The rows are an Arrow table, or `Records` (plain Python rows, for
commands such as `query --list` that must not import pyarrow):

- `json`: ONE JSON array of objects keyed by column name, one object per line. Timestamps are ISO 8601 in UTC
  with `Z`; dates and times ISO; NULL, NaN and infinities are `null`; integers stay exact however large
  (DuckDB's HUGEINT sums arrive as decimals and are written as integers); lists and structs nest; maps
  (`histogram()`, `MAP {...}`) are objects with their keys as strings; intervals are seconds (or ISO 8601
  `P...` when they hold months); bytes are base64.
- `jsonl`: the same objects, one per line and nothing else (JSON Lines, for `jq` and other line tools).
- `csv`: a header row, then one row per record. NULL is an empty field; lists, structs and maps are compact
  JSON; timestamps as in JSON; booleans `true`/`false`.
- `table`: a rich table with a row count caption; cell text is never read as rich markup, and control
  characters in it (terminal escape sequences, newlines, carriage returns, also in column names) are shown
  escaped (`\x1b`, `\n`), so text from flows cannot move the cursor, recolour or rewrite the terminal. A result too wide
  for the terminal (each text column at least `_MIN_TEXT_WIDTH` characters, numbers and times whole) is
  shown one record at a time instead, a `column  value` line per column, as psql's expanded mode does; its
  lines carry no trailing padding.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO
from uuid import UUID

from rich.console import Console
from rich.segment import Segment, Segments
from rich.table import Table
from rich.text import Text

from flowpipe.query.timeparse import format_datetime

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("table", "json", "jsonl", "csv")
_PIPE_WIDTH = 200
_MIN_TEXT_WIDTH = 12
"""A text column narrower than this (or than its longest value, when shorter) is unreadable in a table."""


@dataclass(frozen=True, slots=True)
class Records:
    """Rows already in Python: the column names and one tuple of values per row.

    A column is shown as numbers (right-aligned, never wrapped) when its values are all numbers, and never
    wrapped when they are all times.
    """

    names: Sequence[str]
    rows: Sequence[Sequence[Any]]


def render(
    table: pa.Table | Records,
    output_format: str = "table",
    *,
    out: TextIO | None = None,
    title: str | None = None,
) -> None:
    """Write `table` to `out` (default: stdout) as `table`, `json`, `jsonl` or `csv`."""
    stream = out if out is not None else sys.stdout
    if output_format == "json":
        write_json(table, stream)
    elif output_format == "jsonl":
        write_jsonl(table, stream)
    elif output_format == "csv":
        write_csv(table, stream)
    elif output_format == "table":
        print_table(table, stream, title=title)
    else:
        raise ValueError(f"unknown output format {output_format!r} (one of {', '.join(FORMATS)})")


def unique_names(names: Sequence[str]) -> list[str]:
    """Column names made unique for use as object keys: a repeated `n` becomes `n_2`, `n_3`, ..."""
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        result.append(name if count == 1 else f"{name}_{count}")
    return result


def to_records(table: pa.Table | Records) -> list[dict[str, Any]]:
    """The rows of `table` as JSON-ready dicts (see the module docstring for how values are converted)."""
    names = unique_names(_names(table))
    return [{n: json_value(v) for n, v in zip(names, row, strict=True)} for row in _rows(table)]


def write_jsonl(table: pa.Table | Records, out: TextIO) -> None:
    """JSON Lines: one object per line, keyed by column name."""
    for record in to_records(table):
        out.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
        out.write("\n")


def write_json(table: pa.Table | Records, out: TextIO) -> None:
    """One JSON array of objects keyed by column name, one object per line."""
    records = to_records(table)
    if not records:
        out.write("[]\n")
        return
    out.write("[\n")
    for index, record in enumerate(records):
        out.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
        out.write(",\n" if index < len(records) - 1 else "\n")
    out.write("]\n")


def write_csv(table: pa.Table | Records, out: TextIO) -> None:
    """CSV with a header row; NULL is empty, nested values are compact JSON."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_names(table))
    for record in _rows(table):
        writer.writerow([csv_value(v) for v in record])


def print_table(table: pa.Table | Records, out: TextIO, *, title: str | None = None) -> None:
    """A rich table of `table` with a row-count caption."""
    # A terminal gets a table that fits its width; a pipe or file gets a wide page (rich would otherwise
    # squeeze every table into 80 columns), or $COLUMNS when set.
    width = None if out.isatty() or os.environ.get("COLUMNS") else _PIPE_WIDTH
    console = Console(file=out, highlight=False, soft_wrap=False, width=width)
    names = list(_names(table))
    rows = list(_rows(table))
    caption = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    records = [[_cell(v) for v in record] for record in rows]
    # numbers and times never wrap; long text columns give way instead
    numeric, atomic = _column_kinds(table, rows)
    if _needed_width(names, records, atomic) > console.width:
        _print_expanded(console, names, records, numeric, title=title, caption=caption)
        return
    view = Table(title=title, caption=caption, show_lines=False)
    for name, is_numeric, is_atomic in zip(names, numeric, atomic, strict=True):
        view.add_column(
            Text(printable(name)),
            justify="right" if is_numeric else "left",
            overflow="fold",
            no_wrap=is_atomic,
        )
    for cells in records:
        view.add_row(*cells)
    console.print(view)


def _column_kinds(table: pa.Table | Records, rows: Sequence[Sequence[Any]]) -> tuple[list[bool], list[bool]]:
    """Per column: is it numeric, and is it atomic (numbers and times, never wrapped)."""
    if isinstance(table, Records):
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in table.names]
        numeric = [_all_are(c, (int, float, Decimal)) for c in columns]
        times = [_all_are(c, (datetime, date, time, timedelta)) for c in columns]
        return numeric, [n or t for n, t in zip(numeric, times, strict=True)]
    import pyarrow as pa

    types = [field.type for field in table.schema]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in types]
    return numeric, [n or pa.types.is_temporal(t) for n, t in zip(numeric, types, strict=True)]


def _all_are(values: Iterable[Any], kinds: tuple[type, ...]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in present)


def _needed_width(names: Sequence[str], records: Sequence[Sequence[Text]], atomic: Sequence[bool]) -> int:
    """The narrowest readable table: numbers and times whole, text columns `_MIN_TEXT_WIDTH` wide (or less
    when every value and the header are shorter), plus rich's padding and borders (3 a column, 1 more)."""
    total = 1
    for index, name in enumerate(names):
        longest = max([len(name), *(cells[index].cell_len for cells in records)])
        total += (longest if atomic[index] else min(longest, _MIN_TEXT_WIDTH)) + 3
    return total


def _print_expanded(
    console: Console,
    names: Sequence[str],
    records: Sequence[Sequence[Text]],
    numeric: Sequence[bool],
    *,
    title: str | None,
    caption: str,
) -> None:
    """One record at a time: a rule naming the record, then `column  value` lines (values fold, never cut).

    rich pads every line of a grid to the grid's width (the terminal's, once a value folds); the lines are
    printed without that trailing padding.
    """
    if title:
        console.print(Text(title, style="bold"))
    for number, cells in enumerate(records, start=1):
        console.print(Text(f"-[ row {number} ]" + "-" * 20, style="dim"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style="bold")
        grid.add_column(overflow="fold")
        for name, cell in zip(names, cells, strict=True):
            grid.add_row(Text(printable(name)), cell)
        for line in console.render_lines(grid, pad=False, new_lines=False):
            while line and not line[-1].text.strip() and not line[-1].control:
                line.pop()
            if line:
                line[-1] = line[-1]._replace(text=line[-1].text.rstrip())
            console.print(Segments([*line, Segment.line()]), crop=False, end="")
    console.print(Text(caption, style="dim italic"))


def json_value(value: Any) -> Any:
    """A Python value from Arrow as something `json.dumps` writes exactly and without NaN."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    pyarrow = sys.modules.get("pyarrow")  # an Arrow interval can only come from an already loaded pyarrow
    if pyarrow is not None and isinstance(value, pyarrow.MonthDayNano):
        return _interval(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def csv_value(value: Any) -> str:
    """One CSV field: empty for NULL, JSON for nested values, ISO for times."""
    converted = json_value(value)
    if converted is None:
        return ""
    if isinstance(converted, bool):
        return "true" if converted else "false"
    if isinstance(converted, (list, dict)):
        return json.dumps(converted, ensure_ascii=False, separators=(",", ":"))
    return str(converted)


def _short_datetime(value: datetime) -> str:
    """For tables: `2024-05-01 10:00:00.123Z`, milliseconds at most."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond // 1000:03d}"
    return text + ("Z" if value.tzinfo is not None else "")


def _interval(value: pa.MonthDayNano) -> float | str:
    months, days, nanoseconds = int(value.months), int(value.days), int(value.nanoseconds)
    if months == 0:
        return days * 86400 + nanoseconds / 1e9
    return f"P{months}M{days}DT{nanoseconds / 1e9:g}S"


def _names(table: pa.Table | Records) -> Sequence[str]:
    return table.names if isinstance(table, Records) else table.column_names


def _rows(table: pa.Table | Records) -> Iterable[Sequence[Any]]:
    if isinstance(table, Records):
        return table.rows
    columns = [_pylist(column) for column in table.columns]
    return zip(*columns, strict=True) if columns else iter(())


def _pylist(column: pa.ChunkedArray) -> list[Any]:
    # Maps as dicts (pyarrow's default is a list of (key, value) pairs); DuckDB map keys are unique.
    values: list[Any] = column.to_pylist(maps_as_pydicts="lossy")
    return values


_CONTROL_ESCAPES = {
    code: ("\\n" if code == 10 else "\\t" if code == 9 else "\\r" if code == 13 else f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}
"""C0 and C1 control characters and DEL, each as a visible escape (`\x1b`, `\n`); for terminal text."""


def printable(text: str) -> str:
    """`text` with its control characters escaped: safe to print on a terminal."""
    return text.translate(_CONTROL_ESCAPES)


def _cell(value: Any) -> Text:
    text = None if value is None else _cell_text(value)
    return Text("–", style="dim") if text is None else Text(printable(text))


def _cell_text(value: Any) -> str | None:
    if isinstance(value, datetime):
        return _short_datetime(value)
    if isinstance(value, list):
        items = (json_value(v) for v in value)
        return ", ".join("–" if v is None else v if isinstance(v, str) else json.dumps(v) for v in items)
    converted = json_value(value)
    if isinstance(converted, bool):
        return "true" if converted else "false"
    if isinstance(converted, dict):
        return json.dumps(converted, ensure_ascii=False)
    if converted is None:
        return None
    return str(converted)


def render_to_string(table: pa.Table | Records, output_format: str) -> str:
    """`render()` into a string (used by tests and by callers that embed the output)."""
    buffer = io.StringIO()
    render(table, output_format, out=buffer)
    return buffer.getvalue()

"""The block parser of the JSON fast path: DuckDB's JSON reader turns a block of lines into one nested Arrow struct.

DuckDB parses and types a block about twice as fast as pyarrow's JSON reader, but it coerces where protobuf's
JSON mapping (and so the per-line path, `_json_check`) refuses: `1` or `"true"` for a bool, `1.5` for an integer,
any value for a string. So the reader is asked for the leaves in a form that keeps their JSON kind, and
`parse_block` refuses (`Refused`) a block where a leaf is not of its kind; the caller then decodes that block
the slow, exact way. What it returns is exactly what `pyarrow.json.read_json` would for the same schema:

- strings are read as VARCHAR; a value that reads like a JSON number, `true`/`false`, an object or an array is
  what DuckDB makes of a non-string, so such a value refuses the block (an enum written as its number, too);
- integers are read as VARCHAR and cast by pyarrow, which takes exactly an optional `-` and digits within the
  64-bit range (what the per-line path takes, a JSON string of digits included);
- bools are read as raw JSON text, which must be `true` or `false`;
- presence-only objects (`node_status`, ...) are read as a struct of one unused field;
- a line that is JSON `null` refuses the block (it is not an object).

Structural mismatches (an object where a string belongs, a string where an array belongs, a line that is not
JSON, a key twice in one object) make DuckDB itself fail; that too is a refusal. The one difference left is
syntax DuckDB's parser takes and JSON does not: a trailing comma (`[1,]`, `{"a": 1,}`) and lower-case `inf`
and `nan`; a line holding them is read as the same line without them (in a known field, `inf`/`nan` are still
refused as not-a-string, not-an-integer).
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from functools import cache

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowpipe.transforms._json_schema import parse_schema

# Leaves holding a 64-bit integer as a JSON string or number: string columns, checked like integers.
_INT64_STRINGS = frozenset({"latency_ns", "latencyNs", "num_events_lost", "numEventsLost"})
_UNUSED_FIELD = "__flowpipe_presence"

# First bytes of what DuckDB writes for a non-string value read as VARCHAR (numbers, true/false, {...}, [...],
# and the non-finite numbers its parser also takes); only values starting with one are matched in full.
_SUSPECT_FIRST = np.zeros(256, dtype=bool)
_SUSPECT_FIRST[list(b"-0123456789tf{[iInN")] = True
_NOT_A_STRING = r"^(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|[{\[].*|-?(?:inf|Infinity)|nan|NaN)$"


class Refused(Exception):
    """The block holds a value DuckDB would read differently from the per-line path (or a `null` line)."""


ERRORS = (duckdb.Error, Refused, pa.ArrowInvalid)
"""What `parse_block` raises for a block that must be decoded line by line."""


@dataclass(frozen=True, slots=True)
class _Layout:
    """What one parse layout needs: the DuckDB type of a line, its Arrow type, and the leaves to check."""

    name: str
    duckdb_type: str
    arrow_type: pa.StructType
    strings: tuple[tuple[str, ...], ...]
    integer_strings: tuple[tuple[str, ...], ...]
    bools: tuple[tuple[str, ...], ...]


@cache
def _layout(layout: str) -> _Layout:
    arrow_type = pa.struct(list(parse_schema(layout)))
    strings: list[tuple[str, ...]] = []
    integer_strings: list[tuple[str, ...]] = []
    bools: list[tuple[str, ...]] = []

    def leaves(type_: pa.DataType, path: tuple[str, ...]) -> None:
        if pa.types.is_struct(type_):
            for child in type_:
                leaves(child.type, (*path, child.name))
        elif pa.types.is_list(type_):
            leaves(type_.value_type, (*path, "[]"))
        elif pa.types.is_boolean(type_):
            bools.append(path)
        elif pa.types.is_string(type_):
            named = [part for part in path if part != "[]"]
            (integer_strings if named[-1] in _INT64_STRINGS else strings).append(path)

    leaves(arrow_type, ())
    return _Layout(
        name=f"flowpipe_{layout}_line",
        duckdb_type=_duckdb_type(arrow_type),
        arrow_type=arrow_type,
        strings=tuple(strings),
        integer_strings=tuple(integer_strings),
        bools=tuple(bools),
    )


def _duckdb_type(type_: pa.DataType) -> str:
    """The DuckDB type DuckDB reads a JSON value of this Arrow parse type as (see the module docstring)."""
    if pa.types.is_struct(type_):
        fields = [(child.name, _duckdb_type(child.type)) for child in type_] or [(_UNUSED_FIELD, "JSON")]
        return "STRUCT(" + ", ".join(f'"{name}" {inner}' for name, inner in fields) + ")"
    if pa.types.is_list(type_):
        return _duckdb_type(type_.value_type) + "[]"
    if pa.types.is_boolean(type_):
        return "JSON"
    return "VARCHAR"  # strings, and integers (cast by pyarrow, which is strict)


class _Connections(threading.local):
    """One DuckDB connection per thread (a connection is not shared between threads), with the line types."""

    def __init__(self) -> None:
        self.connection: duckdb.DuckDBPyConnection | None = None
        self.threads = 0
        self.types: set[str] = set()

    def get(self, layout: _Layout, threads: int) -> duckdb.DuckDBPyConnection:
        if self.connection is None:
            self.connection = duckdb.connect()
        if threads != self.threads:
            self.connection.execute(f"SET threads = {threads:d}")
            self.threads = threads
        if layout.name not in self.types:
            # A named type: the reader then binds a short type name instead of parsing the long one each time.
            self.connection.execute(f"CREATE TYPE {layout.name} AS {layout.duckdb_type}")
            self.types.add(layout.name)
        return self.connection


_connections = _Connections()


def parse_block(data: bytes, layout: str, *, threads: bool = True) -> pa.StructArray:
    """The lines of a block (whole lines, blank ones skipped) as one struct of the layout's parse schema.

    `threads=False` parses on the calling thread only (for callers that decode several blocks at once).
    Raises one of `ERRORS` when the block must be decoded line by line instead.
    """
    spec = _layout(layout)
    connection = _connections.get(spec, (os.cpu_count() or 1) if threads else 1)
    relation = connection.read_json(
        io.BytesIO(data),
        columns={"line": spec.name},
        format="newline_delimited",
        records="false",
        maximum_object_size=max(len(data), 1 << 20),
    )
    convert = getattr(relation, "to_arrow_table", None) or relation.arrow  # DuckDB 1.4+ / earlier
    column = convert().column(0)
    if column.null_count:
        raise Refused("a line is JSON null, not an object")
    lines = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    _check_leaves(lines, spec)
    result = lines.cast(spec.arrow_type)  # integers: strict string → int64; lists and structs: renamed fields
    assert isinstance(result, pa.StructArray)
    return result


def _check_leaves(lines: pa.StructArray, spec: _Layout) -> None:
    for path in spec.bools:
        values = _leaf(lines, path)
        if values.null_count < len(values) and not pc.all(pc.is_in(values.drop_null(), _BOOLS)).as_py():
            raise Refused(f"{_name(path)}: not true or false")
    for path in spec.integer_strings:
        values = _leaf(lines, path)
        if values.null_count < len(values):
            pc.cast(values, pa.int64())  # raises ArrowInvalid unless every value is an integer
    for path in spec.strings:
        values = _leaf(lines, path)
        if values.null_count < len(values) and _has_non_string(values):
            raise Refused(f"{_name(path)}: a number, bool, object or array where a string belongs")


_BOOLS = pa.array(["true", "false"])


def _leaf(array: pa.Array, path: tuple[str, ...]) -> pa.Array:
    """The values at `path` below `array` (`[]` steps into list items), ignoring the parents' validity."""
    for step in path:
        array = array.values if step == "[]" else array.field(step)
    return array


def _name(path: tuple[str, ...]) -> str:
    return ".".join(path).replace(".[]", "[]")


def _has_non_string(values: pa.Array) -> bool:
    """Whether a VARCHAR leaf holds what DuckDB wrote for a non-string JSON value (see the module docstring)."""
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    offsets = np.frombuffer(
        values.buffers()[1], dtype=np.int32, count=len(values) + 1, offset=values.offset * 4
    )
    data = values.buffers()[2]
    if data is None or data.size == 0:
        return False
    starts = offsets[:-1]
    nonempty = offsets[1:] > starts
    first = np.frombuffer(data, dtype=np.uint8)[starts[nonempty]]
    suspect = np.zeros(len(values), dtype=bool)
    suspect[nonempty] = _SUSPECT_FIRST[first]
    if not suspect.any():
        return False
    return bool(pc.any(pc.match_substring_regex(values.filter(pa.array(suspect)), _NOT_A_STRING)).as_py())

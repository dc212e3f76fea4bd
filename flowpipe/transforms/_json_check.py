"""The per-line check of Hubble JSON: known fields of a parsed line, type-checked and coerced against the spec.

Used where pyarrow's block parser refuses a block. It accepts what protobuf's JSON parsers accept (enum numbers,
integers as strings, camelCase keys), turns enum numbers into names (an unknown number into its decimal string)
and drops unknown keys, so that its output, built into Arrow, gives the same rows as the fast path.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from flowpipe.transforms._enums import enum_name_or_number
from flowpipe.transforms._json_schema import LINE_SPEC, STR, Leaf, ListOf, Spec, camel

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INTEGER = re.compile(r"-?[0-9]+")
# What the row builder's timestamp cast accepts, checked up front so a bad line is found without Arrow.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:?[0-9]{2})"
)


class BadValue(ValueError):
    """A known field holds a value of the wrong kind; the message names the field."""


def check_line(value: dict[str, Any]) -> dict[str, Any]:
    """The known fields of one parsed line (envelope or bare Flow), checked and coerced; raises BadValue."""
    return _sanitize_struct(value, LINE_SPEC, "")


def json_type(value: Any) -> str:
    """How a JSON value is named in error messages ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Struct:
    """A struct spec prepared for the per-line path: every accepted key → (proto name, child, is alias)."""

    def __init__(self, spec: dict[str, Spec]) -> None:
        self.keys: dict[str, tuple[str, Spec, bool]] = {}
        for name, child in spec.items():
            self.keys[name] = (name, child, False)
            alias = camel(name)
            if alias != name and alias not in spec:
                self.keys[alias] = (name, child, True)


_STRUCTS: dict[int, _Struct] = {}


def _struct(spec: dict[str, Spec]) -> _Struct:
    found = _STRUCTS.get(id(spec))
    if found is None:
        found = _STRUCTS[id(spec)] = _Struct(spec)
    return found


def _sanitize_struct(value: Any, spec: dict[str, Spec], where: str) -> dict[str, Any]:
    """Known keys of a JSON object, checked and coerced; unknown keys dropped; the proto name wins over its
    camelCase alias. Raises BadValue naming the field (`where` is only built on that error path)."""
    if not isinstance(value, dict):
        raise BadValue(f"{where or 'line'}: expected an object, got {json_type(value)}")
    out: dict[str, Any] = {}
    keys = _struct(spec).keys
    for key, item in value.items():
        known = keys.get(key)
        if known is None or item is None:
            continue
        name, child, is_alias = known
        if is_alias and name in value and value[name] is not None:
            continue
        if isinstance(child, Leaf):
            out[name] = _sanitize_leaf(item, child, where, name)
        elif isinstance(child, ListOf):
            out[name] = _sanitize_list(item, child, f"{where}.{name}" if where else name)
        else:
            out[name] = _sanitize_struct(item, child, f"{where}.{name}" if where else name)
    return out


def _sanitize_list(value: Any, spec: ListOf, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadValue(f"{where}: expected an array, got {json_type(value)}")
    item_spec = spec.item
    if item_spec is STR:
        if all(type(item) is str or item is None for item in value):
            return value
    elif isinstance(item_spec, dict):
        return [None if item is None else _sanitize_struct(item, item_spec, f"{where}[]") for item in value]
    assert isinstance(item_spec, Leaf)  # the spec has no lists of lists
    return [None if item is None else _sanitize_leaf(item, item_spec, where, "[]") for item in value]


def _sanitize_leaf(value: Any, spec: Leaf, where: str, name: str) -> Any:
    kind = spec.kind
    if kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "enum":
        # A name is kept even when unknown (newer Cilium); a number is what a writer renders for a value it
        # does not know the name of: its name if we know it, else its decimal string.
        if isinstance(value, str):
            return value
        number = _integer(value)
        if number is not None and _INT64_MIN <= number <= _INT64_MAX:
            assert spec.enum is not None
            return enum_name_or_number(spec.enum, number)
    elif kind in ("int", "int64str"):
        number = _integer(value)
        if number is not None:
            if spec.low is not None and spec.high is not None and not spec.low <= number <= spec.high:
                raise BadValue(
                    f"{_join(where, name)}: {number} is outside {spec.proto} ({spec.low} to {spec.high})"
                )
            return number if kind == "int" else str(number)
    elif kind == "time" and isinstance(value, str):
        if value == "":
            return value
        if _RFC3339.fullmatch(value) and _real_date_and_time(value):
            if not _in_nanosecond_range(value):
                raise BadValue(
                    f"{_join(where, name)}: {value[:60]!r} is outside the times a nanosecond timestamp holds "
                    "(1677-09-21 to 2262-04-11)"
                )
            # RFC 3339 allows lower case `t` and `z`; the row builder's cast wants upper case.
            return value.upper()
        raise BadValue(f"{_join(where, name)}: not an RFC 3339 timestamp: {value[:60]!r}")
    raise BadValue(
        f"{_join(where, name)}: expected {_KIND_WORDS[kind]}, got {json_type(value)} {_short(value)}"
    )


def _real_date_and_time(value: str) -> bool:
    """Whether the `YYYY-MM-DDTHH:MM:SS` part of a well-formed timestamp names a real moment (no 30 February)."""
    try:
        datetime.strptime(value[:19].upper().replace(" ", "T"), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return True


_NS_FIRST = datetime(1677, 9, 21, 0, 12, 44, tzinfo=UTC)
_NS_LAST = datetime(2262, 4, 11, 23, 47, 16, tzinfo=UTC)
"""The whole seconds a signed 64-bit count of nanoseconds since 1970 holds (the dataset's `time` column)."""


def _in_nanosecond_range(value: str) -> bool:
    """Whether a well-formed timestamp fits a nanosecond timestamp (whole seconds; only edge years parsed)."""
    year = int(value[:4])
    if 1678 < year < 2262:
        return True
    if year not in (1677, 1678, 2262):
        return False
    zone = value[19:].lstrip(".0123456789").upper()
    offset = timedelta(0)
    if zone not in ("Z", ""):
        hours, minutes = int(zone[1:3]), int(zone[-2:])
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
    moment = datetime.strptime(value[:19].upper().replace(" ", "T"), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return _NS_FIRST <= moment - offset <= _NS_LAST


def _join(where: str, name: str) -> str:
    if name == "[]":
        return f"{where}[]"
    return f"{where}.{name}" if where else name


_KIND_WORDS = {
    "str": "a string",
    "bool": "true or false",
    "enum": "an enum name or number",
    "int": "an integer",
    "int64str": "an integer",
    "time": "an RFC 3339 timestamp string",
}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value: Any) -> int | None:
    """An integer as protobuf JSON allows it: a number (integral) or a decimal string; None if not one.

    Any size: the caller checks the range of the field's type."""
    number: int | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        number = int(value)
    return number

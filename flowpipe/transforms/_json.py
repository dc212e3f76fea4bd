"""Hubble JSON lines → flow rows and counted events: a vectorized block parser with a per-line fallback.

The fast path hands a whole block of lines to `pyarrow.json.read_json` with an explicit nested schema and
builds the columns with pyarrow.compute (`_columns`). When pyarrow rejects the block (a malformed line, an enum
written as a number, a string where a number belongs), the lines that are not JSON objects are reported and set
aside, the rest is decoded again in halves, and only the small groups that still fail are decoded line by line:
`json.loads`, then a check against the same spec (`_json_check`). Bad lines become `FlowDecodeError`s; good ones
go through the same Arrow struct and the same row builder, so a flow gives the same row either way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from flowpipe.errors import FlowDecodeError
from flowpipe.model import LostEvent, empty_flows
from flowpipe.transforms._columns import build_flow_table
from flowpipe.transforms._json_check import BadValue, check_line, json_type
from flowpipe.transforms._json_schema import (
    BARE_FLOW_KEYS,
    ENVELOPE,
    EVENT_KINDS,
    FLOW_SPEC,
    FULL,
    canonical_type,
    canonicalize,
    guess_layout,
    out_of_range,
    parse_schema,
    sentinels,
)

# pyarrow splits a block into chunks of this size and parses them in parallel (`threads=True`); a caller that
# decodes several blocks at once parses each on one thread, as one chunk (no chunks to stitch together after).
PARSE_CHUNK_BYTES = 1 << 20


REASON_INVALID_JSON = "invalid_json"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_INVALID_VALUE = "invalid_value"
TOO_DEEP = "nested too deeply to decode"


def loads(text: bytes | str) -> Any:
    """`json.loads`; a value nested deeper than Python's recursion limit is a `ValueError` like any bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


@dataclass(slots=True)
class DecodedEvents:
    """What one block of Hubble JSON held: flow rows, lost events, counted event kinds and bad lines."""

    flows: pa.Table = field(default_factory=empty_flows)
    lost_events: list[LostEvent] = field(default_factory=list)
    node_status: int = 0
    agent_events: int = 0
    debug_events: int = 0
    unknown_events: int = 0
    errors: list[FlowDecodeError] = field(default_factory=list)

    def extend(self, other: DecodedEvents) -> None:
        """Append another block's content (rows keep their order)."""
        if other.flows.num_rows:
            self.flows = pa.concat_tables([self.flows, other.flows]) if self.flows.num_rows else other.flows
        self.lost_events.extend(other.lost_events)
        self.node_status += other.node_status
        self.agent_events += other.agent_events
        self.debug_events += other.debug_events
        self.unknown_events += other.unknown_events
        self.errors.extend(other.errors)


def decode_lines(
    data: bytes,
    *,
    path: str,
    first_line: int,
    cluster_name: str | None = None,
    layout: str | None = None,
    threads: bool = True,
    line_count: int | None = None,
) -> DecodedEvents:
    """Decode a block of whole JSON lines (`first_line` is the 1-based number of its first line).

    `layout` is the parse layout of the file (`guess_layout` of its first record); None guesses it here.
    `threads=False` parses on the calling thread only (for callers that decode several blocks at once).
    `line_count` is the number of lines in `data` when the caller knows it (else it is counted here).
    """
    if layout is None:
        layout = guess_block_layout(data)
    if line_count is None:
        line_count = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    try:
        return _decode_block(data, layout, cluster_name, threads, line_count)
    except _ARROW_ERRORS:
        pass
    # pyarrow rejected the block. First set aside the lines that are not JSON objects at all, then decode the
    # rest again in halves, so that only a small group around a line pyarrow cannot take (an enum written as a
    # number, say) goes through the slow per-line path.
    good: list[tuple[int, bytes]] = []
    errors: list[FlowDecodeError] = []
    for index, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        line_number = first_line + index
        try:
            value = loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            errors.append(_invalid_json(exc, path, line_number))
            continue
        if not isinstance(value, dict):
            errors.append(_not_an_object(value, path, line_number))
            continue
        good.append((line_number, line))
    out = _decode_in_halves(good, layout, path, cluster_name, threads, depth=0)
    out.errors = sorted(errors + out.errors, key=lambda e: e.line_number or 0)
    return out


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
_MAX_HALVING_DEPTH = 3
_SMALLEST_HALF = 64


def _decode_in_halves(
    lines: list[tuple[int, bytes]],
    layout: str,
    path: str,
    cluster_name: str | None,
    threads: bool,
    depth: int,
) -> DecodedEvents:
    if depth > 0 and lines:
        if len(lines) > _SMALLEST_HALF and depth <= _MAX_HALVING_DEPTH:
            try:
                return _decode_block(
                    b"\n".join(line for _, line in lines) + b"\n", layout, cluster_name, threads, len(lines)
                )
            except _ARROW_ERRORS:
                pass
        if len(lines) <= _SMALLEST_HALF or depth >= _MAX_HALVING_DEPTH:
            return decode_texts(lines, path=path, cluster_name=cluster_name)
    if not lines:
        return DecodedEvents()
    middle = len(lines) // 2
    out = _decode_in_halves(lines[:middle], layout, path, cluster_name, threads, depth + 1)
    out.extend(_decode_in_halves(lines[middle:], layout, path, cluster_name, threads, depth + 1))
    return out


def _invalid_json(exc: ValueError, path: str, line_number: int) -> FlowDecodeError:
    return FlowDecodeError(
        f"invalid JSON: {exc}", path=path, line_number=line_number, reason=REASON_INVALID_JSON
    )


def _not_an_object(value: Any, path: str, line_number: int) -> FlowDecodeError:
    return FlowDecodeError(
        f"expected a JSON object, got {json_type(value)}",
        path=path,
        line_number=line_number,
        reason=REASON_NOT_AN_OBJECT,
    )


def guess_block_layout(data: bytes) -> str:
    """The parse layout for a block of lines, from its first line that is valid JSON."""
    for line in data.split(b"\n", 8)[:8]:
        if line.strip():
            try:
                return guess_layout(loads(line))
            except ValueError:
                continue
    return ENVELOPE


def _decode_block(
    data: bytes, layout: str, cluster_name: str | None, threads: bool, line_count: int
) -> DecodedEvents:
    lines = _parse(data, layout, threads)
    if len(lines) > line_count:
        # pyarrow reads `{...} {...}` on one line as two records; JSON lines (and the per-line path) do not.
        raise pa.ArrowInvalid("a line holds more than one JSON value")
    if layout != FULL and _needs_full(lines, layout):
        lines = _parse(data, FULL, threads)
        layout = FULL
    if len(lines) == 0:
        return DecodedEvents()
    if layout == FULL:
        lines = canonicalize(lines)
    if out_of_range(lines):
        raise pa.ArrowInvalid("an integer outside its proto type")  # the per-line path names the field
    decoded = decode_canonical(lines, cluster_name=cluster_name)
    if decoded.unknown_events:
        # `{}`, an event kind flowpipe does not know, or a JSON `null` (not an object: an error), which pyarrow
        # reads alike; such lines are rare and the per-line path tells them apart.
        raise pa.ArrowInvalid("a line holds no known event")
    return decoded


def _parse(data: bytes, layout: str, threads: bool = True) -> pa.StructArray:
    chunk = PARSE_CHUNK_BYTES if threads else len(data) + 1
    options = pj.ParseOptions(explicit_schema=parse_schema(layout), unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(
            io.BytesIO(data),
            read_options=pj.ReadOptions(use_threads=threads, block_size=chunk),
            parse_options=options,
        )
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc) or len(data) <= chunk:
            raise
        # A line longer than a parse chunk: parse the block as one chunk instead.
        table = pj.read_json(
            io.BytesIO(data),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
            parse_options=options,
        )
    table = table.combine_chunks()
    return pa.StructArray.from_arrays(
        [column.chunk(0) if column.num_chunks else pa.nulls(0, column.type) for column in table.columns],
        fields=list(table.schema),
    )


def _needs_full(lines: pa.StructArray, layout: str) -> bool:
    """Whether a narrow-layout parse missed something: camelCase keys, or lines of the other shape."""
    for path in sentinels(layout):
        if pc.struct_field(lines, list(path)).null_count < len(lines):
            return True
    if layout == ENVELOPE:
        # A line without any envelope key (a bare Flow, or an event kind flowpipe does not know).
        return _has_no_kind(lines)
    return False


def _has_no_kind(lines: pa.StructArray) -> bool:
    any_kind = pa.repeat(False, len(lines))
    for kind in EVENT_KINDS:
        any_kind = pc.or_(any_kind, pc.is_valid(pc.struct_field(lines, [kind])))
    return not pc.all(any_kind).as_py()


def decode_canonical(lines: pa.StructArray, *, cluster_name: str | None = None) -> DecodedEvents:
    """Classify canonical lines (envelope or bare Flow) and build the flow rows and lost events."""
    out = DecodedEvents()
    kinds = {kind: pc.is_valid(pc.struct_field(lines, [kind])) for kind in EVENT_KINDS}
    # An envelope holds exactly one kind; if a line has several, the first in field-number order counts.
    taken = pa.repeat(False, len(lines))
    only: dict[str, pa.Array] = {}
    for kind in EVENT_KINDS:
        only[kind] = pc.and_(kinds[kind], pc.invert(taken))
        taken = pc.or_(taken, kinds[kind])
    is_envelope = taken
    bare = pa.repeat(False, len(lines))
    if not pc.all(is_envelope).as_py():
        for key in BARE_FLOW_KEYS:
            bare = pc.or_(bare, pc.is_valid(pc.struct_field(lines, [key])))
        bare = pc.and_(bare, pc.invert(is_envelope))
    out.node_status = _count(only["node_status"])
    out.agent_events = _count(only["agent_event"])
    out.debug_events = _count(only["debug_event"])
    n_bare = _count(bare)
    out.unknown_events = len(lines) - _count(is_envelope) - n_bare

    envelope_node = pc.struct_field(lines, ["node_name"])
    envelope_time = pc.struct_field(lines, ["time"])
    flow_rows = pc.or_(only["flow"], bare)
    n_flows = _count(flow_rows)
    if n_flows:
        if n_bare == 0:
            flows = pc.struct_field(lines, ["flow"])
        elif n_bare == n_flows:
            flows = lines  # legacy bare Flows: the line itself is the Flow
        else:
            flows = pc.if_else(bare, _project_bare_flows(lines), pc.struct_field(lines, ["flow"]))
        node, time = envelope_node, envelope_time
        if n_flows < len(lines):  # only then: filtering copies every value of the nested struct
            flows, node, time = flows.filter(flow_rows), node.filter(flow_rows), time.filter(flow_rows)
        out.flows = build_flow_table(flows, node, time, cluster_name=cluster_name)
    if _count(only["lost_events"]):
        rows = only["lost_events"]
        out.lost_events = _lost_events(
            pc.struct_field(lines, ["lost_events"]).filter(rows),
            envelope_node.filter(rows),
            envelope_time.filter(rows),
        )
    return out


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def _project_bare_flows(lines: pa.StructArray) -> pa.StructArray:
    """The line itself as a Flow struct (legacy bare-Flow lines), typed like the envelope's `flow` field."""
    flow_type = lines.type.field("flow").type
    children = [pc.struct_field(lines, [name]) for name in FLOW_SPEC]
    return pa.StructArray.from_arrays(children, fields=list(flow_type), mask=pc.invert(lines.is_valid()))


def _lost_events(records: pa.Array, node_names: pa.Array, times: pa.Array) -> list[LostEvent]:
    utc_us = pa.timestamp("us", tz="UTC")

    def stamps(values: pa.Array) -> list[datetime | None]:
        values = pc.if_else(pc.equal(values, ""), None, values)
        stamps: list[datetime | None] = pc.cast(
            pc.cast(values, pa.timestamp("ns", tz="UTC")), utc_us, safe=False
        ).to_pylist()
        return stamps

    sources = pc.struct_field(records, ["source"]).to_pylist()
    counts = pc.cast(pc.struct_field(records, ["num_events_lost"]), pa.int64()).to_pylist()
    cpus = pc.struct_field(records, ["cpu"]).to_pylist()
    firsts = stamps(pc.struct_field(records, ["first"]))
    lasts = stamps(pc.struct_field(records, ["last"]))
    return [
        LostEvent(
            source=source or "UNKNOWN_LOST_EVENT_SOURCE",
            num_events_lost=count or 0,
            node_name=node or "",
            time=time,
            cpu=cpu,
            first=first,
            last=last,
        )
        for source, count, node, time, cpu, first, last in zip(
            sources, counts, node_names.to_pylist(), stamps(times), cpus, firsts, lasts, strict=True
        )
    ]


# The per-line path: json.loads, then check and coerce every known field (`_json_check`).


def decode_texts(
    items: Sequence[tuple[int, bytes | str]], *, path: str, cluster_name: str | None = None
) -> DecodedEvents:
    """Decode JSON texts one by one (with their line numbers); bad ones become errors, the rest rows."""
    objects: list[tuple[int, Any]] = []
    errors: list[FlowDecodeError] = []
    for line_number, text in items:
        try:
            objects.append((line_number, loads(text)))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            errors.append(_invalid_json(exc, path, line_number))
    out = decode_objects(objects, path=path, cluster_name=cluster_name)
    out.errors = sorted(errors + out.errors, key=lambda e: e.line_number or 0)
    return out


def decode_objects(
    objects: Iterable[tuple[int, Any]], *, path: str, cluster_name: str | None = None
) -> DecodedEvents:
    """Decode parsed JSON values (each with its line number): the per-line path and JSON arrays."""
    good: list[tuple[int, dict[str, Any]]] = []
    errors: list[FlowDecodeError] = []
    for line_number, value in objects:
        if not isinstance(value, dict):
            errors.append(_not_an_object(value, path, line_number))
            continue
        try:
            good.append((line_number, check_line(value)))
        except BadValue as exc:
            errors.append(
                FlowDecodeError(str(exc), path=path, line_number=line_number, reason=REASON_INVALID_VALUE)
            )
    out = _decode_sanitized(good, path=path, cluster_name=cluster_name)
    out.errors = sorted(errors + out.errors, key=lambda e: e.line_number or 0)
    return out


def _decode_sanitized(
    good: list[tuple[int, dict[str, Any]]], *, path: str, cluster_name: str | None
) -> DecodedEvents:
    if not good:
        return DecodedEvents()
    try:
        lines = pa.array([value for _, value in good], type=canonical_type())
        return decode_canonical(lines, cluster_name=cluster_name)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        if len(good) == 1:
            return DecodedEvents(
                errors=[
                    FlowDecodeError(
                        f"invalid value: {exc}",
                        path=path,
                        line_number=good[0][0],
                        reason=REASON_INVALID_VALUE,
                    )
                ]
            )
    # Something only Arrow rejects (an impossible date, say): isolate it by halves.
    middle = len(good) // 2
    out = _decode_sanitized(good[:middle], path=path, cluster_name=cluster_name)
    out.extend(_decode_sanitized(good[middle:], path=path, cluster_name=cluster_name))
    return out

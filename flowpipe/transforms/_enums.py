"""Enum number → row value tables for the flow table, taken from the generated `flow` descriptors.

Row convention: an enum column holds the value NAME; the zero value becomes NULL; a number the descriptor does
not know becomes its decimal string (a newer Cilium), so nothing is lost and nothing is guessed.
"""

from __future__ import annotations

from functools import cache

# The zero value of every enum that reaches a flow-table column. These names are never stored: they mean
# "not set" (protojson omits them, protobuf cannot tell them from absent).
ZERO_NAMES: dict[str, str] = {
    "Verdict": "VERDICT_UNKNOWN",
    "DropReason": "DROP_REASON_UNKNOWN",
    "AuthType": "DISABLED",
    "FlowType": "UNKNOWN_TYPE",
    "TraceObservationPoint": "UNKNOWN_POINT",
    "TrafficDirection": "TRAFFIC_DIRECTION_UNKNOWN",
    "SocketTranslationPoint": "SOCK_XLATE_POINT_UNKNOWN",
    "IPVersion": "IP_NOT_USED",
    "L7FlowType": "UNKNOWN_L7_TYPE",
    "LostEventSource": "UNKNOWN_LOST_EVENT_SOURCE",
}


@cache
def enum_names(enum: str) -> dict[int, str]:
    """Number → name of one enum of package `flow` (e.g. `enum_names("Verdict")[2] == "DROPPED"`)."""
    from flowpipe._proto.flow import flow_pb2

    descriptor = flow_pb2.DESCRIPTOR.enum_types_by_name[enum]
    return {value.number: value.name for value in descriptor.values}


@cache
def enum_row_values(enum: str) -> dict[int, str | None]:
    """Number → flow-table value: the name, NULL for the zero value (callers add unknown numbers as strings)."""
    return {number: (None if number == 0 else name) for number, name in enum_names(enum).items()}


def enum_value(enum: str, number: int) -> str | None:
    """The flow-table value of one enum number: name, NULL for zero, decimal string when unknown."""
    table = enum_row_values(enum)
    if number in table:
        return table[number]
    return str(number)


def enum_name_or_number(enum: str, number: int) -> str:
    """The name of an enum number as JSON would spell it, or its decimal string when unknown (zero kept)."""
    return enum_names(enum).get(number, str(number))

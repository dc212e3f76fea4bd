"""Transforms: pure functions from batch to batch; `normalize` turns Hubble events into flow-table rows."""

from flowpipe.transforms.normalize import (
    DecodedEvents,
    normalize_flows,
    normalize_json_lines,
    normalize_json_objects,
    normalize_json_texts,
    normalize_responses,
)

__all__ = [
    "DecodedEvents",
    "normalize_flows",
    "normalize_json_lines",
    "normalize_json_objects",
    "normalize_json_texts",
    "normalize_responses",
]

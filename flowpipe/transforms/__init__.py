"""Transforms: Hubble events <-> flow-table rows. `normalize` turns Hubble events (protobuf messages, JSON) into
rows; `from_proto` is the one protobuf decoder (serialised responses in bulk, with ptars; `normalize` hands it
the messages it is given); `to_flow` encodes rows back into Hubble `Flow` messages (serve-hubble); `wire`
holds the protobuf varint.

`conventions` holds the row conventions other decoders share with `normalize` (enum names, cluster names, TCP
flags, L4/L7 kinds, policy lists); they are re-exported here.
"""

from flowpipe.transforms.conventions import (
    L4_KINDS,
    L7_KINDS,
    POLICY_LISTS,
    TCP_FLAG_NAMES,
    TCP_FLAG_STRINGS,
    cluster_of,
    enum_names,
    enum_row_values,
)
from flowpipe.transforms.normalize import (
    DecodedEvents,
    normalize_flows,
    normalize_json_lines,
    normalize_json_objects,
    normalize_json_texts,
    normalize_responses,
)

__all__ = [
    "L4_KINDS",
    "L7_KINDS",
    "POLICY_LISTS",
    "TCP_FLAG_NAMES",
    "TCP_FLAG_STRINGS",
    "DecodedEvents",
    "cluster_of",
    "enum_names",
    "enum_row_values",
    "normalize_flows",
    "normalize_json_lines",
    "normalize_json_objects",
    "normalize_json_texts",
    "normalize_responses",
]

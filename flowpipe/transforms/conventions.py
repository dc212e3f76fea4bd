"""The flow table's row conventions that both decoders share: protobuf (`from_proto`) and JSON (`_json`).

`flowpipe.transforms.from_proto` decodes GetFlowsResponse bytes straight into the flow table; it must name
enum values, split cluster names and spell TCP flags, L4/L7 kinds and policy lists exactly as the JSON decoder
does (tests compare both). These are the pieces they share, defined once next to the row builders that use them:

- `enum_names(enum)`: number → value name of one enum of package `flow`; `enum_row_values(enum)`: the same
  with the zero value as NULL (the caller stores an unknown number as its decimal string).
- `cluster_of(node_names, default)`: the cluster part of "<cluster>/<node>", else `default`.
- `TCP_FLAG_NAMES` (field order, the order in `tcp_flags`), `TCP_FLAG_STRINGS` (the `tcp_flags` value of each
  flag bit mask), `L4_KINDS` (the `l4` oneof, the `l4_protocol` values), `L7_KINDS` (the `l7_protocol` values),
  `POLICY_LISTS` (the policy attribution columns).
"""

from flowpipe.transforms._columns import cluster_of
from flowpipe.transforms._enums import enum_names, enum_row_values
from flowpipe.transforms._json_schema import (
    L4_KINDS,
    L7_KINDS,
    POLICY_LISTS,
    TCP_FLAG_NAMES,
    TCP_FLAG_STRINGS,
)

__all__ = [
    "L4_KINDS",
    "L7_KINDS",
    "POLICY_LISTS",
    "TCP_FLAG_NAMES",
    "TCP_FLAG_STRINGS",
    "cluster_of",
    "enum_names",
    "enum_row_values",
]

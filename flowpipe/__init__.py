"""flowpipe: Hubble flow analytics. Stream Cilium Hubble flows into Parquet, ask policy questions, draft policies.

The Python API (see `flowpipe.api` and the README): `flowpipe.open_dataset(path)` gives a `FlowDataset` whose
`question()` and `sql()` return Arrow tables (`frame()` and `sql_frame()`: pandas DataFrames).

Importing `flowpipe` is cheap: the names below are loaded on first use (`flowpipe.FLOW_SCHEMA` imports pyarrow).
"""

from __future__ import annotations

import importlib
from typing import Any

from flowpipe.errors import FlowpipeError

__version__ = "0.1.0"

_LAZY = {
    "FLOW_SCHEMA": "flowpipe.model",
    "SCHEMA_VERSION": "flowpipe.model",
    "FlowDataset": "flowpipe.api",
    "open_dataset": "flowpipe.api",
}

__all__ = ["FLOW_SCHEMA", "SCHEMA_VERSION", "FlowDataset", "FlowpipeError", "__version__", "open_dataset"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

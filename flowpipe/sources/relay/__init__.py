"""The relay source (`source`: `RelaySource` following hubble-relay's GetFlows stream) and its parts.

The package itself imports nothing heavy: the receiving process (`_receiver`, started with `python -m`) starts
with only h2 and its helpers (`_address`, `_h2call`, `_handoff`), and loads Arrow and the decoder (never grpcio)
when the collector asks it for decoded batches. Every name of `source` (the
source, its configuration and helpers) is reachable from here and imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name == "source":
        raise AttributeError(name)
    source = importlib.import_module(f"{__name__}.source")
    try:
        return getattr(source, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

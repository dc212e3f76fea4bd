"""Sources: where event batches come from. The `Source` protocol, and the file source's entry points.

A source yields `EventBatch`es (flow rows, lost events, counted node_status, decode errors, and a `position`).
The pipeline calls `commit(batch.position)` only after every sink made that batch durable; a source must then
never deliver what was committed again (file: per-content line count; relay: time and uuid of the last flow).
A source may also offer `commit_many(positions)`, which the pipeline then calls once with every position one
flush made durable (the file source writes its checkpoint once for them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flowpipe.model import EventBatch
    from flowpipe.sources.file import FileIngestSummary, FileSource, read_events

_FILE_NAMES = ("FileIngestSummary", "FileSource", "read_events")


def __getattr__(name: str) -> Any:
    """The file source's entry points, imported on first use: the receiving process of `collect` imports only
    the relay's connection helpers, and stays small."""
    if name in _FILE_NAMES:
        from flowpipe.sources import file

        return getattr(file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Source(Protocol):
    """What every source offers the pipeline."""

    def batches(self) -> Iterator[EventBatch]:
        """Yield event batches in order, each with the position to commit once it is durable."""
        ...

    def commit(self, position: object) -> None:
        """Record that everything up to `position` is durable (called in order, after the sinks' ack)."""
        ...

    def close(self) -> None:
        """Stop reading and release resources; may be called from another thread."""
        ...


__all__ = ["FileIngestSummary", "FileSource", "Source", "read_events"]

"""The Sink protocol and its acknowledgement: how the pipeline hands batches to sinks and learns they are durable.

A sink receives every `EventBatch` in order through `write`. It may keep rows in memory and make them durable
later (the Parquet sink batches rows into part files). Acknowledgements are cumulative: an `Ack` says "the first
`batches` batches you gave me are durable". The pipeline moves the source's checkpoint to a batch's position
only once every sink has acknowledged that batch, so a crash never skips a flow that was not stored.

Rules every sink follows:

- `write`, `poll` and `flush` return an `Ack` when more batches became durable during the call, else None.
- A batch with nothing to store is durable as soon as every batch before it is.
- An error while making a batch durable raises `SinkError` (usually `DatasetWriteError`) and acknowledges
  nothing of the batches not yet durable. The pipeline treats it as fatal.
- `close` flushes what is open and releases resources; it returns the final `Ack`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flowpipe.model import EventBatch


@dataclass(frozen=True, slots=True)
class Ack:
    """A sink's confirmation that the first `batches` batches written to it are durable.

    `files` lists the part files published by the flush that produced this ack, `flows` how many flows they
    hold (both empty when the ack only covers batches without rows).
    """

    batches: int
    flows: int = 0
    files: tuple[str, ...] = ()


@runtime_checkable
class Sink(Protocol):
    """Consumes event batches and makes them durable; see the module docstring for the rules."""

    name: str

    def write(self, batch: EventBatch) -> Ack | None:
        """Take one batch (in order). May flush; returns an Ack if batches became durable."""
        ...

    def poll(self) -> Ack | None:
        """Flush if the open batch reached its age limit; called regularly by the pipeline."""
        ...

    def flush(self) -> Ack | None:
        """Make everything written so far durable."""
        ...

    def close(self) -> Ack | None:
        """Flush and release resources."""
        ...


__all__ = ["Ack", "Sink"]

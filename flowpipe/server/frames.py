"""Runs of framed GetFlowsResponse messages in one buffer: what `serve-hubble` reads, cuts, merges and sends.

A `Frames` holds consecutive framed messages (gRPC's 5-byte prefix and the message) in sending order, where
each starts, and the time of each flow: sending a run is one write of its bytes, cutting it at `number` or
merging the lost events of the same window between its flows touches no message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from flowpipe.transforms.flow_responses import FramedResponses


@dataclass(frozen=True)
class Frames:
    """Framed messages `data[starts[i]:starts[i + 1]]`, the i-th of a flow of time `times[i]` (ns)."""

    data: memoryview
    starts: np.ndarray  # int64, one more than times
    times: np.ndarray  # int64

    @classmethod
    def encoded(cls, encoded: FramedResponses) -> Frames:
        """The messages of an encoded batch."""
        return cls(memoryview(encoded.data), encoded.starts, encoded.times)

    @classmethod
    def of(cls, messages: Sequence[bytes], times: Sequence[int]) -> Frames:
        """Already framed messages, one buffer."""
        starts = np.zeros(len(messages) + 1, dtype=np.int64)
        np.cumsum([len(m) for m in messages], out=starts[1:])
        return cls(memoryview(b"".join(messages)), starts, np.asarray(times, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.times)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(time, framed message) of each flow."""
        return ((int(self.times[i]), self.message(i)) for i in range(len(self)))

    def message(self, index: int) -> bytes:
        """The framed message of flow `index`."""
        return bytes(self.data[self.starts[index] : self.starts[index + 1]])

    def head(self, count: int) -> Frames:
        """The first `count` messages."""
        count = max(0, min(count, len(self)))
        return Frames(self.data, self.starts[: count + 1], self.times[:count])

    def select(self, indices: Sequence[int]) -> Frames:
        """The messages at `indices`, in that order."""
        return Frames.of([self.message(i) for i in indices], [int(self.times[i]) for i in indices])

    def payload(self) -> memoryview:
        """Every message, one after another (what goes on the wire)."""
        return self.data[self.starts[0] : self.starts[-1]]

    @staticmethod
    def concat(runs: Sequence[Frames]) -> Frames:
        """The messages of several runs, in order."""
        runs = [run for run in runs if len(run)]
        if len(runs) == 1:
            return runs[0]
        messages = [run.payload() for run in runs]
        offsets = np.cumsum([0] + [len(m) for m in messages[:-1]])
        starts = np.concatenate(
            [run.starts[:-1] - run.starts[0] + offset for run, offset in zip(runs, offsets, strict=True)]
            + [np.array([sum(len(m) for m in messages)], dtype=np.int64)]
        ).astype(np.int64)
        times = np.concatenate([run.times for run in runs]) if runs else np.zeros(0, dtype=np.int64)
        return Frames(memoryview(b"".join(messages)), starts, times)


def empty_frames() -> Frames:
    """No message."""
    return Frames(memoryview(b""), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))


def interleave(
    flows: Frames, lost: list[tuple[int, bytes]], *, final: bool
) -> tuple[bytes | memoryview, list[tuple[int, bytes]]]:
    """The bytes of `flows` with each lost event (time, framed message) before the first flow not older than it.

    `final`: the lost events after the last flow go too. Returns the bytes and the lost events not sent yet.
    """
    if not lost:
        return flows.payload(), lost
    times = np.fromiter((t for t, _ in lost), dtype=np.int64, count=len(lost))
    positions = np.searchsorted(flows.times, times, side="left")
    due = len(lost) if final else int(np.searchsorted(positions, len(flows), side="left"))
    out: list[bytes | memoryview] = []
    at = 0
    for (_, message), position in zip(lost[:due], positions[:due], strict=True):
        if position > at:
            out.append(flows.data[flows.starts[at] : flows.starts[position]])
            at = int(position)
        out.append(message)
    if at < len(flows):
        out.append(flows.data[flows.starts[at] : flows.starts[-1]])
    return b"".join(out), lost[due:]

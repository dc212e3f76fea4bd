"""A simulated capture written as overlapping files, the way real captures are collected.

Successive `hubble observe` runs overlap (each starts a little before the previous one ended, or `--last N`
repeats what was already printed), and files cut from a capture (`dropped.json`) repeat its records.
`write_overlapping_files` writes one simulated run as `parts` time-consecutive files, each reaching back
`overlap` of a part's length into the one before, plus `dropped.json` with every DROPPED flow again. Every flow
carries its uuid, so an ingest of all the files must store each flow exactly once: `CaptureFiles` says how many
lines were written, how many distinct flows they hold, and how many lines repeat a flow already written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from flowpipe.errors import ConfigError
from flowpipe.sim.simulator import Simulator

DROPPED_FILE = "dropped.json"
_TIME = '"time":"'


@dataclass(slots=True)
class CaptureFiles:
    """Ground truth of a capture written as overlapping files."""

    files: dict[str, int] = field(default_factory=dict)
    """Lines written per file name, in the order the files were written."""
    distinct_flows: int = 0
    """Flows of the run: what an ingest of every file must store."""
    repeated_lines: int = 0
    """Lines that repeat a flow of an earlier file (overlaps and the dropped cut)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def part_names(parts: int) -> list[str]:
    """The names of the time-consecutive files, in time order (`capture-1.json`, ...)."""
    width = len(str(parts))
    return [f"capture-{index:0{width}d}.json" for index in range(1, parts + 1)]


def write_overlapping_files(
    simulator: Simulator, folder: Path, *, parts: int = 3, overlap: float = 0.25
) -> CaptureFiles:
    """Write a fresh run of `simulator` into `folder` as `parts` overlapping files plus `dropped.json`."""
    if parts < 1:
        raise ConfigError(f"the capture needs at least one file, got {parts}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap is a share of a part's length in [0, 1), got {overlap}")
    config = simulator.config
    length = (config.end_ns - config.start_ns) / parts
    bounds = [config.start_ns + round(length * index) for index in range(parts + 1)]
    reach = round(length * overlap)
    truth = CaptureFiles()
    names = part_names(parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            handles = [_open(stack, folder / name) for name in [*names, DROPPED_FILE]]
            counts = [0] * len(handles)
            for line, when in _timed_lines(simulator):
                written = 0
                for index in range(parts):
                    after_start = index == 0 or bounds[index] - reach <= when
                    if after_start and (index == parts - 1 or when < bounds[index + 1]):
                        handles[index].write(line + "\n")
                        counts[index] += 1
                        written += 1
                if '"verdict":"DROPPED"' in line:
                    handles[-1].write(line + "\n")
                    counts[-1] += 1
                    written += 1
                truth.distinct_flows += 1
                truth.repeated_lines += max(written - 1, 0)
    except OSError as exc:
        raise ConfigError(f"cannot write the capture files into {folder}: {exc.strerror or exc}") from exc
    truth.files = dict(zip([*names, DROPPED_FILE], counts, strict=True))
    return truth


def _open(stack: ExitStack, path: Path) -> IO[str]:
    return stack.enter_context(open(path, "w", encoding="utf-8"))


def _timed_lines(simulator: Simulator) -> Iterator[tuple[str, int]]:
    """The run's jsonpb lines, each with its flow's time in nanoseconds."""
    for line in simulator.json_lines():
        start = line.index(_TIME) + len(_TIME)
        text = line[start : line.index('"', start)]
        seconds, _, fraction = text.rstrip("Z").partition(".")
        whole = datetime.fromisoformat(seconds + "+00:00")
        yield line, int(whole.timestamp()) * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])

"""`flowpipe simulate`: write the built-in simulator's flows as `hubble observe -o jsonpb` lines."""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import click

from flowpipe.cli._options import AliasedOption, choose_faults, simulation_options
from flowpipe.errors import ConfigError
from flowpipe.query.timeparse import parse_seconds
from flowpipe.sim import FAULTS, Simulator, SimulatorConfig
from flowpipe.sim.overlap import CaptureFiles, write_overlapping_files


def parse_start(text: str | None, duration_seconds: float, now: datetime) -> datetime:
    """The simulated start: an ISO 8601 time (UTC if it has no offset), or by default the last `duration` before
    `now`, rounded down to the minute."""
    if text is None:
        end = now.astimezone(UTC).replace(second=0, microsecond=0)
        return end - timedelta(seconds=duration_seconds)
    try:
        start = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"invalid --start {text!r}: use ISO 8601, e.g. 2025-01-06T09:00:00Z") from exc
    return start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)


@contextmanager
def _open_output(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    with ExitStack() as stack:
        try:
            if path.endswith(".gz"):
                handle: IO[str] = stack.enter_context(gzip.open(path, "wt", encoding="utf-8"))
            else:
                handle = stack.enter_context(open(path, "w", encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
        yield handle


@click.command("simulate")
@simulation_options(
    rate=1000.0,
    rate_help="Average flows per second of simulated time.",
    duration="10m",
    duration_help="Simulated duration, e.g. 90s, 10m, 1h.",
)
@click.option(
    "--out",
    "-o",
    "out",
    cls=AliasedOption,
    aliases=("-o",),  # elsewhere -o is the output format (hubble's spelling); kept working here, not shown
    default=None,
    metavar="FILE",
    help="Where to write jsonpb lines; `-` is stdout, a name ending in .gz is compressed.",
)
@click.option(
    "--start",
    default=None,
    metavar="ISO",
    help="Simulated start time (ISO 8601, UTC without an offset). Default: the last --duration before "
    "now, to the minute.",
)
@click.option("--max-flows", type=int, default=None, help="Stop after this many flows.")
@click.option(
    "--ground-truth",
    "ground_truth",
    default=None,
    metavar="FILE",
    help="Also write what each injected fault emitted (JSON).",
)
@click.option(
    "--split",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Write the capture as N overlapping files into the folder --out, as successive `hubble observe` "
    "runs would (each reaches back a quarter of a file's span), plus dropped.json repeating every DROPPED "
    "flow; --ground-truth says how many distinct flows they hold.",
)
@click.option("--list-faults", is_flag=True, help="List the faults that can be injected, then exit.")
def simulate(
    out: str | None,
    seed: int,
    rate: float,
    duration: str,
    start: str | None,
    fault: tuple[str, ...],
    faults: str | None,
    no_faults: bool,
    max_flows: int | None,
    cluster_name: str,
    ground_truth: str | None,
    split: int | None,
    list_faults: bool,
) -> None:
    """Write flows of the built-in simulated cluster as `hubble observe -o jsonpb` lines.

    The flows are deterministic for a seed and start time, and carry injected trouble (failing DNS lookups,
    policy drops, a port scan, a policy regression, conntrack drops...) whose exact counts --ground-truth records.
    """
    if list_faults:
        for spec in FAULTS:
            click.echo(f"{spec.name:22} {spec.description}")
        return
    if out is None:
        raise click.UsageError("missing --out FILE (use `-` for stdout)")
    seconds = parse_seconds(duration)
    config = SimulatorConfig(
        seed=seed,
        start=parse_start(start, seconds, datetime.now(UTC)),
        duration_seconds=seconds,
        rate_flows_per_second=rate,
        faults=choose_faults(fault, faults, no_faults),
        cluster_name=cluster_name,
        max_flows=max_flows,
    )
    simulator = Simulator(config)
    files = None
    if split is not None:
        files = _write_overlapping(simulator, out, split)
        written = files.distinct_flows
    else:
        with _open_output(out) as handle:
            written = simulator.write_jsonpb(handle)
    truth = simulator.ground_truth()
    if files is not None:
        truth.capture_files = files.to_dict()
    if ground_truth is not None:
        with _open_output(ground_truth) as handle:
            handle.write(truth.to_json() + "\n")
    click.echo(
        f"wrote {written} flows ({truth.totals.get('dropped', 0)} dropped) from {truth.start} to {truth.end}, "
        f"faults: {', '.join(truth.faults_enabled) or 'none'} -> {out}"
        + (f" ({len(files.files)} files, {files.repeated_lines} lines repeat a flow)" if files else ""),
        err=True,
    )


def _write_overlapping(simulator: Simulator, out: str, parts: int) -> CaptureFiles:
    """The run as overlapping capture files in the folder `out`."""
    if out == "-" or Path(out).is_file():
        raise click.UsageError("--split writes several files: give --out a folder")
    return write_overlapping_files(simulator, Path(out), parts=parts)

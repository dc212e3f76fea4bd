"""`flowpipe ingest FILE...`: Hubble JSON exports into the dataset, with a progress bar and a summary."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from flowpipe._cli_options import dataset_option
from flowpipe.config import ParquetSinkConfig, field_help
from flowpipe.errors import FlowpipeError
from flowpipe.ingest import IngestResult, ingest_files
from flowpipe.model import EventBatch
from flowpipe.pipeline import handle_stop_signals
from flowpipe.sources.file import STDIN, expand_paths

_HELP = field_help(ParquetSinkConfig)
STOPPED_EXIT_CODE = 130
"""Exit status of an ingest stopped by SIGINT/SIGTERM (after what was read is stored and checkpointed)."""


@click.command("ingest")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@dataset_option
@click.option("--strict", is_flag=True, help="Fail on the first malformed line instead of skipping it.")
@click.option("--cluster", "cluster_name", metavar="NAME",
              help="Cluster name for flows whose node name does not carry one.")  # fmt: skip
@click.option("--max-batch-rows", type=click.IntRange(min=1), help=_HELP["max_batch_rows"])
@click.option("--writer-id", help=_HELP["writer_id"])
def ingest(
    files: tuple[str, ...],
    dataset: str,
    strict: bool,
    cluster_name: str | None,
    max_batch_rows: int | None,
    writer_id: str | None,
) -> None:
    """Ingest Hubble flow files into the dataset.

    FILE is `hubble observe -o jsonpb` (or legacy `-o json`) output, a Hubble exporter file (`events.log`, its
    rotated and `.gz` backups), or a JSON array of flows; `-` reads stdin. Lines already ingested into this
    dataset are skipped, so running it again on the same files adds nothing. A malformed line is reported with
    its file and line number and skipped (with --strict it stops the command). Ctrl-C (or SIGTERM) stops
    after storing and checkpointing what was read, with exit status 130; run the command again to go on.
    """
    options: dict[str, Any] = {"path": dataset}
    if max_batch_rows is not None:
        options["max_batch_rows"] = max_batch_rows
    if writer_id is not None:
        options["writer_id"] = writer_id
    config = ParquetSinkConfig(**options)
    stop = threading.Event()
    console = Console(stderr=True)
    total = _input_bytes(files)
    done: dict[str, int] = {}
    with (
        Progress(
            SpinnerColumn(),
            TextColumn("ingesting"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[flows]:,} flows"),
            TextColumn("{task.fields[where]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress,
        handle_stop_signals(stop),
    ):
        task = progress.add_task("ingest", total=total, flows=0, where="")
        flows = 0

        def advance(batch: EventBatch) -> None:
            nonlocal flows
            flows += batch.flows.num_rows
            path, offset = getattr(batch.position, "path", ""), getattr(batch.position, "offset", 0)
            done[path] = max(done.get(path, 0), int(offset or 0))
            progress.update(task, completed=sum(done.values()), flows=flows, where=Path(path).name)

        result = ingest_files(
            list(files), config, strict=strict, cluster_name=cluster_name, stop=stop, on_batch=advance
        )
    _print_summary(result, dataset)
    if result.pipeline.stopped:
        raise click.exceptions.Exit(STOPPED_EXIT_CODE)


def _input_bytes(files: tuple[str, ...]) -> int | None:
    """Total bytes to read, for the progress bar; None (no bar, a count) for stdin or compressed input."""
    try:
        paths = expand_paths(list(files))
        total = 0
        for path in paths:
            if path == STDIN:
                return None
            with open(path, "rb") as handle:
                if handle.read(2) == b"\x1f\x8b":  # gzip: the offsets count decompressed bytes
                    return None
            total += Path(path).stat().st_size
    except (OSError, FlowpipeError):
        return None  # the source reports the problem itself
    return total


def _print_summary(result: IngestResult, dataset: str) -> None:
    run = result.pipeline
    echo = click.echo
    verdicts = ", ".join(f"{name} {count:,}" for name, count in sorted(result.flows_by_verdict.items()))
    echo(f"flows ingested: {run.flows:,}" + (f" ({verdicts})" if verdicts else "") + f" into {dataset}")
    echo(f"part files written: {len(run.files):,}")
    echo(f"lost events seen: {run.lost_event_records:,} records, {run.events_lost:,} events lost by Hubble")
    if run.node_status:
        echo(f"node status events seen: {run.node_status:,}")
    skipped = sum(result.skipped_by_reason.values())
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(result.skipped_by_reason.items()))
    echo(f"lines skipped: {skipped:,}" + (f" ({reasons})" if reasons else ""))
    for message in result.skipped_samples:
        echo(f"  {message}")
    if skipped > len(result.skipped_samples):
        echo(f"  ... and {skipped - len(result.skipped_samples):,} more")
    for line in _source_lines(result.source_summary):
        echo(line)
    if run.stopped:
        echo("stopped before the end of the input: run the same command again to continue where it stopped")


def _source_lines(summary: object) -> list[str]:
    """What the file source reports beyond the counts above: lines it skipped as already ingested."""
    already = int(getattr(summary, "lines_already_ingested", 0) or 0)
    return (
        [
            f"already ingested: {already:,} lines were in the dataset from an earlier run (nothing added for them)"
        ]
        if already
        else []
    )

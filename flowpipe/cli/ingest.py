"""`flowpipe ingest FILE...`: Hubble JSON exports into the dataset, with a progress bar and a summary."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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

from flowpipe.app.ingest import IngestResult, ingest_files, plural
from flowpipe.cli._options import cluster_name_option, dataset_option
from flowpipe.config import ParquetSinkConfig, field_help
from flowpipe.errors import FlowpipeError, SourceError
from flowpipe.model import EventBatch
from flowpipe.pipeline import handle_stop_signals
from flowpipe.sources import file as file_source
from flowpipe.sources.file import REASON_UNKNOWN_EVENT, STDIN, expand_paths

_HELP = field_help(ParquetSinkConfig)
STOPPED_EXIT_CODE = 130
"""Exit status of an ingest stopped by SIGINT/SIGTERM (after what was read is stored and checkpointed)."""


@click.command("ingest")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@dataset_option
@click.option("--strict", is_flag=True, help="Fail on the first malformed line instead of skipping it.")
@cluster_name_option("Cluster name for flows whose node name does not carry one.")
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
    rotated and `.gz` backups), a JSON array of flows, or pretty-printed flow objects (a flow saved from a
    browser, `jq .` output; one or several); `-` reads stdin. An input from which nothing could be read (every
    line skipped) makes the command fail, after storing what the other inputs held. Lines already ingested into this
    dataset are skipped, so running it again on the same files adds nothing. A malformed line is reported with
    its file and line number and skipped (with --strict it stops the command, saying what was already stored).
    Ctrl-C (or SIGTERM) stops after storing and checkpointing what was read, with exit status 130; run the
    command again to go on.

    The summary accounts for every line read: flows by verdict, lost events by source, node_status, agent and
    debug events (counted, not stored), lines skipped by reason with the first few file:line messages (also
    logged as they happen at --log-level info), lines already ingested, and flows already stored: a flow whose
    uuid the dataset already holds (overlapping captures, a file cut from another) is stored once.
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
        _bad_lines_in_the_summary_only(),
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
    if result.unreadable_files:
        # what the other inputs held is stored; the exit status says that an input gave nothing
        raise SourceError("\n".join(result.unreadable_files))


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
    """Every line read, accounted for: flows by verdict, lost events by source, counted events, skipped lines."""
    run = result.pipeline
    echo = click.echo
    verdicts = ", ".join(f"{name} {count:,}" for name, count in sorted(result.flows_by_verdict.items()))
    echo(f"flows ingested: {run.flows:,}" + (f" ({verdicts})" if verdicts else "") + f" into {dataset}")
    echo(f"part files written: {len(run.files):,}")
    records, lost = sum(result.lost_events_by_source.values()), sum(result.events_lost_by_source.values())
    by_source = "; ".join(
        f"{source}: {plural(count, 'record')}, {plural(result.events_lost_by_source.get(source, 0), 'event')}"
        for source, count in sorted(result.lost_events_by_source.items())
    )
    echo(
        f"lost events seen: {plural(records, 'record')}, {plural(lost, 'event')} lost by Hubble"
        + (f" ({by_source})" if by_source else "")
    )
    counted = {"node_status": result.node_status, "agent": result.agent_events, "debug": result.debug_events}
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in counted.items() if count)
    echo(f"events counted, not stored: {sum(counted.values()):,}" + (f" ({kinds})" if kinds else ""))
    skipped = sum(result.skipped_by_reason.values())
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(result.skipped_by_reason.items()))
    echo(f"lines skipped: {skipped:,}" + (f" ({reasons})" if reasons else ""))
    for message in result.skipped_samples:
        echo(f"  {message}")
    unknown = result.skipped_by_reason.get(REASON_UNKNOWN_EVENT, 0)
    undecodable = skipped - unknown
    if undecodable > len(result.skipped_samples):
        echo(
            f"  ... and {plural(undecodable - len(result.skipped_samples), 'more line')} that could not be decoded"
        )
    if unknown:
        echo(
            f"  {REASON_UNKNOWN_EVENT}: {plural(unknown, 'line')} of valid JSON hold no event flowpipe reads "
            "(an empty object, a null flow, or an event kind of a newer Hubble)"
        )
    if result.lines_already_ingested:
        was = "was" if result.lines_already_ingested == 1 else "were"
        echo(
            f"already ingested: {plural(result.lines_already_ingested, 'line')} {was} in the dataset from an "
            "earlier run (nothing added for them)"
        )
    if result.flows_already_stored:
        were = "was" if result.flows_already_stored == 1 else "were"
        echo(
            f"already stored: {plural(result.flows_already_stored, 'flow')} {were} in the dataset already (same "
            "uuid: overlapping captures, or repeated in the input); each is stored once"
        )
    if run.stopped:
        echo("stopped before the end of the input: run the same command again to continue where it stopped")


@contextmanager
def _bad_lines_in_the_summary_only() -> Iterator[None]:
    """Keep the file source's per-line warnings out of the output: the summary lists the bad lines.

    At `--log-level info` or `debug` they are logged as well, as they happen.
    """
    logger = logging.getLogger(file_source.__name__)
    if logger.getEffectiveLevel() <= logging.INFO:
        yield
        return

    def not_a_warning(record: logging.LogRecord) -> bool:
        return record.levelno != logging.WARNING

    logger.addFilter(not_a_warning)
    try:
        yield
    finally:
        logger.removeFilter(not_a_warning)

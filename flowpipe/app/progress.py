"""What `collect` and `ingest` show while they run and when they end, as the commands call them.

`collect_with_progress` and `ingest_with_progress` run the use case until it ends or SIGTERM/SIGINT stops it
(what was read is stored and checkpointed first), show its progress and print its summary:

- collect: a line on stderr once the relay answered (`collecting from hubble-relay ... into ...`), and the
  summary on stderr when it stops (flows written, part files, events lost, reconnects, repeats, checkpoint).
- ingest: a progress bar on stderr while a terminal watches (bytes read of the input files, flows, the file
  being read; none for stdin or compressed input, where the byte count is unknown), and the summary on stdout
  that accounts for every line read. The file source's per-line warnings are kept out of the output (the
  summary lists the first few bad lines) unless the log level is info or debug.

`echo` writes one line of the summary; the commands pass `click.echo` (to stdout or stderr).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from flowpipe.app.collect import CollectConfig, CollectResult, collect, use_system_memory_pool
from flowpipe.app.ingest import IngestResult, ingest_files, plural
from flowpipe.config import ParquetSinkConfig
from flowpipe.errors import FlowpipeError
from flowpipe.metrics.families import MetricsServer
from flowpipe.model import EventBatch
from flowpipe.pipeline import handle_stop_signals
from flowpipe.sources import file as file_source
from flowpipe.sources.file import REASON_UNKNOWN_EVENT, STDIN, expand_paths
from flowpipe.sources.relay import RelaySource

Echo = Callable[[str], None]


# -- collect --------------------------------------------------------------------------------------------------


def collect_with_progress(config: CollectConfig, *, echo: Echo) -> CollectResult:
    """Collect until SIGTERM/SIGINT; `echo` gets the line saying where it collects from, then the summary.

    Arrow allocates with the system allocator from here on (`use_system_memory_pool`: a long-running collector).
    """
    source = config.source
    use_system_memory_pool()

    def started(relay_source: RelaySource, server: MetricsServer | None) -> None:
        where = f"; metrics on {server.url}/metrics" if server is not None else ""
        shard = f" (shard {source.shard_label})" if source.shard_label else ""
        echo(f"collecting from hubble-relay {source.address}{shard} into {config.sink.path}{where}")

    stop = threading.Event()
    with handle_stop_signals(stop):
        result = collect(config, stop=stop, on_started=started)
    for line in collect_summary(result):
        echo(line)
    return result


def collect_summary(result: CollectResult) -> list[str]:
    """The lines that say what a collect run did."""
    run = result.pipeline
    lines = [
        (
            f"stopped: {run.flows:,} flows written in {len(run.files):,} part files, "
            f"{run.events_lost:,} events lost by Hubble ({run.lost_event_records:,} records), "
            f"{result.reconnects:,} reconnects, {result.repeats_skipped:,} repeated flows skipped"
        )
    ]
    if run.decode_errors:
        lines.append(f"undecodable responses skipped: {run.decode_errors:,}")
    lines.append(f"checkpoint: {result.checkpoint_state}")
    return lines


# -- ingest ---------------------------------------------------------------------------------------------------


def ingest_with_progress(
    files: Sequence[str],
    config: ParquetSinkConfig,
    *,
    strict: bool = False,
    cluster_name: str | None = None,
    echo: Echo,
) -> IngestResult:
    """Ingest `files` until done or SIGTERM/SIGINT, with a progress bar on stderr; `echo` gets the summary."""
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
    for line in ingest_summary(result, config.path):
        echo(line)
    return result


def _input_bytes(files: Sequence[str]) -> int | None:
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


def ingest_summary(result: IngestResult, dataset: str) -> list[str]:
    """Every line read, accounted for: flows by verdict, lost events by source, counted events, skipped lines."""
    run = result.pipeline
    lines: list[str] = []
    echo = lines.append
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
    return lines


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

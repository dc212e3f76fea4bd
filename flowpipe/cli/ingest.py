"""`flowpipe ingest FILE...`: Hubble JSON exports into the dataset, with a progress bar and a summary."""

from __future__ import annotations

from typing import Any

import click

from flowpipe.app.progress import ingest_with_progress
from flowpipe.cli._options import cluster_name_option, dataset_option
from flowpipe.config import ParquetSinkConfig, field_help
from flowpipe.errors import SourceError

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
@click.option(
    "--edge-rollups/--no-edge-rollups", default=False, show_default=True, help=_HELP["edge_rollups"]
)
def ingest(
    files: tuple[str, ...],
    dataset: str,
    strict: bool,
    cluster_name: str | None,
    max_batch_rows: int | None,
    writer_id: str | None,
    edge_rollups: bool,
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
    options: dict[str, Any] = {"path": dataset, "edge_rollups": edge_rollups}
    if max_batch_rows is not None:
        options["max_batch_rows"] = max_batch_rows
    if writer_id is not None:
        options["writer_id"] = writer_id
    config = ParquetSinkConfig(**options)
    result = ingest_with_progress(files, config, strict=strict, cluster_name=cluster_name, echo=click.echo)
    if result.pipeline.stopped:
        raise click.exceptions.Exit(STOPPED_EXIT_CODE)
    if result.unreadable_files:
        # what the other inputs held is stored; the exit status says that an input gave nothing
        raise SourceError("\n".join(result.unreadable_files))

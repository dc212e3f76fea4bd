"""`flowpipe rollup`: write the edge rollups that are missing (or, with --rebuild, all of them) from the flows."""

from __future__ import annotations

import time

import click
import pyarrow as pa

from flowpipe.cli._options import dataset_option, format_option
from flowpipe.cli._output import render
from flowpipe.dataset.layout import Dataset
from flowpipe.errors import QuestionParameterError


@click.command("rollup")
@dataset_option
@click.option("--rebuild", is_flag=True,
              help="Write the rollup of every flow part file again (else only the missing ones).")  # fmt: skip
@click.option("--since", metavar="TIME",
              help="Only hours that end after this: 7d, 2024-05-01T00:00:00Z (default: every hour with flows).")  # fmt: skip
@format_option("table", "json", "jsonl", "csv")
def rollup(dataset: str, rebuild: bool, since: str | None, output_format: str) -> None:
    """Write the edge rollups (`<dataset>/edges/`) of the flows still in the dataset.

    Collect, ingest and compact write each flow part file's rollup as they publish it; this command writes
    those of flows stored before rollups existed, or of flow files whose writer stopped between the two
    writes, and removes the rollups of flow files a compaction replaced. Then it folds each closed hour's
    rollups into one row per edge (`<dataset>/edge_hours/`), which long windows read. Rollups of hours whose
    flows are past their retention are kept as they are.

    \b
    Examples:
      flowpipe rollup                      # the missing ones
      flowpipe rollup --rebuild --since 7d # every rollup of the last week, written again
    """
    from flowpipe.dataset.rollups.build import build_missing
    from flowpipe.query.timeparse import parse_time

    try:
        start = parse_time(since, name="since") if since else None
    except QuestionParameterError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc
    from flowpipe.dataset.rollups.fold import fold_closed

    started = time.perf_counter()
    report = build_missing(Dataset(dataset), since=start, rebuild=rebuild)
    folded, days = fold_closed(Dataset(dataset), since=start, refold=rebuild)
    table = pa.table(
        {
            "rollup": pa.array([path.rpartition("/edges/")[2] for path in report.written], pa.string()),
        }
    )
    render(table, output_format, title=f"edge rollups written in {dataset}")
    ratio = f" ({report.rollup_bytes / report.flow_bytes:.1%} of them)" if report.flow_bytes else ""
    click.echo(
        f"{len(report.written):,} rollups written from {report.flows:,} flows "
        f"({report.flow_bytes / 1e6:,.1f} MB of flows, {report.rollup_bytes / 1e6:,.1f} MB of rollups{ratio}), "
        f"{len(report.removed):,} left by compacted files removed, {len(folded):,} closed hours and {len(days):,} days folded by edge, "
        f"in {time.perf_counter() - started:.1f}s",
        err=True,
    )

"""`flowpipe retention`: remove hour partitions older than `--keep` (a dry run unless `--apply`)."""

from __future__ import annotations

from datetime import timedelta

import click
import pyarrow as pa

from flowpipe.cli._options import dataset_option, format_option
from flowpipe.cli._output import format_datetime, render
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.retention import RetentionReport, apply_retention, plan_retention
from flowpipe.query.timeparse import parse_duration


@click.command("retention")
@dataset_option
@click.option("--keep", required=True, metavar="AGE",
              help="Keep partitions younger than this: 30d, 12h, 2w (the hour must have ended AGE ago).")  # fmt: skip
@click.option("--keep-edges", metavar="AGE",
              help="Keep edge rollups (edges/) younger than this, e.g. 400d; without it they are all kept.")  # fmt: skip
@click.option("--apply", "apply_", is_flag=True, help="Remove them (without it, only list them).")
@format_option("table", "json", "jsonl", "csv")
def retention(dataset: str, keep: str, keep_edges: str | None, apply_: bool, output_format: str) -> None:
    """List (or with --apply remove) the hour partitions of flows and lost events older than --keep, and of
    edge rollups older than --keep-edges.

    \b
    Examples:
      flowpipe retention --keep 30d            # what would go, with sizes
      flowpipe retention --keep 30d --apply    # remove it
      flowpipe retention --keep 3d --keep-edges 400d --apply   # raw flows 3 days, edges 400
    """
    age = _age(keep, "--keep")
    edges_age = _age(keep_edges, "--keep-edges") if keep_edges is not None else None
    target = Dataset(dataset)
    if apply_:
        report = apply_retention(target, age, keep_edges=edges_age)
    else:
        report = plan_retention(target, age, keep_edges=edges_age)
    verb = "removed" if apply_ else "would remove"
    render(_table(report), output_format, title=f"{verb} from {dataset}")
    click.echo(_summary(report), err=True)


def _age(text: str, flag: str) -> timedelta:
    try:
        age = parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from exc
    if not age:
        raise click.BadParameter("the age must be more than zero, e.g. 30d", param_hint=flag)
    return age


def _table(report: RetentionReport) -> pa.Table:
    return pa.table(
        {
            "table": pa.array([p.table for p in report.partitions], pa.string()),
            "partition": pa.array([p.key.path for p in report.partitions], pa.string()),
            "files": pa.array([len(p.files) for p in report.partitions], pa.int64()),
            "bytes": pa.array([p.bytes for p in report.partitions], pa.int64()),
        }
    )


def _summary(report: RetentionReport) -> str:
    cutoff = format_datetime(report.cutoff)
    if not report.applied:
        return (
            f"dry run: {len(report.partitions):,} partitions that ended before {cutoff} "
            f"({report.files:,} files, {report.bytes / 1e6:,.1f} MB) would be removed; "
            "nothing changed (add --apply to remove them)"
        )
    return (
        f"removed {len(report.partitions):,} partitions that ended before {cutoff}: "
        f"{report.files_removed:,} files, {report.bytes_removed / 1e6:,.1f} MB, in {report.seconds:.1f}s"
    )

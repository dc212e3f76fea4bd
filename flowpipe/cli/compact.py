"""`flowpipe compact`: merge the small part files of closed hours into few large ones."""

from __future__ import annotations

import click
import pyarrow as pa

from flowpipe.cli._options import dataset_option, format_option
from flowpipe.cli._output import render
from flowpipe.dataset.compact import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_TARGET_SIZE_BYTES,
    CompactionReport,
    PartitionPlan,
    compact_dataset,
)
from flowpipe.dataset.layout import Dataset

_MIB = 1024 * 1024


@click.command("compact")
@dataset_option
@click.option("--target-size-mb", type=click.FloatRange(min=1, min_open=False), default=DEFAULT_TARGET_SIZE_BYTES / _MIB,
              show_default=True, help="Size of the merged part files, in MiB.")  # fmt: skip
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=DEFAULT_GRACE_SECONDS,
              show_default=True,
              help="Leave an hour alone until it ended this long ago (late flows may still arrive).")  # fmt: skip
@click.option("--edge-rollups", is_flag=True,
              help="Also write the edge rollups of every closed hour (writers then need not) and fold them.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Show what would be merged; change nothing.")
@format_option("table", "json", "jsonl", "csv")
def compact(
    dataset: str,
    target_size_mb: float,
    grace_seconds: float,
    edge_rollups: bool,
    dry_run: bool,
    output_format: str,
) -> None:
    """Merge the small part files of closed hours into files of about --target-size-mb.

    Every row is kept exactly once. The hour collectors write into (and any hour that ended less than
    --grace-seconds ago) is never touched, so it is safe to run while collectors write; queries see each row
    once throughout. Run one compaction (or retention) at a time per dataset.
    """
    report = compact_dataset(
        Dataset(dataset),
        target_size_bytes=int(target_size_mb * _MIB),
        grace_seconds=grace_seconds,
        dry_run=dry_run,
        build_rollups=edge_rollups,
    )
    render(_plan_table(report.plans), output_format, title=_title(report, dataset))
    for reason in report.skipped:
        click.echo(f"left as is: {reason}", err=True)
    click.echo(_summary(report), err=True)


def _plan_table(plans: list[PartitionPlan]) -> pa.Table:
    return pa.table(
        {
            "table": pa.array([p.partition.table for p in plans], pa.string()),
            "partition": pa.array([p.partition.key.path for p in plans], pa.string()),
            "files": pa.array([len(p.partition.files) for p in plans], pa.int64()),
            "files_merged": pa.array([p.inputs for p in plans], pa.int64()),
            "bytes_merged": pa.array([p.input_bytes for p in plans], pa.int64()),
            "merged_files": pa.array([len(p.groups) for p in plans], pa.int64()),
            "leftovers_removed": pa.array([len(p.leftovers) for p in plans], pa.int64()),
        }
    )


def _title(report: CompactionReport, dataset: str) -> str:
    return f"{'would compact' if report.dry_run else 'compacted'} in {dataset}"


def _summary(report: CompactionReport) -> str:
    if report.dry_run:
        return (
            f"dry run: {report.files_merged:,} files ({report.bytes_before / 1e6:,.1f} MB) in "
            f"{len(report.plans):,} closed partitions would become "
            f"{sum(len(p.groups) for p in report.plans):,} files; nothing changed"
        )
    return (
        f"compacted {report.files_merged:,} files ({report.bytes_before / 1e6:,.1f} MB) into "
        f"{len(report.files_written):,} ({report.bytes_after / 1e6:,.1f} MB), {report.rows:,} rows, "
        f"{report.files_removed:,} files removed, in {report.seconds:.1f}s"
    )

"""`flowpipe bench`: measure ingest speed, memory, dataset size and question times against their targets."""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from flowpipe.bench import DEFAULT_BASELINE_FLOWS, DEFAULT_FLOWS, SECTIONS, Figure, run_bench
from flowpipe.cli._options import AliasedOption, format_option
from flowpipe.cli._output import render


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    return f"{'>=' if figure.higher_is_better else '<'} {_number(figure.target)}"


def _print_table(figures: list[Figure]) -> None:
    table = Table(title="flowpipe bench")
    for column, justify in (("section", "left"), ("figure", "left"), ("value", "right"), ("unit", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("target", justify="right")
    table.add_column("result")
    table.add_column("note")
    for figure in figures:
        result = {True: "[green]ok[/]", False: "[red]MISS[/]", None: ""}[figure.ok]
        table.add_row(
            figure.section,
            figure.name,
            _number(figure.value),
            figure.unit,
            _target(figure),
            result,
            figure.note,
        )
    console = Console()
    if not console.is_terminal:  # piped or redirected: do not squeeze the table into 80 columns
        console = Console(width=150)
    console.print(table)


@click.command("bench")
@click.option("--flows", type=click.IntRange(min=1), default=DEFAULT_FLOWS, show_default=True,
              help="Synthetic flows to generate and ingest.")  # fmt: skip
@click.option("--only", metavar="SECTIONS",
              help=f"Comma-separated sections to run (default: all of {', '.join(s.name for s in SECTIONS)}).")  # fmt: skip
@click.option("--baseline-flows", type=click.IntRange(min=1), default=DEFAULT_BASELINE_FLOWS, show_default=True,
              help="Flows the naive baseline reads (it is slow and memory-hungry; its speed is per flow).")  # fmt: skip
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the generated file and dataset (kept); default: a temporary folder.")  # fmt: skip
@click.option("--keep-workdir", "--keep", "keep", cls=AliasedOption, aliases=("--keep",), is_flag=True,
              help="Keep the temporary folder and print where it is.")  # fmt: skip
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the synthetic flows.")
@click.option("--check", is_flag=True, help="Exit with status 1 when a figure misses its target.")
@format_option("table", "json", "jsonl", "csv")
def bench(
    flows: int,
    only: str | None,
    baseline_flows: int,
    workdir: Path | None,
    keep: bool,
    seed: int,
    check: bool,
    output_format: str,
) -> None:
    """Measure ingest throughput, peak memory, dataset size, the naive baseline and question times.

    Generates synthetic `hubble observe -o jsonpb` flows (1-2 KB lines), ingests them in a child process, and
    prints each figure next to its target: ingest >= 100,000 flows/s and >= 5x the baseline, peak RSS < 500 MB,
    dataset at most 1/25 of the jsonpb bytes, each question < 1 s. Progress goes to stderr.
    """
    sections = [name.strip() for name in only.split(",") if name.strip()] if only else None
    figures = run_bench(
        flows=flows,
        only=sections,
        workdir=workdir,
        keep=keep,
        seed=seed,
        baseline_flows=baseline_flows,
        log=lambda message: click.echo(f"bench: {message}", err=True),
    )
    if output_format == "table":
        _print_table(figures)
    else:
        rows = [figure.as_dict() for figure in figures]
        schema = pa.schema(
            [("section", pa.string()), ("name", pa.string()), ("value", pa.float64()), ("unit", pa.string()),
             ("target", pa.float64()), ("target_is", pa.string()), ("ok", pa.bool_()), ("note", pa.string())]
        )  # fmt: skip
        render(pa.Table.from_pylist(rows, schema=schema), output_format)
    missed = [f"{f.section}: {f.name}" for f in figures if f.ok is False]
    if check and missed:
        raise click.ClickException(f"{len(missed)} figure(s) missed their target: {'; '.join(missed)}")

"""`flowpipe sql`: run one SQL statement over the dataset's views (`flows`, `lost_events`) and print the rows."""

from __future__ import annotations

import sys

import click

from flowpipe.cli._options import dataset_option, format_option, param_option, parse_param_options
from flowpipe.cli._output import render
from flowpipe.errors import QuestionParameterError
from flowpipe.query.catalog import find_parameters
from flowpipe.query.engine import open_engine


@click.command("sql")
@click.argument("statement")
@param_option("Bind $KEY to VALUE (repeatable).")
@click.option(
    "--allow-external-access",
    is_flag=True,
    help="Let the statement read and write any file, attach databases, install extensions and reach the "
    "network (DuckDB's defaults). Without it, only the dataset can be read.",
)
@dataset_option
@format_option("table", "json", "jsonl", "csv")
def sql(
    statement: str,
    param_options: tuple[str, ...],
    allow_external_access: bool,
    dataset: str,
    output_format: str,
) -> None:
    """Run STATEMENT (DuckDB SQL; `-` reads it from stdin) over the views `flows` and `lost_events`.

    The statement reads the dataset and nothing else: no other file, no writing (`COPY ... TO`), no
    `ATTACH`, no `INSTALL`, no network, unless --allow-external-access is given.

    \b
    Examples:
      flowpipe sql "SELECT verdict, count(*) AS flows FROM flows GROUP BY verdict"
      flowpipe sql "SELECT * FROM flows WHERE source_namespace = \\$ns LIMIT 5" -p ns=shop --format json
    """
    if statement == "-" and sys.stdin is None:
        raise click.UsageError("STATEMENT is `-` but standard input is closed: pipe the SQL in")
    text = sys.stdin.read() if statement == "-" else statement
    if not text.strip().strip(";").strip():
        raise click.UsageError("no SQL statement given (STATEMENT is empty; `-` reads it from stdin)")
    params = parse_param_options(param_options)
    used = set(find_parameters(text))
    if used != set(params):
        missing, extra = sorted(used - set(params)), sorted(set(params) - used)
        problems = [f"no value for ${', $'.join(missing)} (-p NAME=VALUE)"] if missing else []
        problems += [f"the statement does not use {', '.join(extra)}"] if extra else []
        raise QuestionParameterError("; ".join(problems))
    engine = open_engine(dataset, require_flows=True, external_access=allow_external_access)
    try:
        table = engine.run(text, params)
    finally:
        engine.close()
    render(table, output_format)

"""`flowpipe schema`: print the columns and types of the flow table (or of `lost_events`)."""

from __future__ import annotations

import click
import pyarrow as pa

from flowpipe.cli._options import format_option
from flowpipe.cli._output import render
from flowpipe.model import SCHEMA_VERSION
from flowpipe.query.engine import FLOWS_VIEW, LOST_EVENTS_VIEW, table_columns


@click.command("schema")
@click.option(
    "--table",
    "view",
    type=click.Choice([FLOWS_VIEW, LOST_EVENTS_VIEW]),
    default=FLOWS_VIEW,
    show_default=True,
    help="Which table to describe.",
)
@format_option("table", "json", "jsonl", "csv")
def schema(view: str, output_format: str) -> None:
    """Print the columns of the flow table: name, SQL type (as in `flowpipe sql`) and Arrow type."""
    columns = table_columns(view)
    table = pa.table(
        {
            "column": [name for name, _, _ in columns],
            "type": [sql_type for _, sql_type, _ in columns],
            "arrow_type": [arrow_type for _, _, arrow_type in columns],
        }
    )
    render(table, output_format, title=f"{view} (schema version {SCHEMA_VERSION})")

"""`flowpipe query`: run a named question from the SQL catalog over the dataset, or list the questions.

`query --list` imports neither pyarrow nor DuckDB: the engine is imported when a question runs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from flowpipe.cli._options import (
    dataset_option,
    format_option,
    one_value,
    param_option,
    parse_param_options,
    source_option,
)
from flowpipe.cli._output import Records, format_datetime, render
from flowpipe.query.catalog import RELATIVE_TO, Catalog, Question, load_questions
from flowpipe.query.timeparse import parse_time

if TYPE_CHECKING:
    from flowpipe.query.engine import Engine
    from flowpipe.query.run import QuestionResult

# Flags that set a parameter of the same name, for questions that declare it (`--last` sets `limit`).
SHORTCUTS = ("since", "until", "namespace", "verdict", "limit")

F = TypeVar("F", bound=Callable[..., Any])


def sql_dir_option(func: F) -> F:
    """`--sql-dir DIR`: a folder of question files to use instead of the shipped ones."""
    return click.option(
        "--sql-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder of NAME.sql questions (default: the questions shipped with flowpipe).",
    )(func)


@click.command("query")
@click.argument("name", required=False)
@param_option("Set a question parameter (repeatable).")
@click.option(
    "--since",
    help="Window start: 1h, 30m, 7d, 45s, now, an ISO timestamp, or `all` (from the first record) (sets `since`).",
)
@click.option(
    "--until",
    help="Window end, same forms as --since (sets `until`; default: the later of now and the newest record).",
)
@click.option(
    "-n",
    "--namespace",
    multiple=True,
    callback=one_value,
    help="Only this Kubernetes namespace (sets `namespace`). A question takes one namespace: giving two is an "
    "error.",
)
@click.option(
    "--verdict",
    multiple=True,
    callback=one_value,
    help="Only flows with this verdict, e.g. DROPPED (sets `verdict`, for questions that have it: see --list). "
    "A question takes one verdict: giving two is an error.",
)
@click.option("--last", type=click.IntRange(min=0), metavar="N", help="At most N rows (sets `limit`).")
@click.option(
    "--relative-to",
    type=click.Choice(RELATIVE_TO),
    default="auto",
    show_default=True,
    help="What relative times count back from: the clock (now), the newest flow (data), or the clock unless "
    "the dataset is older than the window (auto).",
)
@click.option("--now", "now_text", metavar="TIME", help="Take this time (ISO timestamp) as the clock's now.")
@click.option("--list", "list_only", is_flag=True, help="List the questions and their parameters.")
@click.option(
    "--engine",
    "engine_name",
    type=click.Choice(["duckdb", "spark"]),
    default="duckdb",
    show_default=True,
    envvar="FLOWPIPE_ENGINE",
    help="Run the question on embedded DuckDB, or on Apache Spark (pip install 'flowpipe[spark]', Java 17+).",
)
@click.option(
    "--spark-master",
    metavar="URL",
    envvar="FLOWPIPE_SPARK_MASTER",
    help="Spark master for --engine spark: local[N] (default local[2]), spark://host:7077, k8s://..., yarn.",
)
@sql_dir_option
@dataset_option
@source_option
@format_option("table", "json", "jsonl", "csv")
def query(
    name: str | None,
    param_options: tuple[str, ...],
    since: str | None,
    until: str | None,
    namespace: str | None,
    verdict: str | None,
    last: int | None,
    relative_to: str,
    now_text: str | None,
    list_only: bool,
    engine_name: str,
    spark_master: str | None,
    sql_dir: Path | None,
    dataset: str,
    source: str,
    output_format: str,
) -> None:
    """Run the question NAME over the dataset (`--list` shows them all).

    \b
    Examples:
      flowpipe query --list
      flowpipe query drops_by_reason --since 6h --namespace shop
      flowpipe query top_talkers --last 5 -o json
      flowpipe query unexpected_drops -o jsonl | jq .why
      flowpipe query unexpected_drops --engine spark --spark-master spark://spark:7077

    Exit status: 0 on success; 1 when the question cannot answer (no dataset, an unknown question or
    parameter, a value of the wrong type, a broken question file); 2 for a usage error (a bad or conflicting
    flag).
    """
    catalog = load_questions(sql_dir)
    if list_only:
        if name is not None:
            raise click.UsageError("--list takes no question name")
        render_catalog(catalog, output_format)
        return
    if name is None:
        raise click.UsageError("give a question name (see `flowpipe query --list`)")
    question = catalog.question(name)
    values: dict[str, object] = dict(parse_param_options(param_options))
    given = (since, until, namespace, verdict, last)
    for key, value in zip(SHORTCUTS, given, strict=True):
        if value is None:
            continue
        if key in values:
            flag = "--last" if key == "limit" else f"--{key}"
            raise click.UsageError(f"{flag} and -p {key}=... both set {key}")
        values[key] = value
    now = parse_time(now_text, name="--now") if now_text is not None else None
    question.check_values(values)
    from flowpipe.query.engine import open_engine
    from flowpipe.query.run import run_question, window_coverage

    if engine_name == "spark":
        from flowpipe.query.spark import open_spark_engine  # pyspark is an optional extra

        engine: Engine = open_spark_engine(dataset, master=spark_master, require_flows=True)
    else:
        engine = open_engine(dataset, require_flows=True, source=source)
    coverage = None
    try:
        result = run_question(engine, question, values, relative_to=relative_to, now=now)  # type: ignore[arg-type]
        if _default_window(question, values):
            coverage = window_coverage(engine, result.params.get("since"), result.params.get("until"))  # type: ignore[arg-type]
        if source != "flows" and engine_name != "spark":
            from flowpipe.dataset.rollups.read import raw_flows_note

            note = raw_flows_note(engine, question.name, result.params.get("since"))  # type: ignore[arg-type]
            if note:
                click.echo(note, err=True)
    finally:
        engine.close()
    if result.anchored_to == "data" and result.anchor is not None:
        click.echo(
            f"note: relative times count back from the newest record ({format_datetime(result.anchor)}), "
            "not the clock; use --relative-to now to change that",
            err=True,
        )
    if coverage is not None and coverage.partial:
        click.echo(coverage.note(result.params.get("since"), result.params.get("until")), err=True)
    render(result.table, output_format, title=_title(result))


def _default_window(question: Question, values: dict[str, object]) -> bool:
    """Whether the question has a time window and its start was left at the default."""
    since = question.parameter("since")
    return since is not None and since.type == "time" and values.get("since") is None


def render_catalog(catalog: Catalog, output_format: str) -> None:
    """Print the questions: a table, or (json/jsonl) records with name, description and parameters as objects,
    or (csv) with the parameters described in one field."""
    nested = output_format in ("json", "jsonl")
    rows = [
        (
            q.name,
            q.description,
            [
                {"name": p.name, "type": p.type, "default": p.default, "required": p.required}
                for p in q.parameters
            ]
            if nested
            else _describe_parameters(q),
        )
        for q in catalog
    ]
    records = Records(("name", "description", "parameters"), rows)
    render(records, output_format, title=f"questions in {catalog.directory}")


def _describe_parameters(question: Question) -> str:
    return ", ".join(p.describe() for p in question.parameters)


def _title(result: QuestionResult) -> str:
    from flowpipe.query.run import window_bound

    since, until = result.params.get("since"), result.params.get("until")
    window = []
    for label, value in (("from", since), ("to", until)):
        if isinstance(value, datetime):
            window.append(f"{label} {window_bound(value)}")
    suffix = f" ({' '.join(window)})" if window else ""
    return f"{result.question.name}{suffix}"

"""Apache Spark runs the same questions over the same dataset: every question returns the same rows on DuckDB
and on Spark (order aside; floats within a tolerance; times to the microsecond, Spark's precision)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner
from support.env import require_binary
from support.small_files import START, lost_events, simulated_flows

from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig
from flowpipe.dataset.compact import compact_dataset
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.rollups import EDGE_IDENTITIES_TABLE, EDGES_TABLE
from flowpipe.dataset.rollups.build import SEEN_FOR
from flowpipe.model import EventBatch, empty_flows
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.query.catalog import Question
from flowpipe.query.engine import open_engine
from flowpipe.query.views import load_views
from flowpipe.sinks.parquet import ParquetSink

ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}
CLUSTERS = ("eu-west", "us-east")
TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})\d*Z$")


def test_every_question_and_shared_view_translates_with_its_parameters() -> None:
    pytest.importorskip("sqlglot")
    from flowpipe.query.spark import to_spark_sql

    for question in load_questions():
        text, names = to_spark_sql(question.sql)
        assert set(names) == {p.name for p in question.parameters}, question.name
        assert "$" not in text.replace("'$'", ""), question.name
        assert all(f":{name}" in text for name in names), question.name
    for view in load_views():
        assert to_spark_sql(view.sql)[1] == (), view.name


def test_ctes_read_more_than_once_are_steps_of_their_own() -> None:
    """Spark copies a CTE wherever it is read: those that compute something and are read more than once become
    views computed first, each step translated with the parameters it uses."""
    pytest.importorskip("sqlglot")
    from flowpipe.query.spark import CTE_VIEW_PREFIX, to_spark_steps

    question = load_questions().question("observed_edges")
    steps, text, names = to_spark_steps(question.sql)
    views = [view for view, _, _ in steps]
    assert f"{CTE_VIEW_PREFIX}pairs" in views and f"{CTE_VIEW_PREFIX}edge_endpoints" in views
    assert f"{CTE_VIEW_PREFIX}calls" not in views  # read once: stays inside the step that reads it
    for view, sql, used in steps:
        assert set(used) <= {p.name for p in question.parameters}, view
        assert all(f":{name}" in sql for name in used) and "$" not in sql.replace("'$'", ""), view
    assert f"JOIN {CTE_VIEW_PREFIX}edge_endpoints AS s" in text and names == ()  # the steps bind them
    plain = "SELECT a FROM (SELECT 1 AS a) AS t WHERE a = $a"
    assert to_spark_steps(plain) == ((), "SELECT a FROM (SELECT 1 AS a) AS t WHERE a = :a", ("a",))


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local[2] SparkSession for this module (UI off), stopped at the end."""
    require_binary("java")
    pytest.importorskip("pyspark")
    from flowpipe.query.spark import spark_session

    session = spark_session("local[2]", app_name="flowpipe-tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated clusters (every fault on) and lost events in one dataset, in part files of 1,500 flows."""
    root = tmp_path_factory.mktemp("spark") / "ds"
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="sim", max_batch_rows=1500))
    for number, cluster in enumerate(CLUSTERS):
        flows = simulated_flows(rate=0.6, cluster_name=cluster, seed=11 + number)
        for offset in range(0, flows.num_rows, 1500):
            sink.write(EventBatch(flows=flows.slice(offset, 1500)))
    sink.write(EventBatch(flows=empty_flows(), lost_events=lost_events()))
    sink.close()
    return root


@pytest.fixture(scope="module")
def engines(spark: Any, dataset: Path) -> Iterator[tuple[DuckDBEngine, Any]]:
    from flowpipe.query.spark import SparkEngine

    # The shared views cached: each is computed on Spark once for the module instead of once per question.
    with DuckDBEngine(dataset) as duck, SparkEngine(dataset, session=spark, cache_views=True) as sparks:
        yield duck, sparks


def normalize(value: Any) -> Any:
    """A value comparable across engines: times as UTC microseconds, floats rounded, lists as tuples."""
    if isinstance(value, pd.Timestamp):
        return ("time", value.value // 1000)
    if isinstance(value, datetime):
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        return ("time", (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1))
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else round(float(value), 6)
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, list | tuple):
        return tuple(normalize(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, normalize(item)) for key, item in value.items()))
    return value


def rows(table: pa.Table) -> list[tuple[Any, ...]]:
    """The rows of a result, normalized, as a sorted list (row order aside)."""
    return sorted(
        (tuple((name, normalize(value)) for name, value in row.items()) for row in table.to_pylist()),
        key=repr,
    )


def values_for(question: Question, **given: str) -> dict[str, str]:
    values = {k: v for k, v in {**ALL_TIME, **given}.items() if question.parameter(k) is not None}
    if question.parameter("limit") is not None:
        values["limit"] = "100000"  # no cut-off among ties, which the engines may break differently
    return values


def assert_same(duck: DuckDBEngine, sparks: Any, question: Question, values: dict[str, str]) -> int:
    on_duckdb = run_question(duck, question, values).table
    on_spark = run_question(sparks, question, values).table
    assert on_spark.column_names == on_duckdb.column_names, question.name
    expected, got = rows(on_duckdb), rows(on_spark)
    if got != expected:
        only_duckdb = [r for r in expected if r not in got][:3]
        only_spark = [r for r in got if r not in expected][:3]
        pytest.fail(f"{question.name} {values}: DuckDB only {only_duckdb}; Spark only {only_spark}")
    return len(expected)


QUESTION_OPTIONS: dict[str, dict[str, str]] = {"dns_failures": {"show_lookups": "true"}}
"""Options beyond the whole window for some questions: dns_failures shows every client's lookups too (the rows the
`flowpipe_dns_lookups` gauge reads; they add rows and change none), rather than run once more. Every question runs
over the whole data: Spark computes the CTEs a question reads more than once only once
(`flowpipe.query.spark.to_spark_steps`)."""


@pytest.mark.timeout(600)  # a question on a local Spark: seconds to minutes
@pytest.mark.parametrize("name", [question.name for question in load_questions()])
def test_every_question_returns_the_same_rows_on_duckdb_and_spark(
    engines: tuple[DuckDBEngine, Any], name: str
) -> None:
    duck, sparks = engines
    question = load_questions().question(name)
    found = assert_same(duck, sparks, question, values_for(question, **QUESTION_OPTIONS.get(name, {})))
    assert found, f"{name} finds nothing in the simulated clusters, so its parity would say little"


def test_parameters_bind_alike(engines: tuple[DuckDBEngine, Any]) -> None:
    """A window inside the data, a namespace, a boolean and a float, on a few questions (Spark is slow to plan)."""
    duck, sparks = engines
    window = {
        "since": (START + timedelta(minutes=50)).isoformat(),
        "until": (START + timedelta(hours=2)).isoformat(),
    }
    catalog = load_questions()
    for name in ("drops_by_reason", "top_talkers", "cross_namespace", "observed_edges"):
        question = catalog.question(name)
        assert assert_same(duck, sparks, question, values_for(question, **window, namespace="production")) > 0
    dns = catalog.question("dns_failures")
    options = {"include_search_expansions": "true", "timeout_seconds": "2.5"}
    narrow = {"since": window["since"], "until": (START + timedelta(minutes=70)).isoformat()}
    assert assert_same(duck, sparks, dns, values_for(dns, **narrow, **options)) > 0


def test_a_value_is_bound_never_spliced_into_the_sql(engines: tuple[DuckDBEngine, Any]) -> None:
    _, sparks = engines
    question = load_questions().question("drops_by_reason")
    hostile = "x' OR '1'='1"
    result = run_question(sparks, question, values_for(question, namespace=hostile)).table
    assert result.num_rows == 0
    assert sparks.run("SELECT $v AS v", {"v": hostile}).to_pylist() == [{"v": hostile}]


def test_cluster_name_reaches_spark(engines: tuple[DuckDBEngine, Any]) -> None:
    _, sparks = engines
    table = sparks.run(
        "SELECT cluster_name, count(*) AS n FROM flows GROUP BY cluster_name ORDER BY cluster_name"
    )
    assert [row["cluster_name"] for row in table.to_pylist()] == list(CLUSTERS)


def test_an_empty_dataset_answers_with_no_rows(spark: Any, tmp_path: Path) -> None:
    from flowpipe.query.spark import SparkEngine

    with SparkEngine(tmp_path / "empty", session=spark) as empty:
        assert not empty.has_flows
        for name in ("drops_by_reason", "lost_events", "observed_edges"):
            question = load_questions().question(name)
            assert run_question(empty, question, values_for(question)).table.num_rows == 0, question.name


def test_part_files_compacted_under_a_running_engine(spark: Any, dataset: Path, tmp_path: Path) -> None:
    from flowpipe.query.spark import SparkEngine

    copy = Path(shutil.copytree(dataset, tmp_path / "ds"))
    with SparkEngine(copy, session=spark) as sparks:
        total = sparks.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py()
        report = compact_dataset(Dataset(copy), clock=lambda: datetime(2100, 1, 1, tzinfo=UTC))
        assert report.files_removed > 0
        assert sparks.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == total


def test_cached_views_are_computed_again_after_a_refresh(spark: Any, dataset: Path, tmp_path: Path) -> None:
    """With `cache_views`, a refresh over new part files answers from them, not from the cache of the old ones."""
    from flowpipe.query.spark import SparkEngine

    copy = tmp_path / "ds"
    sink = ParquetSink(ParquetSinkConfig(path=str(copy), writer_id="first"))
    sink.write(EventBatch(flows=simulated_flows(rate=0.1, cluster_name="eu-west", seed=3)))
    sink.close()
    count = "SELECT count(*) AS n FROM flows_enriched"
    with SparkEngine(copy, session=spark, cache_views=True) as sparks:
        before = sparks.run(count).column("n")[0].as_py()
        assert before > 0 and sparks.spark.catalog.isCached("flows_enriched")
        more = ParquetSink(ParquetSinkConfig(path=str(copy), writer_id="second"))
        more.write(EventBatch(flows=simulated_flows(rate=0.1, cluster_name="us-east", seed=4)))
        more.close()
        sparks.refresh()
        assert sparks.run(count).column("n")[0].as_py() > before


def test_query_command_with_engine_spark(spark: Any, dataset: Path) -> None:
    runner = CliRunner()
    args = [
        "query",
        "drops_by_reason",
        "--dataset",
        str(dataset),
        "--since",
        "2000-01-01",
        "--format",
        "json",
    ]
    on_duckdb = runner.invoke(cli, args)
    on_spark = runner.invoke(cli, [*args, "--engine", "spark"])
    assert on_duckdb.exit_code == 0 and on_spark.exit_code == 0, on_spark.output

    def records(output: str) -> list[str]:  # times to the microsecond, Spark's precision
        found = [
            {k: TIME.sub(r"\1Z", v) if isinstance(v, str) else v for k, v in r.items()}
            for r in json.loads(output)
        ]
        return sorted(json.dumps(r, sort_keys=True) for r in found)

    assert records(on_spark.stdout) == records(on_duckdb.stdout) != []
    empty = runner.invoke(
        cli, ["query", "drops_by_reason", "--dataset", str(dataset / "nothing"), "--engine", "spark"]
    )
    assert empty.exit_code == 1 and "holds no flows" in empty.output
    assert spark.sparkContext._jsc is not None  # the shared session is still running


# -- edge rollups: DuckDB writes them per part file, Spark merges them with the same SQL -----------------------

ROLLUP_SUMMARY = (
    "SELECT cluster_name, outcome, l4_protocol, count(*) AS connections, sum(packets) AS packets, "
    "sum(denied_packets) AS denied, min(source_workload_id) AS first_source, "
    "max(destination_workload_id) AS last_destination, count_if(at_hour_edge) AS at_hour_edge "
    "FROM connections GROUP BY cluster_name, outcome, l4_protocol"
)


def _summary_rows(table: Any) -> list[tuple[Any, ...]]:
    return sorted((tuple(str(v) for v in row.values()) for row in table.to_pylist()), key=repr)


def test_spark_merges_duckdb_rollups_into_the_same_connections(
    spark: Any, capture_files: list[Path], tmp_path: Path
) -> None:
    from pyspark.sql import functions as F

    from flowpipe.app.ingest import ingest_files
    from flowpipe.query.spark import SparkEngine, to_spark_sql

    ingest_files(
        capture_files,
        ParquetSinkConfig(path=str(tmp_path), writer_id="c", max_batch_rows=150, edge_rollups=True),
    )
    with open_engine(tmp_path) as duck:
        expected = _summary_rows(duck.run(ROLLUP_SUMMARY))
    assert expected
    dataset = Dataset(tmp_path)
    with SparkEngine(tmp_path, session=spark) as engine:
        assert (
            _summary_rows(engine.run(ROLLUP_SUMMARY)) == expected
        )  # the edge definition on Spark, from flows
        # the same views over the rollup files instead of the flows
        observations = spark.read.parquet(*[f"file://{p}" for p in dataset.list_part_files(EDGES_TABLE)])
        observations.createOrReplaceTempView("_rollup_rows")
        identities = spark.read.parquet(
            *[f"file://{p}" for p in dataset.list_part_files(EDGE_IDENTITIES_TABLE)]
        )
        identities.createOrReplaceTempView("_rollup_identities")
        # a rollup stores last_seen as the nanoseconds after first_seen (Spark reads both as nanosecond numbers):
        # both as timestamps again, to the microsecond as Spark keeps them
        observations.withColumn(
            "last_seen", F.expr(f"timestamp_micros((first_seen + {SEEN_FOR}) div 1000)")
        ).withColumn("first_seen", F.expr("timestamp_micros(first_seen div 1000)")).createOrReplaceTempView(
            "edge_observations"
        )
        spark.sql(
            "CREATE OR REPLACE TEMP VIEW identity_workloads AS SELECT cluster_name, identity, min(workload) AS "
            "workload FROM _rollup_identities WHERE workload IS NOT NULL GROUP BY cluster_name, identity"
        )
        [connections] = [view for view in load_views() if view.name == "connections"]
        spark.sql(f"CREATE OR REPLACE TEMP VIEW connections AS\n{to_spark_sql(connections.sql)[0]}")
        assert _summary_rows(engine.run(ROLLUP_SUMMARY)) == expected

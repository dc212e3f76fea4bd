"""Apache Spark over the dataset: the views and questions of the DuckDB engine, their SQL translated by sqlglot.

`SparkEngine` implements the `Engine` protocol, so `run_question`, `flowpipe query NAME --engine spark` and the
rest work unchanged. There is one SQL text per question (DuckDB SQL in `sql/`); this module translates it with
sqlglot (`read="duckdb", write="spark"`) when it runs, and binds the parameters as Spark named parameters
(`$since` becomes `:since`, its value goes to `spark.sql(sql, args={...})`: values are never formatted into
the SQL). Needs `pip install 'flowpipe[spark]'` (pyspark, sqlglot) and Java 17 or later.

How the views are built, the same as DuckDB's:

- `flows` and `lost_events` read the part files that `flowpipe.dataset.visible.visible_part_files` lists (temporary
  files, and inputs already in a compacted file, left out) with the Arrow schema of the flow table as the read
  schema, so older files without a column read it as NULL. Spark cannot read Parquet nanosecond timestamps as
  timestamps: they are read as integers (`spark.sql.legacy.parquet.nanosAsLong`) and the view turns them into
  Spark timestamps, which have microseconds (the last three digits of a time are dropped).
- `drop_reasons` and the shared views of `sql/_views/` (translated the same way) are created on the session.
- The session runs in UTC with ANSI mode off (like DuckDB, an array index past the end is NULL, not an error),
  and without constraint propagation (minutes of optimizing on the larger questions' plans).
- A question whose CTEs are read more than once runs in steps (`to_spark_steps`): each such CTE is computed
  once into a view of its rows, since Spark would otherwise copy it into the plan wherever it is read.
- Times have microseconds: a record in the microsecond after a window's `until` is inside it on Spark (its
  nanoseconds dropped), outside on DuckDB.

Where Spark runs: `master="local[2]"` (the default) runs in this process's JVM; any other master
(`spark://host:7077`, `k8s://...`, `yarn`) is a cluster, whose executors must reach the dataset. A local
folder then has to be on a filesystem every executor mounts at the same path. An `s3://bucket/prefix` dataset is
read through Hadoop's S3A connector as `s3a://bucket/prefix`, with the endpoint and region of
`flowpipe.dataset.storage` and the AWS credentials of the environment; the connector is not part of pyspark: add it,
e.g. `PYSPARK_SUBMIT_ARGS="--packages org.apache.hadoop:hadoop-aws:<the Hadoop version of your Spark>
pyspark-shell"` (or the `spark.jars.packages` setting of the cluster).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from types import TracebackType
from typing import Any, Self

import pyarrow as pa

from flowpipe.dataset.layout import FLOWS_TABLE, LOST_EVENTS_TABLE, Dataset
from flowpipe.dataset.storage import s3_options
from flowpipe.dataset.visible import visible_part_files
from flowpipe.drop_reasons import drop_reason_table
from flowpipe.errors import ConfigError, EmptyDatasetError, FlowpipeError, QueryError
from flowpipe.model import FLOW_SCHEMA, LOST_EVENTS_SCHEMA
from flowpipe.query.views import DROP_REASONS_TABLE, NAMED_VIEW, flows_named_sql, load_views

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[2]"
SESSION_CONF: dict[str, str] = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.ansi.enabled": "false",
    "spark.sql.legacy.parquet.nanosAsLong": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # The edge definition joins large intermediate tables (every connection, every identity); broadcasting them
    # to each task runs out of memory where a shuffle join does not.
    "spark.sql.autoBroadcastJoinThreshold": "-1",
    # Inferring filters from the constraints of every operator costs minutes on the plans of the larger questions
    # (and fails on some unions of aggregates: "key not found"); the questions filter where they need to.
    "spark.sql.constraintPropagation.enabled": "false",
}
LOCAL_CONF: dict[str, str] = {"spark.sql.shuffle.partitions": "2", "spark.driver.memory": "4g"}
"""Extra settings for local mode: as many shuffle partitions as local cores (the default 200 is for clusters),
and 4 GiB for the driver, which in local mode also runs the tasks (the default 1 GiB cannot broadcast the
joins of the larger questions at a million flows)."""

_VIEWS: tuple[tuple[str, str, pa.Schema], ...] = (
    ("flows", FLOWS_TABLE, FLOW_SCHEMA),
    ("lost_events", LOST_EVENTS_TABLE, LOST_EVENTS_SCHEMA),
)


def _pyspark() -> Any:
    try:
        import pyspark.sql
        import sqlglot  # noqa: F401  (translates the questions)
    except ImportError as exc:
        raise ConfigError(
            f"the Spark engine needs pyspark and sqlglot ({exc}): pip install 'flowpipe[spark]' (and Java 17+)"
        ) from exc
    return pyspark.sql


def spark_session(master: str | None = None, *, app_name: str = "flowpipe") -> Any:
    """A SparkSession for flowpipe's questions (UTC, ANSI off, UI off); local mode unless `master` says else.

    An existing session of this process is reused (Spark allows one per JVM), with these settings applied.
    """
    sql = _pyspark()
    master = master or DEFAULT_MASTER
    builder = sql.SparkSession.builder.master(master).appName(app_name)
    settings = {**SESSION_CONF, **(LOCAL_CONF if master.startswith("local") else {})}
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # pyspark raises plain exceptions when the JVM cannot start
        raise QueryError(
            f"cannot start Spark (master {master}): {str(exc).strip().splitlines()[0] if str(exc) else exc}; "
            "Spark needs Java 17 or later (JAVA_HOME or java on PATH)"
        ) from exc
    for key in (
        "spark.sql.session.timeZone",
        "spark.sql.ansi.enabled",
        "spark.sql.legacy.parquet.nanosAsLong",
        "spark.sql.constraintPropagation.enabled",
    ):
        session.conf.set(key, SESSION_CONF[key])
    session.sparkContext.setLogLevel("ERROR")
    return session


@lru_cache(maxsize=256)
def to_spark_sql(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` (DuckDB, with `$name` parameters) as Spark SQL with `:name` markers, and the parameter names.

    Raises `QueryError` when sqlglot cannot translate a construct (the question must use a portable form).
    """
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
        for cte in tree.find_all(
            exp.CTE
        ):  # `[NOT] MATERIALIZED` is DuckDB's planning hint; Spark has no such
            cte.set("materialized", None)
        names = tuple(sorted({str(node.this) for node in tree.find_all(exp.Placeholder) if node.this}))
        text = tree.sql(dialect="spark", unsupported_level=sqlglot.ErrorLevel.RAISE)
    except sqlglot.errors.SqlglotError as exc:
        raise QueryError(f"cannot translate the SQL for Spark: {exc}", sql=sql) from exc
    return text, names


CTE_VIEW_PREFIX = "_flowpipe_cte_"


@lru_cache(maxsize=256)
def to_spark_steps(sql: str) -> tuple[tuple[tuple[str, str, tuple[str, ...]], ...], str, tuple[str, ...]]:
    """`sql` as Spark SQL in steps: each CTE of its top-level `WITH` that is read more than once, as (temporary
    view name, its SELECT, its parameter names), in order; then the statement (parameters too), which reads
    those CTEs from their views.

    Spark copies a CTE into the plan wherever it is read (DuckDB computes it once), so a question whose CTEs
    read each other (the edge definition: each end named, then its labels looked up, both ends joined back) has
    a plan of hundreds of joins that takes minutes to optimize and runs every copy. Computed once each, as
    views, every step stays small. The SQL is the same question; without such CTEs there is one step.
    """
    import sqlglot
    from sqlglot import exp

    text, names = to_spark_sql(sql)
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except sqlglot.errors.SqlglotError as exc:  # pragma: no cover - to_spark_sql raised first
        raise QueryError(f"cannot translate the SQL for Spark: {exc}", sql=sql) from exc
    for cte in tree.find_all(exp.CTE):
        cte.set("materialized", None)
    key = "with_" if "with_" in tree.arg_types else "with"  # the name differs between sqlglot versions
    with_ = tree.args.get(key)
    if with_ is None or with_.recursive:
        return (), text, names
    ctes = {cte.alias_or_name: cte for cte in with_.expressions}

    def reads(node: exp.Expression) -> list[str]:
        return [t.name for t in node.find_all(exp.Table) if not t.db and not t.catalog and t.name in ctes]

    counts: dict[str, int] = dict.fromkeys(ctes, 0)
    for name in reads(tree):
        counts[name] += 1

    def computes(node: exp.Expression) -> bool:  # more than a projection of what it reads, cheap to copy
        return any(node.find(kind) for kind in (exp.Join, exp.Group, exp.AggFunc, exp.Window, exp.Distinct))

    shared = [name for name, cte in ctes.items() if counts[name] > 1 and computes(cte.this)]
    if not shared:
        return (), text, names

    def renamed(node: exp.Expression) -> exp.Expression:
        def rename(table: exp.Expression) -> exp.Expression:
            if isinstance(table, exp.Table) and not table.db and table.name in shared:
                alias = table.alias or table.name
                return exp.to_table(CTE_VIEW_PREFIX + table.name).as_(alias)
            return table

        return node.copy().transform(rename)

    def needed(node: exp.Expression) -> list[exp.Expression]:
        """The CTEs not made views that `node` reads, with those they read, in their order."""
        wanted: set[str] = set()
        todo = [n for n in reads(node) if n not in shared]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(n for n in reads(ctes[name].this) if n not in shared)
        return [renamed(cte) for name, cte in ctes.items() if name in wanted]

    def spark(node: exp.Expression) -> tuple[str, tuple[str, ...]]:
        found = tuple(sorted({str(p.this) for p in node.find_all(exp.Placeholder) if p.this}))
        try:
            return node.sql(dialect="spark", unsupported_level=sqlglot.ErrorLevel.RAISE), found
        except sqlglot.errors.SqlglotError as exc:  # pragma: no cover - to_spark_sql raised first
            raise QueryError(f"cannot translate the SQL for Spark: {exc}", sql=sql) from exc

    steps = []
    for name in shared:
        body = renamed(ctes[name].this)
        prior = needed(ctes[name].this)
        if prior:
            body.set(key, exp.With(expressions=prior))
        steps.append((CTE_VIEW_PREFIX + name, *spark(body)))
    statement = tree.copy()
    statement.set(key, None)
    rest = needed(statement)
    final = renamed(statement)
    final.set(key, exp.With(expressions=rest) if rest else None)
    return tuple(steps), *spark(final)


def _spark_type(arrow_type: pa.DataType) -> str:
    """The Spark SQL type of a flow-table column as Spark reads it from Parquet (timestamps: integers)."""
    if pa.types.is_timestamp(arrow_type) or pa.types.is_int64(arrow_type):
        return "BIGINT"
    if pa.types.is_int32(arrow_type):
        return "INT"
    if pa.types.is_uint64(arrow_type):  # Spark has no unsigned types; it reads Parquet's UINT_64 so
        return "DECIMAL(20,0)"
    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN"
    if pa.types.is_string(arrow_type):
        return "STRING"
    if pa.types.is_list(arrow_type) and pa.types.is_string(arrow_type.value_type):
        return "ARRAY<STRING>"
    raise ConfigError(f"no Spark type for Arrow type {arrow_type}")


def read_schema_ddl(schema: pa.Schema) -> str:
    """The Spark read schema (DDL) of a table's part files."""
    return ", ".join(f"`{f.name}` {_spark_type(f.type)}" for f in schema)


def _column(field: pa.Field) -> str:
    if pa.types.is_timestamp(field.type):  # nanoseconds since the epoch → a Spark timestamp (microseconds)
        return f"timestamp_micros(`{field.name}` div 1000) AS `{field.name}`"
    return f"`{field.name}`"


class SparkEngine:
    """A Spark session with the views `flows`, `lost_events`, `drop_reasons` and the shared views over a dataset.

    >>> with SparkEngine("flowpipe-data") as engine:            # doctest: +SKIP
    ...     engine.run("SELECT verdict, count(*) AS n FROM flows GROUP BY verdict").to_pylist()

    `session` (or the session this process already runs) is used and left running on `close()`; otherwise a
    session is started for `master` and stopped on `close()`. `cache_views` keeps each shared view in Spark's
    cache once computed (until `refresh()`), for a session that asks many questions of one snapshot: Spark
    otherwise recomputes the views (the edge definition among them) for every question.
    """

    def __init__(
        self,
        dataset: str | os.PathLike[str] | Dataset | None,
        *,
        master: str | None = None,
        session: Any | None = None,
        cache_views: bool = False,
    ) -> None:
        _pyspark()
        self.cache_views = cache_views
        self._cached: list[str] = []
        if dataset is None or isinstance(dataset, Dataset):
            self.dataset = dataset
        else:
            self.dataset = Dataset(dataset)
        self.files: dict[str, tuple[str, ...]] = {}
        if session is None:  # a session this process already runs is shared (one per JVM), not stopped
            session = _pyspark().SparkSession.getActiveSession()
            if session is not None and master is not None and session.sparkContext.master != master:
                raise ConfigError(
                    f"this process already runs Spark on {session.sparkContext.master}, not {master}"
                )
        self._owns_session = session is None
        self.spark = session if session is not None else spark_session(master)
        # a session started elsewhere too: without it the edge definition's plan fails to optimize on Spark 4
        self.spark.conf.set("spark.sql.constraintPropagation.enabled", "false")
        if self.dataset is not None and not self.dataset.is_local:
            self._configure_s3a()
        self.refresh()

    @property
    def location(self) -> str:
        """The dataset as the user named it (for messages)."""
        return self.dataset.uri if self.dataset is not None else "(no dataset)"

    @property
    def has_flows(self) -> bool:
        """True when the dataset has at least one flow part file."""
        return bool(self.files.get("flows"))

    def refresh(self) -> None:
        """List the part files again and redefine every view over them."""
        self._uncache()
        for view, table, schema in _VIEWS:
            files = tuple(visible_part_files(self.dataset, table)) if self.dataset is not None else ()
            self.files[view] = files
            self._define_view(view, schema, files)
        self._define_shared_views()

    def _define_view(self, view: str, schema: pa.Schema, files: tuple[str, ...]) -> None:
        raw = f"_flowpipe_{view}_raw"
        ddl = read_schema_ddl(schema)
        with _translate_errors(f"-- define view {view}"):
            if files:
                frame = self.spark.read.schema(ddl).parquet(*[self._uri(path) for path in files])
            else:
                frame = self.spark.createDataFrame([], ddl)
            frame.createOrReplaceTempView(raw)
            columns = ",\n    ".join(_column(field) for field in schema)
            self.spark.sql(f"CREATE OR REPLACE TEMP VIEW `{view}` AS SELECT\n    {columns}\nFROM `{raw}`")

    def _define_shared_views(self) -> None:
        with _translate_errors(f"-- create {DROP_REASONS_TABLE}"):
            reasons = drop_reason_table()
            # Spark 4 takes an Arrow table as it is; Spark 3.5 a pandas DataFrame
            frame = reasons if int(self.spark.version.split(".")[0]) >= 4 else reasons.to_pandas()
            self.spark.createDataFrame(frame).createOrReplaceTempView(DROP_REASONS_TABLE)
        named, _ = to_spark_sql(flows_named_sql(fallbacks=True))
        with _translate_errors(named, question=f"view {NAMED_VIEW}"):
            self.spark.sql(f"CREATE OR REPLACE TEMP VIEW `{NAMED_VIEW}` AS\n{named}")
        for view in load_views():
            text, names = to_spark_sql(view.sql)
            if names:
                raise QueryError(f"shared view {view.name} has parameters, which views cannot take")
            with _translate_errors(text, question=f"shared view {view.name}"):
                self.spark.sql(f"CREATE OR REPLACE TEMP VIEW `{view.name}` AS\n{text}")
                if self.cache_views:  # computed at first use, then read from the cache
                    self.spark.sql(f"CACHE LAZY TABLE `{view.name}`")
                    self._cached.append(view.name)

    def _uncache(self) -> None:
        while self._cached:
            self.spark.sql(f"UNCACHE TABLE IF EXISTS `{self._cached.pop()}`")

    def _uri(self, path: str) -> str:
        assert self.dataset is not None
        if self.dataset.is_local:
            return f"file://{path}"
        return f"s3a://{path}"

    def _configure_s3a(self) -> None:
        """Point Hadoop's S3A connector at the endpoint, region and credentials flowpipe uses for S3."""
        options = s3_options()
        conf = self.spark.sparkContext._jsc.hadoopConfiguration()
        if options.endpoint:
            conf.set("fs.s3a.endpoint", options.endpoint)
            conf.set("fs.s3a.path.style.access", "true")
            conf.set("fs.s3a.connection.ssl.enabled", str(options.endpoint.startswith("https")).lower())
        if options.region:
            conf.set("fs.s3a.endpoint.region", options.region)
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            conf.set("fs.s3a.access.key", os.environ["AWS_ACCESS_KEY_ID"])
            conf.set("fs.s3a.secret.key", os.environ["AWS_SECRET_ACCESS_KEY"])

    # -- running SQL ----------------------------------------------------------------------------------------

    def run(
        self, sql: str, params: Mapping[str, object] | None = None, *, question: str | None = None
    ) -> pa.Table:
        """Translate `sql` for Spark, bind `params` as named parameters, run it; the result as Arrow.

        A part file removed since the views were defined (compaction, retention) makes the engine list the
        files again and retry once. Errors become `QueryError`.
        """
        steps, text, names = to_spark_steps(sql)
        given = dict(params or {})
        missing = [name for name in names if name not in given]
        if missing:
            raise QueryError(f"no value for parameter(s) {', '.join(missing)}", question=question, sql=sql)
        try:
            with _translate_errors(text, question=question):
                return self._run(steps, text, names, given)
        except QueryError as exc:
            if self.dataset is None or not _is_missing_file(exc.__cause__) or self._all_there():
                raise
        self.refresh()
        with _translate_errors(text, question=question):
            return self._run(steps, text, names, given)

    def _run(
        self,
        steps: tuple[tuple[str, str, tuple[str, ...]], ...],
        text: str,
        names: tuple[str, ...],
        given: dict[str, object],
    ) -> pa.Table:
        # aware datetimes (times are bound in UTC) are taken by pyspark as the instant they are
        made = []
        try:
            for view, step, step_names in steps:
                # Each CTE read more than once, computed once: the view reads its rows, not its plan (a cached
                # DataFrame would keep the plan, which Spark matches against every later plan).
                frame = self.spark.sql(step, args={name: given[name] for name in step_names} or None)
                frame = frame.localCheckpoint(eager=True)
                frame.createOrReplaceTempView(view)
                made.append((view, frame))
            frame = self.spark.sql(text, args={name: given[name] for name in names} or None)
            to_arrow = getattr(frame, "toArrow", None)
            if to_arrow is not None:  # Spark 4
                table: pa.Table = to_arrow()
                return table
            pandas = frame.toPandas()
            return pa.Table.from_pandas(pandas, preserve_index=False)
        finally:
            for view, frame in made:
                self.spark.catalog.dropTempView(view)
                frame.unpersist()

    def _all_there(self) -> bool:
        assert self.dataset is not None
        return all(self.dataset.exists(path) for files in self.files.values() for path in files)

    def close(self) -> None:
        """Drop the views; stop the session if this engine started it."""
        self._uncache()
        if self._owns_session:
            self.spark.stop()
            return
        for name in (
            [view for view, _, _ in _VIEWS]
            + [DROP_REASONS_TABLE, NAMED_VIEW]
            + [v.name for v in load_views()]
        ):
            self.spark.catalog.dropTempView(name)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def _translate_errors(sql: str, question: str | None = None) -> Iterator[None]:
    """Turn pyspark and Py4J errors into `QueryError` with the SQL."""
    try:
        yield
    except FlowpipeError:
        raise
    except Exception as exc:
        if not _is_spark_error(exc):
            raise
        what = f"question {question}" if question else "SQL"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(f"{what} failed on Spark: {detail}", question=question, sql=sql) from exc


def _is_spark_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("pyspark", "py4j"))


def _is_missing_file(exc: BaseException | None) -> bool:
    text = str(exc or "")
    return "FileNotFoundException" in text or "FILE_NOT_EXIST" in text or "does not exist" in text


def open_spark_engine(
    dataset: str | os.PathLike[str] | Dataset, *, master: str | None = None, require_flows: bool = True
) -> SparkEngine:
    """A `SparkEngine` over `dataset`; with `require_flows`, `EmptyDatasetError` when it has no flows yet."""
    engine = SparkEngine(dataset, master=master)
    if require_flows and not engine.has_flows:
        engine.close()
        raise EmptyDatasetError(
            f"dataset {engine.location} holds no flows yet: ingest or collect first (`flowpipe ingest FILE`), "
            "or point --dataset / FLOWPIPE_DATASET at another dataset"
        )
    return engine

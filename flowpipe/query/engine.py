"""DuckDB over the dataset: the views `flows` and `lost_events`, bound parameters, duckdb errors translated.

The `Engine` protocol is what questions run on: SQL text and parameters in, an Arrow table out. `DuckDBEngine`
implements it over the Parquet dataset; another engine (Spark, with the same SQL files transpiled by sqlglot)
can implement it later without touching the catalog or the CLI.

How the views are built:

- The part files are listed through `flowpipe.dataset.layout.Dataset`, which skips temporary and private files
  (names starting with `.` or `_`, or ending in `.tmp`) and works on any pyarrow filesystem; files that a
  compacted file already holds are left out (`flowpipe.dataset.visible.visible_part_files`), so a query running
  during a compaction sees every row once. Only files in the
  `date=.../hour=.../` layout are read; anything else under `flows/` is logged and left out.
- On a local folder the files go to DuckDB's own Parquet reader (`read_parquet([...], hive_partitioning=true,
  union_by_name=true)`), the fastest path. On any other pyarrow filesystem (an object store) they become a
  `pyarrow.dataset` with Hive partitioning, registered in DuckDB; DuckDB scans it with projection and filter
  pushdown. No DuckDB extension has to be downloaded either way.
- The view `flows` has exactly the columns of `FLOW_SCHEMA`, in order and with the same types whether or not
  there are files: every column is cast to the type DuckDB gives the Arrow schema, and a column missing from
  older part files reads as NULL. The Hive partition columns `date` and `hour` are read (so the layout is
  checked) but not exposed: `SELECT * FROM flows` is the flow table and nothing else, the same as on Spark.
  The time filter of a question still skips whole row groups through Parquet statistics on `time`.
- `lost_events` is built the same way from `<root>/lost_events/` with `LOST_EVENTS_SCHEMA`.

An empty or missing dataset: the views always exist (empty, with the right columns), so any SQL binds and a
library caller that wants "no rows" gets no rows. `open_engine(..., require_flows=True)`, which the CLI uses
for `query` and `sql`, raises `EmptyDatasetError` instead, naming the dataset: an empty answer from a dataset
that does not exist is almost always a wrong `--dataset`, and silence would hide it.

The file list is taken when the engine is created (and again on `refresh()`); part files written later are
not seen until then.

What SQL may touch: the engine is for reading the dataset. Once the views are defined, DuckDB's external
access is turned off (`enable_external_access = false`) and the configuration locked, with the listed part
files as the only allowed paths. A statement can read the views and the dataset's part files, nothing else:
no other file (`read_csv('/etc/passwd')`), no writing (`COPY ... TO`, `EXPORT DATABASE`), no other
database (`ATTACH`), no extension download (`INSTALL`), no network, and no `SET` that would lift it; `COPY`,
`EXPORT`, `ATTACH`, `DETACH` and `INSTALL`/`LOAD` are refused before they run (a COPY could otherwise
overwrite one of the allowed part files). Part files on an object store are read by pyarrow (a registered
Arrow dataset), never by DuckDB. `refresh()` opens a new connection (the allowed paths of a locked one cannot
grow). `external_access=True` (the `--allow-external-access` option of `flowpipe sql`) leaves DuckDB's
defaults as they are.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from flowpipe._resources import apply_duckdb_limits
from flowpipe.dataset.layout import FLOWS_TABLE, LOST_EVENTS_TABLE, Dataset
from flowpipe.dataset.rollups import CUTS_VARIABLE
from flowpipe.dataset.visible import visible_part_files
from flowpipe.errors import EmptyDatasetError, FlowpipeError, QueryError
from flowpipe.model import FLOW_SCHEMA, LOST_EVENTS_SCHEMA
from flowpipe.query.views import ReadableFiles, hold_identity_workloads, install_views

log = logging.getLogger(__name__)

FLOWS_VIEW = "flows"
LOST_EVENTS_VIEW = "lost_events"
PARTITION_COLUMNS = ("date", "hour")
MAX_ATTEMPTS = 5
"""Tries of a query (or of defining the views) while part files vanish under it: each compaction group or
retention partition removed between a listing and the read costs one."""
_PARTITION_PATH = re.compile(r"(^|/)date=[^/]+/hour=[^/]+/[^/]+$")
_VIEWS: tuple[tuple[str, str, pa.Schema], ...] = (
    (FLOWS_VIEW, FLOWS_TABLE, FLOW_SCHEMA),
    (LOST_EVENTS_VIEW, LOST_EVENTS_TABLE, LOST_EVENTS_SCHEMA),
)


T = TypeVar("T")

Setup = Callable[[duckdb.DuckDBPyConnection], object]
"""Adds views or tables to a fresh connection (after `flows` and `lost_events` are defined). A setup whose views
read more of the dataset's local files with DuckDB's reader returns them as `ReadableFiles`."""


class Engine(Protocol):
    """Runs SQL over the dataset's views and returns the result as an Arrow table.

    `params` are bound by the engine, never formatted into the SQL. `question` names the question for error
    messages. Implementations raise `QueryError` (never their own exceptions).
    """

    def run(
        self, sql: str, params: Mapping[str, object] | None = None, *, question: str | None = None
    ) -> pa.Table:
        """Run one statement with bound parameters; the result as an Arrow table."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


@contextmanager
def translate_duckdb_errors(sql: str, question: str | None = None) -> Iterator[None]:
    """Turn `duckdb.Error` (and Arrow errors from a registered dataset) into `QueryError` with the SQL."""
    try:
        yield
    except (duckdb.Error, pa.ArrowException) as exc:
        what = f"question {question}" if question else "SQL"
        detail = str(exc).strip() or type(exc).__name__
        raise QueryError(f"{what} failed: {detail}", question=question, sql=sql) from exc


class DuckDBEngine:
    """An in-memory DuckDB connection with the views `flows` and `lost_events` over one dataset.

    >>> with DuckDBEngine("flowpipe-data") as engine:          # doctest: +SKIP
    ...     engine.run("SELECT verdict, count(*) AS n FROM flows GROUP BY verdict").to_pylist()
    [{'verdict': 'FORWARDED', 'n': 761}, ...]

    `dataset` is a local folder, an object-store URL (`s3://bucket/prefix`), a `Dataset`, or None for no
    dataset (both views empty, e.g. to describe the schema). `filesystem` overrides the filesystem of a path.
    `setup` is called with the connection once `flows` and `lost_events` exist (and again after `refresh()`),
    to add shared views or tables that questions read; it raises `QueryError` on failure. `tables` gives a view
    its rows from an Arrow table instead of part files (`{"flows": table}`: questions over rows in memory).
    """

    def __init__(
        self,
        dataset: str | os.PathLike[str] | Dataset | None,
        *,
        filesystem: pafs.FileSystem | None = None,
        setup: Setup | None = None,
        external_access: bool = False,
        tables: Mapping[str, pa.Table] | None = None,
    ) -> None:
        self._tables = dict(tables or {})
        if dataset is None or isinstance(dataset, Dataset):
            self.dataset = dataset
        else:
            self.dataset = Dataset(dataset, filesystem=filesystem)
        self.files: dict[str, tuple[str, ...]] = {}
        self._setup = setup
        self._setup_files: list[str] = []
        self.external_access = external_access
        self._con = _connect()
        try:
            self._sql_types = {view: self._duckdb_types(view, schema) for view, _, schema in _VIEWS}
            self._retrying(self._define_views, relist=False)
            self._lock()
        except BaseException:
            self._con.close()
            raise

    # -- the views ------------------------------------------------------------------------------------------

    @property
    def flow_files(self) -> tuple[str, ...]:
        """The part files behind the `flows` view."""
        return self.files.get(FLOWS_VIEW, ())

    @property
    def has_flows(self) -> bool:
        """True when the dataset has at least one flow part file."""
        return bool(self.flow_files)

    @property
    def location(self) -> str:
        """The dataset as the user named it (for messages)."""
        return self.dataset.uri if self.dataset is not None else "(no dataset)"

    def refresh(self) -> None:
        """List the part files again and redefine the views over them.

        Defining the views reads the flows once (the probe of `install_views`); a part file that vanishes
        meanwhile (compaction or retention removed it after it was listed) makes it list again, up to
        `MAX_ATTEMPTS` times. Unless external access is allowed, the views go on a new connection, locked
        once they are defined (a locked connection cannot allow the new part files).
        """
        if self.external_access:
            self._retrying(self._define_views, relist=False)
            return
        old = self._con
        self._con = _connect()
        try:
            for view, _, schema in _VIEWS:
                self._duckdb_types(view, schema)
            self._retrying(self._define_views, relist=False)
            self._lock()
        except BaseException:
            self._con.close()
            self._con = old
            raise
        old.close()

    def _lock(self) -> None:
        """External access off and the configuration locked; the listed part files stay readable."""
        if self.external_access:
            return
        listed = {path for files in self.files.values() for path in files}
        allowed = sorted(listed | set(self._setup_files)) if self._local else []
        self._con.execute("SET allowed_paths = $paths", {"paths": allowed})
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    @property
    def _local(self) -> bool:
        return self.dataset is not None and self.dataset.is_local

    def _define_views(self) -> None:
        self._define_table_views()
        # The shared views every question may read (sql/_views/: workload identity) and `drop_reasons`.
        fallbacks = install_views(self._con)
        if self._setup is not None:
            readable = self._setup(self._con)
            self._setup_files = list(readable) if isinstance(readable, ReadableFiles) else []
        # Joined on every flow (fallback regions) or every rollup row (edges read from rollups): held as a
        # table, so that DuckDB builds those joins over the identities, not over the flows.
        if fallbacks or self._setup_files:
            hold_identity_workloads(self._con)

    def _define_table_views(self) -> None:
        """The views `flows` and `lost_events` over freshly listed part files."""
        for view, table, schema in _VIEWS:
            files = self._list_files(table)
            self.files[view] = files
            with translate_duckdb_errors(f"-- define view {view}"):
                self._define_view(view, schema, files)

    def _retrying(self, call: Callable[[], T], *, relist: bool = True) -> T:
        """`call()`, again over a fresh file list while it fails because listed part files are gone."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return call()
            except (duckdb.Error, pa.ArrowException, QueryError) as exc:
                if attempt == MAX_ATTEMPTS or not _maybe_vanished(exc) or not self._files_vanished():
                    raise
                log.info("part files vanished while reading (compaction or retention); listing again")
                if relist:
                    self.refresh()
        raise AssertionError("unreachable")

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection, for setup code that adds views or tables (queries go through `run`)."""
        return self._con

    def _list_files(self, table: str) -> tuple[str, ...]:
        if self.dataset is None:
            return ()
        try:
            # without the inputs of a compaction that are still there (they are in a compacted file)
            paths = visible_part_files(self.dataset, table)
        except FlowpipeError as exc:
            raise QueryError(f"cannot list the dataset {self.location}: {exc}") from exc
        kept = []
        for path in paths:
            if _PARTITION_PATH.search(path[len(self.dataset.table_dir(table)) :].lstrip("/")):
                kept.append(path)
            else:
                log.warning("ignoring %s: not in the date=YYYY-MM-DD/hour=HH/ layout", path)
        return tuple(kept)

    def _duckdb_types(self, view: str, schema: pa.Schema) -> dict[str, str]:
        """The DuckDB type of each column of `schema` (what DuckDB makes of the Arrow type)."""
        empty = f"_flowpipe_{view}_empty"
        self._con.register(empty, schema.empty_table())
        rows = self._con.execute(f'DESCRIBE "{empty}"').fetchall()
        return {str(name): str(sql_type) for name, sql_type, *_ in rows}

    def _define_view(self, view: str, schema: pa.Schema, files: tuple[str, ...]) -> None:
        types = self._sql_types[view]
        if view in self._tables:
            source = f"_flowpipe_{view}_table"
            self._con.register(source, self._tables[view])
            present = set(self._tables[view].column_names)
        elif not files:
            source, present = f"_flowpipe_{view}_empty", set(schema.names)
        else:
            source = f"_flowpipe_{view}_files"
            present = set(self._register_files(source, view, schema, files))
        columns = ",\n    ".join(
            f'CAST("{name}" AS {types[name]}) AS "{name}"'
            if name in present
            else f'CAST(NULL AS {types[name]}) AS "{name}"'
            for name in schema.names
        )
        self._con.execute(f'CREATE OR REPLACE VIEW "{view}" AS SELECT\n    {columns}\nFROM "{source}"')

    def _register_files(self, name: str, view: str, schema: pa.Schema, files: tuple[str, ...]) -> list[str]:
        """Make the part files queryable as `name`; returns the column names they provide."""
        assert self.dataset is not None
        if self.dataset.is_local:
            relation = self._con.read_parquet(list(files), hive_partitioning=True, union_by_name=True)
            relation.create_view(name, replace=True)
            return list(relation.columns)
        # Any other pyarrow filesystem: a pyarrow dataset, which DuckDB scans with pushdown.
        partitioning = pads.partitioning(
            pa.schema([pa.field(column, pa.string()) for column in PARTITION_COLUMNS]), flavor="hive"
        )
        table_dir = self.dataset.table_dir(FLOWS_TABLE if view == FLOWS_VIEW else LOST_EVENTS_TABLE)
        dataset = pads.dataset(
            list(files),
            schema=_with_partition_columns(schema),
            format="parquet",
            filesystem=self.dataset.filesystem,
            partitioning=partitioning,
            partition_base_dir=table_dir,
        )
        self._con.register(name, dataset)
        return list(dataset.schema.names)

    # -- running SQL ----------------------------------------------------------------------------------------

    def run(
        self, sql: str, params: Mapping[str, object] | None = None, *, question: str | None = None
    ) -> pa.Table:
        """Run one SQL statement with `params` bound by DuckDB; the result as an Arrow table.

        A statement other than a query runs once and gives what DuckDB reports for it (possibly an empty
        table). Errors become `QueryError`. A part file that vanished since the file list was taken
        (compaction or retention ran meanwhile) makes the engine list the files again and retry, up to
        `MAX_ATTEMPTS` times in all. The error differs by where the files are: DuckDB's own reader (a local
        folder) raises `IOException`, a registered pyarrow dataset (an object store) `InvalidInputException`
        wrapping Arrow's "Path does not exist"; either is retried when, and only when, a listed file is gone.
        """
        with translate_duckdb_errors(sql, question):
            if not self.external_access:
                _refuse_writes(sql, question)
            return self._retrying(lambda: self._run(sql, params))

    def _run(self, sql: str, params: Mapping[str, object] | None) -> pa.Table:
        # the window's times, for the edge views: an hour of folded rollups is read only when no time of the
        # window falls inside it (flowpipe.dataset.rollups.read)
        cuts = sorted(v for v in (params or {}).values() if isinstance(v, datetime))
        self._con.execute(f"SET VARIABLE {CUTS_VARIABLE} = CAST(? AS TIMESTAMPTZ[])", [cuts])
        relation = self._con.sql(sql, params=dict(params) if params else None)
        if relation is None:
            return pa.table({})
        return _to_arrow(relation)

    def _files_vanished(self) -> bool:
        """True when a part file behind the views is no longer listed (one listing per table)."""
        if self.dataset is None:
            return False
        for view, table, _ in _VIEWS:
            listed = self.files.get(view, ())
            if listed and not set(listed) <= set(self.dataset.list_part_files(table)):
                return True
        return False

    def close(self) -> None:
        """Close the DuckDB connection."""
        self._con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_engine(
    dataset: str | os.PathLike[str] | Dataset,
    *,
    require_flows: bool = True,
    filesystem: pafs.FileSystem | None = None,
    setup: Setup | None = None,
    external_access: bool = False,
    source: str = "flows",
) -> DuckDBEngine:
    """A `DuckDBEngine` over `dataset`; with `require_flows`, `EmptyDatasetError` when it has no flows yet.

    `external_access` lets SQL reach files and the network beyond the dataset (see the module's docstring).
    `source` is where the edge views read (`flowpipe.dataset.rollups.read`): `flows`, or edge rollups where they cover
    an hour (`auto`) or only (`edges`); a dataset with rollups but no flows left is then not empty.
    """
    if source != "flows":
        from flowpipe.dataset.rollups.read import with_rollups

        if not isinstance(dataset, Dataset):
            dataset = Dataset(dataset, filesystem=filesystem)
        setup, covered = with_rollups(dataset, source, setup)
    else:
        covered = None
    engine = DuckDBEngine(dataset, filesystem=filesystem, setup=setup, external_access=external_access)
    if require_flows and not engine.has_flows and not (covered is not None and covered()):
        engine.close()
        assert engine.dataset is not None
        where = engine.dataset.table_dir(FLOWS_TABLE)
        root = engine.dataset.root
        missing = engine.dataset.is_local and not os.path.isdir(root)
        if missing and os.path.exists(root):
            state = "is a file, not a dataset folder"
        elif missing:
            state = "does not exist"
        else:
            state = f"holds no flows yet (no part files under {where})"
        raise EmptyDatasetError(
            f"dataset {engine.location} {state}: ingest or collect first (`flowpipe ingest FILE`), "
            "or point --dataset / FLOWPIPE_DATASET at another dataset"
        )
    return engine


def table_columns(view: str) -> list[tuple[str, str, str]]:
    """Each column of the view `flows` or `lost_events`: (name, DuckDB type, Arrow type), in table order."""
    schema = {name: s for name, _, s in _VIEWS}.get(view)
    if schema is None:
        raise QueryError(f"unknown table {view!r} (one of {', '.join(name for name, _, _ in _VIEWS)})")
    with DuckDBEngine(None) as engine:
        types = engine._sql_types[view]
    return [(field.name, types[field.name], str(field.type)) for field in schema]


_WRITING_STATEMENTS = frozenset(
    getattr(duckdb.StatementType, name)
    for name in ("COPY", "EXPORT", "ATTACH", "DETACH", "LOAD", "COPY_DATABASE", "EXTENSION")
    if hasattr(duckdb.StatementType, name)
)
"""Statements that write files or reach beyond the dataset: refused before they run (the lock refuses the others
too, except a COPY onto one of the dataset's own part files, which are allowed paths)."""


def _refuse_writes(sql: str, question: str | None) -> None:
    """QueryError when `sql` holds a statement that writes files, attaches a database or loads an extension."""
    refused = [s.type.name for s in duckdb.extract_statements(sql) if s.type in _WRITING_STATEMENTS]
    if refused:
        what = f"question {question}" if question else "SQL"
        raise QueryError(
            f"{what} refused: {', '.join(refused)} statements may not run here (SQL reads the dataset and nothing "
            "else; `flowpipe sql --allow-external-access` lifts that)",
            question=question,
            sql=sql,
        )


def _connect() -> duckdb.DuckDBPyConnection:
    """A new in-memory connection: no progress bar, UTC."""
    # No progress bar: it would write into stdout, which carries --format json/csv results.
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    # Each Parquet footer read once per engine, not once per view that binds the file: a month of rollups is
    # some 1,500 files, bound by every view over them. Files are published whole by rename, never rewritten in
    # place, and a file replaced under the same name is read afresh (DuckDB checks the cached footer).
    con.execute("SET parquet_metadata_cache = true")
    apply_duckdb_limits(con)  # the container's memory and CPU limits, not the host's
    try:
        # Results and comparisons in UTC whatever the machine's zone (the dataset is UTC).
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # a DuckDB build without ICU has no time zones and is UTC anyway
        pass
    return con


def _maybe_vanished(exc: BaseException | None) -> bool:
    """True for the errors a part file removed under a running query raises (checked against a listing)."""
    while exc is not None:
        # a locked connection reports a listed file that is gone as a PermissionException (it globs for it)
        vanished = duckdb.IOException | duckdb.InvalidInputException | duckdb.PermissionException
        if isinstance(exc, vanished | FileNotFoundError):
            return True
        if isinstance(exc, pa.ArrowException) and "does not exist" in str(exc):
            return True
        exc = exc.__cause__
    return False


def _with_partition_columns(schema: pa.Schema) -> pa.Schema:
    for column in PARTITION_COLUMNS:
        schema = schema.append(pa.field(column, pa.string()))
    return schema


def _to_arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    # DuckDB 1.4+ names it to_arrow_table; earlier versions only have arrow().
    convert = getattr(relation, "to_arrow_table", None) or relation.arrow
    table = convert()
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    return table

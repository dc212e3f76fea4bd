"""Write edge rollups: one rollup per flow part file, named after it, built from that file alone.

`build_rollup` reads one flow part file into DuckDB, defines the shared views over it exactly as a query does
(the same SQL: `sql/_views/`), and writes two small Parquet files under the flow file's own name:

- `edges/date=D/hour=H/NAME`: the rows of `edge_observations` (each observer's records of each request),
  with every pod known only by its identity left unnamed (`identity_workloads` is empty while they are
  computed): which workload that identity is may be written in another part file, so it is looked up when
  the rollups are read, over all of them;
- `edge_identities/date=D/hour=H/NAME`: the rows of `edge_identities` of this file (the workload and the
  labels of each pod identity).

The identities are published first and the edges last, so a rollup whose `edges` file exists is complete.
Building is idempotent (the same flow file gives the same rollup, replaced whole), so every repair is "build
what is missing": `build_missing` after a crash between a flow file and its rollup, `prune_orphans` for the
rollups of flow files that a compaction replaced. A flow file is counted once either way: readers take the
rollup of each flow file present, never the rollups of files that are gone while flows of that hour remain.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Self

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from flowpipe._resources import apply_duckdb_limits
from flowpipe.dataset.layout import FLOWS_TABLE, Dataset, PartitionKey, kill_point, translate_write_errors
from flowpipe.dataset.maintenance import PartitionFiles, list_partitions
from flowpipe.dataset.rollups import EDGE_IDENTITIES_TABLE, EDGES_TABLE, ROLLUP_TABLES
from flowpipe.errors import DatasetWriteError, FlowpipeError, QueryError
from flowpipe.model import FLOW_SCHEMA
from flowpipe.query.views import (
    FALLBACK_NEEDED_SQL,
    IDENTITY_WORKLOADS_VIEW,
    install_views,
    load_views,
    unname_identities,
)

log = logging.getLogger(__name__)

OBSERVATIONS_VIEW = "edge_observations"
IDENTITIES_VIEW = "edge_identities"


@dataclass(slots=True)
class RollupReport:
    """What a build, repair or rebuild did: rollups written, orphans removed, flows and bytes summarised."""

    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    flows: int = 0
    flow_bytes: int = 0
    rollup_bytes: int = 0
    seconds: float = 0.0


def rollup_path(dataset: Dataset, flow_path: str, table: str = EDGES_TABLE) -> str:
    """The rollup file (of `table`) of one flow part file: the same partition and name under `table`."""
    flows_dir = dataset.table_dir(FLOWS_TABLE)
    if not flow_path.startswith(flows_dir + "/"):
        raise ValueError(f"{flow_path} is not a flow part file of {dataset.uri}")
    return dataset.table_dir(table) + flow_path[len(flows_dir) :]


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection in UTC within the container's limits (as queries use)."""
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    apply_duckdb_limits(con)
    try:
        con.execute("SET TimeZone = 'UTC'")
    except duckdb.Error:  # a build without ICU is UTC anyway
        pass
    return con


FlowSource = pa.Table | pads.Dataset | list[str]
"""Flows to summarise: a table in memory, a Parquet dataset read through Arrow (object stores), or the paths of
local part files, which DuckDB reads itself (a third to half the CPU of the same files read through Arrow,
and less than a table in memory: converting its label lists costs more than decoding them)."""


def flows_view(con: duckdb.DuckDBPyConnection, flows: FlowSource) -> None:
    """Define (or point again) the view `flows` on `con` over `flows` with the columns and types of
    `FLOW_SCHEMA` (NULL for those a file written by an older version lacks)."""
    if isinstance(flows, list):
        source = "_rollup_flow_files"
        con.read_parquet(flows, union_by_name=True, hive_partitioning=False).create_view(source, replace=True)
        present = {str(row[0]) for row in con.execute(f"DESCRIBE {source}").fetchall()}
    else:
        source = "_rollup_flow_table"
        con.register(source, flows)
        present = set(flows.schema.names)
    con.register("_rollup_schema", FLOW_SCHEMA.empty_table())
    types = {str(row[0]): str(row[1]) for row in con.execute("DESCRIBE _rollup_schema").fetchall()}
    columns = ", ".join(
        f'CAST("{name}" AS {types[name]}) AS "{name}"'
        if name in present
        else f'CAST(NULL AS {types[name]}) AS "{name}"'
        for name in FLOW_SCHEMA.names
    )
    con.execute(f"CREATE OR REPLACE VIEW flows AS SELECT {columns} FROM {source}")


class Summariser:
    """Summarises flows into rollup rows (`summarise`) on one DuckDB connection, kept from call to call.

    Creating the shared views binds each of them, some 0.2 CPU-s: as much as summarising a collector's part
    file of 20,000 flows. So they are created once, and each call points the view `flows` at its flows; they
    are created again only when the fallback regions the flows need (`FALLBACK_NEEDED_SQL`) change. Use from
    one thread at a time; `close` when done (a failed call closes the connection: the next opens a new one).
    """

    def __init__(self) -> None:
        self._con: duckdb.DuckDBPyConnection | None = None
        self._fallbacks: bool | None = None
        self._workloads_sql: dict[bool, str] = {}

    def summarise(self, flows: FlowSource) -> tuple[pa.Table, pa.Table]:
        """The rollup of `flows` (see `FlowSource`): (`edge_observations` rows, `edge_identities` rows). Files
        are read column by column as the SQL needs (labels only where it does)."""
        try:
            con = self._con if self._con is not None else self._open()
            flows_view(con, flows)
            fallbacks = bool(con.execute(FALLBACK_NEEDED_SQL).fetchall()[0][0])
            if fallbacks != self._fallbacks:
                self._fallbacks = install_views(con)
            else:  # `identity_workloads` as installed (the previous call emptied it)
                con.execute(
                    f"CREATE OR REPLACE VIEW {IDENTITY_WORKLOADS_VIEW} AS\n{self._installed(fallbacks)}"
                )
            identities = _arrow(con.sql(f"SELECT * FROM {IDENTITIES_VIEW}"))
            unname_identities(con)  # pods known only by identity: named when read, over every rollup
            observations = _arrow(con.sql(f"SELECT * FROM {OBSERVATIONS_VIEW}"))
            if not isinstance(flows, list):
                con.unregister("_rollup_flow_table")  # the flows are not kept alive by the connection
        except (duckdb.Error, pa.ArrowException) as exc:
            self.close()
            raise QueryError(f"cannot summarise flows into edge rollups: {exc}") from exc
        return observations, identities

    def _installed(self, fallbacks: bool) -> str:
        """The SELECT of `identity_workloads` as `install_views` creates it."""
        if not self._workloads_sql:
            view = next(v for v in load_views() if v.name == IDENTITY_WORKLOADS_VIEW)
            self._workloads_sql = {True: view.sql, False: view.sql_without_fallbacks}
        return self._workloads_sql[fallbacks]

    def _open(self) -> duckdb.DuckDBPyConnection:
        con = self._con = connect()
        self._fallbacks = None
        return con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summarise(flows: FlowSource) -> tuple[pa.Table, pa.Table]:
    """The rollup of `flows` on a connection of its own (see `Summariser.summarise`)."""
    with Summariser() as summariser:
        return summariser.summarise(flows)


def _arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    convert = getattr(relation, "to_arrow_table", None) or relation.arrow
    table = convert()
    return table.read_all() if isinstance(table, pa.RecordBatchReader) else table


def build_rollup(
    dataset: Dataset,
    flow_path: str,
    *,
    zstd_level: int = 3,
    report: RollupReport | None = None,
    flows: pa.Table | None = None,
    summariser: Summariser | None = None,
) -> str:
    """Write the rollup of one flow part file (replacing any); returns the path of its `edges` file.
    `summariser` is the caller's (one for many files: its views are created once), else one for this file.

    `flows` are the file's flows when the writer still holds them (a small file: it is then not read back; a
    local file is read back by DuckDB for about the CPU of a table in memory, one on an object store through
    Arrow, with its requests)."""
    source: FlowSource
    if flows is not None:
        source, count = flows, flows.num_rows
    else:
        try:
            if dataset.is_local:
                source, count = [flow_path], pq.read_metadata(flow_path).num_rows
            else:
                source = pads.dataset([flow_path], format="parquet", filesystem=dataset.filesystem)
                count = source.count_rows()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(
                f"cannot read the flow part file {flow_path}: {exc}", path=flow_path
            ) from exc
    try:
        observations, identities = summariser.summarise(source) if summariser else summarise(source)
    except QueryError:
        if isinstance(source, list) and not os.path.exists(flow_path):
            raise FileNotFoundError(flow_path) from None  # removed meanwhile (compaction, retention)
        raise
    options = {"compression": "zstd", "compression_level": zstd_level, "use_dictionary": True}
    final = ""
    for table, rows in ((EDGE_IDENTITIES_TABLE, identities), (EDGES_TABLE, observations)):
        final = rollup_path(dataset, flow_path, table)
        folder, _, name = final.rpartition("/")
        if table == EDGES_TABLE:
            rows, extra = _compact_layout(rows)
            temp = dataset.write_parquet_temp(rows, folder, name, hold=True, **{**options, **extra})
        else:
            temp = dataset.write_parquet_temp(rows, folder, name, hold=True, **options)
        dataset.publish(temp, final)
        if report is not None:
            report.rollup_bytes += _size(dataset, final)
    if report is not None:
        report.written.append(final)
        report.flows += count
        report.flow_bytes += _size(dataset, flow_path)
    return final


SORT_KEYS = (
    "cluster_name",
    "source_workload_id",
    "destination_workload_id",
    "destination_port",
    "source_ip",
    "destination_ip",
    "source_port",
    "l4_protocol",
    "first_seen",
)
"""Rollup rows are stored in this order: the rows of one connection together (its observers' times nearly the
same), connections by edge."""
SEEN_FOR = "seen_for_ns"
"""Stored instead of `last_seen`: the nanoseconds from `first_seen` to it (0 for most rows, which hold one
record); readers add it back (`flowpipe.dataset.rollups.read`)."""
DELTA_COLUMNS = ("first_seen", "records")
PLAIN_COLUMNS = ("source_port", SEEN_FOR)
"""Stored as they are (then zstd): ephemeral ports and durations repeat too little for a dictionary, and jump too
much between rows for deltas."""


def _compact_layout(rows: pa.Table) -> tuple[pa.Table, dict[str, object]]:
    """Rollup rows sorted by connection and time, `last_seen` as `SEEN_FOR`, and the Parquet options that store
    times as deltas (a rollup is 40% smaller than with `last_seen` and deltas of every number)."""
    if "last_seen" in rows.column_names and "first_seen" in rows.column_names:
        seen_for = pc.subtract(rows["last_seen"].cast(pa.int64()), rows["first_seen"].cast(pa.int64()))
        rows = rows.drop_columns(["last_seen"]).append_column(SEEN_FOR, seen_for)
    rows = rows.sort_by([(key, "ascending") for key in SORT_KEYS if key in rows.column_names])
    encodings = {
        **{name: "DELTA_BINARY_PACKED" for name in DELTA_COLUMNS if _numeric(rows, name)},
        **{name: "PLAIN" for name in PLAIN_COLUMNS if _numeric(rows, name)},
    }
    dictionary = [name for name in rows.column_names if name not in encodings]
    return rows, {"use_dictionary": dictionary, "column_encoding": encodings}


def _numeric(rows: pa.Table, name: str) -> bool:
    if name not in rows.column_names:
        return False
    kind = rows.schema.field(name).type
    return pa.types.is_integer(kind) or pa.types.is_timestamp(kind)


def build_after_publish(
    dataset: Dataset,
    published: Iterable[str],
    *,
    zstd_level: int = 3,
) -> list[str]:
    """The rollups of the flow part files `published` (other paths, e.g. lost events, are skipped), each read
    back. A rollup that cannot be written is logged and left missing: the flows are safe, the hour is read from
    raw flows until `build_missing` (the writer's next start, compaction, retention or `flowpipe rollup`)
    writes it.
    """
    flows_dir = dataset.table_dir(FLOWS_TABLE) + "/"
    written = []
    for path in published:
        if not path.startswith(flows_dir):
            continue
        kill_point("rollup:before")
        try:
            written.append(build_rollup(dataset, path, zstd_level=zstd_level))
        except FlowpipeError as exc:
            log.warning(
                "edge rollup of %s not written (its hour is read from flows until it is): %s", path, exc
            )
    return written


class RollupBuilder:
    """Builds the rollups of the flow part files a writer publishes, in a thread of its own at the lowest CPU
    priority (nice 19, Linux), so that the writer goes on at its own rate.

    Building a rollup costs more CPU than writing the flows (the SQL of the edge definition over every flow), so
    a writer that built them itself would keep up with less than half the flows. The builder takes the CPU the
    writer leaves: beside a single-process ingest, the second core; beside a collector busy on both cores,
    little, and it trails (its files wait in a queue, by path; the hour is read from raw flows until its
    rollups exist). The flows of files just published are handed over while few are waiting (up to
    `HELD_ROWS`), else the file is read back. `close` builds what is queued itself, at the writer's priority, up
    to a deadline, then waits for the file being built only; files still waiting then (or lost to a crash) are
    built at the writer's next start (`repair_writers`), by compaction, retention or `flowpipe rollup`: a
    rollup is named after its flow file, so building it twice gives the same file.
    """

    HELD_ROWS = 50_000
    """Flows held in memory for files waiting to be built (small files, built from memory); larger files are
    read back when their turn comes, so a builder that trails holds no flows (a collector's memory stays flat).
    A writer keeps an open part's flows only up to this many (`flowpipe.sinks.parquet`)."""

    def __init__(self, dataset: Dataset, *, zstd_level: int = 3) -> None:
        self.dataset = dataset
        self.zstd_level = zstd_level
        self.built = 0
        self._flows_dir = dataset.table_dir(FLOWS_TABLE) + "/"
        self._queue: queue.Queue[tuple[str, pa.Table | None] | None] = queue.Queue()
        self._held = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._skipped = 0
        self._local = threading.local()
        self._summarisers: list[Summariser] = []

    @property
    def waiting(self) -> int:
        """Files published whose rollup is not built yet."""
        return self._queue.unfinished_tasks

    def submit(self, published: Iterable[str], flows: Mapping[str, Sequence[pa.Table]] | None = None) -> None:
        """Queue the rollups of the flow part files just `published` (other paths are skipped); `flows` holds,
        by path, the flows the writer still has in memory."""
        for path in published:
            if not path.startswith(self._flows_dir):
                continue
            tables = (flows or {}).get(path)
            held = None
            with self._lock:
                rows = sum(t.num_rows for t in tables) if tables else 0
                if tables and self._held + rows <= self.HELD_ROWS:
                    held = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
                    self._held += rows
            self._start()
            self._queue.put((path, held))

    def close(self, timeout: float | None = None) -> int:
        """Build the queued rollups here, at the caller's priority (the writer is done with the CPU), for at
        most `timeout` seconds (None: all of them); then stop the thread once the file it is building is done.
        Returns the files left unbuilt (logged: later runs build them). The thread never outlives this call: a
        process must not exit while it is inside DuckDB."""
        if self._thread is None:
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._take(item)
        self._stopping.set()
        self._queue.put(None)
        self._thread.join()
        with self._lock:
            summarisers, self._summarisers = self._summarisers, []
        for summariser in summarisers:
            summariser.close()
        self._local = threading.local()
        left, self._skipped, self._thread = self._skipped, 0, None
        self._stopping.clear()
        if left:
            log.warning(
                "%d edge rollup(s) not built before stopping: the next start, compaction or `flowpipe rollup` "
                "builds them (their hours are read from flows until then)",
                left,
            )
        return left

    def _summariser(self) -> Summariser:
        """This thread's summariser (the builder's thread, and the one that closes the builder)."""
        found: Summariser | None = getattr(self._local, "summariser", None)
        if found is None:
            found = self._local.summariser = Summariser()
            with self._lock:
                self._summarisers.append(found)
        return found

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowpipe-rollups", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        _lowest_priority()
        while self._take(self._queue.get()):
            pass

    def _take(self, item: tuple[str, pa.Table | None] | None) -> bool:
        """Build one queued rollup (skipped once stopping); False for the end of the queue."""
        try:
            if item is None:
                return False
            path, held = item
            if held is not None:
                with self._lock:
                    self._held -= held.num_rows
            if self._stopping.is_set():
                with self._lock:
                    self._skipped += 1
            else:
                self._build(path, held)
            return True
        finally:
            self._queue.task_done()

    def _build(self, path: str, held: pa.Table | None) -> None:
        kill_point("rollup:before")
        try:
            build_rollup(
                self.dataset, path, zstd_level=self.zstd_level, flows=held, summariser=self._summariser()
            )
            self.built += 1
        except FileNotFoundError:
            log.debug("flow part file %s went before its rollup was built (compacted)", path)
        except FlowpipeError as exc:
            log.warning(
                "edge rollup of %s not written (its hour is read from flows until it is): %s", path, exc
            )
        except Exception:  # the thread must go on: a rollup is never needed for the flows' safety
            log.exception("edge rollup of %s not written (its hour is read from flows until it is)", path)


def _lowest_priority() -> None:
    """Give the calling thread (and the threads it starts, DuckDB's) the lowest CPU priority, where the system
    lets a thread have its own (Linux)."""
    native = getattr(threading, "get_native_id", None)
    if native is None or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, native(), 19)
    except OSError:  # not permitted or not per thread here: the builder runs at the writer's priority
        pass


def repair_writers(dataset: Dataset, writer_ids: Iterable[str]) -> list[str]:
    """At a writer's start: the rollups of flow files that `writer_ids` (itself, writers that died) published
    without their rollup (they stopped between the two writes); returns the rollups written.

    Only those writers' flow files are built (by the writer id in their names): another writer running now
    may be between its own two writes. Errors are logged, as in `build_after_publish`.
    """
    writers = set(writer_ids)
    if not writers:
        return []
    from flowpipe.dataset.layout import parse_part_file_name

    try:
        flows = visible_flow_names(dataset)
        have = {
            (p.key.date, p.key.hour): {f.name for f in p.files} for p in list_partitions(dataset, EDGES_TABLE)
        }
    except FlowpipeError as exc:
        log.warning("cannot look for missing edge rollups: %s", exc)
        return []
    missing = []
    for key, names in flows.items():
        for name, path in names.items():
            parsed = parse_part_file_name(name)
            if parsed is not None and parsed.writer_id in writers and name not in have.get(key, set()):
                missing.append(path)
    written = build_after_publish(dataset, sorted(missing))
    if written:
        log.info("wrote %d edge rollup(s) missing after an earlier run stopped", len(written))
    return written


def _size(dataset: Dataset, path: str) -> int:
    try:
        return int(dataset.filesystem.get_file_info(path).size or 0)
    except (OSError, pa.ArrowException):
        return 0


def _by_partition(dataset: Dataset, table: str) -> dict[tuple[str, str], PartitionFiles]:
    return {(p.key.date, p.key.hour): p for p in list_partitions(dataset, table)}


def visible_flow_names(dataset: Dataset) -> dict[tuple[str, str], dict[str, str]]:
    """The flow part files a query reads (compacted inputs left out), by partition: name → path."""
    from flowpipe.dataset.visible import visible_part_files

    flows_dir = dataset.table_dir(FLOWS_TABLE)
    out: dict[tuple[str, str], dict[str, str]] = {}
    for path in visible_part_files(dataset, FLOWS_TABLE):
        parts = path[len(flows_dir) :].strip("/").split("/")
        if len(parts) == 3 and parts[0].startswith("date=") and parts[1].startswith("hour="):
            out.setdefault((parts[0][5:], parts[1][5:]), {})[parts[2]] = path
    return out


def build_missing(
    dataset: Dataset,
    *,
    since: datetime | None = None,
    partitions: Iterable[tuple[str, str]] | None = None,
    rebuild: bool = False,
    zstd_level: int = 3,
) -> RollupReport:
    """Write the rollup of every visible flow file that has none (with `rebuild`, of every one), and remove
    orphans (`prune_orphans`). `since` keeps to hours that end after it; `partitions` to those (date, hour)."""
    started = time.perf_counter()
    report = RollupReport()
    wanted = set(partitions) if partitions is not None else None
    flows = visible_flow_names(dataset)
    edges = _by_partition(dataset, EDGES_TABLE)
    identities = _by_partition(dataset, EDGE_IDENTITIES_TABLE)
    with Summariser() as summariser:
        for key in sorted(flows):
            if wanted is not None and key not in wanted:
                continue
            if since is not None and not _ends_after(key, since):
                continue
            have = {f.name for f in edges[key].files} if key in edges else set()
            have &= {f.name for f in identities[key].files} if key in identities else set()
            for name, path in sorted(flows[key].items()):
                if rebuild or name not in have:
                    try:
                        build_rollup(
                            dataset, path, zstd_level=zstd_level, report=report, summariser=summariser
                        )
                    except FileNotFoundError:
                        continue  # compacted or expired meanwhile
    report.removed = prune_orphans(dataset, partitions=wanted, flows=flows)
    report.seconds = time.perf_counter() - started
    return report


def prune_orphans(
    dataset: Dataset,
    *,
    partitions: Iterable[tuple[str, str]] | None = None,
    flows: dict[tuple[str, str], dict[str, str]] | None = None,
) -> list[str]:
    """Remove the rollups of flow files that are gone from an hour that still has flow files (a compaction
    replaced them); returns their paths. Hours without flow files (past the raw retention) keep theirs."""
    wanted = set(partitions) if partitions is not None else None
    flows = flows if flows is not None else visible_flow_names(dataset)
    removed = []
    for table in (EDGES_TABLE, EDGE_IDENTITIES_TABLE):  # edges first: a rollup without edges is not read
        for key, partition in _by_partition(dataset, table).items():
            if (wanted is not None and key not in wanted) or key not in flows:
                continue
            for entry in partition.files:
                if entry.name not in flows[key]:
                    with translate_write_errors(entry.path):
                        try:
                            dataset.filesystem.delete_file(entry.path)
                        except FileNotFoundError:
                            continue
                    removed.append(entry.path)
    return removed


def _ends_after(key: tuple[str, str], since: datetime) -> bool:
    from datetime import timedelta

    start = PartitionKey(*key).start()
    return start is None or start + timedelta(hours=1) > since


__all__ = [
    "ROLLUP_TABLES",
    "RollupReport",
    "build_after_publish",
    "build_missing",
    "build_rollup",
    "prune_orphans",
    "rollup_path",
    "summarise",
]

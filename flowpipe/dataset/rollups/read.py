"""Read edge rollups: which hours they cover, and the views that merge them with the flows of the other hours.

An hour `date=D/hour=H` is covered when each flow part file a query would read there (compacted inputs left
out) has its rollup (`edges` and `edge_identities` files of the same name), or when it has no flow files left
(past the raw retention) but has rollups. Only the rollups of the flow files present are read while flows
remain, so a rollup left behind by a compaction is never added to the one of the file that replaced it. An
hour's kept files (the folded rows of flows past their retention) are read for it besides whatever else it has.

`install_rollups(con, dataset, source)` runs after the shared views exist on a query connection and redefines
five of them:

- `edge_observations`: the rows from flows of the hours not covered (`auto`), plus the rollup rows of the
  covered hours (`auto`, `edges`);
- `identity_workloads`: over flows and the rollups' identity rows (the same minimum either way);
- `edge_identity_labels`: the labels the rollups kept per pod identity (observed_edges reads them for
  identities whose flows are gone);
- `connections`: with the lookup of pods known only by identity kept (rollups hold such pods unnamed);
- `privilege_records` (least_privilege): the folded privilege rows (`privilege_hours`, `privilege_days`) of
  the hours and days the window holds whole (or whose flows are gone; with `edges`, every folded hour), pods
  known only by identity named as `flows_enriched` names them, and (`auto`) the flows' rows of the other hours.

Every view above `edge_observations` (connections, observed_edges, new_connections, ...) is then unchanged: it
merges rows that add up, so flows and rollups give the same answer for the same records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from flowpipe.dataset.layout import Dataset, PartitionKey
from flowpipe.dataset.maintenance import list_partitions
from flowpipe.dataset.rollups import (
    CUTS_VARIABLE,
    EDGE_DAYS_TABLE,
    EDGE_HOURS_TABLE,
    EDGE_IDENTITIES_TABLE,
    EDGES_TABLE,
    PRIVILEGE_DAYS_TABLE,
    PRIVILEGE_HOURS_TABLE,
    SOURCES,
)
from flowpipe.dataset.rollups.build import SEEN_FOR, visible_flow_names
from flowpipe.errors import ConfigError, QueryError

log = logging.getLogger(__name__)

ROWS = "_edge_rollup_rows"
IDENTITIES = "_edge_rollup_identities"
HOURS = "_edge_rollup_hours"
FLOW_OBSERVATIONS = "_edge_observations_flows"
FLOW_IDENTITIES = "_identity_workloads_flows"


@dataclass(slots=True)
class Coverage:
    """The hours rollups answer for, and the rollup files to read for them."""

    hours: list[datetime] = field(default_factory=list)
    edge_files: list[str] = field(default_factory=list)
    identity_files: list[str] = field(default_factory=list)
    uncovered: list[datetime] = field(default_factory=list)
    """Hours with flows but without a rollup for every flow file (read from flows)."""
    folded: dict[datetime, str] = field(default_factory=dict)
    """Hours with a folded file that holds for them (`flowpipe.dataset.rollups.fold`): hour → file."""
    coarse: set[datetime] = field(default_factory=set)
    """Folded hours whose per-file rollups are gone: they are read from the folded file whatever the window."""
    days: dict[datetime, str] = field(default_factory=dict)
    """Days (UTC) whose every hour with edges is folded and whose folded day holds for those hours: day → file."""
    kept: dict[datetime, list[str]] = field(default_factory=dict)
    """Hours with kept files (the folded rows of flows that went): read whatever else the hour holds, unless
    the hour is read from its folded day."""
    hour_files: dict[datetime, list[str]] = field(default_factory=dict)
    """Hours whose edges are all in folded and kept files (what a folded day is made of): hour → those files."""
    privilege: PrivilegeCoverage | None = None
    """The folded privilege records (`coverage(..., privilege=True)`, as a query installs the views)."""


@dataclass(slots=True)
class PrivilegeCoverage:
    """The hours and days of folded privilege records (`privilege_records`) that hold, as `Coverage` for edges."""

    folded: dict[datetime, str] = field(default_factory=dict)
    """Hours with a folded file named after their flow files (or, without flows left, any): hour → file."""
    coarse: set[datetime] = field(default_factory=set)
    """Folded hours without flows left: read from the folded file whatever the window."""
    pending: set[datetime] = field(default_factory=set)
    """Hours with flows but no folded file that holds for them (read from flows)."""
    days: dict[datetime, str] = field(default_factory=dict)
    """Days whose every hour with flows or folded records is folded, and whose folded day holds: day → file."""
    kept: dict[datetime, list[str]] = field(default_factory=dict)
    """Hours with kept files (folded records of flows that went), read as `Coverage.kept`."""
    hour_files: dict[datetime, list[str]] = field(default_factory=dict)
    """Hours whose records are all in folded and kept files: hour → those files."""

    @property
    def files(self) -> list[str]:
        return [*self.folded.values(), *self.days.values(), *_flat(self.kept)]


def privilege_coverage(
    dataset: Dataset, flows: dict[tuple[str, str], dict[str, str]] | None = None
) -> PrivilegeCoverage:
    """Which hours and days of `dataset` have folded privilege records that hold for them (`flows`: the flow
    files by partition, when already listed)."""
    from flowpipe.dataset.rollups import fold_name

    flows = visible_flow_names(dataset) if flows is None else flows
    folds = {
        (p.key.date, p.key.hour): {f.name: f.path for f in p.files}
        for p in list_partitions(dataset, PRIVILEGE_HOURS_TABLE)
    }
    result = PrivilegeCoverage()
    for key in sorted(set(flows) | set(folds)):
        start = hour_start(key)
        if start is None:
            continue
        folded, kept = _hour_folds(folds.get(key, {}))
        fold = _valid_fold(folded, set(flows.get(key, {})), fold_name)
        if fold is not None:
            result.folded[start] = fold
            if key not in flows:
                result.coarse.add(start)
        elif key in flows:
            result.pending.add(start)
        if kept:
            result.kept[start] = [kept[name] for name in sorted(kept)]
        if fold is not None or (kept and key not in flows):
            result.hour_files[start] = ([fold] if fold is not None else []) + result.kept.get(start, [])
    result.days = _valid_days(
        dataset, PRIVILEGE_DAYS_TABLE, result.hour_files, set(result.hour_files) | result.pending
    )
    return result


def coverage(dataset: Dataset, *, privilege: bool = False) -> Coverage:
    """Which hours of `dataset` its rollups cover, and their files (see the module docstring); with `privilege`,
    its folded privilege records too (`Coverage.privilege`)."""
    from flowpipe.dataset.rollups import fold_name

    flows = visible_flow_names(dataset)
    edges = {(p.key.date, p.key.hour): p for p in list_partitions(dataset, EDGES_TABLE)}
    identities = {(p.key.date, p.key.hour): p for p in list_partitions(dataset, EDGE_IDENTITIES_TABLE)}
    folds = {(p.key.date, p.key.hour): p for p in list_partitions(dataset, EDGE_HOURS_TABLE)}
    result = Coverage()
    for key in sorted(set(edges) | set(flows) | set(folds)):
        start = hour_start(key)
        if start is None:
            continue  # rows without a time: always from flows
        edge_names = {f.name: f.path for f in edges[key].files} if key in edges else {}
        identity_names = {f.name: f.path for f in identities[key].files} if key in identities else {}
        folded, kept = _hour_folds({f.name: f.path for f in folds[key].files} if key in folds else {})
        complete = set(edge_names) & set(identity_names)
        present = set(flows.get(key, {}))
        names = present or complete
        fold = _valid_fold(folded, present, fold_name)
        named: list[str] = []  # the identity files to read
        if fold is not None and not (names and names <= complete):
            # flows past their retention, per-file rollups removed (before kept files): the folded rows alone
            result.folded[start] = fold
            result.coarse.add(start)
            named = sorted(identity_names)
        elif names and names <= complete:
            result.edge_files += [edge_names[name] for name in sorted(names)]
            named = sorted(names)
            if fold is not None:
                result.folded[start] = fold
        elif present:
            result.uncovered.append(start)
        if kept:
            result.kept[start] = [kept[name] for name in sorted(kept)]
            named = sorted(identity_names)  # every one: they name the pods of the kept rows too
        if start in result.folded or (names and names <= complete) or (kept and not present):
            result.hours.append(start)
        if start in result.folded or (kept and not present):
            result.hour_files[start] = [result.folded[start]] if start in result.folded else []
            result.hour_files[start] += result.kept.get(start, [])
        result.identity_files += [identity_names[name] for name in named]
    hours = {hour_start(key) for key in set(edges) | set(flows) | set(folds)}
    result.days = _valid_days(
        dataset, EDGE_DAYS_TABLE, result.hour_files, {h for h in hours if h is not None}
    )
    if privilege:
        result.privilege = privilege_coverage(dataset, flows)
    return result


def _valid_days(
    dataset: Dataset, table: str, folded: dict[datetime, list[str]], hours: set[datetime]
) -> dict[datetime, str]:
    """The days of `table` (day → file) whose `hours` are all `folded` (hour → its folded and kept files), and
    whose day file is named after those files."""
    from flowpipe.dataset.rollups import day_name

    files = {p.key.start(): {f.name: f.path for f in p.files} for p in list_partitions(dataset, table)}
    days = {}
    for day, named in files.items():
        if day is None or not named:
            continue
        own = [hour for hour in hours if day <= hour < day + timedelta(days=1)]
        if own and all(hour in folded for hour in own):
            path = named.get(day_name({hour: folded[hour] for hour in own}))
            if path is not None:
                days[day] = path
    return days


def _hour_folds(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """An hour's files of folded rows (name → path) as (folded files, kept files); a folded file whose kept
    file exists is left out (a retention run stopped between writing one and removing the other)."""
    from flowpipe.dataset.rollups import FOLD_PREFIX, KEPT_PREFIX, kept_name

    kept = {name: path for name, path in files.items() if name.startswith(KEPT_PREFIX)}
    folded = {
        name: path
        for name, path in files.items()
        if name.startswith(FOLD_PREFIX) and kept_name(name) not in kept
    }
    return folded, kept


def _flat(files: dict[datetime, list[str]]) -> list[str]:
    """The paths of `files` (hour → paths), hour by hour."""
    return [path for hour in sorted(files) for path in files[hour]]


def _valid_fold(
    folded: dict[str, str], flow_names: set[str], fold_name: Callable[[set[str]], str]
) -> str | None:
    """The folded file that holds for an hour: the one named after its flow files, or, without flows, the one
    there (two only if a fold stopped between publishing a file and removing the one it replaced: then the
    last by name, either one a whole summary of the hour)."""
    if not folded:
        return None
    if flow_names:
        return folded.get(fold_name(flow_names))
    return folded[max(folded)]


def hour_start(key: tuple[str, str]) -> datetime | None:
    """The start of the hour of partition `key` (date, hour); None for rows without a time."""
    return PartitionKey(*key).start()


MAX_RANGES = 64
"""Above this many separate runs of hours without rollups, flows are filtered by a table of covered hours."""


def _uncovered_filter(con: duckdb.DuckDBPyConnection, cover: Coverage) -> str:
    """An SQL condition on `time` that keeps the flows of the hours rollups do not cover (and rows without a time).

    Few runs of such hours (the open hour, a writer's missing rollups): time ranges, which Parquet statistics
    use to skip the other hours' row groups unread. Many: a lookup in a table of the covered hours.
    """
    ranges: list[list[datetime]] = []
    for hour in sorted(cover.uncovered):
        if ranges and ranges[-1][1] == hour:
            ranges[-1][1] = hour + timedelta(hours=1)
        else:
            ranges.append([hour, hour + timedelta(hours=1)])
    if len(ranges) <= MAX_RANGES:
        # the bounds are whole hours computed here from partition names (never text from flows or users)
        spans = "".join(
            f" OR (time >= TIMESTAMPTZ '{start:%Y-%m-%d %H:%M:%S}+00'"
            f" AND time < TIMESTAMPTZ '{end:%Y-%m-%d %H:%M:%S}+00')"
            for start, end in ranges
        )
        return f"(time IS NULL{spans})"
    hours = pa.table({"hour": pa.array(cover.hours, pa.timestamp("us", "UTC"))})
    con.register("_edge_rollup_hours_arrow", hours)
    con.execute(f"CREATE OR REPLACE TABLE {HOURS} AS SELECT hour FROM _edge_rollup_hours_arrow")
    con.unregister("_edge_rollup_hours_arrow")
    return f"coalesce(date_trunc('hour', time) NOT IN (SELECT hour FROM {HOURS}), TRUE)"


def check_source(source: str) -> str:
    """`source` if it is one of `SOURCES`, else `ConfigError`."""
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")
    return source


def install_rollups(con: duckdb.DuckDBPyConnection, dataset: Dataset, source: str) -> Coverage | None:
    """Redefine the edge views on `con` to read rollups (`source` auto or edges); None for `flows`."""
    from flowpipe.query.views import FALLBACK_NEEDED_SQL, load_views

    if check_source(source) == "flows":
        return None
    cover = coverage(dataset, privilege=True)
    privilege = cover.privilege or PrivilegeCoverage()
    if (
        source == "auto"
        and not cover.hours
        and not cover.kept
        and not privilege.folded
        and not privilege.kept
    ):
        return cover  # no rollups to read: the views stay as they are
    views = {view.name: view for view in load_views()}
    try:
        fallbacks = bool(con.execute(FALLBACK_NEEDED_SQL).fetchall()[0][0])

        def sql(name: str, *, full: bool = False) -> str:
            view = views[name]
            return view.sql if fallbacks or full else view.sql_without_fallbacks

        observations = sql("edge_observations")
        if source == "auto":
            marker = "FROM flows_enriched\n"
            if observations.count(marker) != 1:
                raise QueryError("edge_observations must read flows_enriched once to be split by hour")
            observations = observations.replace(
                marker,
                f"FROM (SELECT * FROM flows_enriched WHERE {_uncovered_filter(con, cover)}) AS flows_enriched\n",
            )
        con.execute(f"CREATE OR REPLACE VIEW {FLOW_OBSERVATIONS} AS\n{observations}")
        con.execute(f"CREATE OR REPLACE VIEW {FLOW_IDENTITIES} AS\n{sql('identity_workloads')}")
        rows = register_files(con, dataset, ROWS, cover.edge_files, FLOW_OBSERVATIONS)
        ids = register_files(con, dataset, IDENTITIES, cover.identity_files, "edge_identities")
        folded = _install_folded_hours(con, dataset, cover)
        flow_rows = f"SELECT * FROM {FLOW_OBSERVATIONS} UNION ALL " if source == "auto" else ""
        con.execute(
            f"CREATE OR REPLACE VIEW edge_observations AS {flow_rows}SELECT * FROM {rows} "
            f"WHERE coalesce(hour NOT IN (SELECT hour FROM {FOLDED_HOURS} WHERE {USABLE}), TRUE)"
        )
        con.execute(
            "CREATE OR REPLACE VIEW identity_workloads AS SELECT cluster_name, identity, min(workload) AS workload "
            f"FROM (SELECT * FROM {FLOW_IDENTITIES} UNION ALL SELECT cluster_name, identity, workload FROM {ids} "
            "WHERE workload IS NOT NULL) AS named GROUP BY cluster_name, identity"
        )
        con.execute(
            "CREATE OR REPLACE VIEW edge_identity_labels AS SELECT cluster_name, namespace, identity, labels "
            f"FROM {ids} WHERE labels IS NOT NULL"
        )
        merged = sql("connections", full=True)
        con.execute(f"CREATE OR REPLACE VIEW connections AS\nSELECT * FROM (\n{merged}\n) AS merged{folded}")
        _install_privilege(con, dataset, source, privilege, sql("privilege_records"))
    except duckdb.Error as exc:
        raise QueryError(f"cannot read the edge rollups of {dataset.uri}: {exc}") from exc
    return cover


def with_rollups(
    dataset: Dataset, source: str, setup: Callable[[duckdb.DuckDBPyConnection], object] | None = None
) -> tuple[Callable[[duckdb.DuckDBPyConnection], object], Callable[[], bool]]:
    """An engine setup that installs the rollups (then runs `setup`), and a check: did they cover an hour?"""
    from flowpipe.query.views import ReadableFiles

    check_source(source)
    last: list[Coverage | None] = [None]

    def install(con: duckdb.DuckDBPyConnection) -> ReadableFiles:
        cover = last[0] = install_rollups(con, dataset, source)
        if setup is not None:
            setup(con)
        # DuckDB reads a local dataset's rollup files itself: they stay readable once the engine is locked
        files = (
            [*cover.edge_files, *cover.identity_files, *cover.folded.values(), *cover.days.values()]
            + _flat(cover.kept)
            + (cover.privilege.files if cover.privilege is not None else [])
            if cover is not None and dataset.is_local
            else []
        )
        return ReadableFiles(files)

    return install, lambda: bool(last[0] is not None and last[0].hours)


FOLDED_ROWS = "_edge_hour_rows"
FOLDED_HOURS = "_edge_folded_hours"
FOLDED_DAYS = "_edge_folded_days"
DAY_ROWS = "_edge_day_rows"
KEPT_ROWS = "_edge_kept_rows"


def _whole(start: str, length: str) -> str:
    """SQL: no time of the window falls inside the span from `start` (the question takes it whole or not at all,
    so rows of the whole span give its answer)."""
    return (
        f"coalesce(len(list_filter(getvariable('{CUTS_VARIABLE}'), "
        f"lambda t: t > {start} AND t < {start} + INTERVAL {length})) = 0, TRUE)"
    )


USABLE = f"(coarse OR {_whole('hour', '1 HOUR')})"
"""A folded hour is read when the window holds it whole, or when it has nothing finer left; else its per-file
rollups are."""
DAY_USABLE = _whole("day", "1 DAY")
"""A folded day is read when the window holds it whole; else its folded hours are."""


def _folded_tables(
    con: duckdb.DuckDBPyConnection,
    names: tuple[str, str],
    folded: dict[datetime, str],
    coarse: set[datetime],
    days: dict[datetime, str],
) -> None:
    """Create the tables `names` (folded hours: hour, coarse, day, day_folded; folded days: day)."""
    hours = sorted(folded)
    tables = {
        names[0]: {
            "hour": pa.array(hours, pa.timestamp("us", "UTC")),
            "coarse": pa.array([hour in coarse for hour in hours], pa.bool_()),
            "day": pa.array([hour.replace(hour=0) for hour in hours], pa.timestamp("us", "UTC")),
            "day_folded": pa.array([hour.replace(hour=0) in days for hour in hours], pa.bool_()),
        },
        names[1]: {"day": pa.array(sorted(days), pa.timestamp("us", "UTC"))},
    }
    for name, columns in tables.items():
        con.register(f"{name}_arrow", pa.table(columns))
        con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM {name}_arrow")
        con.unregister(f"{name}_arrow")


def _folded_rows(
    hour_rows: str, day_rows: str, kept_rows: str, tables: tuple[str, str], hour_usable: str
) -> str:
    """SQL: the rows of the folded hours (`hour_rows`) that are usable (`hour_usable`) and not read from their
    day, those of the folded days (`day_rows`) the window holds whole, and the kept rows (`kept_rows`) of
    hours not read from their day (whatever the window cuts: nothing finer is left of them)."""
    hours, days = tables
    return (
        f"SELECT * FROM {hour_rows} WHERE hour IN "
        f"(SELECT hour FROM {hours} WHERE {hour_usable} AND NOT (day_folded AND {DAY_USABLE})) "
        f"UNION ALL SELECT * FROM {day_rows} WHERE hour IN (SELECT day FROM {days} WHERE {DAY_USABLE}) "
        f"UNION ALL SELECT * FROM {kept_rows} WHERE date_trunc('day', hour) NOT IN "
        f"(SELECT day FROM {days} WHERE {DAY_USABLE})"
    )


def _install_folded_hours(con: duckdb.DuckDBPyConnection, dataset: Dataset, cover: Coverage) -> str:
    """Register the folded files of `cover` and the table of folded hours; returns the UNION ALL that adds
    their rows (named as `connections` names pods) to the merged connections ('' without folded hours)."""
    hours, days = sorted(cover.folded), sorted(cover.days)
    _folded_tables(con, (FOLDED_HOURS, FOLDED_DAYS), cover.folded, cover.coarse, cover.days)
    if not hours and not cover.kept:
        return ""
    register_files(con, dataset, FOLDED_ROWS, [cover.folded[hour] for hour in hours], "connections")
    register_files(con, dataset, DAY_ROWS, [cover.days[day] for day in days], "connections")
    register_files(con, dataset, KEPT_ROWS, _flat(cover.kept), "connections")
    columns = [str(row[0]) for row in con.execute("DESCRIBE connections").fetchall()]
    items = []
    for column in columns:
        side = column.split("_", 1)[0]
        alias = "siw" if side == "source" else "diw"
        if column in ("source_workload", "destination_workload"):
            items.append(
                f"CASE WHEN f.{side}_identity_key IS NOT NULL AND {alias}.workload IS NOT NULL "
                f"THEN {alias}.workload ELSE f.{column} END AS {column}"
            )
        elif column in ("source_workload_id", "destination_workload_id"):
            items.append(
                f"CASE WHEN f.{side}_identity_key IS NOT NULL AND {alias}.workload IS NOT NULL THEN "
                f"(CASE WHEN f.{side}_namespace IS NOT NULL THEN f.{side}_namespace || '/' || {alias}.workload "
                f"ELSE {alias}.workload END) ELSE f.{column} END AS {column}"
            )
        else:
            items.append(f'f."{column}"')
    rows = _folded_rows(FOLDED_ROWS, DAY_ROWS, KEPT_ROWS, (FOLDED_HOURS, FOLDED_DAYS), USABLE)
    return (
        f"\nUNION ALL\nSELECT {', '.join(items)} FROM ({rows}) AS f\n"
        "LEFT JOIN identity_workloads AS siw ON siw.identity = f.source_identity_key\n"
        "    AND coalesce(siw.cluster_name, '') = coalesce(f.cluster_name, '')\n"
        "LEFT JOIN identity_workloads AS diw ON diw.identity = f.destination_identity_key\n"
        "    AND coalesce(diw.cluster_name, '') = coalesce(f.cluster_name, '')"
    )


PRIVILEGE_FLOWS = "_privilege_records_flows"
PRIVILEGE_HOURS = "_privilege_folded_hours"
PRIVILEGE_DAYS = "_privilege_folded_days"
PRIVILEGE_HOUR_ROWS = "_privilege_hour_rows"
PRIVILEGE_DAY_ROWS = "_privilege_day_rows"
PRIVILEGE_KEPT_ROWS = "_privilege_kept_rows"
PRIVILEGE_NAMED = {
    "workload": ("workload_identity_key", "wiw"),
    "peer_workload": ("peer_identity_key", "piw"),
}
"""The columns of `privilege_records` that name a pod known only by identity, with the column of its identity."""


def _install_privilege(
    con: duckdb.DuckDBPyConnection, dataset: Dataset, source: str, cover: PrivilegeCoverage, flow_sql: str
) -> None:
    """Redefine `privilege_records`: the folded rows of the hours (days) the window holds whole or whose flows
    are gone (with `edges`: every folded hour), with pods known only by identity named as `flows_enriched`
    names them; plus (`auto`) the rows from flows of every other hour."""
    con.execute(f"CREATE OR REPLACE VIEW {PRIVILEGE_FLOWS} AS\n{flow_sql}")
    _folded_tables(con, (PRIVILEGE_HOURS, PRIVILEGE_DAYS), cover.folded, cover.coarse, cover.days)
    hours, days = sorted(cover.folded), sorted(cover.days)
    register_files(con, dataset, PRIVILEGE_HOUR_ROWS, [cover.folded[h] for h in hours], PRIVILEGE_FLOWS)
    register_files(con, dataset, PRIVILEGE_DAY_ROWS, [cover.days[d] for d in days], PRIVILEGE_FLOWS)
    register_files(con, dataset, PRIVILEGE_KEPT_ROWS, _flat(cover.kept), PRIVILEGE_FLOWS)
    usable = USABLE if source == "auto" else "TRUE"
    columns = [str(row[0]) for row in con.execute(f"DESCRIBE {PRIVILEGE_FLOWS}").fetchall()]
    items = []
    for column in columns:
        if column in PRIVILEGE_NAMED:
            key, alias = PRIVILEGE_NAMED[column]
            items.append(
                f"CASE WHEN f.{key} IS NOT NULL AND {alias}.workload IS NOT NULL THEN {alias}.workload "
                f"ELSE f.{column} END AS {column}"
            )
        else:
            items.append(f'f."{column}"')
    joins = "".join(
        f"\nLEFT JOIN identity_workloads AS {alias} ON {alias}.identity = f.{key}"
        f"\n    AND coalesce({alias}.cluster_name, '') = coalesce(f.cluster_name, '')"
        for key, alias in PRIVILEGE_NAMED.values()
    )
    rows = _folded_rows(
        PRIVILEGE_HOUR_ROWS,
        PRIVILEGE_DAY_ROWS,
        PRIVILEGE_KEPT_ROWS,
        (PRIVILEGE_HOURS, PRIVILEGE_DAYS),
        usable,
    )
    flow_rows = (
        f"SELECT * FROM {PRIVILEGE_FLOWS} WHERE "
        f"coalesce(hour NOT IN (SELECT hour FROM {PRIVILEGE_HOURS} WHERE {USABLE}), TRUE)\nUNION ALL\n"
        if source == "auto"
        else ""
    )
    con.execute(
        f"CREATE OR REPLACE VIEW privilege_records AS\n{flow_rows}"
        f"SELECT {', '.join(items)} FROM ({rows}) AS f{joins}"
    )


def register_files(
    con: duckdb.DuckDBPyConnection, dataset: Dataset, name: str, files: list[str], like: str
) -> str:
    """The rollup files as a view `name` with the columns and types of the view `like`; returns `name`."""
    columns = con.execute(f"DESCRIBE {like}").fetchall()
    source = f"{name}_files"
    present: set[str] = set()
    if files and dataset.is_local:  # DuckDB's own Parquet reader, as for the flows: the fastest path
        relation = con.read_parquet(list(files), union_by_name=True)
        relation.create_view(source, replace=True)
        present = set(relation.columns)
    elif files:  # an object store: a pyarrow dataset, which DuckDB scans with pushdown
        table = pads.dataset(files, format="parquet", filesystem=dataset.filesystem)
        con.register(source, table)
        present = set(table.schema.names)
    select = ", ".join(_column(column, sql_type, present) for column, sql_type, *_ in columns)
    origin = f"FROM {source}" if files else "WHERE FALSE"
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {select} {origin}")
    return name


def _column(column: str, sql_type: str, present: set[str]) -> str:
    """The select item of one column of the rollup files: itself, `last_seen` from its duration, or NULL."""
    if column in present:
        return f'CAST("{column}" AS {sql_type}) AS "{column}"'
    if column == "hour" and "first_seen" in present:  # rollups written before connections were per hour
        return f'CAST(date_trunc(\'hour\', "first_seen") AS {sql_type}) AS "{column}"'
    if column == "last_seen" and SEEN_FOR in present:
        # nanoseconds after first_seen, added in UTC whatever the session's time zone
        time = f'timezone(\'UTC\', make_timestamp_ns(epoch_ns("first_seen") + "{SEEN_FOR}"))'
        return f'CAST({time} AS {sql_type}) AS "{column}"'
    return f'CAST(NULL AS {sql_type}) AS "{column}"'


def raw_flows_note(engine: Any, question: str, since: datetime | None) -> str | None:
    """A note for a question that reads raw flows (not one of `EDGE_QUESTIONS`), or raw flows and folded privilege
    records (`PRIVILEGE_QUESTIONS`), whose window starts before the oldest of them while edge rollups reach back
    further; None otherwise."""
    from flowpipe.dataset.rollups import EDGE_QUESTIONS, PRIVILEGE_QUESTIONS

    privilege = question in PRIVILEGE_QUESTIONS
    if (question in EDGE_QUESTIONS and not privilege) or since is None or engine.dataset is None:
        return None
    oldest = engine.run("SELECT min(time) AS oldest FROM flows").column("oldest")[0].as_py()
    what = "raw flows"
    if privilege:
        folded = privilege_coverage(engine.dataset).hour_files
        if folded and (oldest is None or min(folded) < oldest):
            oldest = min(folded)
        what = "raw flows and privilege rollups"
    if oldest is None or since >= oldest:
        return None
    hours = coverage(engine.dataset).hours
    if not hours or hours[0] >= oldest:
        return None
    edge_only = [name for name in EDGE_QUESTIONS if name not in PRIVILEGE_QUESTIONS]
    return (
        f"note: {question} reads {what}, which this dataset keeps from {oldest:%Y-%m-%d %H:%M}Z only (edge "
        f"rollups go back to {hours[0]:%Y-%m-%d %H:%M}Z, for the edge questions: {', '.join(edge_only)})"
    )

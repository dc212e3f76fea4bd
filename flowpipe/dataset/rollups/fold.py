"""Fold an hour of edge rollups into edge rows: one row per edge and hour, for months of history in seconds.

The rollup of a part file keeps each observer's records of each connection (`edge_observations`), which is
what lets rollups of any split of the flows merge into exact answers, and also why a month of them is large and
slow to merge: every connection is a group. Once an hour is closed, its connections are final (the edge
definition counts a connection within its hour), so `fold_closed` merges them once, through the same view
`connections` a query uses, and folds them by edge: every column of `connections` except the client's port
(and the source address of pods and world clients, which no edge question reads) is the key, and the counts
add up (`packets`, `denied_packets`, `dropped_packets`, `folded`: the connections or calls a row stands for),
with the first and last time. The file is `<dataset>/edge_hours/date=D/hour=H/hour-<digest>.parquet`, where the
digest names the flow files it summarises: readers take it only while the hour holds exactly those flow files
(a flow file written into the hour later makes it stale, and the hour is read as before until it is folded
again), and once the hour's flows are past their retention, whatever folded file the hour has.

A closed day whose hours with edges are all folded is folded again the same way, into one row per edge and
day (`<dataset>/edge_days/date=D/hour=00/day-<digest>.parquet`, the digest naming the hours' folded files).

The same run folds each such hour's privilege records (the view `privilege_records`, what least_privilege
judges) from the hour's flows, which hold the denials reported at either end: by every column but the time,
`flows` summed, into `<dataset>/privilege_hours/` (named after the flow files like the folded edges), and a
closed day's into `<dataset>/privilege_days/`.

Once an hour's flows are gone (past the raw retention), its folded files (edges and privilege records) become
kept files (`kept-<digest>.parquet`, `keep_folded`): rows of flow files that no longer exist, never folded again
and read for the hour whatever else it holds. Flows written into that hour later (an old capture ingested) are
folded apart from them, and the hour's rows are both: folding the hour again never drops the rows of flows that
went.

A pod known only by its identity at every end stays unnamed here (its identity is kept in
`*_identity_key`) and is named when read, over every rollup, as the view `connections` names it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from flowpipe.dataset.layout import Dataset, PartitionKey, kill_point, translate_write_errors
from flowpipe.dataset.maintenance import list_partitions
from flowpipe.dataset.rollups import (
    EDGE_DAYS_TABLE,
    EDGE_HOURS_TABLE,
    EDGE_IDENTITIES_TABLE,
    EDGES_TABLE,
    FOLD_PREFIX,
    PRIVILEGE_DAYS_TABLE,
    PRIVILEGE_HOURS_TABLE,
    day_name,
    fold_name,
    kept_name,
)
from flowpipe.dataset.rollups.read import hour_start
from flowpipe.errors import DatasetWriteError, FlowpipeError, QueryError

log = logging.getLogger(__name__)

SUMS = ("packets", "denied_packets", "dropped_packets", "folded")
"""The counts of a folded row: summed over the connections (or ICMP / L7 calls) it stands for."""
TIMES = {"first_seen": "min", "last_seen": "max"}
DROPPED = ("source_port",)
"""Not kept: the client's ephemeral port (one per connection)."""
SOURCE_IP = "CASE WHEN source_entity IS NOT NULL AND source_entity <> 'world' THEN source_ip END"
"""The source address kept: that of reserved entities other than the world (observed_edges shows them)."""
PRIVILEGE_SUMS = ("flows",)
"""The count of a folded privilege row: the records it stands for."""
PRIVILEGE_VIEW = "privilege_records"
CLOSED_AFTER = timedelta(minutes=10)
"""An hour is folded once it ended this long ago (late records of collectors catching up go to their hour)."""


def _folding_sql(
    columns: list[str], source: str, replaced: dict[str, tuple[str, str | None]], sums: tuple[str, ...] = SUMS
) -> str:
    """The SELECT folding the rows of `source` (columns `columns`): counts (`sums`) summed, times bounded,
    `replaced` columns as (expression, grouping key or None), every other column a key."""
    items, keys = [], []
    for name in columns:
        quoted = f'"{name}"'
        if name in sums:
            items.append(f"CAST(sum({quoted}) AS BIGINT) AS {quoted}")
        elif name in TIMES:
            items.append(f"{TIMES[name]}({quoted}) AS {quoted}")
        elif name in replaced:
            expression, key = replaced[name]
            items.append(f"{expression} AS {quoted}")
            keys += [key] if key is not None else []
        else:
            items.append(quoted)
            keys.append(quoted)
    return f"SELECT {', '.join(items)} FROM {source} GROUP BY {', '.join(keys)}"


def day_sql(columns: list[str], source: str, sums: tuple[str, ...] = SUMS) -> str:
    """The SELECT folding hourly folded rows (`source`, columns `columns`) into one row per edge and day."""
    return _folding_sql(columns, source, {"hour": ("min(date_trunc('day', \"hour\"))", None)}, sums)


def fold_sql(columns: list[str]) -> str:
    """The SELECT folding the rows of `connections` (whose columns are `columns`) by edge."""
    dropped = {name: ("CAST(NULL AS INTEGER)", None) for name in DROPPED}
    return _folding_sql(columns, "connections", {**dropped, "source_ip": (SOURCE_IP, SOURCE_IP)})


def fold_rows(dataset: Dataset, edge_files: list[str]) -> pa.Table:
    """The folded rows of the rollup files `edge_files` (the `edges` files of one hour's flow files)."""
    from flowpipe.dataset.rollups.build import OBSERVATIONS_VIEW, _arrow, connect
    from flowpipe.dataset.rollups.read import register_files
    from flowpipe.model import FLOW_SCHEMA
    from flowpipe.query.views import install_views, load_views, unname_identities

    con = connect()
    try:
        con.register("_fold_no_flows", FLOW_SCHEMA.empty_table())
        con.execute("CREATE VIEW flows AS SELECT * FROM _fold_no_flows")
        install_views(con)
        rows = register_files(con, dataset, "_fold_rows", edge_files, OBSERVATIONS_VIEW)
        con.execute(f"CREATE OR REPLACE VIEW {OBSERVATIONS_VIEW} AS SELECT * FROM {rows}")
        unname_identities(con)  # pods known only by identity: named when read, over every rollup
        connections = next(view for view in load_views() if view.name == "connections")
        con.execute(f"CREATE OR REPLACE VIEW connections AS\n{connections.sql}")
        columns = [str(row[0]) for row in con.execute("DESCRIBE connections").fetchall()]
        return _arrow(con.sql(fold_sql(columns)))
    except (duckdb.Error, pa.ArrowException) as exc:
        raise QueryError(f"cannot fold the edge rollups of {dataset.uri}: {exc}") from exc
    finally:
        con.close()


def privilege_rows(dataset: Dataset, flow_files: list[str]) -> pa.Table:
    """The rows of `privilege_records` of the flow files `flow_files` (one closed hour's, so that a denial
    reported at either end is among them) folded by every column but the time: `flows` summed, `first_seen` and
    `last_seen` bounded. Pods known only by identity stay unnamed (their identity is kept in
    `*_identity_key`): they are named when read, over every rollup, as `flows_enriched` names them."""
    from flowpipe.dataset.rollups.build import _arrow, connect, flows_view
    from flowpipe.model import FLOW_SCHEMA
    from flowpipe.query.views import install_views, unname_identities

    con = connect()
    try:
        flows_view(
            con,
            list(flow_files)
            if dataset.is_local
            else pads.dataset(
                flow_files, schema=FLOW_SCHEMA, format="parquet", filesystem=dataset.filesystem
            ),
        )
        install_views(con)
        unname_identities(con)
        columns = [str(row[0]) for row in con.execute(f"DESCRIBE {PRIVILEGE_VIEW}").fetchall()]
        return _arrow(con.sql(_folding_sql(columns, PRIVILEGE_VIEW, {}, PRIVILEGE_SUMS)))
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        raise QueryError(f"cannot fold the privilege records of {dataset.uri}: {exc}") from exc
    finally:
        con.close()


def _files(dataset: Dataset, table: str, prefix: str = "") -> dict[tuple[str, str], dict[str, str]]:
    """The part files of `table` (whose names start with `prefix`) by partition (date, hour): name → path (one
    listing)."""
    return {
        (p.key.date, p.key.hour): {f.name: f.path for f in p.files if f.name.startswith(prefix)}
        for p in list_partitions(dataset, table)
    }


@dataclass(frozen=True, slots=True)
class _Listing:
    """The rollup files of a dataset by partition (name → path), listed once for every hour a run folds."""

    edges: dict[tuple[str, str], dict[str, str]]
    identities: dict[tuple[str, str], dict[str, str]]
    folded: dict[tuple[str, str], dict[str, str]]
    """The folded files (`hour-*`) only: kept files are never replaced by a fold."""
    privilege: dict[tuple[str, str], dict[str, str]]

    @classmethod
    def take(cls, dataset: Dataset) -> _Listing:
        return cls(
            _files(dataset, EDGES_TABLE),
            _files(dataset, EDGE_IDENTITIES_TABLE),
            _files(dataset, EDGE_HOURS_TABLE, FOLD_PREFIX),
            _files(dataset, PRIVILEGE_HOURS_TABLE, FOLD_PREFIX),
        )

    def complete(self, key: tuple[str, str]) -> dict[str, str]:
        """The flow-file names of hour `key` with both rollup files: name → path of its `edges` file."""
        identities = self.identities.get(key, {})
        return {name: path for name, path in self.edges.get(key, {}).items() if name in identities}


def _fold_hour(
    dataset: Dataset, key: tuple[str, str], flows: dict[str, str], listing: _Listing, zstd_level: int
) -> str | None:
    """Fold hour `key`, which holds the flow files `flows` (name → path), when each has its rollup; the folded
    file's path, or None (nothing written). Earlier folded files of the hour go once it is published: a reader
    sees one of them whole, and takes only the one named after the flow files it sees."""
    complete = listing.complete(key)
    if not flows or not set(flows) <= set(complete):
        return None
    rows = fold_rows(dataset, [complete[name] for name in sorted(flows)])
    others = list(listing.folded.get(key, {}).values())
    return _publish(dataset, EDGE_HOURS_TABLE, PartitionKey(*key), fold_name(flows), rows, others, zstd_level)


def _fold_privilege_hour(
    dataset: Dataset, key: tuple[str, str], flows: dict[str, str], listing: _Listing, zstd_level: int
) -> str:
    """Fold the privilege records of hour `key` from its flow files `flows` (name → path); the folded file's
    path, named and published as the hour's folded edges."""
    rows = privilege_rows(dataset, [flows[name] for name in sorted(flows)])
    others = list(listing.privilege.get(key, {}).values())
    return _publish(
        dataset, PRIVILEGE_HOURS_TABLE, PartitionKey(*key), fold_name(flows), rows, others, zstd_level
    )


def _publish(
    dataset: Dataset,
    table: str,
    key: PartitionKey,
    name: str,
    rows: pa.Table,
    others: list[str],
    zstd_level: int,
) -> str:
    """Write folded `rows` as `name` in partition `key` of `table`, then remove the `others` it replaces."""
    folder = dataset.partition_dir(table, key)
    final = f"{folder}/{name}"
    options = {"compression": "zstd", "compression_level": zstd_level, "use_dictionary": True}
    temp = dataset.write_parquet_temp(rows, folder, name, hold=True, **options)
    kill_point("fold:written")
    dataset.publish(temp, final)
    for path in others:
        if path != final:
            _delete(dataset, path)
    return final


def fold_closed(
    dataset: Dataset,
    *,
    partitions: Iterable[tuple[str, str]] | None = None,
    since: datetime | None = None,
    now: datetime | None = None,
    refold: bool = False,
    days: bool = True,
    zstd_level: int = 3,
) -> tuple[list[str], list[str]]:
    """Fold every closed hour (of `partitions`, else all; ending after `since`) whose rollups are complete and
    whose folded file is missing or stale (with `refold`, every one), then (with `days`) every closed day as
    `fold_closed_days` does; returns the (hour, day) files of folded edges written. The privilege records of
    each such hour with flows are folded too, from its flows (`privilege_hours`, then `privilege_days`). A
    failure is logged and leaves the hour as it was."""
    from flowpipe.dataset.rollups.build import visible_flow_names

    wanted = set(partitions) if partitions is not None else None
    cutoff = (now or datetime.now(UTC)) - CLOSED_AFTER
    written = []
    visible = visible_flow_names(dataset)
    # hours whose flows went without their folded files becoming kept ones (a retention run that stopped, a
    # dataset folded before kept files existed): kept now, before flows written there later are folded
    bare = {
        key
        for table in KEEPABLE
        for key, files in _files(dataset, table, FOLD_PREFIX).items()
        if files and key not in visible and (wanted is None or key in wanted)
    }
    keep_folded(dataset, bare, zstd_level, visible)
    listing = _Listing.take(dataset)
    for key, names in sorted(visible.items()):
        start = hour_start(key)
        if (wanted is not None and key not in wanted) or start is None or start + timedelta(hours=1) > cutoff:
            continue
        if since is not None and start + timedelta(hours=1) <= since:
            continue
        if refold or fold_name(names) not in listing.privilege.get(key, {}):
            try:
                _fold_privilege_hour(dataset, key, names, listing, zstd_level)
            except FlowpipeError as exc:
                log.warning(
                    "privilege hour %s %s:00 not folded (read from its flows until it is): %s", *key, exc
                )
        if not refold and fold_name(names) in listing.folded.get(key, {}):
            continue
        try:
            path = _fold_hour(dataset, key, names, listing, zstd_level)
        except FlowpipeError as exc:
            log.warning("edge hour %s %s:00 not folded (read from its rollups until it is): %s", *key, exc)
            continue
        if path is not None:
            written.append(path)
    if not days:
        return written, []
    return written, fold_closed_days(dataset, now=now, refold=refold, zstd_level=zstd_level)


KEEPABLE = (EDGE_HOURS_TABLE, PRIVILEGE_HOURS_TABLE)
"""The tables of folded hours whose files become kept files once the hour's flows are gone."""


def keep_folded(
    dataset: Dataset,
    keys: Iterable[tuple[str, str]],
    zstd_level: int = 3,
    visible: dict[tuple[str, str], dict[str, str]] | None = None,
) -> list[str]:
    """Make the folded files (edges, privilege records) of each hour of `keys` whose flows are gone kept files
    (`kept_name`), read for the hour whatever flows come later; returns the kept files written. A kept file is
    published before the folded file goes: a reader seeing both takes the kept one only (same digest).
    `visible`: the flow files by partition, when already listed."""
    import pyarrow.parquet as pq

    from flowpipe.dataset.rollups.build import visible_flow_names

    wanted = set(keys)
    if not wanted:
        return []
    visible = visible_flow_names(dataset) if visible is None else visible
    written = []
    for table in KEEPABLE:
        for partition in list_partitions(dataset, table):
            key = (partition.key.date, partition.key.hour)
            names = {f.name: f.path for f in partition.files}
            folds = sorted(name for name in names if name.startswith(FOLD_PREFIX))
            if key not in wanted or key in visible or not folds:
                continue
            # two folded files only if a fold stopped before removing the one it replaced: either is the hour
            last, others = folds[-1], [names[name] for name in folds]
            try:
                if (
                    kept_name(last) in names
                ):  # published by a run that stopped before removing the folded files
                    for path in others:
                        _delete(dataset, path)
                    continue
                with dataset.filesystem.open_input_file(names[last]) as handle:
                    rows = pq.read_table(handle)
                written.append(
                    _publish(dataset, table, partition.key, kept_name(last), rows, others, zstd_level)
                )
            except (FlowpipeError, OSError, pa.ArrowException) as exc:
                log.warning(
                    "%s %s %s:00 not kept apart yet (its folded file answers for it): %s", table, *key, exc
                )
    return written


def fold_closed_days(
    dataset: Dataset, *, now: datetime | None = None, refold: bool = False, zstd_level: int = 3
) -> list[str]:
    """Fold every closed day (UTC) whose hours with edges are all folded and whose folded day is missing or
    stale (with `refold`, every one) into one row per edge and day; returns the files written. Earlier files of
    the day go once the new one is published. A failure is logged and leaves the day as it was. The closed days
    whose hours with flows all have folded privilege records are folded too."""
    from flowpipe.dataset.rollups.read import coverage, privilege_coverage

    cutoff = (now or datetime.now(UTC)) - CLOSED_AFTER
    privilege = privilege_coverage(dataset)
    _fold_days(
        dataset,
        PRIVILEGE_DAYS_TABLE,
        privilege.hour_files,
        set(privilege.pending),
        privilege.days,
        cutoff=cutoff,
        refold=refold,
        zstd_level=zstd_level,
    )
    cover = coverage(dataset)
    pending = set(cover.uncovered) | {hour for hour in cover.hours if hour not in cover.hour_files}
    return _fold_days(
        dataset,
        EDGE_DAYS_TABLE,
        cover.hour_files,
        pending,
        cover.days,
        cutoff=cutoff,
        refold=refold,
        zstd_level=zstd_level,
    )


def _fold_days(
    dataset: Dataset,
    table: str,
    folded: dict[datetime, list[str]],
    pending: set[datetime],
    days: dict[datetime, str],
    *,
    cutoff: datetime,
    refold: bool,
    zstd_level: int,
) -> list[str]:
    """Fold into `table` every day closed before `cutoff` whose hours are all `folded` (hour → its folded and
    kept files; none `pending`) and whose folded day (`days`) is missing or stale (with `refold`, every one);
    the files written."""
    by_day: dict[datetime, dict[datetime, list[str]]] = {}
    for hour, files in folded.items():
        by_day.setdefault(hour.replace(hour=0), {})[hour] = files
    waiting = {hour.replace(hour=0) for hour in pending}
    sums = PRIVILEGE_SUMS if table == PRIVILEGE_DAYS_TABLE else SUMS
    what = "privilege" if table == PRIVILEGE_DAYS_TABLE else "edge"
    written = []
    day_files = _files(dataset, table)
    for day, hours in sorted(by_day.items()):
        if day in waiting or day + timedelta(days=1) > cutoff:
            continue
        if not refold and days.get(day, "").endswith("/" + day_name(hours)):
            continue
        try:
            key = PartitionKey.from_time(day)
            rows = _day_rows(dataset, day, hours, sums)
            others = list(day_files.get((key.date, key.hour), {}).values())
            written.append(_publish(dataset, table, key, day_name(hours), rows, others, zstd_level))
        except FlowpipeError as exc:
            log.warning(
                "%s day %s not folded (read from its hours until it is): %s", what, f"{day:%Y-%m-%d}", exc
            )
    return written


def _day_rows(
    dataset: Dataset, day: datetime, hours: dict[datetime, list[str]], sums: tuple[str, ...] = SUMS
) -> pa.Table:
    """The folded rows of the day's hours (`hours`: hour → its folded and kept files), one row per key and
    day."""
    from flowpipe.dataset.rollups.build import _arrow, connect
    from flowpipe.dataset.rollups.read import register_files

    files = [path for hour in sorted(hours) for path in hours[hour]]
    con = connect()
    try:
        schema = _hour_schema(dataset, files[0])
        con.register("_day_like", schema.empty_table())
        rows_view = register_files(con, dataset, "_day_rows", files, "_day_like")
        return _arrow(con.sql(day_sql(list(schema.names), rows_view, sums)))
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        raise QueryError(f"cannot fold the hours of {day:%Y-%m-%d} in {dataset.uri}: {exc}") from exc
    finally:
        con.close()


def _hour_schema(dataset: Dataset, path: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with dataset.filesystem.open_input_file(path) as handle:
        return pq.read_schema(handle)


def _delete(dataset: Dataset, path: str) -> None:
    with translate_write_errors(path):
        try:
            dataset.filesystem.delete_file(path)
        except FileNotFoundError:
            pass


def drop_observations(dataset: Dataset, keys: Iterable[tuple[str, str]]) -> list[str]:
    """Remove the per-file rollups (`edges`) of the hours `keys` that have a folded file (their flows are going:
    the folded rows answer for them); returns the paths removed. Identity rows stay (they name pods)."""
    folded = {(p.key.date, p.key.hour) for p in list_partitions(dataset, EDGE_HOURS_TABLE) if p.files}
    removed = []
    wanted = set(keys) & folded
    for partition in list_partitions(dataset, EDGES_TABLE):
        if (partition.key.date, partition.key.hour) in wanted:
            for entry in partition.files:
                try:
                    _delete(dataset, entry.path)
                except DatasetWriteError as exc:
                    log.warning("%s", exc)
                    continue
                removed.append(entry.path)
    return removed


__all__ = [
    "day_name",
    "drop_observations",
    "fold_closed",
    "fold_closed_days",
    "fold_name",
    "fold_rows",
    "keep_folded",
    "privilege_rows",
]

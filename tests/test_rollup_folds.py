"""Edge rollups folded by hour and day: closed hours answer as their flows do, stale and damaged folds are
rebuilt, backfills past the raw retention add up, and least_privilege answers from folded privilege records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.rollups import (
    EDGE_QUESTIONS,
    PRIVILEGE,
    answers,
    rollup_names,
    simulated,
    write,
)

from flowpipe.dataset.layout import Dataset, PartitionKey
from flowpipe.dataset.rollups import (
    EDGE_DAYS_TABLE,
    EDGE_HOURS_TABLE,
    EDGES_TABLE,
    PRIVILEGE_DAYS_TABLE,
    PRIVILEGE_HOURS_TABLE,
)
from flowpipe.dataset.rollups.read import coverage, privilege_coverage
from flowpipe.query.engine import open_engine

# -- closed hours folded by edge --------------------------------------------------------------------------------

WINDOWS: tuple[dict[str, str], ...] = (
    {},
    {"since": "2024-05-01T10:00:00Z", "until": "2024-05-01T10:30:00Z"},
    {"since": "2024-05-01T09:50:00Z", "until": "2024-05-01T10:05:00Z", "cluster": "west"},
    {
        "since": "2024-05-01T10:00:00Z",
        "until": "2024-05-01T11:00:00Z",
        "baseline_since": "2024-05-01T09:00:00Z",
    },
)
"""All time, then windows that cut an hour (read from the per-file rollups) or hold whole hours (folded)."""
LATER = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def folded(two_clusters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from flowpipe.dataset.rollups.fold import fold_closed

    root = tmp_path_factory.mktemp("rollups-folded") / "dataset"
    shutil.copytree(two_clusters, root)
    hours, days = fold_closed(Dataset(root), now=LATER)
    assert len(hours) == 2 and len(days) == 1
    return root


def connection_rows(root: Path, **params: Any) -> tuple[int, int]:
    """(rows of `connections`, the connections and calls they stand for) over rollups alone."""
    with open_engine(root, source="edges") as engine:
        where = "WHERE first_seen >= $since" if params else ""
        row = engine.run(
            f"SELECT count(*) AS n, CAST(sum(folded) AS BIGINT) AS f FROM connections {where}", params
        )
        return row.column("n")[0].as_py(), row.column("f")[0].as_py()


def test_folded_hours_answer_as_the_flows_do(two_clusters: Path, folded: Path) -> None:
    cover = coverage(Dataset(folded))
    assert [h.hour for h in cover.folded] == [9, 10] and not cover.coarse
    assert list(cover.days) == [datetime(2024, 5, 1, tzinfo=UTC)]
    # the folded rows are read: fewer rows, standing for the same connections; the day's fewer than its hours'
    rows, stands_for = connection_rows(folded)
    assert rows < stands_for == connection_rows(two_clusters)[1]
    nine = {"since": datetime(2024, 5, 1, 9, tzinfo=UTC)}  # inside the day: its hours are read
    assert rows < connection_rows(folded, **nine)[0] and connection_rows(folded, **nine)[1] == stands_for
    # a window starting inside hour 09 reads that hour's per-file rollups, and hour 10's folded rows
    inside = {"since": datetime(2024, 5, 1, 9, 45, tzinfo=UTC)}
    (rows, stands_for), (raw_rows, raw_stands_for) = (
        connection_rows(folded, **inside),
        connection_rows(two_clusters, **inside),
    )
    assert stands_for == raw_stands_for and rows < raw_rows
    ten = {"since": datetime(2024, 5, 1, 10, tzinfo=UTC)}
    assert connection_rows(folded, **ten)[0] < connection_rows(two_clusters, **ten)[0]
    assert rows - connection_rows(folded, **ten)[0] == raw_rows - connection_rows(two_clusters, **ten)[0]
    for values in WINDOWS:
        raw = answers(two_clusters, "flows", **values)
        assert answers(folded, "auto", **values) == raw, values
        assert answers(folded, "edges", **values) == raw, values


def test_suggest_equal_from_folded_hours(two_clusters: Path, folded: Path) -> None:
    from flowpipe.app.suggest import SuggestConfig, suggest_policies

    def drafts(root: Path, source: str) -> list[tuple[str, str]]:
        with open_engine(root, source=source) as engine:
            suggestion = suggest_policies(
                engine,
                SuggestConfig(cluster="east", since="2024-05-01T09:00:00Z", until="2024-05-01T11:00:00Z"),
            )
        assert suggestion.edges and suggestion.files
        return [(str(f.path), f.text) for f in suggestion.files]

    assert drafts(folded, "edges") == drafts(two_clusters, "flows")


def test_a_flow_file_written_into_a_folded_hour_makes_its_fold_stale(folded: Path, tmp_path: Path) -> None:
    import shutil

    from flowpipe.dataset.rollups.fold import fold_closed, fold_closed_days

    root = tmp_path / "dataset"
    shutil.copytree(folded, root)
    late = simulated("east", seed=77, duration=600, rate=6.0)  # 09:40-09:50, a collector catching up
    write(root, late, writer="late", rows=2_000)
    dataset = Dataset(root)
    stale = coverage(dataset)
    # hour 09 is read from its per-file rollups again, and the day from its hours
    assert [h.hour for h in stale.folded] == [10] and not stale.days
    assert [h.hour for h in privilege_coverage(dataset).folded] == [10] and not privilege_coverage(
        dataset
    ).days
    raw = answers(root, "flows")
    assert answers(root, "edges") == raw
    privilege = answers(root, "flows", PRIVILEGE)
    assert answers(root, "auto", PRIVILEGE) == privilege  # hour 09 from its flows, late file included
    assert answers(root, "edges", PRIVILEGE) != privilege  # rollups alone: hour 09's privilege rows are stale
    assert [p.split("/")[-2] for p in fold_closed(dataset, now=LATER, days=False)[0]] == ["hour=09"]
    assert [h.hour for h in coverage(dataset).folded] == [9, 10] and not coverage(dataset).days
    assert len(dataset.list_part_files(EDGE_HOURS_TABLE)) == 2  # the stale fold went
    assert len(dataset.list_part_files(PRIVILEGE_HOURS_TABLE)) == 2
    assert answers(root, "edges") == raw
    assert answers(root, "edges", PRIVILEGE) == privilege
    assert len(fold_closed_days(dataset, now=LATER)) == 1 and coverage(dataset).days
    assert (
        len(dataset.list_part_files(EDGE_DAYS_TABLE))
        == len(dataset.list_part_files(PRIVILEGE_DAYS_TABLE))
        == 1
    )
    assert answers(root, "edges") == raw
    assert answers(root, "edges", PRIVILEGE) == answers(root, "auto", PRIVILEGE) == privilege
    # an hour is folded only once it is closed
    assert fold_closed(dataset, now=datetime(2024, 5, 1, 11, 5, tzinfo=UTC), refold=True, days=False)[0] == [
        p for p in dataset.list_part_files(EDGE_HOURS_TABLE) if "hour=09/" in p
    ]


def test_folded_hours_alone_answer_whole_hours(two_clusters: Path, folded: Path, tmp_path: Path) -> None:
    """Past the raw retention only the folded rows (and the identities) stay: windows of whole hours give the
    flows' answers; a window cutting such an hour takes the hour whole."""
    import shutil

    from flowpipe.dataset.rollups.fold import drop_observations

    root = tmp_path / "dataset"
    shutil.copytree(folded, root)
    shutil.rmtree(root / "flows")
    dataset = Dataset(root)
    assert len(drop_observations(dataset, [("2024-05-01", "09"), ("2024-05-01", "10")])) > 4
    assert dataset.list_part_files(EDGES_TABLE) == []
    cover = coverage(dataset)
    assert cover.coarse == set(cover.folded) and len(cover.folded) == 2
    for values in (WINDOWS[0], WINDOWS[3]):
        assert answers(root, "auto", **values) == answers(two_clusters, "flows", **values), values
        every = (*EDGE_QUESTIONS, *PRIVILEGE)
        assert answers(root, "auto", every, **values) == answers(two_clusters, "flows", every, **values), (
            values
        )
    cut = {"since": "2024-05-01T09:50:00Z", "until": "2024-05-01T10:05:00Z"}
    assert answers(root, "auto", **cut)["observed_edges"]


def test_a_denied_attempt_reported_either_side_of_an_hour_boundary_stays_denied(tmp_path: Path) -> None:
    """An ingress denial is FORWARDED at the source and DROPPED at the destination; nodes' clocks differ, so the
    two reports of one attempt can fall in two hours, which the edge definition counts apart. The source's half
    alone looks delivered: observed_edges (and so suggest) counts it denied, from flows and from folded hours."""
    import duckdb

    from flowpipe.dataset.rollups.fold import fold_closed

    table = simulated("east", seed=5)
    con = duckdb.connect()
    con.register("flows", table)
    # a connection denied at the destination (every report of it in one hour, like all the simulator's)
    found = con.sql(
        """
        SELECT source_ip, source_port, destination_ip, destination_port
        FROM flows
        GROUP BY ALL
        HAVING bool_or(verdict = 'DROPPED' AND traffic_direction = 'INGRESS' AND drop_reason_desc = 'POLICY_DENIED')
           AND bool_or(verdict = 'FORWARDED' AND traffic_direction = 'EGRESS')
           AND count(DISTINCT date_trunc('hour', time)) = 1
        ORDER BY min(time)
        LIMIT 1
        """
    ).fetchall()
    assert found, "the simulator denies connections at their destination"
    denied = found[0]
    # its source's reports half a millisecond before 10:00, its destination's just after (the clocks' skew)
    edge = "source_ip = ? AND source_port = ? AND destination_ip = ? AND destination_port = ?"
    moved = con.sql(
        f"""
        SELECT * REPLACE (CASE WHEN {edge} THEN (CASE WHEN traffic_direction = 'EGRESS'
            THEN TIMESTAMPTZ '2024-05-01 09:59:59.9995+00' ELSE TIMESTAMPTZ '2024-05-01 10:00:00.0002+00' END)
            ELSE time END AS time)
        FROM flows ORDER BY time
        """,
        params=[*denied],
    ).to_arrow_table()
    root = tmp_path / "dataset"
    write(root, moved, writer="skew", rows=4_000)

    def statuses(source: str) -> set[str]:
        rows = answers(root, source, ("observed_edges",))["observed_edges"]
        return {
            r["status"]
            for r in rows
            if r["destination_port"] == denied[3]
            and r["l4_protocol"] == "TCP"
            and (r["source_workload"], r["destination_workload"]) == pair
        }

    with open_engine(root, source="flows") as engine:
        names = engine.run(
            "SELECT source_workload, destination_workload FROM connections WHERE source_ip = $a "
            "AND source_port = $b AND destination_ip = $c AND destination_port = $d",
            dict(zip("abcd", denied, strict=True)),
        ).to_pylist()
        halves = engine.run(
            "SELECT hour, outcome, at_hour_edge FROM connections WHERE source_ip = $a AND source_port = $b "
            "ORDER BY hour",
            {"a": denied[0], "b": denied[1]},
        ).to_pylist()
    assert [(h["outcome"], h["at_hour_edge"]) for h in halves] == [("delivered", True), ("denied", False)]
    pair = (names[0]["source_workload"], names[0]["destination_workload"])
    assert statuses("flows") == {"denied"}
    assert len(fold_closed(Dataset(root), now=LATER, days=False)[0]) == 2
    assert statuses("edges") == {"denied"}
    assert answers(root, "edges") == answers(root, "flows")


def test_compaction_can_build_the_rollups_writers_did_not(tmp_path: Path) -> None:
    """Writers without rollups pay nothing; `compact --edge-rollups` writes every closed hour's rollups and folds
    the hours and the day, and the answers stay the flows'."""
    from click.testing import CliRunner

    from flowpipe.cli import cli

    root = tmp_path / "dataset"
    write(root, simulated("east", seed=8, duration=1800, rate=8.0), writer="plain", rows=2_000, rollups=False)
    raw = answers(root, "flows")
    result = CliRunner().invoke(
        cli, ["compact", "--dataset", str(root), "--grace-seconds", "0", "--edge-rollups"]
    )
    assert result.exit_code == 0, result.output
    flows, edges = rollup_names(str(root))
    assert flows and edges == flows
    cover = coverage(Dataset(root))
    assert [h.hour for h in cover.folded] == [9, 10] and len(cover.days) == 1
    assert answers(root, "edges") == raw
    assert answers(root, "auto", since="2024-05-01T09:50:00Z", until="2024-05-01T10:10:00Z") == answers(
        root, "flows", since="2024-05-01T09:50:00Z", until="2024-05-01T10:10:00Z"
    )


def test_a_damaged_folded_file_is_named_and_rebuilt(folded: Path, two_clusters: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from flowpipe.cli import cli

    root = tmp_path / "dataset"
    shutil.copytree(folded, root)
    [day] = Dataset(root).list_part_files(EDGE_DAYS_TABLE)
    Path(day).write_bytes(Path(day).read_bytes()[:300])  # cut short
    result = CliRunner().invoke(cli, ["query", "top_talkers", "--dataset", str(root), "--since", "all"])
    assert result.exit_code != 0 and day in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["rollup", "--dataset", str(root), "--rebuild"])
    assert result.exit_code == 0, result.output
    assert "2 closed hours and 1 days folded" in result.output
    assert answers(root, "edges") == answers(two_clusters, "flows")


def test_flows_backfilled_into_an_hour_past_the_raw_retention_add_to_its_folded_rows(
    two_clusters: Path, folded: Path, tmp_path: Path
) -> None:
    """An old capture ingested into an hour whose flows went (only its folded rows left): the hour's edges are
    those of the flows that went plus the new ones, through folding again, a rebuild, a day fold and a crash."""
    import shutil

    from flowpipe.dataset.retention import apply_retention
    from flowpipe.dataset.rollups.fold import fold_closed

    root = tmp_path / "dataset"
    shutil.copytree(folded, root)
    dataset = Dataset(root)
    # the flows of 09:00-10:00 go (hour 10 stays); their folded rows are kept apart from any flows to come
    apply_retention(dataset, timedelta(hours=2), clock=lambda: datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    assert not any("hour=09/" in p for p in dataset.list_part_files("flows"))
    kept = [p for p in dataset.list_part_files(EDGE_HOURS_TABLE) if "hour=09/" in p]
    assert [p.rpartition("/")[2][:5] for p in kept] == ["kept-"]
    assert any("hour=09/kept-" in p for p in dataset.list_part_files(PRIVILEGE_HOURS_TABLE))
    assert answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE) == answers(
        two_clusters, "flows", EDGE_QUESTIONS + PRIVILEGE
    )

    # what the dataset has seen: the first flows and the backfilled ones
    late = simulated("north", seed=78, duration=600, rate=6.0)  # 09:40-09:50, another cluster's capture
    truth = tmp_path / "truth"
    shutil.copytree(two_clusters, truth)
    write(truth, late, writer="backfill", rows=2_000)
    expected = answers(truth, "flows", EDGE_QUESTIONS + PRIVILEGE)
    assert expected["least_privilege"]

    write(root, late, writer="backfill", rows=2_000)
    # hour 09: its kept rows and the new flows' rollups (privilege records: the new flows, until folded)
    edges_only = {name: rows for name, rows in expected.items() if name in EDGE_QUESTIONS}
    assert answers(root, "edges") == edges_only
    assert answers(root, "auto", EDGE_QUESTIONS + PRIVILEGE) == expected
    hours, days = fold_closed(dataset, now=LATER)
    assert [p.split("/")[-2] for p in hours] == ["hour=09"] and len(days) == 1
    assert answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE) == expected  # from the day's rows
    assert (
        answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE, since="2024-05-01T09:00:00Z") == expected
    )  # from the hours' rows
    fold_closed(dataset, now=LATER, refold=True)  # `flowpipe rollup --rebuild` keeps them too
    assert answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE) == expected
    assert kept[0] in dataset.list_part_files(EDGE_HOURS_TABLE)

    # the backfilled flows go too: a second kept file; a retention stopped between writing it and removing
    # the folded file it replaces reads the hour once
    apply_retention(dataset, timedelta(hours=2), clock=lambda: datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    files = sorted(p.rpartition("/")[2] for p in dataset.list_part_files(EDGE_HOURS_TABLE) if "hour=09/" in p)
    assert [name[:5] for name in files] == ["kept-", "kept-"]
    assert answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE) == expected
    replaced = dataset.partition_dir(EDGE_HOURS_TABLE, PartitionKey("2024-05-01", "09"))
    shutil.copy(kept[0], f"{replaced}/hour-{kept[0].rpartition('/')[2][5:]}")
    assert answers(root, "edges", EDGE_QUESTIONS + PRIVILEGE) == expected


PRIVILEGE_WINDOWS: tuple[dict[str, str], ...] = (
    {},
    {"since": "2024-05-01T10:00:00Z", "until": "2024-05-01T10:30:00Z"},
    {"since": "2024-05-01T09:50:00Z", "until": "2024-05-01T10:05:00Z"},
    {"since": "2024-05-01T09:00:00Z", "until": "2024-05-01T10:00:00Z"},
    {"since": "2024-05-01T09:00:00Z", "until": "2024-05-01T11:00:00Z", "namespace": "production"},
)
"""All time, windows cutting hours (their flows are read), whole hours and the whole day, a namespace."""


def privilege_totals(root: Path, source: str) -> list[dict[str, Any]]:
    """Per direction and `allowed`: the rows of `privilege_records` read and the records they stand for."""
    with open_engine(root, source=source) as engine:
        return engine.run(
            "SELECT direction, allowed, count(*) AS rows, CAST(sum(flows) AS BIGINT) AS records "
            "FROM privilege_records GROUP BY ALL ORDER BY ALL"
        ).to_pylist()


def test_least_privilege_equal_from_folded_privilege_records(two_clusters: Path, folded: Path) -> None:
    """least_privilege answers from the folded privilege rows of whole hours and days (and the flows of the hours
    a window cuts) as from the flows: every finding of both clusters, the namespace filter, the egress records of
    connections denied at their destination counted as denied."""
    cover = privilege_coverage(Dataset(folded))
    assert [h.hour for h in cover.folded] == [9, 10] and len(cover.days) == 1 and not cover.pending
    raw_totals, folded_totals = privilege_totals(two_clusters, "flows"), privilege_totals(folded, "edges")
    assert [(r["direction"], r["allowed"], r["records"]) for r in folded_totals] == [
        (r["direction"], r["allowed"], r["records"]) for r in raw_totals
    ]
    assert all(f["rows"] < r["rows"] for f, r in zip(folded_totals, raw_totals, strict=True))
    # the source's FORWARDED egress records of connections its destination denied: no use of an allowance
    assert any(r["direction"] == "egress" and not r["allowed"] for r in raw_totals)
    for values in PRIVILEGE_WINDOWS:
        raw = answers(two_clusters, "flows", PRIVILEGE, **values)
        rows = raw["least_privilege"]
        assert {r["cluster_name"] for r in rows} == {"east", "west"}, values
        assert {"no_policy", "ingress_from_world", "observed_ingress", "observed_egress"} <= {
            r["finding"] for r in rows
        } or values.get("namespace"), values
        assert answers(folded, "auto", PRIVILEGE, **values) == raw, values
        if values.get("since", "").endswith(":00:00Z") and values.get("until", "").endswith(":00:00Z"):
            assert answers(folded, "edges", PRIVILEGE, **values) == raw, values
    assert {
        r["namespace"] for r in answers(folded, "auto", PRIVILEGE, **PRIVILEGE_WINDOWS[4])["least_privilege"]
    } == {"production"}


def test_least_privilege_from_rollups_names_pods_known_only_by_identity(tmp_path: Path) -> None:
    """A pod that one hour's records know only by its identity, named in another hour's: the folded privilege
    rows keep the identity, and the pod takes the name the flows give it."""
    import duckdb

    from flowpipe.dataset.rollups.fold import fold_closed

    table = simulated("east", seed=12, duration=1800, rate=8.0)
    con = duckdb.connect()
    con.register("flows", table)
    # in hour 10, the pods of a namespace lose their pod name, workload name and labels as destinations: known
    # by identity only, named by the records of hour 09
    blurred = con.sql(
        """
        SELECT * REPLACE (
            CASE WHEN time >= TIMESTAMPTZ '2024-05-01 10:00:00+00' AND destination_namespace = 'production'
                THEN NULL ELSE destination_pod_name END AS destination_pod_name,
            CASE WHEN time >= TIMESTAMPTZ '2024-05-01 10:00:00+00' AND destination_namespace = 'production'
                THEN NULL ELSE destination_workload_name END AS destination_workload_name,
            CASE WHEN time >= TIMESTAMPTZ '2024-05-01 10:00:00+00' AND destination_namespace = 'production'
                THEN [] ELSE destination_labels END AS destination_labels)
        FROM flows ORDER BY time
        """
    ).to_arrow_table()
    root = tmp_path / "dataset"
    write(root, blurred, writer="blur", rows=4_000)
    raw = answers(root, "flows", PRIVILEGE)
    fold_closed(Dataset(root), now=LATER)
    with open_engine(root, source="edges") as engine:
        keys = (
            engine.run("SELECT count(*) AS n FROM privilege_records WHERE workload_identity_key IS NOT NULL")
            .column("n")[0]
            .as_py()
        )
    assert keys > 0
    assert answers(root, "edges", PRIVILEGE) == raw
    assert answers(
        root, "auto", PRIVILEGE, since="2024-05-01T10:00:00Z", until="2024-05-01T11:00:00Z"
    ) == answers(root, "flows", PRIVILEGE, since="2024-05-01T10:00:00Z", until="2024-05-01T11:00:00Z")

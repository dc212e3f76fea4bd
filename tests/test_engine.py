"""The DuckDB engine: the `flows` and `lost_events` views over a real Parquet dataset, empty datasets, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from support.flowdata import T0, flow, flows_table, synthetic_flows, write_dataset

from flowpipe.dataset.layout import Dataset
from flowpipe.errors import EmptyDatasetError, QueryError
from flowpipe.model import FLOW_SCHEMA, LOST_EVENTS_SCHEMA, LostEvent
from flowpipe.query.engine import DuckDBEngine, open_engine, table_columns


def count(engine: DuckDBEngine, sql: str = "SELECT count(*) AS n FROM flows") -> int:
    return int(engine.run(sql).column(0)[0].as_py())


def describe(engine: DuckDBEngine, view: str) -> list[tuple[str, str]]:
    return [(r["column_name"], r["column_type"]) for r in engine.run(f"DESCRIBE {view}").to_pylist()]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_dataset(root, synthetic_flows(120), batch_rows=50)
    return root


def test_flows_view_reads_every_part_file(dataset: Path) -> None:
    parts = list((dataset / "flows").rglob("*.parquet"))
    assert len(parts) >= 2 and {p.parent.parent.name for p in parts} == {"date=2024-05-01"}
    with DuckDBEngine(dataset) as engine:
        assert count(engine) == sum(pq.read_metadata(p).num_rows for p in parts)
        assert len(engine.flow_files) == len(parts)


def test_flows_view_has_exactly_the_flow_table_columns(dataset: Path, tmp_path: Path) -> None:
    with DuckDBEngine(dataset) as engine, DuckDBEngine(tmp_path / "empty") as empty:
        columns = describe(engine, "flows")
        assert [name for name, _ in columns] == FLOW_SCHEMA.names  # no `date` / `hour`
        assert columns == describe(empty, "flows")  # same types with and without files
        star = engine.run("SELECT * FROM flows LIMIT 3")
        assert star.column_names == FLOW_SCHEMA.names and star.num_rows == 3
        assert star.schema.field("time").type.tz in ("UTC", "Etc/UTC")


def test_rows_come_back_as_written(tmp_path: Path) -> None:
    when = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    row = flow(
        time=when,
        verdict="DROPPED",
        drop_reason=133,
        drop_reason_desc="POLICY_DENIED",
        is_reply=False,
        source_namespace="shop",
        source_labels=["k8s:app=web", "reserved:world"],
        destination_port=443,
        dns_ips=[],
        latency_ns=2**62,
        ingress_denied_by=["shop/deny-all"],
    )
    write_dataset(tmp_path, [row])
    with DuckDBEngine(tmp_path) as engine:
        (got,) = engine.run("SELECT * FROM flows").to_pylist()
    assert got["time"] == when
    assert {k: got[k] for k in row if k != "time"} == {k: v for k, v in row.items() if k != "time"}


def test_temporary_and_private_files_are_ignored(dataset: Path) -> None:
    with DuckDBEngine(dataset) as engine:
        before = count(engine)
    partition = next((dataset / "flows").glob("date=*/hour=*"))
    extra = flows_table([flow(time=T0, verdict="FORWARDED")])
    pq.write_table(extra, partition / ".part-x.parquet")
    pq.write_table(extra, partition / "_part-y.parquet")
    (partition / ".part-z.parquet.tmp").write_bytes(b"half a file")  # an unfinished write
    (partition / "part-w.parquet.tmp").write_bytes(b"PAR1 not really")
    hidden = dataset / "flows" / "_staging" / "date=2024-05-01" / "hour=10"
    hidden.mkdir(parents=True)
    pq.write_table(extra, hidden / "part-v.parquet")
    pq.write_table(extra, dataset / "flows" / "stray.parquet")  # outside the partition layout
    (dataset / "_state").mkdir(exist_ok=True)
    pq.write_table(extra, dataset / "_state" / "x.parquet")
    with DuckDBEngine(dataset) as engine:
        assert count(engine) == before


def test_older_part_files_without_a_column_read_it_as_null(tmp_path: Path) -> None:
    write_dataset(tmp_path, [flow(time=T0, verdict="FORWARDED", dns_query="a.example.")])
    old = flows_table([flow(time=T0 + timedelta(minutes=1), verdict="DROPPED")]).drop_columns(
        ["dns_query", "egress_denied_by"]
    )
    pq.write_table(old, tmp_path / "flows" / "date=2024-05-01" / "hour=10" / "part-old.parquet")
    with DuckDBEngine(tmp_path) as engine:
        assert [name for name, _ in describe(engine, "flows")] == FLOW_SCHEMA.names
        rows = engine.run("SELECT verdict, dns_query, egress_denied_by FROM flows ORDER BY time").to_pylist()
    assert rows == [
        {"verdict": "FORWARDED", "dns_query": "a.example.", "egress_denied_by": []},
        {"verdict": "DROPPED", "dns_query": None, "egress_denied_by": None},
    ]


def test_rows_without_a_time_are_read_from_the_null_partition(tmp_path: Path) -> None:
    write_dataset(tmp_path, [flow(time=None, verdict="DROPPED"), flow(time=T0, verdict="FORWARDED")])
    assert (tmp_path / "flows" / "date=__HIVE_DEFAULT_PARTITION__").is_dir()
    with DuckDBEngine(tmp_path) as engine:
        rows = engine.run("SELECT time, verdict FROM flows ORDER BY time NULLS LAST").to_pylist()
    assert rows == [{"time": T0, "verdict": "FORWARDED"}, {"time": None, "verdict": "DROPPED"}]


def test_part_file_removed_after_listing_is_survived(tmp_path: Path) -> None:
    write_dataset(tmp_path, [flow(time=T0, verdict="FORWARDED")], writer_id="a")
    write_dataset(tmp_path, [flow(time=T0 + timedelta(hours=1), verdict="DROPPED")] * 2, writer_id="b")
    with DuckDBEngine(tmp_path) as engine:
        assert count(engine) == 3
        Path(engine.flow_files[0]).unlink()  # compaction or retention removed it meanwhile
        assert count(engine) == 2 and len(engine.flow_files) == 1


def test_lost_events_view(tmp_path: Path) -> None:
    with DuckDBEngine(tmp_path) as engine:
        assert [name for name, _ in describe(engine, "lost_events")] == LOST_EVENTS_SCHEMA.names
        assert count(engine, "SELECT count(*) FROM lost_events") == 0
    lost = LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=7, node_name="kind/node-1", time=T0)
    write_dataset(tmp_path, [flow(time=T0, verdict="FORWARDED")], lost_events=[lost])
    with DuckDBEngine(tmp_path) as engine:
        rows = engine.run(
            "SELECT source, num_events_lost, node_name, cluster_name FROM lost_events"
        ).to_pylist()
    assert rows == [
        {
            "source": "HUBBLE_RING_BUFFER",
            "num_events_lost": 7,
            "node_name": "kind/node-1",
            "cluster_name": "kind",
        }
    ]


# -- empty and missing datasets -------------------------------------------------------------------------------


def test_missing_dataset_is_refused_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(EmptyDatasetError) as info:
        open_engine(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert "ingest or collect first" in str(info.value)


def test_a_file_given_as_the_dataset_is_named_as_a_file(tmp_path: Path) -> None:
    flows_file = tmp_path / "flows.json"
    flows_file.write_text("{}\n")
    with pytest.raises(EmptyDatasetError) as info:
        open_engine(flows_file)
    assert f"dataset {flows_file} is a file, not a dataset folder" in str(info.value)


def test_dataset_without_flows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "flows" / "date=2024-05-01" / "hour=10").mkdir(parents=True)
    (tmp_path / "flows" / "date=2024-05-01" / "hour=10" / ".part-1.parquet.tmp").write_bytes(b"")
    with pytest.raises(EmptyDatasetError, match="holds no flows yet .*ingest or collect first") as info:
        open_engine(tmp_path)
    assert str(tmp_path / "flows") in str(info.value)


def test_empty_dataset_gives_empty_views_when_allowed(tmp_path: Path) -> None:
    with open_engine(tmp_path / "nowhere", require_flows=False) as engine:
        assert not engine.has_flows
        result = engine.run("SELECT * FROM flows")
        assert result.num_rows == 0 and result.column_names == FLOW_SCHEMA.names
        assert count(engine, "SELECT count(*) FROM lost_events") == 0


def test_refresh_sees_new_part_files(tmp_path: Path) -> None:
    with open_engine(tmp_path, require_flows=False) as engine:
        write_dataset(tmp_path, [flow(time=T0, verdict="FORWARDED")] * 3)
        assert count(engine) == 0  # the file list is taken when the engine starts
        engine.refresh()
        assert count(engine) == 3 and engine.has_flows


def test_a_file_replaced_under_its_name_is_read_afresh(dataset: Path) -> None:
    # The engine caches Parquet footers; a file published again under the same name (a rebuilt rollup, a
    # repaired part) must be read as it is now, not as its cached footer says.
    part = min((dataset / "flows").rglob("*.parquet"))
    with DuckDBEngine(dataset) as engine:
        before = count(engine)
        rows = pq.read_table(part)
        staged = part.with_name("staged.tmp")
        pq.write_table(pa.concat_tables([rows, rows]), staged)
        staged.replace(part)
        assert count(engine) == before + rows.num_rows


# -- parameters and errors ----------------------------------------------------------------------------------


def test_parameters_are_bound(dataset: Path) -> None:
    with DuckDBEngine(dataset) as engine:
        total = count(engine, "SELECT count(*) FROM flows WHERE source_namespace = 'shop'")
        sql = "SELECT count(*) AS n FROM flows WHERE source_namespace = $ns AND time >= $since"
        assert (
            engine.run(sql, {"ns": "shop", "since": T0 - timedelta(days=1)}).column("n")[0].as_py()
            == total
            > 0
        )
        assert engine.run(sql, {"ns": "shop' OR 1=1 --", "since": T0}).column("n")[0].as_py() == 0


def test_duckdb_errors_become_query_errors(dataset: Path) -> None:
    with DuckDBEngine(dataset) as engine:
        with pytest.raises(QueryError) as info:
            engine.run("SELECT no_such_column FROM flows", question="broken")
        assert info.value.question == "broken" and info.value.sql == "SELECT no_such_column FROM flows"
        assert "question broken failed" in str(info.value) and "no_such_column" in str(info.value)
        assert isinstance(info.value.__cause__, duckdb.Error)
        with pytest.raises(QueryError, match="SQL failed"):
            engine.run("SELECT $missing")


def test_statements_other_than_select_run_once(tmp_path: Path) -> None:
    with DuckDBEngine(tmp_path) as engine:
        assert isinstance(engine.run("CREATE TABLE t AS SELECT 1 AS x"), pa.Table)
        assert engine.run("SELECT x FROM t").to_pylist() == [{"x": 1}]


def test_setup_hook_adds_views_after_flows(dataset: Path) -> None:
    def setup(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("CREATE VIEW drops AS SELECT * FROM flows WHERE verdict = 'DROPPED'")

    with DuckDBEngine(dataset, setup=setup) as engine:
        drops = count(engine, "SELECT count(*) FROM drops")
        assert drops == count(engine, "SELECT count(*) FROM flows WHERE verdict = 'DROPPED'") > 0


# -- any pyarrow filesystem -----------------------------------------------------------------------------------


def test_other_filesystems_go_through_a_pyarrow_dataset(dataset: Path) -> None:
    # A SubTreeFileSystem is not a LocalFileSystem, so the engine takes the path an object store would take.
    fs = pafs.SubTreeFileSystem(str(dataset.parent), pafs.LocalFileSystem())
    remote = Dataset(dataset.name, filesystem=fs)
    assert not remote.is_local
    query = "SELECT verdict, source_namespace, count(*) AS n FROM flows GROUP BY ALL ORDER BY ALL"
    with DuckDBEngine(remote) as engine, DuckDBEngine(dataset) as local:
        assert describe(engine, "flows") == describe(local, "flows")
        assert engine.run(query).to_pylist() == local.run(query).to_pylist()
        assert count(engine) == count(local) > 0


def test_table_columns_describe_both_tables() -> None:
    flows = table_columns("flows")
    assert [name for name, _, _ in flows] == FLOW_SCHEMA.names
    assert {n: t for n, t, _ in flows}["time"].startswith("TIMESTAMP")
    assert {n: a for n, _, a in flows}["source_labels"] == str(pa.list_(pa.string()))
    assert [name for name, _, _ in table_columns("lost_events")] == LOST_EVENTS_SCHEMA.names
    with pytest.raises(QueryError, match="unknown table"):
        table_columns("nope")

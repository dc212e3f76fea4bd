"""`flowpipe query`, `flowpipe sql` and `flowpipe schema` end to end: output shapes and error messages."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from support.flowdata import synthetic_flows, write_dataset

from flowpipe.cli import cli
from flowpipe.dataset.layout import Dataset
from flowpipe.model import FLOW_SCHEMA

WINDOW = ["--since", "2024-01-01", "--until", "2025-01-01"]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return synthetic_flows(200)


@pytest.fixture(scope="module")
def dataset(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cli") / "data"
    write_dataset(root, rows)
    return str(root)


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def ok(*args: str, **kwargs: Any) -> Result:
    result = invoke(*args, **kwargs)
    assert result.exit_code == 0, result.output
    return result


# -- query --list ---------------------------------------------------------------------------------------------


def test_list_as_json_is_an_array_of_questions() -> None:
    questions = json.loads(ok("query", "--list", "--format", "json").stdout)
    assert isinstance(questions, list)
    by_name = {q["name"]: q for q in questions}
    assert {"drops_by_reason", "top_talkers", "dns_queries"} <= set(by_name)
    assert all(set(q) == {"name", "description", "parameters"} and q["description"] for q in questions)
    limit = next(p for p in by_name["top_talkers"]["parameters"] if p["name"] == "limit")
    assert limit == {"name": "limit", "type": "int", "default": "20", "required": False}
    namespace = next(p for p in by_name["top_talkers"]["parameters"] if p["name"] == "namespace")
    assert namespace["default"] is None and namespace["required"] is False


def test_list_as_table_names_every_question() -> None:
    out = ok("query", "--list").stdout
    for name in ("drops_by_reason", "top_talkers", "dns_queries"):
        assert name in out
    assert "since=1h" in out


# -- query NAME -----------------------------------------------------------------------------------------------


def test_query_json_is_one_array_of_objects(dataset: str, rows: list[dict[str, Any]]) -> None:
    out = ok(
        "query", "drops_by_reason", "--dataset", dataset, *WINDOW, "-p", "limit=1000", "--format", "json"
    )
    records = json.loads(out.stdout)
    assert isinstance(records, list) and records
    assert set(records[0]) == {
        "drop_reason_desc",
        "reason_class",
        "source_namespace",
        "destination_namespace",
        "flows",
        "source_pods",
        "destination_pods",
        "first_seen",
        "last_seen",
        "cluster_name",
    }
    assert sum(r["flows"] for r in records) == sum(r["verdict"] == "DROPPED" for r in rows)
    assert all(r["first_seen"].endswith("Z") and "T" in r["first_seen"] for r in records)


def test_query_csv_has_a_header_row(dataset: str) -> None:
    out = ok("query", "dns_queries", "--dataset", dataset, *WINDOW, "--format", "csv").stdout
    table = list(csv.reader(io.StringIO(out)))
    assert table[0][:3] == ["source_namespace", "source_workload", "query"]
    records = list(csv.DictReader(io.StringIO(out)))
    assert records and all(json.loads(r["qtypes"]) for r in records)  # lists are JSON in a CSV field


def test_query_table_shows_the_question_and_row_count(dataset: str) -> None:
    out = ok("query", "top_talkers", "--dataset", dataset, *WINDOW, "-p", "limit=3").stdout
    # (headers may wrap in a narrow table: look for the ones too short to wrap)
    assert "top_talkers" in out and "3 rows" in out and "flows" in out and "dropped" in out


def test_namespace_shortcut_sets_the_parameter(dataset: str) -> None:
    out = ok(
        "query", "top_talkers", "--dataset", dataset, *WINDOW, "--namespace", "billing", "--format", "json"
    )
    records = json.loads(out.stdout)
    assert records and all("billing" in (r["source_namespace"], r["destination_namespace"]) for r in records)


def test_sql_in_a_parameter_returns_no_extra_rows(dataset: str) -> None:
    out = ok(
        "query",
        "top_talkers",
        "--dataset",
        dataset,
        *WINDOW,
        "--namespace",
        "x' OR 1=1 --",
        "--format",
        "json",
    )
    assert json.loads(out.stdout) == []


def test_old_dataset_is_anchored_at_its_newest_flow(dataset: str) -> None:
    result = ok("query", "top_talkers", "--dataset", dataset, "--since", "1h", "--format", "json")
    assert json.loads(result.stdout)  # the capture is from 2024: relative to the clock it would be empty
    assert "newest record" in result.stderr
    clock = ok(
        "query",
        "top_talkers",
        "--dataset",
        dataset,
        "--since",
        "1h",
        "--relative-to",
        "now",
        "--format",
        "json",
    )
    assert json.loads(clock.stdout) == [] and clock.stderr == ""


def test_now_option_sets_the_clock(dataset: str) -> None:
    out = ok(
        "query",
        "top_talkers",
        "--dataset",
        dataset,
        "--since",
        "30m",
        "--relative-to",
        "now",
        "--now",
        "2024-05-01T10:30:00Z",
        "--format",
        "json",
    ).stdout
    records = json.loads(out)
    assert records
    assert all(
        "2024-05-01T10:00:00" <= r["first_seen"] and r["last_seen"] <= "2024-05-01T10:30:00Z" for r in records
    )


def test_dataset_from_the_environment(dataset: str) -> None:
    out = ok("query", "top_talkers", *WINDOW, "--format", "json", env={"FLOWPIPE_DATASET": dataset}).stdout
    assert json.loads(out)


# -- query errors ---------------------------------------------------------------------------------------------


def test_unknown_question_suggests_close_matches(dataset: str) -> None:
    result = invoke("query", "top_talker", "--dataset", dataset)
    assert result.exit_code == 1
    assert "unknown question 'top_talker'" in result.stderr and "top_talkers" in result.stderr


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke("query", "top_talkers", "--dataset", str(tmp_path / "nothing"))
    assert result.exit_code == 1
    assert str(tmp_path / "nothing") in result.stderr and "ingest or collect first" in result.stderr


def test_unknown_parameter_is_an_error(dataset: str) -> None:
    result = invoke("query", "top_talkers", "--dataset", dataset, "-p", "limt=3")
    assert result.exit_code == 1 and "no parameter limt" in result.stderr


def test_malformed_parameter_option_is_a_usage_error(dataset: str) -> None:
    result = invoke("query", "top_talkers", "--dataset", dataset, "-p", "limit")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr


def test_a_configuration_error_shows_the_usage_of_its_command(tmp_path: Path) -> None:
    result = invoke("query", "top_talkers", "--sql-dir", str(tmp_path / "missing"))
    assert result.exit_code == 2
    assert "Usage: cli query [OPTIONS] [NAME]" in result.stderr
    assert "Try 'cli query --help' for help." in result.stderr
    assert f"question directory {tmp_path / 'missing'} does not exist" in result.stderr


def test_bad_time_is_an_error(dataset: str) -> None:
    result = invoke("query", "top_talkers", "--dataset", dataset, "--since", "yesterday")
    assert result.exit_code == 1 and "since: 'yesterday' is not a time" in result.stderr


@pytest.mark.parametrize("since", ["0001-01-01", "100000000d"])
def test_a_window_from_the_distant_past_covers_every_flow(dataset: str, since: str) -> None:
    args = ("--dataset", dataset, "--format", "json", "--until", "9999-12-31", "--relative-to", "now")
    everything = json.loads(ok("sql", "SELECT count(*) AS n FROM flows", *args[:4]).stdout)[0]["n"]
    rows = json.loads(ok("query", "top_talkers", "-p", "limit=1000", "--since", since, *args).stdout)
    assert sum(r["flows"] for r in rows) > 0 and len(rows) < 1000
    assert everything >= sum(r["flows"] for r in rows)


def test_sql_dir_questions_and_their_parameter_checks(dataset: str, tmp_path: Path) -> None:
    (tmp_path / "by_pod.sql").write_text(
        "-- description: Flows of one source pod.\n-- params: pod\n"
        "SELECT count(*) AS flows FROM flows WHERE source_pod_name = $pod\n"
    )
    missing = invoke("query", "by_pod", "--sql-dir", str(tmp_path), "--dataset", dataset)
    assert missing.exit_code == 1 and "needs parameter pod" in missing.stderr
    shortcut = invoke(
        "query", "by_pod", "--sql-dir", str(tmp_path), "--dataset", dataset, "-p", "pod=x", "--since", "1h"
    )
    assert shortcut.exit_code == 1 and "has no parameter since" in shortcut.stderr
    out = ok(
        "query",
        "by_pod",
        "--sql-dir",
        str(tmp_path),
        "--dataset",
        dataset,
        "-p",
        "pod=worker-0",
        "--format",
        "json",
    )
    assert json.loads(out.stdout)[0]["flows"] > 0
    listed = json.loads(ok("query", "--list", "--sql-dir", str(tmp_path), "--format", "json").stdout)
    assert listed == [
        {
            "name": "by_pod",
            "description": "Flows of one source pod.",
            "parameters": [{"name": "pod", "type": "str", "default": None, "required": True}],
        }
    ]


def test_broken_question_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.sql").write_text("-- description: x\n-- params: limit=5\nSELECT 1\n")
    result = invoke("query", "--list", "--sql-dir", str(tmp_path))
    assert result.exit_code == 1 and "broken.sql:2" in result.stderr and "limit" in result.stderr


# -- sql ------------------------------------------------------------------------------------------------------


def test_sql_json_is_one_array_keyed_by_column(dataset: str, rows: list[dict[str, Any]]) -> None:
    out = ok(
        "sql",
        "SELECT verdict, count(*) AS flows FROM flows GROUP BY verdict ORDER BY verdict",
        "--dataset",
        dataset,
        "--format",
        "json",
    ).stdout
    records = json.loads(out)
    expected = {v: sum(r["verdict"] == v for r in rows) for v in {r["verdict"] for r in rows}}
    assert records == [{"verdict": v, "flows": n} for v, n in sorted(expected.items())]


def test_sql_json_handles_awkward_values(dataset: str) -> None:
    sql = (
        "SELECT TIMESTAMPTZ '2024-05-01 10:00:00.5+00' AS t, ['a', NULL] AS l, 'nan'::DOUBLE AS nan, "
        "NULL::INTEGER AS nothing, 12345678901234567890123::HUGEINT AS big, sum(9007199254740993) AS total, "
        "1.25::DECIMAL(10, 2) AS money, {'k': 1} AS s"
    )
    (record,) = json.loads(ok("sql", sql, "--dataset", dataset, "--format", "json").stdout)
    assert record == {
        "t": "2024-05-01T10:00:00.500000Z",
        "l": ["a", None],
        "nan": None,
        "nothing": None,
        "big": 12345678901234567890123,
        "total": 9007199254740993,
        "money": 1.25,
        "s": {"k": 1},
    }


def test_maps_are_json_objects_in_every_format(dataset: str) -> None:
    # histogram() gives a MAP, the usual way to count values in one row
    sql = "SELECT histogram(verdict) AS h, MAP {1: 'x'} AS m, [MAP {'a': 2}] AS l FROM flows"
    (record,) = json.loads(ok("sql", sql, "--dataset", dataset, "--format", "json").stdout)
    counts_sql = "SELECT verdict, count(*) AS n FROM flows GROUP BY verdict"
    counts = ok("sql", counts_sql, "--dataset", dataset, "--format", "json")
    expected = {r["verdict"]: r["n"] for r in json.loads(counts.stdout)}
    assert len(expected) >= 2
    assert record == {"h": expected, "m": {"1": "x"}, "l": [{"a": 2}]}
    csv_out = ok("sql", sql, "--dataset", dataset, "--format", "csv").stdout
    (csv_row,) = list(csv.DictReader(io.StringIO(csv_out)))
    assert json.loads(csv_row["h"]) == expected and csv_row["m"] == '{"1":"x"}'
    assert '{"1": "x"}' in ok("sql", sql, "--dataset", dataset).stdout


def test_sql_select_star_has_the_flow_columns(dataset: str) -> None:
    out = ok("sql", "SELECT * FROM flows LIMIT 2", "--dataset", dataset, "--format", "json").stdout
    records = json.loads(out)
    assert len(records) == 2 and list(records[0]) == FLOW_SCHEMA.names
    header = next(
        csv.reader(
            io.StringIO(
                ok("sql", "SELECT * FROM flows LIMIT 2", "--dataset", dataset, "--format", "csv").stdout
            )
        )
    )
    assert header == FLOW_SCHEMA.names


def test_sql_csv_and_table(dataset: str) -> None:
    sql = "SELECT 'a,b' AS text, NULL AS nothing, true AS yes"
    assert ok("sql", sql, "--dataset", dataset, "--format", "csv").stdout == 'text,nothing,yes\n"a,b",,true\n'
    table = ok("sql", sql, "--dataset", dataset).stdout
    assert "a,b" in table and "1 row" in table


def test_a_result_too_wide_for_the_terminal_is_shown_record_by_record(dataset: str) -> None:
    # Every value whole (rich would squeeze the text columns of a wide table to nothing), one line a column.
    sql = (
        "SELECT 'regression' AS why, 'production' AS source_namespace, 'api' AS source_workload, "
        "'redis' AS destination_workload, 6379 AS destination_port, "
        "TIMESTAMPTZ '2024-05-01 10:06:00Z' AS first_seen, TIMESTAMPTZ '2024-05-01 10:09:59Z' AS last_seen "
        "FROM range(2)"
    )
    narrow = ok("sql", sql, "--dataset", dataset, env={"COLUMNS": "80"}).stdout
    lines = narrow.splitlines()
    assert [line for line in lines if "row " in line and "[" in line] == [
        "-[ row 1 ]" + "-" * 20,
        "-[ row 2 ]" + "-" * 20,
    ]
    for name, value in [("why", "regression"), ("source_namespace", "production"), ("destination_port", "6379"),
                        ("first_seen", "2024-05-01 10:06:00Z")]:  # fmt: skip
        assert sum(line.split() == [name, *value.split()] for line in lines) == 2, (name, narrow)
    assert lines[-1] == "2 rows"
    # where it fits, the same result is a table: one header line naming every column
    wide = ok("sql", sql, "--dataset", dataset, env={"COLUMNS": "200"}).stdout
    assert "row 1 ]" not in wide and "2 rows" in wide
    assert any(
        all(name in line for name in ("why", "source_namespace", "last_seen")) for line in wide.splitlines()
    )


def test_sql_parameters_and_stdin(dataset: str) -> None:
    sql = "SELECT count(*) AS n FROM flows WHERE source_namespace = $ns"
    shop = json.loads(ok("sql", sql, "-p", "ns=shop", "--dataset", dataset, "--format", "json").stdout)[0][
        "n"
    ]
    assert shop > 0
    evil = json.loads(
        ok("sql", sql, "-p", "ns=shop' OR 1=1 --", "--dataset", dataset, "--format", "json").stdout
    )
    assert evil == [{"n": 0}]
    piped = json.loads(
        ok("sql", "-", "-p", "ns=shop", "--dataset", dataset, "--format", "json", input=sql).stdout
    )
    assert piped == [{"n": shop}]
    missing = invoke("sql", sql, "--dataset", dataset)
    assert missing.exit_code == 1 and "no value for $ns" in missing.stderr


def test_sql_error_is_reported_without_a_traceback(dataset: str) -> None:
    result = invoke("sql", "SELECT nope FROM flows", "--dataset", dataset)
    assert result.exit_code == 1 and "SQL failed" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(("statement", "stdin"), [("", None), ("  ;\n", None), ("-", " \n")])
def test_an_empty_statement_is_a_usage_error(dataset: str, statement: str, stdin: str | None) -> None:
    result = invoke("sql", statement, "--dataset", dataset, input=stdin)
    assert result.exit_code == 2 and "no SQL statement given" in result.stderr


# -- schema ---------------------------------------------------------------------------------------------------


def test_schema_json_lists_the_flow_columns() -> None:
    columns = json.loads(ok("schema", "--format", "json").stdout)
    assert [c["column"] for c in columns] == FLOW_SCHEMA.names
    types = {c["column"]: c["type"] for c in columns}
    assert types["source_labels"] == "VARCHAR[]" and types["destination_port"] == "INTEGER"
    assert {c["column"]: c["arrow_type"] for c in columns}["time"] == "timestamp[ns, tz=UTC]"


def test_schema_table_and_lost_events() -> None:
    out = ok("schema").stdout
    assert "drop_reason_desc" in out and "schema version" in out
    lost = json.loads(ok("schema", "--table", "lost_events", "--format", "json").stdout)
    assert "num_events_lost" in [c["column"] for c in lost]


# -- what SQL may touch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM read_csv('{secret}')",
        "COPY (SELECT 1 AS n) TO '{written}'",
        "ATTACH '{written}' AS other",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SELECT * FROM glob('{outside}/*')",
    ],
)
def test_sql_reads_the_dataset_and_nothing_else(
    dataset: str, rows: list[dict[str, Any]], tmp_path: Path, statement: str
) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    written = tmp_path / "written.db"
    text = statement.format(secret=secret, written=written, outside=tmp_path)
    result = invoke("sql", text, "--dataset", dataset)
    assert result.exit_code != 0
    assert "hunter2" not in result.output and "Traceback" not in result.output
    assert not written.exists()
    # the views still read the dataset in the same locked session
    counted = ok("sql", "SELECT count(*) AS n FROM flows", "--dataset", dataset, "--format", "csv").stdout
    assert counted == f"n\n{len(rows)}\n"


def test_allow_external_access_lifts_the_lock(
    dataset: str, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    written = tmp_path / "out.csv"
    refused = invoke("sql", f"COPY (SELECT count(*) AS n FROM flows) TO '{written}'", "--dataset", dataset)
    assert refused.exit_code == 1 and "COPY statements may not run" in refused.output and not written.exists()
    result = ok(
        "sql",
        f"COPY (SELECT count(*) AS n FROM flows) TO '{written}'",
        "--dataset",
        dataset,
        "--allow-external-access",
    )
    assert written.read_text().split() == ["n", str(len(rows))], result.output


def test_sql_cannot_overwrite_the_datasets_own_part_files(tmp_path: Path) -> None:
    # the part files are the paths DuckDB may open; a COPY onto one is refused before it runs
    root = tmp_path / "data"
    write_dataset(root, synthetic_flows(20))
    part = Dataset(root).list_part_files("flows")[0]
    before = Path(part).read_bytes()
    for options in ("(FORMAT csv, USE_TMP_FILE false)", "(FORMAT parquet, USE_TMP_FILE false)"):
        result = invoke(
            "sql", f"SELECT 1; COPY (SELECT 1 AS x) TO '{part}' {options}", "--dataset", str(root)
        )
        assert result.exit_code == 1 and "COPY statements may not run" in result.output, result.output
    assert Path(part).read_bytes() == before


def test_terminal_escapes_in_flow_text_are_shown_escaped(tmp_path: Path) -> None:
    hostile = synthetic_flows(3)
    for row in hostile:
        row["source_namespace"] = "shop\x1b[2J\x1b]0;owned\x07\nfake row"
    root = tmp_path / "data"
    write_dataset(root, hostile)
    for env in ({"COLUMNS": "200"}, {"COLUMNS": "30"}):  # a table, then record by record
        out = ok(
            "sql",
            'SELECT source_namespace AS "ns\x1b[1m" FROM flows LIMIT 1',
            "--dataset",
            str(root),
            env=env,
        ).stdout
        assert "\x1b" not in out and "\x07" not in out
        assert "\\x1b[2J" in out and "\\nfake row" in out and "1 row" in out
    json_out = ok(
        "sql", "SELECT source_namespace FROM flows LIMIT 1", "--dataset", str(root), "--format", "json"
    )
    assert json.loads(json_out.stdout)[0]["source_namespace"] == hostile[0]["source_namespace"]

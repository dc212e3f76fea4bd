"""Every shipped question runs on a real dataset and returns the rows computed independently here in Python."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlglot
from support.flowdata import T0, flow, flows_table, synthetic_flows, write_dataset

from flowpipe.config import ParquetSinkConfig
from flowpipe.drop_reasons import DROP_REASONS
from flowpipe.model import FLOW_SCHEMA
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.query.catalog import Catalog, Question
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import read_events

Row = dict[str, Any]
ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01", "limit": "1000"}
REASON_NAMES = {reason.value: name for name, reason in DROP_REASONS.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return synthetic_flows(400)


@pytest.fixture(scope="module")
def engine(rows: list[Row], tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    root = tmp_path_factory.mktemp("dataset")
    write_dataset(root, rows, batch_rows=150)
    with DuckDBEngine(root) as engine:
        yield engine


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_questions()


def ask(engine: DuckDBEngine, question: Question, **values: str) -> list[Row]:
    return run_question(engine, question, {**ALL_TIME, **values}).table.to_pylist()


def in_window(rows: list[Row], since: datetime | None = None, until: datetime | None = None) -> list[Row]:
    return [
        r for r in rows if (since is None or r["time"] >= since) and (until is None or r["time"] <= until)
    ]


def endpoint(row: Row, side: str, *, use_names: bool = True) -> str | None:
    names = row[f"{side}_names"] if use_names else []
    return (
        row[f"{side}_workload_name"]
        or row[f"{side}_pod_name"]
        or (names[0] if names else None)
        or row[f"{side}_ip"]
    )


def group(rows: list[Row], key: Callable[[Row], tuple[Any, ...]]) -> dict[tuple[Any, ...], list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def by_key(result: list[Row], *columns: str) -> dict[tuple[Any, ...], Row]:
    keyed = {tuple(r[c] for c in columns): r for r in result}
    assert len(keyed) == len(result), "result has duplicate groups"
    return keyed


# -- the catalog as a whole ---------------------------------------------------------------------------------


OURS = ("drops_by_reason", "top_talkers", "dns_queries")


def window_values(question: Question) -> dict[str, str]:
    """The all-time window (and a large limit) for whichever of those parameters the question declares."""
    return {k: v for k, v in ALL_TIME.items() if question.parameter(k) is not None}


def test_shipped_questions_are_present_and_described(catalog: Catalog) -> None:
    assert set(OURS) <= set(catalog.names)
    for question in catalog:
        assert len(question.description) > 20, question.name
    for name in OURS:
        question = catalog.question(name)
        for parameter in ("since", "until", "namespace", "limit"):
            assert question.parameter(parameter) is not None, (name, parameter)


def test_every_question_runs_on_the_dataset(engine: DuckDBEngine, catalog: Catalog) -> None:
    for question in catalog:
        result = run_question(engine, question, window_values(question))
        assert result.table.num_columns > 0, question.name
        if question.name in OURS:
            assert result.table.num_rows > 0, f"{question.name} found nothing in the fixture dataset"


def test_every_question_runs_on_an_empty_dataset(tmp_path: Path, catalog: Catalog) -> None:
    with DuckDBEngine(tmp_path / "empty") as empty:
        for question in catalog:
            result = run_question(empty, question, window_values(question))
            assert result.table.num_columns > 0, question.name
            if question.name in OURS:
                assert result.table.num_rows == 0


def test_every_question_transpiles_to_spark(catalog: Catalog) -> None:
    for question in catalog:
        spark = sqlglot.transpile(
            question.sql, read="duckdb", write="spark", unsupported_level=sqlglot.ErrorLevel.RAISE
        )
        assert len(spark) == 1, question.name
        assert ":since" in spark[0] or question.parameter("since") is None, question.name


# -- drops_by_reason ----------------------------------------------------------------------------------------


def expected_drops(rows: list[Row], namespace: str | None = None) -> dict[tuple[Any, ...], Row]:
    dropped = [r for r in rows if r["verdict"] == "DROPPED"]
    if namespace is not None:
        dropped = [r for r in dropped if namespace in (r["source_namespace"], r["destination_namespace"])]

    def reason(r: Row) -> str:
        if r["drop_reason_desc"]:
            return str(r["drop_reason_desc"])
        number = r["drop_reason"] or (r["event_sub_type"] if r["event_type"] == 1 else None)
        if number:
            return REASON_NAMES.get(number, str(number))
        return "DROP_REASON_UNKNOWN"

    expected = {}
    for key, members in group(
        dropped, lambda r: (reason(r), r["source_namespace"], r["destination_namespace"])
    ).items():
        expected[key] = {
            "reason_class": DROP_REASONS[key[0]].reason_class if key[0] in DROP_REASONS else "unknown",
            "flows": len(members),
            "source_pods": len({m["source_pod_name"] for m in members} - {None}),
            "destination_pods": len({m["destination_pod_name"] for m in members} - {None}),
            "first_seen": min(m["time"] for m in members),
            "last_seen": max(m["time"] for m in members),
        }
    return expected


def test_drops_by_reason_counts_every_drop(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    result = ask(engine, catalog.question("drops_by_reason"))
    got = by_key(result, "drop_reason_desc", "source_namespace", "destination_namespace")
    expected = expected_drops(rows)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert {k: got[key][k] for k in values} == values, key
    reasons = {key[0]: row["reason_class"] for key, row in got.items()}
    # named by the flow, by the number alone (181), by a drop event's sub-type alone (133), by nothing
    assert {"POLICY_DENIED", "CT_MAP_INSERTION_FAILED", "POLICY_DENY", "250", "DROP_REASON_UNKNOWN"} <= set(
        reasons
    )
    assert reasons["POLICY_DENIED"] == "policy" and reasons["250"] == "unknown"
    assert [r["flows"] for r in result] == sorted((r["flows"] for r in result), reverse=True)


def test_drops_by_reason_namespace_and_limit(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    question = catalog.question("drops_by_reason")
    got = by_key(
        ask(engine, question, namespace="billing"),
        "drop_reason_desc",
        "source_namespace",
        "destination_namespace",
    )
    assert set(got) == set(expected_drops(rows, "billing"))
    top = ask(engine, question, limit="2")
    assert len(top) == 2
    assert top[0]["flows"] == max(v["flows"] for v in expected_drops(rows).values())


def test_drops_by_reason_window(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    since, until = T0 + timedelta(minutes=30), T0 + timedelta(minutes=50)
    result = ask(
        engine, catalog.question("drops_by_reason"), since=since.isoformat(), until=until.isoformat()
    )
    expected = expected_drops(in_window(rows, since, until))
    assert sum(r["flows"] for r in result) == sum(v["flows"] for v in expected.values()) > 0
    assert all(since <= r["first_seen"] and r["last_seen"] <= until for r in result)


# -- top_talkers --------------------------------------------------------------------------------------------


def expected_talkers(rows: list[Row]) -> dict[tuple[Any, ...], Row]:
    # Requests: neither replies nor L7 responses. Endpoints are named as every question names them; these
    # synthetic flows carry no identity or labels and no pod name with a controller suffix, so that is the
    # workload, else the pod, else the address (a DNS name attached to an address does not name it).
    requests = [r for r in rows if r["is_reply"] is not True and r["l7_type"] != "RESPONSE"]
    key = lambda r: (
        r["source_namespace"],
        endpoint(r, "source", use_names=False),
        r["destination_namespace"],
        endpoint(r, "destination", use_names=False),
    )
    return {
        k: {
            "flows": len(m),
            "forwarded": sum(r["verdict"] == "FORWARDED" for r in m),
            "dropped": sum(r["verdict"] == "DROPPED" for r in m),
            "destination_ports": len({r["destination_port"] for r in m} - {None}),
            "first_seen": min(r["time"] for r in m),
            "last_seen": max(r["time"] for r in m),
        }
        for k, m in group(requests, key).items()
    }


def test_top_talkers_match_the_flows(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    result = ask(engine, catalog.question("top_talkers"))
    got = by_key(
        result, "source_namespace", "source_workload", "destination_namespace", "destination_workload"
    )
    expected = expected_talkers(rows)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert {k: got[key][k] for k in values} == values, key
    # a pod without a workload by its pod name; an endpoint without identity or pod (host, world) by its IP
    assert any(key[1] == "legacy-pod" for key in got)
    assert any(key[0] is None and key[1] == "192.168.1.1" for key in got)
    assert any(key[3].startswith("203.0.113.") for key in got)
    assert not any(key[3] == "api.example.com" for key in got)


def test_top_talkers_limit_keeps_the_busiest(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    result = ask(engine, catalog.question("top_talkers"), limit="3")
    counts = sorted((v["flows"] for v in expected_talkers(rows).values()), reverse=True)
    assert [r["flows"] for r in result] == counts[:3]


def test_top_talkers_namespace_matches_either_side(engine: DuckDBEngine, catalog: Catalog) -> None:
    result = ask(engine, catalog.question("top_talkers"), namespace="billing")
    assert result
    assert all("billing" in (r["source_namespace"], r["destination_namespace"]) for r in result)


# -- dns_queries --------------------------------------------------------------------------------------------


def expected_dns(
    rows: list[Row], pattern: Callable[[str], bool] = lambda _: True
) -> dict[tuple[Any, ...], Row]:
    dns = [r for r in rows if r["l7_protocol"] == "dns" and r["dns_query"] and pattern(r["dns_query"])]

    def client(r: Row) -> tuple[Any, ...]:
        side = "destination" if r["l7_type"] == "RESPONSE" else "source"
        return (r[f"{side}_namespace"], endpoint(r, side, use_names=False), r["dns_query"])

    expected = {}
    for key, m in group(dns, client).items():
        responses = [r for r in m if r["l7_type"] == "RESPONSE"]
        expected[key] = {
            "lookups": sum(r["l7_type"] == "REQUEST" for r in m),
            "responses": len(responses),
            "failures": sum(r["dns_rcode"] != 0 for r in responses),
            "rcodes": sorted({RCODES[r["dns_rcode"]] for r in responses}),
            "qtypes": sorted({q for r in m for q in r["dns_qtypes"]}),
            "answers": sorted({ip for r in m for ip in r["dns_ips"]}),
            "first_seen": min(r["time"] for r in m),
            "last_seen": max(r["time"] for r in m),
        }
    return expected


def test_dns_queries_match_the_flows(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    result = ask(engine, catalog.question("dns_queries"))
    got = by_key(result, "source_namespace", "source_workload", "query")
    expected = expected_dns(rows)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert {k: got[key][k] for k in values} == values, key
    # the client is the asking pod on both the request and the answer, never the DNS server
    assert all(key[0] != "kube-system" for key in got)
    assert any("NXDOMAIN" in r["rcodes"] and r["failures"] == r["responses"] for r in result)


def test_dns_queries_pattern_and_namespace(engine: DuckDBEngine, catalog: Catalog, rows: list[Row]) -> None:
    question = catalog.question("dns_queries")
    result = ask(engine, question, query="%.EXAMPLE.com.")
    assert set(by_key(result, "source_namespace", "source_workload", "query")) == set(
        expected_dns(rows, lambda q: q.endswith(".example.com."))
    )
    shop = ask(engine, question, namespace="shop")
    assert shop and all(r["source_namespace"] == "shop" for r in shop)


# -- parameters are values, never SQL -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parameter"),
    [("drops_by_reason", "namespace"), ("top_talkers", "namespace"), ("dns_queries", "query")],
)
def test_sql_in_a_parameter_is_a_plain_value(
    engine: DuckDBEngine, catalog: Catalog, name: str, parameter: str
) -> None:
    question = catalog.question(name)
    assert ask(engine, question)  # the question has rows without the filter
    for value in ("x' OR 1=1 --", "' OR ''='", "shop'; DROP VIEW flows; --"):
        assert ask(engine, question, **{parameter: value}) == []
    assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() > 0


# -- relative times and the anchor --------------------------------------------------------------------------


def test_relative_window_counts_back_from_the_newest_flow_of_an_old_dataset(
    engine: DuckDBEngine, catalog: Catalog, rows: list[Row]
) -> None:
    question = catalog.question("drops_by_reason")
    newest = max(r["time"] for r in rows)
    clock = datetime(2030, 1, 1, tzinfo=newest.tzinfo)

    auto = run_question(engine, question, {"since": "30m", "limit": "1000"}, now=clock)
    assert auto.anchored_to == "data" and auto.anchor == newest
    expected = expected_drops(in_window(rows, newest - timedelta(minutes=30), newest))
    assert sum(r["flows"] for r in auto.table.to_pylist()) == sum(v["flows"] for v in expected.values()) > 0

    clock_based = run_question(engine, question, {"since": "30m"}, relative_to="now", now=clock)
    assert clock_based.anchored_to == "now" and clock_based.table.num_rows == 0


def test_relative_window_uses_the_clock_for_a_live_dataset(
    engine: DuckDBEngine, catalog: Catalog, rows: list[Row]
) -> None:
    newest = max(r["time"] for r in rows)
    clock = newest + timedelta(minutes=5)
    result = run_question(
        engine, catalog.question("top_talkers"), {"since": "1h", "limit": "1000"}, now=clock
    )
    assert result.anchored_to == "now" and result.anchor == clock
    assert result.params["since"] == clock - timedelta(hours=1)
    expected = expected_talkers(in_window(rows, clock - timedelta(hours=1), clock))
    assert sum(r["flows"] for r in result.table.to_pylist()) == sum(v["flows"] for v in expected.values())


def test_newest_flow_with_nanoseconds_is_inside_a_data_anchored_window(
    tmp_path: Path, catalog: Catalog
) -> None:
    rows = [flow(time=T0, verdict="DROPPED", drop_reason_desc="POLICY_DENIED")] * 2
    table = flows_table(rows)
    nanos = [
        int(T0.timestamp()) * 10**9,
        int(T0.timestamp()) * 10**9 + 1_000_000_999,
    ]  # newest: +1.000000999 s
    table = table.set_column(0, "time", pa.array(nanos, FLOW_SCHEMA.field("time").type))
    write_dataset(tmp_path, table.to_pylist())
    with DuckDBEngine(tmp_path) as engine:
        assert engine.run("SELECT max(time) AS t FROM flows").column("t")[0].value % 1000 == 999
        result = run_question(
            engine, catalog.question("drops_by_reason"), {"since": "1h"}, relative_to="data"
        )
    assert result.anchored_to == "data" and result.anchor == T0 + timedelta(seconds=1, microseconds=1)
    assert [r["flows"] for r in result.table.to_pylist()] == [2]


def test_absolute_times_ignore_the_anchor(engine: DuckDBEngine, catalog: Catalog) -> None:
    since, until = T0.isoformat(), (T0 + timedelta(hours=3)).isoformat()
    result = run_question(
        engine, catalog.question("top_talkers"), {"since": since, "until": until}, relative_to="data"
    )
    assert result.anchored_to == "now"  # nothing relative, nothing to anchor
    assert result.params["since"] == T0


# -- the real captures ----------------------------------------------------------------------------------------


def raw_flows(files: list[Path]) -> list[dict[str, Any]]:
    """Every flow of the capture files, read straight from their JSON (envelopes unwrapped), with its time."""
    flows = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            raw = obj.get("flow") if "flow" in obj else (obj if "verdict" in obj else None)
            if raw is not None and (raw.get("time") or obj.get("time")):
                flows.append(raw)
    return flows


@pytest.fixture(scope="module")
def capture_engine(capture_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> DuckDBEngine:
    root = tmp_path_factory.mktemp("captures")
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="captures"))
    for batch in read_events(capture_files):
        sink.write(batch)
    sink.close()
    with DuckDBEngine(root) as engine:
        yield engine


CAPTURE_WINDOW = {"since": "1970-01-01", "until": "2100-01-01", "limit": "100000"}


def test_real_captures_drops_by_reason(
    capture_engine: DuckDBEngine, capture_files: list[Path], catalog: Catalog
) -> None:
    expected: dict[tuple[Any, ...], int] = defaultdict(int)
    for raw in raw_flows(capture_files):
        if raw.get("verdict") != "DROPPED":
            continue
        event = raw.get("event_type") or {}
        number = raw.get("drop_reason") or (event.get("sub_type") if event.get("type") == 1 else None)
        reason = raw.get("drop_reason_desc") or (REASON_NAMES.get(number, str(number)) if number else None)

        def namespace(end: dict[str, Any]) -> str | None:
            # A pod identity with labels but no namespace field is in its namespace label's namespace.
            if end.get("namespace"):
                return str(end["namespace"])
            if 256 <= (end.get("identity") or 0) < 2**24:
                prefix = "k8s:io.kubernetes.pod.namespace="
                return next((x[len(prefix) :] for x in end.get("labels") or [] if x.startswith(prefix)), None)
            return None

        # Drop notifications; a policy-verdict event is the same packet (these captures have none of those).
        assert event.get("type") != 5
        namespaces = (namespace(raw.get("source") or {}), namespace(raw.get("destination") or {}))
        expected[(reason or "DROP_REASON_UNKNOWN", *namespaces)] += 1
    result = run_question(
        capture_engine, catalog.question("drops_by_reason"), CAPTURE_WINDOW
    ).table.to_pylist()
    got = {
        (r["drop_reason_desc"], r["source_namespace"], r["destination_namespace"]): r["flows"] for r in result
    }
    assert got == dict(expected)
    assert {"UNSUPPORTED_L3_PROTOCOL", "POLICY_DENIED", "INVALID_SOURCE_IP"} <= {key[0] for key in got}


def test_real_captures_dns_queries(
    capture_engine: DuckDBEngine, capture_files: list[Path], catalog: Catalog
) -> None:
    expected: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    for raw in raw_flows(capture_files):
        l7 = raw.get("l7") or {}
        if "dns" not in l7 or not l7["dns"].get("query"):
            continue
        response = l7.get("type") == "RESPONSE"
        client = (raw.get("destination") if response else raw.get("source")) or {}
        counts = expected[(client.get("namespace") or None, l7["dns"]["query"])]
        counts[1 if response else 0] += 1
        counts[2] += int(response and l7["dns"].get("rcode", 0) != 0)
    result = run_question(capture_engine, catalog.question("dns_queries"), CAPTURE_WINDOW).table.to_pylist()
    got: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in result:
        counts = got[(r["source_namespace"], r["query"])]
        for index, column in enumerate(("lookups", "responses", "failures")):
            counts[index] += r[column]
    assert dict(got) == dict(expected) and sum(c[0] for c in got.values()) > 0

"""The one definition of a workload's display name and stable identity: the shared view `flows_enriched`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlglot
from support.flowdata import T0, flow, write_dataset

from flowpipe.errors import QuestionDefinitionError
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.query.views import FALLBACK_NEEDED_SQL, HELD_IDENTITY_WORKLOADS, load_views, parse_view

IDENTITY_COLUMNS = (
    "source_entity, source_workload, source_workload_id, destination_entity, destination_workload, "
    "destination_workload_id"
)


def pod(
    side: str,
    namespace: str,
    pod_name: str,
    *,
    workload: str | None = None,
    identity: int = 4242,
    labels: tuple[str, ...] = (),
    ip: str = "10.0.0.1",
) -> dict[str, Any]:
    values: dict[str, Any] = {
        f"{side}_namespace": namespace,
        f"{side}_pod_name": pod_name,
        f"{side}_identity": identity,
        f"{side}_labels": list(labels),
        f"{side}_ip": ip,
    }
    if workload is not None:
        values[f"{side}_workload_name"] = workload
        values[f"{side}_workload_kind"] = "Deployment"
    return values


def entity(side: str, identity: int | None, *labels: str, ip: str = "192.0.2.7") -> dict[str, Any]:
    return {f"{side}_identity": identity, f"{side}_labels": list(labels), f"{side}_ip": ip}


def names(tmp_path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write `rows` as a dataset and return the identity columns of `flows_enriched`, in time order."""
    write_dataset(tmp_path, rows)
    with DuckDBEngine(tmp_path) as engine:
        return engine.run(f"SELECT {IDENTITY_COLUMNS} FROM flows_enriched ORDER BY time").to_pylist()


def timed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, row in enumerate(rows):
        row["time"] = T0.replace(second=index)
    return rows


def test_a_reported_workload_is_the_name_and_namespace_makes_the_identity(tmp_path: Path) -> None:
    rows = timed(
        [
            flow(
                **pod("source", "shop", "api-7d9f8b6c5d-x2k9p", workload="api", labels=("k8s:app=backend",)),
                **pod("destination", "db", "postgres-0", workload="postgres"),
            )
        ]
    )
    [row] = names(tmp_path, rows)
    assert row == {
        "source_entity": None,
        "source_workload": "api",
        "source_workload_id": "shop/api",
        "destination_entity": None,
        "destination_workload": "postgres",
        "destination_workload_id": "db/postgres",
    }


@pytest.mark.parametrize(
    ("labels", "pod_name", "expected"),
    [
        (
            ("k8s:app=ratings", "k8s:app.kubernetes.io/name=ratings-svc", "k8s:k8s-app=x"),
            "r-1",
            "ratings-svc",
        ),
        (("k8s:k8s-app=kube-dns", "k8s:app=coredns"), "coredns-558bd4d5db-w2m67", "coredns"),
        (
            ("k8s:k8s-app=kube-dns", "k8s:pod-template-hash=558bd4d5db"),
            "coredns-558bd4d5db-w2m67",
            "kube-dns",
        ),
        (("k8s:name=legacy", "k8s:version=v1"), "legacy-abc", "legacy"),
        # No stable label: the pod name without what its controller appended.
        (("k8s:pod-template-hash=b6994bb9",), "ratings-v1-b6994bb9-jgqxb", "ratings-v1"),
        ((), "cilium-x7k2p", "cilium"),
        ((), "postgres-12", "postgres"),
        ((), "backup-28391234-bcdfg", "backup"),
        # Ordinary words (with vowels) are not mistaken for generated suffixes.
        ((), "frontend-admin", "frontend-admin"),
        ((), "nginx", "nginx"),
        # A label value on another key is not a stable label.
        (("k8s:io.kubernetes.pod.namespace=shop", "k8s:tier=app"), "web-2", "web"),
    ],
)
def test_a_pod_without_a_reported_workload_falls_back_to_labels_then_pod_name(
    tmp_path: Path, labels: tuple[str, ...], pod_name: str, expected: str
) -> None:
    rows = timed(
        [flow(**pod("source", "shop", pod_name, labels=labels), **entity("destination", 2, "reserved:world"))]
    )
    [row] = names(tmp_path, rows)
    assert (row["source_workload"], row["source_workload_id"]) == (expected, f"shop/{expected}")
    assert row["source_entity"] is None


@pytest.mark.parametrize(
    ("identity", "labels", "expected"),
    [
        (1, ("reserved:host",), "host"),
        (2, ("reserved:world",), "world"),
        (3, (), "unmanaged"),
        (4, ("reserved:health",), "health"),
        (6, ("reserved:remote-node",), "remote-node"),
        (7, ("reserved:kube-apiserver",), "kube-apiserver"),
        (9, ("reserved:world-ipv4",), "world"),
        (16777217, ("cidr:203.0.113.0/24", "reserved:world"), "world"),
        # No identity (an exporter field mask): the reserved label decides.
        (None, ("reserved:remote-node",), "remote-node"),
        (None, ("reserved:world-ipv6",), "world"),
        (0, ("reserved:kube-apiserver", "reserved:host"), "kube-apiserver"),
    ],
)
def test_reserved_identities_are_entities(
    tmp_path: Path, identity: int | None, labels: tuple[str, ...], expected: str
) -> None:
    rows = timed(
        [flow(**entity("source", identity, *labels), **pod("destination", "shop", "web-0", workload="web"))]
    )
    [row] = names(tmp_path, rows)
    assert (row["source_entity"], row["source_workload"], row["source_workload_id"]) == (expected,) * 3


def test_an_endpoint_nothing_describes_is_its_address(tmp_path: Path) -> None:
    rows = timed(
        [flow(**entity("source", None, ip="198.51.100.9"), **entity("destination", None, ip="10.9.9.9"))]
    )
    [row] = names(tmp_path, rows)
    assert row["source_workload_id"] == "198.51.100.9" and row["destination_workload_id"] == "10.9.9.9"
    assert row["source_entity"] is None and row["destination_entity"] is None


def described_rows() -> list[dict[str, Any]]:
    """Flows Cilium described fully: every pod has its workload, every other endpoint a reserved identity."""
    return timed(
        [
            flow(
                **pod("source", "shop", "web-5d8f-bcdfg", workload="web", labels=("k8s:app=frontend",)),
                **pod("destination", "shop", "api-7d9f-bcdfg", workload="api"),
            ),
            flow(
                **entity("source", 1, "reserved:host"),
                **pod("destination", "shop", "api-7d9f-bcdfg", workload="api"),
            ),
            flow(
                **pod("source", "shop", "api-7d9f-bcdfg", workload="api"),
                **entity("destination", 16777300, "cidr:1.2.3.4/32", "reserved:world"),
            ),
            flow(
                **entity("source", 6, "reserved:remote-node"), **entity("destination", 4, "reserved:health")
            ),
        ]
    )


def test_views_leave_out_the_fallbacks_when_every_endpoint_is_described(tmp_path: Path) -> None:
    write_dataset(tmp_path, described_rows())
    [view] = [v for v in load_views() if v.name == "flows_enriched"]
    query = f"SELECT {IDENTITY_COLUMNS}, http_path, is_request FROM flows_enriched ORDER BY time"
    with DuckDBEngine(tmp_path) as engine:
        assert engine.run(FALLBACK_NEEDED_SQL).to_pylist() == [{"undescribed": 0}]
        fast = engine.run(query).to_pylist()
        definition = engine.run(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'flows_enriched'"
        ).to_pylist()[0]["sql"]
        assert "_labels" not in definition.replace("flows_enriched", "")
        # The full definition, fallbacks included, names every flow the same way.
        engine.connection.execute(f"CREATE OR REPLACE VIEW flows_enriched AS {view.sql}")
        assert engine.run(query).to_pylist() == fast
    assert [r["source_workload_id"] for r in fast] == ["shop/web", "host", "shop/api", "remote-node"]
    assert [r["destination_workload_id"] for r in fast] == ["shop/api", "shop/api", "world", "health"]


def test_one_undescribed_flow_brings_the_fallbacks_back(tmp_path: Path) -> None:
    rows = described_rows() + timed([flow(**pod("source", "shop", "cart-0", labels=("k8s:app=cart",)))])[-1:]
    rows[-1]["time"] = T0.replace(minute=5)
    write_dataset(tmp_path, rows)
    with DuckDBEngine(tmp_path) as engine:
        assert engine.run(FALLBACK_NEEDED_SQL).to_pylist() == [{"undescribed": 1}]
        ids = engine.run("SELECT source_workload_id FROM flows_enriched ORDER BY time").column(0).to_pylist()
    assert ids == ["shop/web", "host", "shop/api", "remote-node", "shop/cart"]


def test_request_rcode_and_path_columns(tmp_path: Path) -> None:
    rows = timed(
        [
            flow(
                is_reply=False,
                l7_type="REQUEST",
                l7_protocol="http",
                http_method="GET",
                http_url="http://api:8080/api/v1/orders/123/items/9?page=2",
            ),
            flow(
                is_reply=True,
                l7_type="RESPONSE",
                l7_protocol="http",
                http_code=200,
                http_url="https://api/v2/users/3f2b9c1e-8a7d-4b6c-9e5f-1a2b3c4d5e6f#top",
            ),
            flow(
                is_reply=None, l7_type="RESPONSE", l7_protocol="dns", dns_rcode=3, dns_query="nope.example."
            ),
            flow(is_reply=None, http_url="/"),
            flow(is_reply=None, l7_type="REQUEST", l7_protocol="dns", dns_rcode=0, dns_query="ok.example."),
        ]
    )
    write_dataset(tmp_path, rows)
    with DuckDBEngine(tmp_path) as engine:
        result = engine.run("SELECT is_request, dns_rcode_name, http_path FROM flows_enriched ORDER BY time")
    assert result.to_pylist() == [
        {"is_request": True, "dns_rcode_name": None, "http_path": "/api/v1/orders/{id}/items/{id}"},
        {"is_request": False, "dns_rcode_name": None, "http_path": "/v2/users/{id}"},
        {"is_request": False, "dns_rcode_name": "NXDOMAIN", "http_path": None},
        {"is_request": True, "dns_rcode_name": None, "http_path": "/"},
        # A request carries no response code, whatever the record's scalar says.
        {"is_request": True, "dns_rcode_name": None, "http_path": None},
    ]


def test_shared_views_transpile_to_spark() -> None:
    views = load_views()
    sources = {"flows", *(view.name for view in views)}
    for view in views:
        for sql in (view.sql, view.sql_without_fallbacks):
            [spark] = sqlglot.transpile(
                sql, read="duckdb", write="spark", unsupported_level=sqlglot.ErrorLevel.RAISE
            )
            # each reads the flow table or another shared view, whatever Spark's spelling of the rest
            assert any(f"FROM {name}" in spark for name in sources - {view.name}), view.name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1 FROM flows\n", "missing `-- description"),
        ("-- description: x\nDELETE FROM flows\n", "one SELECT"),
        ("-- description: x\nSELECT 1\n-- fallback: begin\n, 2\n", "unbalanced"),
    ],
)
def test_a_malformed_view_file_is_refused_with_its_path(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.sql"
    with pytest.raises(QuestionDefinitionError, match=message) as info:
        parse_view(text, name="broken", path=path)
    assert str(path) in str(info.value)


def test_views_are_created_in_the_order_they_require(tmp_path: Path) -> None:
    (tmp_path / "a_last.sql").write_text(
        "-- description: reads b\n-- requires: b_first\nSELECT * FROM b_first\n"
    )
    (tmp_path / "b_first.sql").write_text("-- description: base\nSELECT 1 AS x FROM flows\n")
    assert [v.name for v in load_views(tmp_path)] == ["b_first", "a_last"]
    (tmp_path / "b_first.sql").write_text("-- description: loop\n-- requires: a_last\nSELECT 1 AS x\n")
    with pytest.raises(QuestionDefinitionError, match="cycle"):
        load_views(tmp_path)
    (tmp_path / "b_first.sql").write_text("-- description: gap\n-- requires: c_missing\nSELECT 1 AS x\n")
    with pytest.raises(QuestionDefinitionError, match="c_missing"):
        load_views(tmp_path)


def test_a_record_with_labels_but_no_namespace_is_named_by_its_labels(tmp_path: Path) -> None:
    labels = (
        "k8s:app.kubernetes.io/name=tiefighter",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:org=empire",
    )
    rows = timed(
        [
            flow(
                **entity("source", 31246, *labels, ip="fe80::1"),
                **entity("destination", None, "reserved:unknown"),
            )
        ]
    )
    [row] = names(tmp_path, rows)
    assert (row["source_workload"], row["source_workload_id"]) == ("tiefighter", "default/tiefighter")
    assert row["source_entity"] is None


def test_every_question_names_endpoints_as_the_view_does(tmp_path: Path) -> None:
    # Pods without a reported workload (an exporter field mask, an old agent): named by the view's fallbacks.
    web = pod("source", "shop", "web-7d9f8b6c5d-bcdfg", ip="10.0.1.1")
    api = pod("destination", "shop", "api-5c6d7f8b9c-x2k9p", ip="10.0.1.2")
    dns = pod("destination", "kube-system", "coredns-558bd4d5db-w2m67", labels=("k8s:k8s-app=kube-dns",))
    world = entity("destination", 2, "reserved:world", ip="203.0.113.9")
    tcp = {"l4_protocol": "TCP", "source_port": 40000, "is_reply": False}
    lookup = {"l4_protocol": "UDP", "l7_protocol": "dns", "dns_query": "api.example.", "flow_type": "L7"}
    rows = timed(
        [
            flow(**web, **api, **tcp, destination_port=8080, verdict="FORWARDED", traffic_direction="EGRESS"),
            flow(**web, **world, **tcp, destination_port=443, verdict="FORWARDED", traffic_direction="EGRESS",
                 destination_names=["api.example."]),
            flow(**web, **dns, **lookup, destination_port=53, verdict="FORWARDED", l7_type="REQUEST",
                 is_reply=False),
            flow(**{k.replace("source_", "destination_"): v for k, v in web.items()},
                 **{k.replace("destination_", "source_"): v for k, v in dns.items()}, **lookup, source_port=53,
                 verdict="FORWARDED", l7_type="RESPONSE", is_reply=True, dns_rcode=3),
            flow(**web, **api, **tcp, destination_port=9090, verdict="DROPPED", drop_reason=133,
                 drop_reason_desc="POLICY_DENIED", event_type=1, traffic_direction="EGRESS"),
        ]
    )  # fmt: skip
    write_dataset(tmp_path, rows)
    named = {"web", "api", "kube-dns", "world"}
    found = {}
    with DuckDBEngine(tmp_path) as engine:
        for question in load_questions():
            values = {"since": "2000-01-01", "until": "2100-01-01", "show_expected": "true"}
            given = {k: v for k, v in values.items() if question.parameter(k) is not None}
            result = run_question(engine, question, given).table.to_pylist()
            for column in ("source_workload", "destination_workload", "workload"):
                values_seen = {row[column] for row in result if column in row} - {None}
                assert values_seen <= named, (question.name, column, values_seen)
                found.setdefault(question.name, set()).update(values_seen)
    assert found["top_talkers"] == {"web", "api", "kube-dns", "world"}
    assert found["dns_queries"] == {"web"}
    assert found["dns_failures"] == {"web"} and found["unexpected_drops"] == {"web", "api"}


def test_identity_workloads_is_held_per_listing_and_names_pods_known_only_by_identity(tmp_path: Path) -> None:
    """Where the fallbacks join `identity_workloads` on every flow, the engine computes it once per listing of the
    part files (a table, so that DuckDB builds that join over the identities): a pod known only by its identity
    takes the workload another record names it by, and a refresh takes the identities of new files too."""
    only_identity = ("k8s:app=a", "k8s:io.kubernetes.pod.namespace=shop")

    def pair(identity: int, workload: str, minute: int) -> list[dict[str, Any]]:
        rows = [
            flow(**pod("source", "shop", f"{workload}-7d9f-bcdfg", workload=workload, identity=identity)),
            flow(**entity("source", identity, *only_identity, ip="10.9.9.9")),
        ]
        for second, row in enumerate(rows):
            row["time"] = T0.replace(minute=minute, second=second)
        return rows

    def held(engine: DuckDBEngine) -> list[dict[str, Any]]:
        return engine.run(
            "SELECT table_name FROM duckdb_tables() WHERE table_name = $name",
            {"name": HELD_IDENTITY_WORKLOADS},
        ).to_pylist()

    write_dataset(tmp_path, pair(5000, "web", 1), writer_id="one")
    query = (
        "SELECT source_ip, source_workload FROM flows_enriched WHERE source_pod_name IS NULL ORDER BY time"
    )
    with DuckDBEngine(tmp_path) as engine:
        assert held(engine) == [{"table_name": HELD_IDENTITY_WORKLOADS}]
        assert engine.run(query).to_pylist() == [{"source_ip": "10.9.9.9", "source_workload": "web"}]
        write_dataset(tmp_path, pair(6000, "api", 2), writer_id="two")
        engine.refresh()
        assert held(engine) == [{"table_name": HELD_IDENTITY_WORKLOADS}]
        assert [r["source_workload"] for r in engine.run(query).to_pylist()] == ["web", "api"]
    # Every endpoint described: no fallbacks, nothing joins the view on every flow, nothing is held.
    described = tmp_path / "described"
    write_dataset(described, described_rows())
    with DuckDBEngine(described) as engine:
        assert held(engine) == []

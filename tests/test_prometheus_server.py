"""A real Prometheus scrapes `flowpipe serve-metrics` over a dataset written by the Parquet sink.

The counters equal what the dataset holds, new part files show up, and every dashboard query returns data.

Dashboard queries over metrics that only `flowpipe collect` exports (relay connection, flushes, checkpoint age,
decode errors, flowpipe's own drops) are listed by `support.prom.deferred_to_collect()` and checked by the collect test,
which runs `support.prom.check_dashboard_queries(prom, role="collect", ...)` against a collector following the simulated
relay.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support.flowdata import flow, write_dataset
from support.prom import (
    QUESTION_METRICS,
    ROOT,
    PrometheusServer,
    check_dashboard_queries,
    dashboard_expressions,
    deferred_to_collect,
    http_get,
    promql_metric_names,
    question_available,
    run_prometheus,
    substitute_grafana_variables,
)
from support.wait import wait_until

from flowpipe.drop_reasons import drop_reason_table
from flowpipe.metrics.families import series_names
from flowpipe.model import LostEvent

pytestmark = [pytest.mark.external, pytest.mark.slow]

# -- a dataset whose every count is known ----------------------------------------------------------------------


def analytics_rows(start: datetime, *, scale: int = 1) -> list[dict[str, Any]]:
    """Flows covering every analytics family: policy and non-policy drops, DNS answers and failures, dropped DNS,
    policy verdict events, requests to the world, and ordinary traffic. `scale` multiplies every group."""
    rows: list[dict[str, Any]] = []
    clock = iter(start + timedelta(seconds=i) for i in range(100_000))

    def add(count: int, *parts: dict[str, Any]) -> None:
        values = {key: value for part in parts for key, value in part.items()}
        rows.extend(flow(time=next(clock), node_name="kind/worker", **values) for _ in range(count * scale))

    def edge(
        src: str | None, dst: str | None, direction: str | None, reply: bool | None = False
    ) -> dict[str, Any]:
        return {
            "source_namespace": src,
            "destination_namespace": dst,
            "traffic_direction": direction,
            "is_reply": reply,
        }

    def dropped(number: int, name: str | None) -> dict[str, Any]:
        return {"verdict": "DROPPED", "event_type": 1, "drop_reason": number, "drop_reason_desc": name}

    def tcp(port: int) -> dict[str, Any]:
        return {"l4_protocol": "TCP", "destination_port": port}

    forwarded, verdict_event = {"verdict": "FORWARDED", "event_type": 4}, {"event_type": 5}
    world = {"destination_identity": 2, "destination_labels": ["reserved:world"]}
    add(6, dropped(133, "POLICY_DENIED"), edge("billing", "shop", "INGRESS"), tcp(8080))
    add(4, dropped(181, "POLICY_DENY"), edge("billing", "payments", "EGRESS"), tcp(5432))
    add(3, dropped(155, "CT_MAP_INSERTION_FAILED"), edge("shop", "shop", "EGRESS"), tcp(6379))
    add(2, dropped(151, None), edge("payments", None, None, None), tcp(443))  # old data: the number only
    for _ in range(scale):  # whole lookups, one request and its answer after the other
        for client, name, rcode in DNS_ANSWERS:
            add_dns(rows, clock, client, name, rcode)
    add(
        2,
        dropped(133, "POLICY_DENIED"),
        edge("billing", "kube-system", "EGRESS"),
        {"l4_protocol": "UDP", "destination_port": 53},
        {"source_pod_name": DNS_CLIENTS["billing"][0], "source_ip": DNS_CLIENTS["billing"][1]},
    )
    add(4, verdict_event, {"verdict": "DROPPED"}, edge("billing", "shop", "INGRESS"), tcp(8080))
    add(5, verdict_event, {"verdict": "FORWARDED"}, edge("shop", "shop", "INGRESS"))
    add(3, verdict_event, {"verdict": "FORWARDED"}, edge("billing", "payments", "EGRESS"))
    # the policy verdict event of a request to the world: a policy verdict, never a second world request
    add(2, verdict_event, {"verdict": "FORWARDED"}, edge("shop", None, "EGRESS"), world, tcp(443))
    add(4, forwarded, edge("shop", None, "EGRESS"), world, tcp(443))
    add(
        1,
        dropped(133, "POLICY_DENIED"),
        edge("payments", None, "EGRESS"),
        tcp(443),
        {
            "destination_identity": 16777217,
            "destination_labels": ["cidr:203.0.113.7/32", "reserved:world-ipv4"],
        },
    )
    add(10, forwarded, edge("shop", "shop", "INGRESS"), tcp(8080))
    add(10, forwarded, edge("shop", "shop", "INGRESS", True), {"l4_protocol": "TCP", "source_port": 8080})
    return rows


DNS_CLIENTS = {"shop": ("web-5c6d-fghij", "10.0.1.5"), "billing": ("worker-0", "10.0.2.7")}
DNS_ANSWERS = (
    # shop's resolver tries the search path of api.example.com (ndots:5) until the name itself resolves: three
    # NXDOMAIN answers, one lookup that did not fail; then four lookups of a Service, answered at once
    ("shop", "api.example.com.shop.svc.cluster.local.", 3),
    ("shop", "api.example.com.svc.cluster.local.", 3),
    ("shop", "api.example.com.cluster.local.", 3),
    ("shop", "api.example.com.", 0),
    *[("shop", "redis.shop.svc.cluster.local.", 0)] * 4,
    # billing: a typo failing at every name (one failed lookup), two lookups answered SERVFAIL, one that resolved
    ("billing", "postgress.billing.svc.cluster.local.", 3),
    ("billing", "postgress.svc.cluster.local.", 3),
    ("billing", "postgress.cluster.local.", 3),
    ("billing", "postgress.", 3),
    *[("billing", "flaky.example.org.", 2)] * 2,
    ("billing", "api.example.com.", 0),
)
"""DNS the DNS proxy saw, as (client namespace, name asked, rcode); with billing's two dropped DNS packets the
dns_failures question counts 5 lookups of shop (none failed) and 6 of billing (NXDOMAIN 1, SERVFAIL 2, dropped 2)."""
DNS_GAUGES = {
    "lookups": {("(no cluster)", "shop"): 5.0, ("(no cluster)", "billing"): 6.0},
    "failed": {("(no cluster)", "billing", "NXDOMAIN"): 1.0, ("(no cluster)", "billing", "SERVFAIL"): 2.0,
               ("(no cluster)", "billing", "dropped"): 2.0},
}  # fmt: skip
"""What the DNS question gauges say of one `analytics_rows(scale=1)` (failed lookups: the reasons above 0)."""


def add_dns(
    rows: list[dict[str, Any]], clock: Iterator[datetime], client: str, name: str, rcode: int
) -> None:
    """One DNS request of `client` for `name` from a port of its own, and its answer a second later."""
    pod, address = DNS_CLIENTS[client]
    port = 40000 + len(rows)
    server = {"namespace": "kube-system", "pod_name": "coredns-558bd-w2m67", "ip": "10.0.0.10"}
    common = {"verdict": "FORWARDED", "l7_protocol": "dns", "flow_type": "L7", "event_type": 129,
              "l4_protocol": "UDP", "dns_query": name, "dns_qtypes": ["A"], "traffic_direction": "EGRESS"}  # fmt: skip
    ends = {
        "client": {"namespace": client, "pod_name": pod, "ip": address, "port": port},
        "server": {**server, "port": 53},
    }
    for kind, src, dst in (("REQUEST", "client", "server"), ("RESPONSE", "server", "client")):
        values = {f"source_{k}": v for k, v in ends[src].items()} | {
            f"destination_{k}": v for k, v in ends[dst].items()
        }
        answer = {"dns_rcode": rcode} if kind == "RESPONSE" else {}
        rows.append(
            flow(
                time=next(clock),
                node_name="kind/worker",
                l7_type=kind,
                is_reply=kind == "RESPONSE",
                **common,
                **values,
                **answer,
            )
        )


def lost_events(start: datetime) -> list[LostEvent]:
    return [
        LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=17, node_name="kind/worker", time=start),
        LostEvent(
            source="PERF_EVENT_RING_BUFFER", num_events_lost=3, node_name="kind/control-plane", time=start
        ),
    ]


# -- counts computed independently from the dataset, with SQL -------------------------------------------------

_ENRICHED = """
WITH f AS (
    SELECT *, coalesce(is_reply, l7_type = 'RESPONSE', false) AS reply
    FROM read_parquet($files, union_by_name = true)
), g AS (
    SELECT *,
        CASE WHEN (traffic_direction IS NULL AND NOT reply)
                  OR (traffic_direction IS NOT NULL AND (traffic_direction = 'EGRESS') <> reply)
             THEN coalesce(source_namespace, '(no namespace)')
             ELSE coalesce(destination_namespace, '(no namespace)') END AS enforcing_ns,
        CASE WHEN reply THEN coalesce(destination_namespace, '(no namespace)')
             ELSE coalesce(source_namespace, '(no namespace)') END AS client_ns,
        coalesce(traffic_direction, '(no direction)') AS direction,
        coalesce(verdict, 'unknown') AS verdict_label
    FROM f
)
"""

EXPECTED_SQL = {
    "flowpipe_observed_drops_total": (
        "namespace, direction, reason_class",
        """
        SELECT enforcing_ns, direction, coalesce(r.reason_class, 'unknown'), count(*)
        FROM g LEFT JOIN drop_reasons r
          ON r.drop_reason_desc = g.drop_reason_desc
          OR (g.drop_reason_desc IS NULL AND g.drop_reason <> 0 AND r.drop_reason = g.drop_reason)
        WHERE verdict = 'DROPPED' AND event_type <> 5 GROUP BY ALL""",
    ),
    "flowpipe_observed_dns_responses_total": (
        "namespace, rcode",
        """
        SELECT client_ns, CASE dns_rcode WHEN 0 THEN 'NOERROR' WHEN 2 THEN 'SERVFAIL' WHEN 3 THEN 'NXDOMAIN' END,
               count(*)
        FROM g WHERE l7_protocol = 'dns' AND l7_type = 'RESPONSE' GROUP BY ALL""",
    ),
    "flowpipe_observed_dns_failures_total": (
        "namespace, reason",
        """
        SELECT client_ns, CASE dns_rcode WHEN 2 THEN 'SERVFAIL' WHEN 3 THEN 'NXDOMAIN' END, count(*)
        FROM g WHERE l7_protocol = 'dns' AND l7_type = 'RESPONSE' AND dns_rcode <> 0 GROUP BY ALL
        UNION ALL
        SELECT client_ns, 'dropped', count(*) FROM g
        WHERE verdict = 'DROPPED' AND event_type <> 5 AND NOT reply AND destination_port = 53
          AND l4_protocol IN ('UDP', 'TCP')
        GROUP BY ALL""",
    ),
    "flowpipe_observed_dns_lookups_total": (
        "namespace",
        """
        SELECT client_ns, count(*) FROM g
        WHERE (l7_protocol = 'dns' AND l7_type = 'REQUEST')
           OR (verdict = 'DROPPED' AND event_type <> 5 AND NOT reply AND destination_port = 53
               AND l4_protocol IN ('UDP', 'TCP') AND l7_protocol IS DISTINCT FROM 'dns')
        GROUP BY ALL""",
    ),
    "flowpipe_observed_policy_verdicts_total": (
        "namespace, direction, verdict",
        """
        SELECT enforcing_ns, direction, verdict_label, count(*) FROM g WHERE event_type = 5 GROUP BY ALL""",
    ),
    "flowpipe_observed_world_flows_total": (
        "namespace, verdict",
        """
        SELECT client_ns, verdict_label, count(*) FROM g
        WHERE NOT reply AND event_type <> 5
          AND (destination_identity IN (2, 9, 10)
               OR list_has_any(destination_labels, ['reserved:world', 'reserved:world-ipv4', 'reserved:world-ipv6']))
        GROUP BY ALL""",
    ),
    "flowpipe_flows_received_total": ("verdict", "SELECT verdict_label, count(*) FROM g GROUP BY ALL"),
}


def expected_counts(root: Path) -> dict[str, dict[tuple[str, ...], float]]:
    """Metric → {label values: count}, computed from the part files with DuckDB."""
    files = sorted(str(p) for p in (root / "flows").rglob("*.parquet"))
    con = duckdb.connect()
    con.register("drop_reasons", drop_reason_table())
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for metric, (_, sql) in EXPECTED_SQL.items():
        rows = con.execute(_ENRICHED + sql, {"files": files}).fetchall()
        out[metric] = {tuple(row[:-1]): float(row[-1]) for row in rows}
    lost_files = sorted(str(p) for p in (root / "lost_events").rglob("*.parquet"))
    rows = con.execute(
        "SELECT lower(source), node_name, sum(num_events_lost) FROM read_parquet($files) GROUP BY ALL",
        {"files": lost_files},
    ).fetchall()
    out["flowpipe_hubble_lost_events_total"] = {tuple(row[:-1]): float(row[-1]) for row in rows}
    return out


def prometheus_counts(prom: PrometheusServer, metric: str) -> dict[tuple[str, ...], float]:
    labels = EXPECTED_SQL[metric][0] if metric in EXPECTED_SQL else "source, node"
    names = [name.strip() for name in labels.split(",")]
    result = prom.query(f"sum by ({labels}) ({metric})")
    return {tuple(s["metric"].get(n, "") for n in names): float(s["value"][1]) for s in result}


def gauge(prom: PrometheusServer, expr: str, *labels: str) -> dict[Any, float]:
    """An instant query as {label value (a tuple for several labels): value}."""
    return {
        tuple(s["metric"][n] for n in labels) if len(labels) > 1 else s["metric"][labels[0]]: float(
            s["value"][1]
        )
        for s in prom.query(expr)
    }


def eventually_equal(actual: Callable[[], Any], expected: Any, what: str) -> None:
    """Bounded wait for `actual()` to equal `expected`, then assert it (a diff on failure)."""
    try:
        wait_until(lambda: actual() == expected or None, what=what)
    except AssertionError:
        pass
    assert actual() == expected, what


# -- the running pieces -----------------------------------------------------------------------------------------


@dataclass
class ServeMetrics:
    process: subprocess.Popen[str]
    url: str
    lines: list[str]


def _drain(stream: Any, lines: list[str], announced: queue.Queue[str]) -> None:
    for line in stream:
        lines.append(line)
        if "/metrics" in line and "http://" in line:
            announced.put(line.strip().rsplit(" ", 1)[-1].removesuffix("/metrics"))


def start_serve_metrics(dataset: Path) -> ServeMetrics:
    """`flowpipe serve-metrics` as a subprocess on 127.0.0.1 (port 0: it reports the port it got)."""
    command = [
        sys.executable,
        "-m",
        "flowpipe",
        "serve-metrics",
        "--dataset",
        str(dataset),
        "--metrics-address",
        "127.0.0.1:0",
        "--poll-interval-seconds",
        "0.2",
        "--question-interval-seconds",
        "1",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    announced: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_drain, args=(process.stderr, lines, announced), daemon=True).start()
    try:
        url = announced.get(timeout=60)
    except queue.Empty:
        process.kill()
        raise AssertionError("serve-metrics did not report its address:\n" + "".join(lines)) from None
    return ServeMetrics(process, url, lines)


def stop(process: subprocess.Popen[str]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=5)


@dataclass
class Stack:
    dataset: Path
    start: datetime
    serve: ServeMetrics
    prom: PrometheusServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A dataset (one part file per table), serve-metrics over it, and Prometheus scraping that every second."""
    workdir = tmp_path_factory.mktemp("prometheus-server")
    dataset = workdir / "dataset"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(
        minutes=20
    )  # inside the questions' 1h window
    write_dataset(dataset, analytics_rows(start), lost_events=lost_events(start), writer_id="first")
    serve = start_serve_metrics(dataset)
    try:
        wait_until(lambda: http_get(f"{serve.url}/readyz")[0] == 200, what="serve-metrics /readyz")
        with run_prometheus(workdir / "prometheus", [serve.url.removeprefix("http://")]) as prom:
            yield Stack(dataset, start, serve, prom)
    finally:
        code = stop(serve.process)
        assert code == 0, "serve-metrics did not stop cleanly:\n" + "".join(serve.lines)


# -- the tests --------------------------------------------------------------------------------------------------


def test_serve_metrics_answers_health_and_metrics(stack: Stack) -> None:
    assert http_get(f"{stack.serve.url}/healthz") == (200, b"ok\n")
    status, body = http_get(f"{stack.serve.url}/metrics")
    assert status == 200 and b"flowpipe_observed_drops_total{" in body


def test_prometheus_scrapes_it(stack: Stack) -> None:
    up = wait_until(stack.prom.targets_up, what="the serve-metrics target to be up")
    assert [t["scrapeUrl"] for t in up] == [f"{stack.serve.url}/metrics"]
    assert stack.prom.wait_for_series('flowpipe_build_info{job="flowpipe"}')


def test_counters_equal_the_counts_in_the_dataset(stack: Stack) -> None:
    expected = expected_counts(stack.dataset)
    assert all(expected.values())  # the dataset exercises every family
    for metric, counts in expected.items():
        eventually_equal(lambda m=metric: prometheus_counts(stack.prom, m), counts, metric)


def test_dns_gauges_count_lookups_as_the_question_does(stack: Stack) -> None:
    """The DNS gauges are the dns_failures question's answer, and the "DNS failure share" panel reads them: shop's
    NXDOMAIN answers to the search-path expansions of a name that resolved fail no lookup (the streaming counter
    counts them as error answers), billing's typo, SERVFAIL answers and dropped requests do."""
    from flowpipe.metrics.families import DNS_FAILURE_REASONS
    from flowpipe.metrics.questions import dns_failures_runner, dns_lookup_counts

    lookups, failed = dns_lookup_counts(dns_failures_runner(str(stack.dataset))())
    assert lookups == DNS_GAUGES["lookups"]
    assert {key: n for key, n in failed.items() if n} == DNS_GAUGES["failed"]
    every_reason = {(c, ns, why): 0.0 for c, ns in DNS_GAUGES["lookups"] for why in DNS_FAILURE_REASONS}
    eventually_equal(
        lambda: gauge(
            stack.prom, "sum by (cluster, namespace) (flowpipe_dns_lookups)", "cluster", "namespace"
        ),
        DNS_GAUGES["lookups"],
        "flowpipe_dns_lookups by cluster and namespace",
    )
    eventually_equal(
        lambda: gauge(
            stack.prom,
            "sum by (cluster, namespace, reason) (flowpipe_dns_failed_lookups)",
            "cluster",
            "namespace",
            "reason",
        ),
        every_reason | DNS_GAUGES["failed"],
        "flowpipe_dns_failed_lookups by cluster, namespace and reason, every reason present",
    )
    (panel,) = [e for _, title, e in dashboard_expressions() if title == "DNS failure share"]
    share = stack.prom.values(substitute_grafana_variables(panel))
    assert share == {(): pytest.approx(5 / 11)}
    shop = stack.prom.values(
        substitute_grafana_variables(panel).replace('namespace=~".*"', 'namespace="shop"')
    )
    assert shop == {(): 0.0}
    streamed = prometheus_counts(stack.prom, "flowpipe_observed_dns_failures_total")
    assert streamed[("shop", "NXDOMAIN")] == 3  # what a counter fed flow by flow would call failures


def test_new_part_files_are_picked_up(stack: Stack) -> None:
    later = stack.start + timedelta(minutes=5)
    write_dataset(
        stack.dataset, analytics_rows(later, scale=2), lost_events=lost_events(later), writer_id="second"
    )
    # Count the part files rather than assume one per write: a write whose rows cross an hour is two files.
    parts = {
        table: float(len(list((stack.dataset / table).rglob("part-*.parquet"))))
        for table in ("flows", "lost_events")
    }
    assert parts["flows"] >= 2 and parts["lost_events"] >= 2
    eventually_equal(
        lambda: stack.prom.values("sum by (table) (flowpipe_dataset_parts_read_total)", "table"),
        parts,
        "every part file of each table read",
    )
    expected = expected_counts(stack.dataset)
    assert expected["flowpipe_observed_drops_total"][("shop", "INGRESS", "policy")] == 6 * 3
    for metric, counts in expected.items():
        eventually_equal(lambda m=metric: prometheus_counts(stack.prom, m), counts, metric)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    with_question = question_available()
    left_out = check_dashboard_queries(stack.prom, role="dataset", with_question=with_question)
    collect_only = {f"{d}: {t}: {e}" for d, t, e in deferred_to_collect()}
    needs_question = {
        f"{d}: {t}: {e}" for d, t, e in dashboard_expressions() if promql_metric_names(e) & QUESTION_METRICS
    }
    assert set(left_out) == collect_only | (set() if with_question else needs_question)
    assert len(dashboard_expressions()) - len(left_out) >= 20, left_out


def test_unexpected_drops_gauge_matches_the_question(stack: Stack) -> None:
    if not question_available():
        pytest.skip("the question catalog has no unexpected_drops question yet")
    from flowpipe.metrics.families import NO_CLUSTER, UNEXPECTED_WHYS
    from flowpipe.metrics.questions import unexpected_drop_counts, unexpected_drops_runner

    counts = unexpected_drop_counts(unexpected_drops_runner(str(stack.dataset))())
    clusters = {cluster for cluster, _ in counts} or {NO_CLUSTER}
    unexpected = {(c, why): 0.0 for c in clusters for why in UNEXPECTED_WHYS}
    unexpected |= {key: n for key, n in counts.items() if key[1] != "expected"}
    expected = {c: counts.get((c, "expected"), 0.0) for c in clusters}
    assert (
        sum(n for (_, why), n in counts.items() if why == "non_policy") > 0
    )  # the conntrack and routing drops
    assert sum(expected.values()) > 0  # policy drops never seen delivered

    eventually_equal(
        lambda: gauge(stack.prom, "sum by (cluster, why) (flowpipe_unexpected_drops)", "cluster", "why"),
        unexpected,
        "flowpipe_unexpected_drops by cluster and why, every why present",
    )
    eventually_equal(
        lambda: gauge(stack.prom, "sum by (cluster) (flowpipe_expected_drops)", "cluster"),
        expected,
        "flowpipe_expected_drops by cluster",
    )


# -- dashboards while files arrive --------------------------------------------------------------------------------

HEALTHY_AT_ZERO = frozenset({"Errors by stage"})
"""Panels whose right answer for a healthy flowpipe is 0 (nothing failed)."""


def test_every_dashboard_panel_shows_nonzero_rates_while_files_arrive(tmp_path: Path) -> None:
    """serve-metrics starts over a dataset that already holds flows, then part files keep arriving: every panel
    that serve-metrics can fill reads above 0 (rates included: the backlog is not born at its full value), and no
    series has a blank label."""
    if not question_available():
        pytest.skip("the question catalog has no unexpected_drops question yet")
    dataset = tmp_path / "dataset"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    write_dataset(dataset, analytics_rows(start), lost_events=lost_events(start), writer_id="backlog")
    serve = start_serve_metrics(dataset)
    arriving = threading.Event()

    def ingest() -> None:
        for index in range(120):  # at most two minutes of files, one a second
            if arriving.wait(1.0):
                return
            moment = start + timedelta(minutes=1, seconds=index)
            write_dataset(
                dataset, analytics_rows(moment), lost_events=lost_events(moment), writer_id=f"w{index}"
            )

    writer = threading.Thread(target=ingest, name="test-ingest", daemon=True)
    try:
        with run_prometheus(tmp_path / "prometheus", [serve.url.removeprefix("http://")]) as prom:
            # The flows already there are an increase that rate() and increase() see, not counters born at
            # their full value (which read as no increase at all).
            backlog = sum(expected_counts(dataset)["flowpipe_flows_received_total"].values())
            wait_until(
                lambda: (
                    prom.values("sum(increase(flowpipe_flows_received_total[10m]))").get((), 0)
                    >= 0.9 * backlog
                ),
                what="the dataset already there as an increase",
            )
            writer.start()
            names = series_names(role="dataset")
            checked = []
            for dashboard, title, expr in dashboard_expressions():
                if not promql_metric_names(expr) <= names or title in HEALTHY_AT_ZERO:
                    continue
                query = substitute_grafana_variables(expr)

                def positive(q: str = query) -> list[dict[str, Any]]:
                    return [s for s in prom.query(q) if float(s["value"][1]) > 0]

                samples = wait_until(positive, what=f"a value above 0 for {dashboard} / {title}: {query}")
                blank = [s["metric"] for s in samples if any(v == "" for v in s["metric"].values())]
                assert not blank, (dashboard, title, blank)
                checked.append(title)
            assert len(checked) >= 20, checked
    finally:
        arriving.set()
        writer.join(10)
        assert stop(serve.process) == 0, "".join(serve.lines)

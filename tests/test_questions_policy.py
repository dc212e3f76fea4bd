"""The semantics of the policy questions, one hand-made situation at a time, on real Parquet and DuckDB."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support.flowdata import T0, flow, write_dataset
from support.sim_dataset import ask

from flowpipe.query import DuckDBEngine

Row = dict[str, Any]
CLUSTER = {"cluster_name": "kind", "node_name": "kind/worker"}


def at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


def ts(seconds: float) -> pd.Timestamp:
    return pd.Timestamp(at(seconds))


def side(
    prefix: str,
    namespace: str | None,
    workload: str | None,
    *,
    identity: int = 5000,
    ip: str = "10.0.0.1",
    pod: str | None = None,
) -> Row:
    if namespace is None:  # a reserved identity
        return {f"{prefix}_identity": identity, f"{prefix}_ip": ip}
    return {
        f"{prefix}_namespace": namespace,
        f"{prefix}_workload_name": workload,
        f"{prefix}_pod_name": pod or f"{workload}-7d9f8b6c5d-bcdfg",
        f"{prefix}_identity": identity,
        f"{prefix}_ip": ip,
    }


def edge(src: Row, dst: Row, port: int, protocol: str = "TCP") -> Row:
    return {**src, **dst, "destination_port": port, "source_port": 40000, "l4_protocol": protocol}


def reversed_edge(values: Row) -> Row:
    """The same endpoints as a reply travels: source and destination swapped, ports too."""
    out: Row = {}
    for key, value in values.items():
        if key.startswith("source_"):
            out["destination_" + key[len("source_") :]] = value
        elif key.startswith("destination_"):
            out["source_" + key[len("destination_") :]] = value
        else:
            out[key] = value
    return out


def forwarded(
    when: float, values: Row, *, direction: str, point: str | None = None, reply: bool = False
) -> Row:
    point = point or ("TO_ENDPOINT" if direction == "INGRESS" else "TO_STACK")
    return flow(
        **CLUSTER,
        **values,
        time=at(when),
        verdict="FORWARDED",
        flow_type="L3_L4",
        event_type=4,
        traffic_direction=direction,
        trace_observation_point=point,
        is_reply=reply,
    )


def dropped(
    when: float,
    values: Row,
    *,
    reason: str = "POLICY_DENIED",
    number: int = 133,
    direction: str = "EGRESS",
    verdict_event: bool = False,
) -> list[Row]:
    """A drop notification, preceded (when asked) by the policy-verdict event of the same packet."""
    rows = []
    if verdict_event:
        rows.append(
            flow(
                **CLUSTER,
                **values,
                time=at(when),
                verdict="DROPPED",
                drop_reason=number,
                drop_reason_desc=reason,
                event_type=5,
                traffic_direction=direction,
                flow_type="L3_L4",
            )
        )
    rows.append(
        flow(
            **CLUSTER,
            **values,
            time=at(when + 0.001),
            verdict="DROPPED",
            drop_reason=number,
            drop_reason_desc=reason,
            event_type=1,
            traffic_direction=direction,
            flow_type="L3_L4",
        )
    )
    return rows


def run(tmp_path: Path, rows: list[Row], question: str, **values: object) -> list[Row]:
    write_dataset(tmp_path, rows)
    with DuckDBEngine(tmp_path) as engine:
        return ask(engine, question, **values)


WEB = side("source", "shop", "web", identity=5001, ip="10.0.1.1")
API = side("destination", "shop", "api", identity=5002, ip="10.0.1.2")
WEB_TO_API = edge(WEB, API, 8080)
API_CLIENT = side("source", "shop", "api", identity=5002, ip="10.0.1.2")


# -- unexpected_drops -----------------------------------------------------------------------------------------


def test_forwarded_at_egress_then_denied_at_ingress_is_one_denied_connection(tmp_path: Path) -> None:
    rows: list[Row] = []
    for i in range(3):
        rows.append(forwarded(i, WEB_TO_API, direction="EGRESS"))
        rows += dropped(i + 0.01, WEB_TO_API, direction="INGRESS", verdict_event=True)
    assert run(tmp_path, rows, "unexpected_drops") == []
    [row] = run(tmp_path / "again", rows, "unexpected_drops", show_expected="true")
    assert (row["why"], row["flows"], row["changed_at"]) == ("expected", 3, None)
    # The policy-verdict event dates the drop; the drop notification is what is counted.
    assert row["first_seen"] == ts(0.01)


def test_a_policy_drop_after_delivery_is_a_regression_with_the_moment_it_changed(tmp_path: Path) -> None:
    rows = dropped(1, WEB_TO_API)  # denied before anything got through: expected
    rows.append(forwarded(10, WEB_TO_API, direction="EGRESS"))
    rows.append(forwarded(10.001, WEB_TO_API, direction="INGRESS"))
    rows.append(
        forwarded(10.002, reversed_edge(WEB_TO_API), direction="INGRESS", point="TO_STACK", reply=True)
    )
    rows.append(forwarded(20, WEB_TO_API, direction="INGRESS"))
    for i in range(4):
        rows += dropped(30 + i, WEB_TO_API, verdict_event=True)
    result = run(tmp_path, rows, "unexpected_drops", show_expected="true")
    by_why = {r["why"]: r for r in result}
    assert by_why.keys() == {"regression", "expected"}
    regression = by_why["regression"]
    assert (regression["source_workload"], regression["destination_workload"]) == ("web", "api")
    assert (regression["destination_port"], regression["l4_protocol"], regression["flows"]) == (
        8080,
        "TCP",
        4,
    )
    assert regression["changed_at"] == ts(30)
    assert (regression["first_delivered"], regression["last_delivered"]) == (ts(10.001), ts(20))
    assert by_why["expected"]["flows"] == 1 and by_why["expected"]["changed_at"] is None


def test_an_answer_is_a_delivery(tmp_path: Path) -> None:
    world = side("destination", None, None, identity=2, ip="203.0.113.5")
    out = edge(WEB, world, 443)
    rows = [
        forwarded(1, out, direction="EGRESS"),
        forwarded(1.2, reversed_edge(out), direction="EGRESS", point="TO_ENDPOINT", reply=True),
    ]
    rows += dropped(5, out)
    [row] = run(tmp_path, rows, "unexpected_drops")
    assert (row["why"], row["destination_workload"], row["flows"]) == ("regression", "world", 1)
    assert row["first_delivered"] == ts(1.2)


def test_dropped_dns_is_dns_blocked_even_when_it_used_to_work(tmp_path: Path) -> None:
    dns = side("destination", "kube-system", "coredns", identity=5100, ip="10.0.9.9")
    lookup = edge(WEB, dns, 53, "UDP")
    rows = [forwarded(1, lookup, direction="INGRESS")]
    rows += dropped(2, lookup) + dropped(3, lookup)
    [row] = run(tmp_path, rows, "unexpected_drops")
    assert (row["why"], row["flows"], row["destination_port"]) == ("dns_blocked", 2, 53)
    assert row["changed_at"] == ts(2.001)


def test_drops_to_the_dns_service_on_another_port_are_dns_blocked(tmp_path: Path) -> None:
    # OpenShift's cluster DNS: the Service dns-default in openshift-dns, its pods listening on 5353.
    server = side("destination", "openshift-dns", "dns-default", identity=5110, ip="10.0.9.10")
    service = {"destination_service_name": "dns-default"}
    lookup = {**edge(WEB, server, 5353, "UDP"), **service}
    other_client = {**edge(side("source", "batch", "job", identity=5300), server, 5353, "UDP"), **service}
    rows = [forwarded(1, other_client, direction="INGRESS")]  # 5353 is what the DNS pods serve
    rows += dropped(2, lookup) + dropped(3, lookup)
    rows += dropped(4, {**edge(WEB, server, 8000), **service})  # a port they never serve: a probe
    # A DNS server behind no Service name, seen answering DNS on 5353: a drop on that port is DNS too.
    resolver = side("destination", "infra", "unbound", identity=5120, ip="10.0.9.11")
    answer = reversed_edge({**edge(API_CLIENT, resolver, 5353, "UDP"), "source_port": 40001})
    rows.append(
        flow(**CLUSTER, **answer, time=at(5), verdict="FORWARDED", flow_type="L7", event_type=129,
             traffic_direction="EGRESS", l7_type="RESPONSE", l7_protocol="dns", dns_query="a.example.",
             dns_rcode=0, is_reply=True)
    )  # fmt: skip
    rows += dropped(6, edge(WEB, resolver, 5353, "UDP"))
    rows += dropped(7, edge(WEB, resolver, 5354, "UDP"))  # not where it answers
    result = run(tmp_path, rows, "unexpected_drops", show_expected="true")
    found = {(r["destination_workload"], r["destination_port"]): (r["why"], r["flows"]) for r in result}
    assert found == {
        ("dns-default", 5353): ("dns_blocked", 2),
        ("dns-default", 8000): ("expected", 1),
        ("unbound", 5353): ("dns_blocked", 1),
        ("unbound", 5354): ("expected", 1),
    }


def test_reasons_that_are_not_policy_decisions(tmp_path: Path) -> None:
    rows = dropped(1, WEB_TO_API, reason="CT_MAP_INSERTION_FAILED", number=155)
    rows += dropped(2, WEB_TO_API, reason="250", number=250)  # a reason newer than this flowpipe
    old = dropped(3, WEB_TO_API, reason="STALE_OR_UNROUTABLE_IP", number=151)
    old[-1]["drop_reason_desc"] = None  # an old capture: the number alone
    rows += old
    rows += dropped(4, WEB_TO_API, reason="IGMP_HANDLED", number=199)  # consumed on purpose: not trouble
    legacy_deny = dropped(5, WEB_TO_API, reason="POLICY_DENY", number=181)
    legacy_deny[-1]["drop_reason_desc"] = None
    rows += legacy_deny
    # Only the drop event's sub-type carries the reason (a legacy `-o json` flow): 133 is POLICY_DENIED.
    sub_type_only = dropped(6, WEB_TO_API, reason="POLICY_DENIED", number=133)
    sub_type_only[-1].update(drop_reason_desc=None, drop_reason=0, event_sub_type=133)
    rows += sub_type_only
    result = run(tmp_path, rows, "unexpected_drops")
    assert {(r["why"], r["drop_reason_desc"], r["flows"]) for r in result} == {
        ("non_policy", "CT_MAP_INSERTION_FAILED", 1),
        ("non_policy", "250", 1),
        ("non_policy", "STALE_OR_UNROUTABLE_IP", 1),
    }
    expected = run(tmp_path / "all", rows, "unexpected_drops", show_expected="true")
    assert {r["drop_reason_desc"] for r in expected if r["why"] == "expected"} == {
        "IGMP_HANDLED",
        "POLICY_DENY",
        "POLICY_DENIED",
    }


def test_infrastructure_drops(tmp_path: Path) -> None:
    host = side("source", None, None, identity=1, ip="172.18.0.2")
    apiserver = side("destination", None, None, identity=7, ip="172.18.0.3")
    coredns = side("destination", "kube-system", "coredns", identity=5100, ip="10.0.9.9")
    monitoring = side("source", "monitoring", "prometheus", identity=5200, ip="10.0.2.2")
    rows = dropped(1, edge(host, API, 8080), direction="INGRESS")
    rows += dropped(2, edge(WEB, apiserver, 6443))
    # coredns serves metrics on 9153 to someone: a drop there hurts a client. Port 22 it never serves: a probe.
    rows.append(forwarded(3, edge(monitoring, coredns, 9153), direction="INGRESS"))
    rows += dropped(4, edge(WEB, coredns, 9153))
    rows += dropped(5, edge(WEB, coredns, 22))
    result = run(tmp_path, rows, "unexpected_drops", show_expected="true")
    found = {
        (r["source_workload"], r["destination_workload"], r["destination_port"]): r["why"] for r in result
    }
    assert found == {
        ("host", "api", 8080): "infrastructure",
        ("web", "kube-apiserver", 6443): "infrastructure",
        ("web", "coredns", 9153): "infrastructure",
        ("web", "coredns", 22): "expected",
    }


def test_unexpected_drops_window_and_namespace(tmp_path: Path) -> None:
    other = edge(
        side("source", "batch", "job", identity=5300), side("destination", "batch", "db", identity=5301), 5432
    )
    rows = dropped(1, WEB_TO_API, reason="CT_MAP_INSERTION_FAILED", number=155)
    rows += dropped(100, other, reason="CT_MAP_INSERTION_FAILED", number=155)
    write_dataset(tmp_path, rows)
    with DuckDBEngine(tmp_path) as engine:
        assert [r["source_namespace"] for r in ask(engine, "unexpected_drops", namespace="batch")] == [
            "batch"
        ]
        window = ask(engine, "unexpected_drops", since=at(50).isoformat(), until=at(200).isoformat())
        assert [r["source_workload"] for r in window] == ["job"]
        assert len(ask(engine, "unexpected_drops", limit="1")) == 1


# -- dns_failures ---------------------------------------------------------------------------------------------


CLIENT = side("source", "shop", "web", identity=5001, ip="10.0.1.1", pod="web-7d9f8b6c5d-bcdfg")
SERVER = side("destination", "kube-system", "coredns", identity=5100, ip="10.0.9.9")


def dns(
    when: float,
    kind: str,
    query: str,
    *,
    port: int = 40000,
    rcode: int = 0,
    qtype: str = "A",
    verdict: str = "FORWARDED",
    client: Row = CLIENT,
) -> Row:
    values = {**client, **SERVER, "source_port": port, "destination_port": 53, "l4_protocol": "UDP"}
    if kind == "RESPONSE":
        values = reversed_edge(values)
    return flow(
        **CLUSTER,
        **values,
        time=at(when),
        verdict=verdict,
        flow_type="L7",
        event_type=129,
        traffic_direction="EGRESS",
        l7_type=kind,
        l7_protocol="dns",
        dns_query=query,
        dns_qtypes=[qtype],
        dns_rcode=rcode,
        is_reply=kind == "RESPONSE",
    )


def test_requests_and_responses_pair_by_port_query_and_type(tmp_path: Path) -> None:
    rows = [
        dns(1, "REQUEST", "api.example.", qtype="A"),
        dns(1, "REQUEST", "api.example.", qtype="AAAA"),
        dns(1.01, "RESPONSE", "api.example.", qtype="A"),  # AAAA never answered
        dns(2, "REQUEST", "slow.example.", port=40001),
        dns(9, "RESPONSE", "slow.example.", port=40001),  # 7 s later: after the 5 s timeout
        dns(3, "REQUEST", "other.example.", port=40002),
        dns(3.1, "RESPONSE", "other.example.", port=40003),  # another port: not its answer
        dns(30, "REQUEST", "late.example.", port=40004),  # too close to the end of the data to judge
        dns(31, "REQUEST", "end.example.", port=40005),
        dns(31.5, "RESPONSE", "end.example.", port=40005),
    ]
    result = run(tmp_path, rows, "dns_failures")
    unanswered = {(r["query"], r["failures"]) for r in result if r["kind"] == "no_answer"}
    assert unanswered == {("api.example.", 1), ("slow.example.", 1), ("other.example.", 1)}
    # Seven lookups: each answered name (api.example. A, slow, other, end) and each request whose name got no answer
    # in time (api.example. AAAA, late, and slow, whose answer came after the timeout); other's answer came in
    # time to another port: that lookup is not counted again.
    for row in result:
        assert row["lookups"] == 7 and row["failure_share"] == pytest.approx(1 / 7, abs=1e-4)
    patient = run(tmp_path / "patient", rows, "dns_failures", timeout_seconds="8")
    assert {r["query"] for r in patient if r["kind"] == "no_answer"} == {"api.example.", "other.example."}


def test_rcode_failures_and_search_path_expansions(tmp_path: Path) -> None:
    rows = []
    for i, (query, rcode) in enumerate(
        [
            ("api.github.com.shop.svc.cluster.local.", 3),
            ("api.github.com.svc.cluster.local.", 3),
            ("api.github.com.", 0),
            ("typo.shop.svc.cluster.local.", 3),
            ("flaky.example.", 2),
            ("flaky.example.", 0),
            ("corp.internal.", 5),
        ]
    ):
        rows += [
            dns(i, "REQUEST", query, port=41000 + i),
            dns(i + 0.01, "RESPONSE", query, port=41000 + i, rcode=rcode),
        ]
    result = run(tmp_path, rows, "dns_failures")
    # api.github.com resolved after its search path: no failure. typo's first expansion failed and its own name
    # was never seen; flaky.example failed, then resolved in a lookup of its own. Failures by the name asked.
    assert {(r["kind"], r["query"], r["rcode_name"], r["failures"]) for r in result} == {
        ("unresolved_final_not_seen", "typo", "NXDOMAIN", 1),
        ("rcode", "flaky.example", "SERVFAIL", 1),
        ("rcode", "corp.internal", "REFUSED", 1),
    }
    # five lookups: api.github.com (three names), typo, flaky.example twice, corp.internal
    assert all(r["lookups"] == 5 and r["example_pods"] == ["web-7d9f8b6c5d-bcdfg"] for r in result)
    everything = run(tmp_path / "all", rows, "dns_failures", include_search_expansions="true")
    assert len([r for r in everything if r["rcode_name"] == "NXDOMAIN"]) == 3


def test_dropped_lookups_and_l3_only_visibility(tmp_path: Path) -> None:
    batch = side("source", "batch", "job", identity=5300, ip="10.0.3.3")
    packet = edge(batch, SERVER, 53, "UDP")
    rows = [dns(1, "REQUEST", "blocked.example.", verdict="DROPPED")]  # refused by the DNS proxy
    rows += dropped(2, edge(CLIENT, SERVER, 53, "UDP"), verdict_event=True)  # dropped before the proxy
    rows += [dns(3, "REQUEST", "ok.example."), dns(3.01, "RESPONSE", "ok.example.")]
    # `batch` resolves names too, but only its port 53 packets are visible: no DNS records at all.
    rows += [forwarded(4 + i, packet, direction="EGRESS") for i in range(3)]
    result = run(tmp_path, rows, "dns_failures")
    dropped_rows = {r["query"]: r for r in result if r["kind"] == "dropped"}
    assert dropped_rows.keys() == {"blocked.example.", None}
    assert all(r["failures"] == 1 and r["lookups"] == 3 for r in dropped_rows.values())
    [invisible] = [r for r in result if r["kind"] == "no_l7_visibility"]
    assert (invisible["source_workload"], invisible["lookups"], invisible["failures"]) == ("job", 3, None)
    assert "L3/L4" in invisible["note"]


# -- least_privilege ------------------------------------------------------------------------------------------


def verdict(when: float, values: Row, *, direction: str, policies: list[str], match: int = 2) -> Row:
    attribution = "ingress_allowed_by" if direction == "INGRESS" else "egress_allowed_by"
    return flow(
        **CLUSTER,
        **values,
        time=at(when),
        verdict="FORWARDED",
        event_type=5,
        flow_type="L3_L4",
        traffic_direction=direction,
        policy_match_type=match,
        is_reply=False,
        **{attribution: policies},
    )


def findings(rows: list[Row]) -> dict[tuple[str, str], Row]:
    return {(r["workload"], r["finding"]): r for r in rows}


def test_without_policy_verdicts_nothing_is_called_unselected(tmp_path: Path) -> None:
    rows = [forwarded(1, WEB_TO_API, direction="INGRESS"), forwarded(2, WEB_TO_API, direction="EGRESS")]
    result = findings(run(tmp_path, rows, "least_privilege"))
    assert not [key for key in result if key[1].startswith("no_")]
    assert result[("api", "observed_ingress")]["detail"] == "from shop/web 8080/TCP"
    assert result[("web", "observed_egress")]["detail"] == "to shop/api 8080/TCP"


def test_unselected_workloads_and_directions(tmp_path: Path) -> None:
    db = side("destination", "shop", "db", identity=5003, ip="10.0.1.3")
    host = side("source", None, None, identity=1, ip="172.18.0.2")
    rows = [
        verdict(1, WEB_TO_API, direction="EGRESS", policies=["shop/web"]),
        verdict(1, WEB_TO_API, direction="INGRESS", policies=["shop/api"]),
        # api sends to db with no egress policy; db has no policy at all; kubelet probes do not count.
        forwarded(2, edge(side("source", "shop", "api", identity=5002), db, 5432), direction="EGRESS"),
        forwarded(2.1, edge(side("source", "shop", "api", identity=5002), db, 5432), direction="INGRESS"),
        forwarded(
            3, edge(host, side("destination", "shop", "web", identity=5001), 8080), direction="INGRESS"
        ),
    ]
    result = findings(run(tmp_path, rows, "least_privilege"))
    assert ("db", "no_policy") in result
    assert result[("api", "no_egress_policy")]["detail"].startswith(
        "no policy selects it for egress: 1 egress"
    )
    assert ("web", "no_policy") not in result and ("web", "no_ingress_policy") not in result
    assert ("api", "no_policy") not in result


def test_ingress_from_the_world(tmp_path: Path) -> None:
    rows = []
    for i in range(3):
        world = side("source", None, None, identity=2, ip=f"203.0.113.{i % 2}")
        rows.append(verdict(10 + i, edge(world, API, 8080), direction="INGRESS", policies=["shop/api"]))
    result = findings(run(tmp_path, rows, "least_privilege"))
    world = result[("api", "ingress_from_world")]
    assert (world["flows"], world["peers"], world["policies"]) == (3, 2, "shop/api")
    assert (
        world["detail"] == "3 requests from 2 addresses outside the cluster on 8080/TCP; allowed by shop/api"
    )


def test_all_namespaces_and_broad_policies(tmp_path: Path) -> None:
    target = side("destination", "shared", "cache", identity=5400, ip="10.0.4.4")
    rows = []
    for i, namespace in enumerate(["a", "b", "c"]):
        client = side("source", namespace, "app", identity=5500 + i, ip=f"10.0.5.{i}")
        rows.append(
            verdict(i, edge(client, target, 6379), direction="INGRESS", policies=["shared/cache"], match=3)
        )
    result = findings(run(tmp_path, rows, "least_privilege"))
    wide = result[("cache", "ingress_from_all_namespaces")]
    assert wide["detail"].endswith("a, b, c") and wide["peers"] == 3
    broad = result[("cache", "broad_policy")]
    assert broad["policies"] == "shared/cache" and "l4-only" in broad["detail"]
    assert broad["detail"].endswith("a/app, b/app, c/app") and broad["peers"] == 3
    # One more namespace that does not call the cache: no longer every namespace.
    rows.append(
        forwarded(9, edge(side("source", "d", "other", identity=5600), API, 8080), direction="INGRESS")
    )
    assert ("cache", "ingress_from_all_namespaces") not in findings(
        run(tmp_path / "d", rows, "least_privilege")
    )


def test_observed_allow_set_lists_l7_calls_and_stays_within_max_listed(tmp_path: Path) -> None:
    rows = []
    for i, url in enumerate(["http://api/v1/orders/1", "http://api/v1/orders/2?x=1", "http://api/v1/carts"]):
        rows.append(
            flow(
                **CLUSTER,
                **WEB_TO_API,
                time=at(i),
                verdict="FORWARDED",
                event_type=129,
                flow_type="L7",
                traffic_direction="INGRESS",
                l7_type="REQUEST",
                l7_protocol="http",
                http_method="GET",
                http_url=url,
                is_reply=False,
            )
        )
    for port in range(9000, 9005):
        rows.append(forwarded(10, edge(WEB, API, port), direction="INGRESS"))
    result = findings(run(tmp_path, rows, "least_privilege", max_listed="3"))
    detail = result[("api", "observed_ingress")]["detail"]
    assert detail.startswith("from shop/web 8080/TCP [GET /v1/carts, GET /v1/orders/{id}]; shop/web 9000/TCP")
    assert detail.endswith("... (6 entries)")

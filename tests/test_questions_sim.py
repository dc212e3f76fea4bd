"""The policy questions against the simulator's ground truth: every injected fault found with the right answer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.sim_dataset import SimDataset, parse_time

from flowpipe.query import DuckDBEngine
from flowpipe.sim import edges as e
from flowpipe.sim import faults as f
from flowpipe.sim import policies as sim_policies
from flowpipe.sim import resolver

Row = dict[str, Any]


def _rows(rows: list[Row], **match: object) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _truth(sim: SimDataset, name: str) -> f.FaultTruth:
    return sim.truth.faults[name]


# -- unexpected_drops ----------------------------------------------------------------------------------------


def test_unexpected_drops_regression_has_the_moment_it_changed(sim_faults: SimDataset) -> None:
    truth = _truth(sim_faults, f.POLICY_REGRESSION)
    rows = _rows(sim_faults.ask("unexpected_drops"), why="regression")
    assert len(rows) == 1
    row = rows[0]
    assert (row["source_namespace"], row["source_workload"]) == (
        truth.source_namespace,
        truth.source_workload,
    )
    assert (row["destination_namespace"], row["destination_workload"]) == (
        truth.destination_namespace,
        truth.destination_workload,
    )
    assert (row["destination_port"], row["l4_protocol"]) == (truth.port, truth.protocol)
    assert row["drop_reason_desc"] == truth.reason
    # Each denied packet is one drop notification (its policy-verdict twin is not counted again); SYN
    # retransmits make more dropped packets than connection attempts.
    assert row["flows"] == truth.counts["drop"] == truth.counts["policy_verdict"]
    assert truth.counts["drop"] > truth.counts["attempts"] > 0
    policy_change = parse_time(truth.changed_at)
    assert row["changed_at"] == parse_time(truth.first_seen)
    assert row["changed_at"] >= policy_change
    assert row["last_delivered"] < policy_change
    assert row["first_seen"] == parse_time(truth.first_seen)
    assert row["last_seen"] <= parse_time(truth.last_seen)
    assert truth.details["forwarded_before"]["attempts"] > 0


def test_unexpected_drops_dns_blocked_by_default_deny(sim_faults: SimDataset) -> None:
    truth = _truth(sim_faults, f.DNS_POLICY_DROP)
    rows = _rows(sim_faults.ask("unexpected_drops"), why="dns_blocked")
    assert {f"{r['source_namespace']}/{r['source_workload']}" for r in rows} == set(
        truth.details["workloads"]
    )
    for row in rows:
        assert (row["destination_namespace"], row["destination_workload"]) == ("kube-system", "coredns")
        assert (row["destination_port"], row["l4_protocol"]) == (53, "UDP")
        assert row["drop_reason_desc"] == "POLICY_DENIED"
    assert sum(r["flows"] for r in rows) == truth.counts["drop"]


@pytest.mark.parametrize("fault", [f.CT_MAP_FULL, f.STALE_IP])
def test_unexpected_drops_non_policy_reasons(sim_faults: SimDataset, fault: str) -> None:
    truth = _truth(sim_faults, fault)
    rows = _rows(sim_faults.ask("unexpected_drops"), why="non_policy", drop_reason_desc=truth.reason)
    assert sum(r["flows"] for r in rows) == truth.counts["drop"]
    assert min(r["first_seen"] for r in rows) == parse_time(truth.first_seen)
    assert max(r["last_seen"] for r in rows) == parse_time(truth.last_seen)
    if truth.source_workload is not None:
        assert {(r["source_workload"], r["destination_workload"], r["destination_port"]) for r in rows} == {
            (truth.source_workload, truth.destination_workload, truth.port)
        }


def test_unexpected_drops_reports_nothing_else(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("unexpected_drops")
    assert Counter(r["why"] for r in rows).keys() == {"regression", "dns_blocked", "non_policy"}
    faults = (f.POLICY_REGRESSION, f.DNS_POLICY_DROP, f.CT_MAP_FULL, f.STALE_IP)
    assert sum(r["flows"] for r in rows) == sum(_truth(sim_faults, name).counts["drop"] for name in faults)
    # The compromised pod's probes were never delivered: expected enforcement, hidden by default.
    scan = _truth(sim_faults, f.PORT_SCAN)
    assert not _rows(
        rows,
        source_namespace=scan.source_namespace,
        source_workload=scan.source_workload,
        drop_reason_desc="POLICY_DENIED",
    )


def test_unexpected_drops_shows_probes_as_expected_when_asked(sim_faults: SimDataset) -> None:
    scan = _truth(sim_faults, f.PORT_SCAN)
    denied = _truth(sim_faults, f.INGRESS_DENIED)
    rows = sim_faults.ask("unexpected_drops", show_expected="true")
    expected = _rows(rows, why="expected")
    probes = _rows(expected, source_namespace=scan.source_namespace, source_workload=scan.source_workload)
    assert probes and sum(r["flows"] for r in probes) == scan.counts["drop"]
    assert {r["destination_port"] for r in probes} <= set(scan.details["candidate_ports"])
    # The connection that grafana's egress allows and postgres' ingress denies was never delivered: expected.
    grafana = _rows(
        expected, source_namespace=denied.source_namespace, source_workload=denied.source_workload
    )
    assert [(r["destination_workload"], r["destination_port"]) for r in grafana] == [
        (denied.destination_workload, denied.port)
    ]
    assert grafana[0]["flows"] == denied.counts["drop"]
    assert len(probes) + len(grafana) == len(expected)
    # Every other row is unchanged by the parameter.
    assert [r for r in rows if r["why"] != "expected"] == sim_faults.ask("unexpected_drops")


def test_unexpected_drops_namespace_filter(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("unexpected_drops", namespace="staging")
    assert rows and {r["why"] for r in rows} == {"dns_blocked"}
    assert all("staging" in (r["source_namespace"], r["destination_namespace"]) for r in rows)


def test_clean_window_has_no_unexpected_drops(sim_clean: SimDataset) -> None:
    assert sim_clean.truth.totals["dropped"] == 0
    assert sim_clean.ask("unexpected_drops") == []
    assert sim_clean.ask("unexpected_drops", show_expected="true") == []


# -- dns_failures --------------------------------------------------------------------------------------------


def _client_lookups(sim: SimDataset, namespace: str, workload: str) -> int:
    """DNS lookups of a workload computed from the rows: every simulated lookup starts with the name plus the
    client's own namespace suffix (L7 requests of that first name), or is a drop notification to port 53."""

    def is_lookup(r: Row) -> bool:
        first = (
            r["l7_protocol"] == "dns"
            and r["l7_type"] == "REQUEST"
            and r["dns_query"].endswith(f".{namespace}.svc.cluster.local.")
        )
        dropped = r["verdict"] == "DROPPED" and r["destination_port"] == 53 and r["event_type"] == 1
        return first or dropped

    return sum(
        1
        for r in sim.rows()
        if (r["source_namespace"], r["source_workload_name"]) == (namespace, workload) and is_lookup(r)
    )


@pytest.mark.parametrize("fault", [f.DNS_NXDOMAIN, f.DNS_SERVFAIL, f.DNS_REFUSED])
def test_dns_failures_rcodes(sim_faults: SimDataset, fault: str) -> None:
    truth = _truth(sim_faults, fault)
    rows = _rows(sim_faults.ask("dns_failures"), kind="rcode", rcode_name=truth.reason)
    assert len(rows) == 1
    row = rows[0]
    # One row per failed lookup's name as the application asked it, not one per search-path expansion.
    assert (row["source_namespace"], row["source_workload"], row["query"]) == (
        truth.source_namespace,
        truth.source_workload,
        truth.destination_name,
    )
    assert row["names"] == sorted(truth.details["names"])
    assert row["failures"] == truth.counts["attempts"]
    assert row["lookups"] == _client_lookups(sim_faults, truth.source_namespace, truth.source_workload)
    assert row["failure_share"] == pytest.approx(row["failures"] / row["lookups"], abs=1e-4)
    assert row["first_seen"] >= parse_time(truth.first_seen)
    assert row["last_seen"] <= parse_time(truth.last_seen)
    assert row["example_pods"] and all(p.startswith(truth.source_workload + "-") for p in row["example_pods"])


def test_dns_failures_unanswered_lookups(sim_faults: SimDataset) -> None:
    truth = _truth(sim_faults, f.DNS_NO_RESPONSE)
    # Requests within the timeout of the newest DNS record cannot be judged yet.
    dns = [r for r in sim_faults.rows() if r["l7_protocol"] == "dns"]
    newest = max(r["time"] for r in dns)
    asked = [r["time"] for r in dns if r["l7_type"] == "REQUEST" and r["dns_query"] == truth.destination_name]
    judged = [t for t in asked if (newest - t).total_seconds() >= 5]
    assert len(asked) == truth.counts["attempts"] >= len(judged) > 0
    rows = _rows(sim_faults.ask("dns_failures"), kind="no_answer")
    assert len(rows) == 1
    row = rows[0]
    assert (row["source_workload"], row["query"], row["rcode_name"]) == (
        truth.source_workload,
        truth.destination_name,
        None,
    )
    # The final name of each lookup got no answer (its search-path expansions were answered NXDOMAIN).
    assert row["failures"] == len(judged)
    assert row["lookups"] == _client_lookups(sim_faults, truth.source_namespace, truth.source_workload)
    assert (row["first_seen"], row["last_seen"]) == (min(judged), max(judged))
    # The answered expansions of these lookups are not reported as another failure.
    stem = truth.destination_name.rstrip(".")
    assert not [r for r in sim_faults.ask("dns_failures") if r["query"] == stem]
    # A timeout longer than the whole run leaves nothing that can be judged.
    assert not _rows(sim_faults.ask("dns_failures", timeout_seconds="100000"), kind="no_answer")


def test_dns_failures_final_name_not_seen_through_node_local_dns(sim_faults: SimDataset) -> None:
    truth = _truth(sim_faults, f.DNS_UPSTREAM_UNSEEN)
    rows = _rows(sim_faults.ask("dns_failures"), kind="unresolved_final_not_seen")
    assert len(rows) == 1
    row = rows[0]
    # node-local-dns is the client of the forwarded names; the name itself went upstream, unseen.
    assert (row["source_namespace"], row["query"], row["rcode_name"]) == (
        truth.source_namespace,
        truth.destination_name,
        "NXDOMAIN",
    )
    assert row["names"] == sorted(truth.details["names"])
    assert row["failures"] == truth.counts["attempts"] == row["lookups"]
    assert row["example_pods"] and all(p.startswith("node-local-dns-") for p in row["example_pods"])
    assert (
        parse_time(truth.first_seen) <= row["first_seen"] <= row["last_seen"] <= parse_time(truth.last_seen)
    )


def test_dns_failures_search_path_expansions_of_resolved_names_are_no_failure(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("dns_failures")
    # External names resolve after their search path; only the injected names fail.
    failed = {r["query"] for r in rows if r["query"]}
    injected = {
        _truth(sim_faults, name).destination_name for name in f.FAULT_NAMES if name.startswith("dns-")
    }
    assert failed <= injected
    # With include_search_expansions every error answer is a row of its own, counted as it came.
    raw = sim_faults.ask("dns_failures", include_search_expansions="true")
    answers = Counter(
        (r["dns_query"], r["dns_rcode"])
        for r in sim_faults.rows()
        if r["l7_protocol"] == "dns" and r["l7_type"] == "RESPONSE" and r["dns_rcode"] != 0
    )
    rcodes = {2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
    shown = Counter()
    for r in _rows(raw, kind="rcode"):
        shown[r["query"], r["rcode_name"]] += r["failures"]
    assert shown == Counter({(q, rcodes[c]): n for (q, c), n in answers.items()})
    assert any(q.startswith(f"{name}.") for q, _ in shown for name in e.EXTERNAL_IPS)
    assert not _rows(raw, kind="unresolved_final_not_seen")


def test_dns_failures_reports_nothing_else(sim_faults: SimDataset) -> None:
    kinds = Counter(r["kind"] for r in sim_faults.ask("dns_failures"))
    assert kinds == {
        "rcode": 3,
        "no_answer": 1,
        "dropped": 2,
        "unresolved_final_not_seen": 1,
        "no_l7_visibility": 1,
    }


def test_clean_window_has_no_dns_failures(sim_clean: SimDataset) -> None:
    # Its lookups of outside names go through their search path (NXDOMAIN answers) and then resolve.
    assert [r for r in sim_clean.rows() if r["l7_protocol"] == "dns" and r["dns_rcode"] == 3]
    assert sim_clean.ask("dns_failures") == []


# -- least_privilege -----------------------------------------------------------------------------------------


def _unselected(sim: SimDataset) -> set[str]:
    workloads = list(sim.simulator.cluster.workloads.values())
    unselected = set(sim.simulator.policies.unselected_workloads(workloads))
    if f.DNS_UPSTREAM_UNSEEN in sim.truth.faults_enabled:
        unselected.add("/".join(resolver.NODE_LOCAL_DNS))  # a hostNetwork DaemonSet that no policy selects
    return unselected


@pytest.mark.parametrize("which", ["faults", "clean"])
def test_least_privilege_finds_the_workloads_no_policy_selects(
    which: str, sim_faults: SimDataset, sim_clean: SimDataset
) -> None:
    sim = sim_faults if which == "faults" else sim_clean
    rows = sim.ask("least_privilege")
    found = {f"{r['namespace']}/{r['workload']}" for r in rows if r["finding"] == "no_policy"}
    assert found == _unselected(sim)
    assert ("production/report-export" in found) == (which == "faults")
    assert not [r for r in rows if r["finding"] in ("no_ingress_policy", "no_egress_policy")]


def test_least_privilege_ingress_from_world(sim_faults: SimDataset, sim_clean: SimDataset) -> None:
    truth = _truth(sim_faults, f.WORLD_INGRESS)
    with_fault = {
        (r["namespace"], r["workload"]): r
        for r in sim_faults.ask("least_privilege")
        if r["finding"] == "ingress_from_world"
    }
    without = {
        (r["namespace"], r["workload"])
        for r in sim_clean.ask("least_privilege")
        if r["finding"] == "ingress_from_world"
    }
    api = (truth.destination_namespace, truth.destination_workload)
    assert api in with_fault and api not in without
    # node-local-dns, a hostNetwork pod recorded with the world identity, is a client of CoreDNS (with the faults).
    coredns = ("kube-system", "coredns")
    assert with_fault.keys() - {api, coredns} == without == {("ingress-nginx", "ingress-nginx-controller")}
    row = with_fault[api]
    assert row["policies"] == truth.details["policy"] and f"{truth.port}/{truth.protocol}" in row["detail"]
    # Requests from the world to api: the policy verdict, both traces and the L7 request of each connection.
    expected = sum(
        1
        for r in sim_faults.rows()
        if r["source_identity"] == truth.details["source_identity"]
        and r["destination_workload_name"] == truth.destination_workload
        and r["traffic_direction"] == "INGRESS"
        and r["is_reply"] is not True
        and r["l7_type"] != "RESPONSE"
    )
    assert row["flows"] == expected


def test_least_privilege_observed_allow_sets_hold_no_probe(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("least_privilege", max_listed="100")
    allow = {
        (r["namespace"], r["workload"], r["finding"]): r["detail"]
        for r in rows
        if r["finding"].startswith("observed_")
    }
    api_egress = allow[("production", "api", "observed_egress")]
    assert "production/postgres 5432/TCP" in api_egress
    assert "world:s3.us-east-1.amazonaws.com 443/TCP" in api_egress
    assert "kube-system/coredns 53/UDP [dns " in api_egress
    api_ingress = allow[("production", "api", "observed_ingress")]
    assert "production/web 8080/TCP [GET /api/v1/" in api_ingress and "{id}" in api_ingress
    web_egress = allow[("production", "web", "observed_egress")]
    scan = _truth(sim_faults, f.PORT_SCAN)
    probed = {
        r["destination_port"]
        for r in sim_faults.rows()
        if r["source_pod_name"] == scan.source_pod and r["drop_reason_desc"] == scan.reason
    }
    assert probed and not any(f" {port}/TCP" in web_egress for port in probed)
    # What allows it today, from the attribution: the workload's own policy, and only policies that exist.
    policies = {(r["namespace"], r["workload"], r["finding"]): r["policies"] for r in rows}
    assert policies[("production", "api", "observed_ingress")] == "production/api"
    known = {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in sim_faults.truth.policies}
    assert all(set(r["policies"].split(", ")) <= known for r in rows if r["policies"])


def test_least_privilege_policies_match_the_simulator(sim_faults: SimDataset) -> None:
    # The simulated policies allow peers by label: no wildcard match, so no broad-policy finding.
    assert all(
        not (rule.peers == () and rule.ports)
        for policy in sim_faults.simulator.policies.policies
        for rule in (policy.ingress or ()) + (policy.egress or ())
    )
    assert sim_policies.MATCH_L4_ONLY == 3
    assert not [r for r in sim_faults.ask("least_privilege") if r["finding"] == "broad_policy"]


# -- the other questions on the simulated cluster --------------------------------------------------------------


def test_new_connections_after_the_scan_started_are_the_probes(sim_faults: SimDataset) -> None:
    scan = _truth(sim_faults, f.PORT_SCAN)
    since = parse_time(scan.first_seen)
    rows = sim_faults.ask(
        "new_connections", since=since.isoformat(), baseline_since=sim_faults.start.isoformat()
    )

    def label(r: dict[str, object], key: str) -> str | None:
        prefix = f"k8s:{key}="
        return next((x[len(prefix) :] for x in r["destination_labels"] if x.startswith(prefix)), None)  # type: ignore[attr-defined]

    # A probed pod on another node may be known there only by identity and labels: its identity names it.
    named = {
        r["destination_identity"]: r["destination_workload_name"]
        for r in sim_faults.rows()
        if r["destination_pod_name"] and r["destination_workload_name"]
    }
    probes = {
        (
            r["destination_namespace"] or label(r, "io.kubernetes.pod.namespace"),
            r["destination_workload_name"] or named.get(r["destination_identity"]),
            r["destination_port"],
        )
        for r in sim_faults.rows()
        if r["source_pod_name"] == scan.source_pod
        and r["drop_reason_desc"] == scan.reason
        and r["time"] >= since
    }
    from_scanner = [
        r
        for r in rows
        if (r["source_namespace"], r["source_workload"]) == (scan.source_namespace, scan.source_workload)
    ]
    assert {
        (r["destination_namespace"], r["destination_workload"], r["destination_port"]) for r in from_scanner
    } == probes
    assert all(r["forwarded"] == 0 and r["dropped"] > 0 for r in from_scanner)
    # Anything else new in that window is a rare but ordinary edge (a kubelet probe), and it was delivered.
    others = [r for r in rows if r not in from_scanner]
    assert all(r["forwarded"] > 0 and r["dropped"] == 0 for r in others)
    # With the baseline reaching back to the start, no edge seen before the window counts as new.
    assert all(r["first_seen"] >= since for r in rows)
    everything = sim_faults.ask("new_connections", since=sim_faults.start.isoformat())
    assert len(everything) > len(rows)


def test_world_egress_by_name(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("world_egress")
    names = {(r["source_workload"], r["destination_name"]) for r in rows}
    assert ("payment-service", "api.stripe.com") in names
    assert ("api", "s3.us-east-1.amazonaws.com") in names
    assert all(r["destination_name"] is not None and r["destination"] == r["destination_name"] for r in rows)
    stripe = [r for r in rows if r["destination_name"] == "api.stripe.com"]
    # Request packets counted once: the egress trace of each request packet; the policy-verdict event of a
    # connection's first packet is the same packet.
    expected = sum(
        1
        for r in sim_faults.rows()
        if "api.stripe.com" in r["destination_names"] and r["is_reply"] is not True and r["event_type"] != 5
    )
    assert sum(r["flows"] for r in stripe) == expected


def test_cross_namespace_and_policy_verdicts(sim_faults: SimDataset) -> None:
    cross = sim_faults.ask("cross_namespace", namespace="monitoring")
    scraped = {
        (r["destination_namespace"], r["destination_workload"])
        for r in cross
        if r["source_workload"] == "prometheus"
    }
    assert ("production", "api") in scraped and ("kube-system", "coredns") in scraped
    assert all(r["source_namespace"] != r["destination_namespace"] for r in cross)
    verdicts = sim_faults.ask("policy_verdicts", namespace="production")
    world = [
        r
        for r in verdicts
        if r["workload"] == "api"
        and r["direction"] == "INGRESS"
        and r["policy"] == "production/api"
        and r["verdict"] == "REDIRECTED"
    ]
    assert world and all(r["match"] == "l3-l4" for r in world)
    denied = [r for r in verdicts if r["workload"] == "api" and r["verdict"] == "DROPPED"]
    assert sum(r["flows"] for r in denied) == _truth(sim_faults, f.POLICY_REGRESSION).counts["policy_verdict"]


def test_http_errors_match_the_responses(sim_faults: SimDataset) -> None:
    rows = sim_faults.ask("http_errors")
    assert rows and all(r["http_code"] >= 400 for r in rows)
    expected = sum(
        1
        for r in sim_faults.rows()
        if r["l7_protocol"] == "http" and r["l7_type"] == "RESPONSE" and (r["http_code"] or 0) >= 400
    )
    assert sum(r["errors"] for r in rows) == expected
    assert all(r["path"].startswith("/api/v1/") and "{id}" in r["path"] for r in rows)


def test_the_bench_dataset_repeats_a_simulated_hour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowpipe.bench import BenchContext
    from flowpipe.bench import questions as bench_questions

    monkeypatch.setattr(bench_questions, "BASE_FLOWS_MAX", 1_000)
    flows, start, end = bench_questions.write_scaled_dataset(tmp_path / "scaled", 2_500, seed=3)
    assert flows == 2_500 and (end - start).total_seconds() == 3 * 3600
    with DuckDBEngine(tmp_path / "scaled") as engine:
        hours = engine.run(
            "SELECT date_trunc('hour', time) AS h, count(*) AS n FROM flows GROUP BY h ORDER BY h"
        )
    assert hours.num_rows == 3 and sum(hours.column("n").to_pylist()) == 2_500
    figures = bench_questions.bench_questions_at_scale(BenchContext(flows=250, workdir=tmp_path / "bench"))
    assert figures[0].value == 2_500
    timed = {f.name.removeprefix("query "): f for f in figures[2:]}
    assert {"unexpected_drops", "dns_failures", "least_privilege"} <= timed.keys()
    assert all(f.value is not None and f.target == bench_questions.TARGET_SECONDS for f in timed.values())

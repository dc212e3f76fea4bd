"""`suggest` against ground truth: the simulator's injected faults, Istio drafts of the simulated cluster, and
the real Hubble captures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support.policy import validate_document
from support.suggest import suggest

from flowpipe.app.suggest import Suggestion
from flowpipe.config import ParquetSinkConfig
from flowpipe.policy.draft import edge_text
from flowpipe.policy.edges import learned_requests
from flowpipe.policy.istio import IstioPolicy, unallowed_requests
from flowpipe.policy.load import parse_policies
from flowpipe.policy.replay import ReplayReport, replay_edges, replay_flows
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import read_events


def deployed(suggestion: Suggestion, fmt: str) -> Any:
    """The drafted policies of one format as the cluster would read them."""
    return parse_policies("---\n".join(f.text for f in suggestion.files if f.format == fmt), path=fmt)


def probes(report: ReplayReport, truth: Any) -> list[Any]:
    scan = truth.faults["port-scan"]
    return [e for e in report.denied_edges if e.source == f"{scan.source_namespace}/{scan.source_workload}"]


@pytest.fixture(scope="module")
def faulty(sim_faults: Any) -> Suggestion:
    return suggest(sim_faults.root, formats=("cilium", "kubernetes"), l7=True)


@pytest.mark.parametrize("fmt", ["cilium", "kubernetes"])
def test_drafts_allow_every_forwarded_request_and_none_of_the_probes(
    faulty: Suggestion, sim_faults: Any, fmt: str
) -> None:
    result = next(r for r in faulty.results if r.format == fmt)
    assert result.flows_proved and result.requests_proved == faulty.requests
    report = replay_flows(deployed(faulty, fmt), sim_faults.table)
    assert report.would_break == 0, report.denied_edges[:3]
    scan = sim_faults.truth.faults["port-scan"]
    found = probes(report, sim_faults.truth)
    assert len({e.port for e in found}) >= 5 and {e.port for e in found} <= set(
        scan.details["candidate_ports"]
    )
    assert all(e.forwarded == 0 and e.dropped > 0 for e in found)
    # the world reached production/api (the world-ingress fault, forwarded by a broad rule): the draft keeps it,
    # because applying it must not break what works today, and says so
    assert any(
        r.startswith("production/flowpipe-api accepts ingress from the world on TCP/8080")
        for r in result.review
    )
    assert "review: production/flowpipe-api accepts ingress from the world" in faulty.stream()


@pytest.mark.parametrize("fmt", ["cilium", "kubernetes"])
def test_drafts_never_allow_an_edge_the_current_policy_denied(
    faulty: Suggestion, sim_faults: Any, fmt: str
) -> None:
    rows = sim_faults.ask("observed_edges")
    key = ("source_namespace", "source_workload", "source_entity", "destination_namespace",
           "destination_workload", "destination_entity", "l4_protocol", "destination_port")  # fmt: skip
    delivered = {tuple(r[k] for k in key) for r in rows if r["status"] == "delivered"}
    denied = [r for r in rows if r["status"] == "denied" and tuple(r[k] for k in key) not in delivered]
    # The simulator denies some connections outright (a default-deny without a DNS rule, probes).
    assert denied
    assert {lo.edge for lo in faulty.denied} >= {edge_text(r) for r in denied}
    # DNS lookups a default-deny without a DNS rule blocks today are the exception, said so: every drafted
    # default-deny allows DNS.
    dns = [r for r in denied if r["destination_port"] == 53]
    assert dns and all(
        "DNS allowance allows" in lo.reason for lo in faulty.denied if ":53" in lo.edge or "/53" in lo.edge
    )
    others = [r for r in denied if r["destination_port"] != 53]
    report = replay_edges(deployed(faulty, fmt), learned_requests(others))
    assert others and report.allowed == 0 and report.denied == sum(r["flows"] for r in others)


def test_drafts_of_a_clean_run_deny_exactly_the_injected_traffic(sim_clean: Any, sim_faults: Any) -> None:
    clean = suggest(sim_clean.root, formats=("cilium",), l7=True)
    assert not next(r for r in clean.results).review or all(
        "ingress-nginx" in r for r in clean.results[0].review
    )
    report = replay_flows(deployed(clean, "cilium"), sim_faults.table)
    fault = sim_faults.truth.faults["world-ingress"]
    broken = [e for e in report.denied_edges if e.forwarded]
    # what the faulty run forwarded and the clean drafts deny: only the world calling production/api
    assert broken and {(e.source, e.destination, e.port) for e in broken} == {
        ("world", f"{fault.destination_namespace}/{fault.destination_workload}", fault.port)
    }
    assert sum(e.forwarded for e in broken) >= fault.counts["attempts"]
    assert probes(report, sim_faults.truth)


def test_istio_drafts_call_by_service_account_and_allow_what_they_learned(sim_faults: Any) -> None:
    suggestion = suggest(sim_faults.root, formats=("istio",), l7=True)
    docs = list(yaml.safe_load_all(suggestion.stream()))
    for doc in docs:
        validate_document(doc, Path("unused"))
    api = next(d for d in docs if d["metadata"] == {"name": "flowpipe-api", "namespace": "production"})
    principals = {
        p
        for rule in api["spec"]["rules"]
        for f in rule.get("from", ())
        for p in f["source"].get("principals", ())
    }
    assert "cluster.local/ns/production/sa/web" in principals
    web_rule = next(
        r
        for r in api["spec"]["rules"]
        if r.get("from", [{}])[0].get("source", {}).get("principals")
        == ["cluster.local/ns/production/sa/web"]
    )
    operations = [t["operation"] for t in web_rule["to"]]
    assert all(op["ports"] == ["8080"] for op in operations)
    assert {m for op in operations for m in op.get("methods", ())} >= {"GET", "POST"}
    # ids that varied are one segment ({*}, Istio 1.22 and later), never a prefix that also allows deeper paths
    paths = [path for op in operations for path in op.get("paths", ())]
    assert any(path.endswith("/{*}") for path in paths) and not any(path.endswith("*") for path in paths)
    assert any(d["metadata"]["name"] == "flowpipe-default-deny" and d["spec"] == {} for d in docs)
    # the proof can fail: without the web rule, web's calls are refused
    policies = [p for p in suggestion.results[0].policies if isinstance(p, IstioPolicy)]
    rows = [e for e in sim_faults.ask("observed_edges") if e["status"] == "delivered"]
    assert unallowed_requests(policies, rows) == []
    rules = [r for r in api["spec"]["rules"] if r is not web_rule]
    cut = [
        p
        if p.key != "production/flowpipe-api"
        else IstioPolicy(p.name, p.namespace, {**api, "spec": {**api["spec"], "rules": rules}})
        for p in policies
    ]
    refused = unallowed_requests(cut, rows)
    assert refused and all(r["source_workload"] == "web" for r in refused)


@pytest.fixture(scope="module")
def captures(capture_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suggest-captures")
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="captures"))
    for batch in read_events(capture_files):
        sink.write(batch)
    sink.close()
    return root


def test_capture_drafts_validate_and_allow_every_learned_request(
    captures: Path, cilium_schemas: Path
) -> None:
    for formats in (("cilium", "kubernetes"), ("istio",)):
        # suggest refuses any draft whose replay denies a learned request: getting one is the proof
        suggestion = suggest(captures, formats=formats, l7=True, include_kube_system=True)
        assert suggestion.files and all(r.requests_proved > 0 for r in suggestion.results)
        for doc in yaml.safe_load_all(suggestion.stream()):
            validate_document(doc, cilium_schemas)

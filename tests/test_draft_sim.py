"""observed_edges and drafts against the simulator's ground truth: every legitimate edge allowed, no probe."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from support.policy import validate_document

from flowpipe.policy.draft import draft_policies
from flowpipe.policy.edges import OBSERVED_EDGE_SCHEMA
from flowpipe.policy.render import render_yaml
from flowpipe.policy.replay import replay_flows


@pytest.fixture(scope="module")
def observed(sim_faults: Any) -> list[dict[str, Any]]:
    return sim_faults.ask("observed_edges")  # type: ignore[no-any-return]


def test_observed_edges_has_the_contract_columns(observed: list[dict[str, Any]]) -> None:
    assert observed
    assert set(OBSERVED_EDGE_SCHEMA.names) <= set(observed[0])
    # requests only: nobody "calls" a client's ephemeral port
    assert all(r["destination_port"] is None or r["destination_port"] < 32768 for r in observed)


def test_each_connection_counts_once(sim_faults: Any, observed: list[dict[str, Any]]) -> None:
    rows = [
        r
        for r in sim_faults.rows()
        if r["l4_protocol"] == "TCP"
        and r["l7_type"] is None
        and r["is_reply"] is False
        and r["verdict"] == "FORWARDED"
        and (r["source_workload_name"], r["destination_workload_name"], r["destination_port"])
        == ("web", "api", 8080)
        and r["source_namespace"] == "production"
    ]
    connections = {
        (r["source_ip"], r["source_port"], r["destination_ip"], r["destination_port"]) for r in rows
    }
    assert len(rows) > len(connections)  # Hubble reported them at both ends
    [edge] = [
        e
        for e in observed
        if (
            e["source_namespace"],
            e["source_workload"],
            e["destination_workload"],
            e["destination_port"],
            e["l7_protocol"],
        )
        == ("production", "web", "api", 8080, None)
    ]
    assert edge["flows"] == len(connections)


@pytest.mark.parametrize("flavour", ["cilium", "kubernetes"])
def test_drafts_allow_every_legitimate_request_and_no_probe(
    sim_faults: Any, observed: list[dict[str, Any]], flavour: str
) -> None:
    # Drafts learn delivered edges only: the probes (denied at the destination) stay denied.
    delivered = [e for e in observed if e["status"] == "delivered"]
    assert any(e["status"] == "denied" for e in observed)
    draft = draft_policies(delivered, flavour=flavour, l7=True)  # type: ignore[arg-type]
    report = replay_flows(draft.policies, sim_faults.table)
    assert report.would_break == 0, report.denied_edges[:3]
    scan = sim_faults.truth.faults["port-scan"]
    probes = [e for e in report.denied_edges if e.source == f"{scan.source_namespace}/{scan.source_workload}"]
    probed_ports = {e.port for e in probes}
    assert len(probed_ports) >= 5 and probed_ports <= set(scan.details["candidate_ports"])
    assert all(e.forwarded == 0 for e in probes)
    for doc in yaml.safe_load_all(render_yaml(draft.policies)):
        assert doc["metadata"]["name"].startswith("flowpipe-")


def test_sim_drafts_validate(observed: list[dict[str, Any]], cilium_schemas: Any) -> None:
    for flavour in ("cilium", "kubernetes"):
        draft = draft_policies(observed, flavour=flavour, l7=True)  # type: ignore[arg-type]
        for doc in yaml.safe_load_all(render_yaml(draft.policies)):
            validate_document(doc, cilium_schemas)

"""Drafts from real Hubble captures: they validate, and replaying the captures through them breaks nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from support.policy import validate_document

from flowpipe.config import ParquetSinkConfig
from flowpipe.policy.draft import draft_policies
from flowpipe.policy.render import render_yaml
from flowpipe.policy.replay import ReplayConfig, replay_flows
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import read_events

ALL_TIME = {"since": "1970-01-01", "until": "2100-01-01"}


@pytest.fixture(scope="module")
def captures(
    capture_files: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pa.Table, list[dict[str, Any]]]]:
    """The captures as a dataset: all flow rows, and the observed edges."""
    root = tmp_path_factory.mktemp("policy-captures")
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id="captures"))
    for batch in read_events(capture_files):
        sink.write(batch)
    sink.close()
    with DuckDBEngine(root) as engine:
        flows = engine.run("SELECT * FROM flows")
        edges = run_question(engine, load_questions().question("observed_edges"), ALL_TIME).table.to_pylist()
    yield flows, [e for e in edges if e["status"] == "delivered"]


@pytest.mark.parametrize("flavour", ["cilium", "kubernetes"])
def test_capture_drafts_validate_and_allow_every_learned_request(
    captures: tuple[pa.Table, list[dict[str, Any]]], cilium_schemas: Path, flavour: str
) -> None:
    flows, edges = captures
    assert edges, "the captures hold forwarded requests"
    draft = draft_policies(edges, flavour=flavour, l7=True, include_kube_system=True)  # type: ignore[arg-type]
    namespaces = {p.namespace for p in draft.policies}
    assert {"bookinfo", "default"} <= namespaces
    for doc in yaml.safe_load_all(render_yaml(draft.policies)):
        validate_document(doc, cilium_schemas)
    # NetworkPolicy can name node addresses only as ipBlocks, which Cilium applies to nodes in the `nodes` mode
    # (the draft's notes say so); Cilium drafts use entities and need no such setting.
    config = ReplayConfig(cidr_match_nodes=flavour == "kubernetes")
    report = replay_flows(draft.policies, flows, config=config)
    assert report.flows_evaluated > 0
    assert report.would_break == 0, report.denied_edges[:5]
    if flavour == "kubernetes":
        assert any("policy-cidr-match-mode: nodes" in n for n in draft.notes)


@pytest.mark.parametrize("flavour", ["cilium", "kubernetes"])
def test_no_workload_is_opened_to_the_world_because_a_record_lacked_its_namespace(
    captures: tuple[pa.Table, list[dict[str, Any]]], flavour: str
) -> None:
    """In kind-starwars, 19 of tiefighter's records carry its labels but no namespace: deathstar accepts
    tiefighter by its labels, and nothing from the world."""
    _, edges = captures
    draft = draft_policies(edges, flavour=flavour, include_kube_system=True)  # type: ignore[arg-type]
    deathstar = next(p for p in draft.policies if p.key == "default/flowpipe-deathstar")
    peers = [peer for rule in deathstar.rules_for("ingress") for peer in rule.peers]
    assert peers and all(p.kind == "endpoints" for p in peers)
    text = render_yaml(draft.policies)
    assert "0.0.0.0/0" not in text and "fromEntities:\n    - world" not in text
    assert not any(p.kind == "entity" and p.entity == "world" for r in deathstar.rules for p in r.peers)

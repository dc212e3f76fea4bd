"""Several clusters in one dataset, for what works per cluster by nature: the observed edges `suggest` drafts
from, `suggest` and `replay` (a policy applies to one cluster), and the evidence of policies behind
`least_privilege`'s no-policy findings. Three simulated clusters, each also written alone as the reference."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from support.flowdata import T0, write_dataset
from support.flowdata import flow as full_row
from support.policy import flow, pod
from support.suggest import suggest

from flowpipe.cli import cli
from flowpipe.config import ParquetSinkConfig
from flowpipe.errors import ConfigError
from flowpipe.model import EventBatch
from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.sim import Simulator, SimulatorConfig
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.transforms.normalize import normalize_flows

START = datetime(2024, 6, 3, 8, 0, tzinfo=UTC)
WINDOW = {"since": "2000-01-01", "until": "2100-01-01"}
CLUSTERS = ("eu-1", "us-1", "ap-1")
UNPOLICED = "ap-1"
"""The cluster without policies: no policy-verdict events and no policy drops (Cilium emits verdict events only
for endpoints some policy selects)."""


def cluster_flows(name: str, number: int) -> pa.Table:
    """One simulated cluster's flows, normalized (node names `<cluster>/<node>` give `cluster_name`)."""
    config = SimulatorConfig(
        seed=40 + number, start=START, duration_seconds=1800, rate_flows_per_second=2.0, cluster_name=name
    )
    table = normalize_flows(list(Simulator(config).flows()))
    if name == UNPOLICED:
        verdict_event = pc.fill_null(pc.equal(table.column("event_type"), 5), False)
        policy_drop = pc.fill_null(pc.equal(table.column("drop_reason_desc"), "POLICY_DENIED"), False)
        table = table.filter(pc.invert(pc.or_(verdict_event, policy_drop)))
    return table


def write(root: Path, table: pa.Table, writer_id: str) -> None:
    sink = ParquetSink(ParquetSinkConfig(path=str(root), writer_id=writer_id, max_batch_rows=20_000))
    sink.write(EventBatch(flows=table))
    sink.close()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each cluster alone (by name), and all three in one dataset (`all`), written by one writer each."""
    root = tmp_path_factory.mktemp("clusters")
    out = {}
    for number, name in enumerate(CLUSTERS):
        table = cluster_flows(name, number)
        write(root / name, table, "alone")
        write(root / "all", table, f"collector-{name}")
        out[name] = root / name
    out["all"] = root / "all"
    return out


def ask(dataset: Path, question: str, **values: object) -> list[dict[str, Any]]:
    with DuckDBEngine(dataset) as engine:
        return run_question(
            engine, load_questions().question(question), {**WINDOW, **values}
        ).table.to_pylist()


def as_set(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)


def test_the_clusters_share_namespaces_and_workloads(datasets: dict[str, Path]) -> None:
    """What makes merging them wrong: the same workload names in every cluster."""
    workloads = [
        {(r["source_namespace"], r["source_workload"]) for r in ask(datasets[name], "observed_edges")}
        for name in CLUSTERS
    ]
    assert len(set.intersection(*workloads)) >= 5


def test_observed_edges_are_per_cluster_and_equal_each_clusters_own_answer(datasets: dict[str, Path]) -> None:
    total = ask(datasets["all"], "observed_edges")
    assert {row["cluster_name"] for row in total} == set(CLUSTERS)
    for name in CLUSTERS:
        alone = ask(datasets[name], "observed_edges")
        assert alone and {row["cluster_name"] for row in alone} == {name}
        # Labels, counts and times included: nothing of another cluster leaks into a cluster's edges.
        assert as_set([row for row in total if row["cluster_name"] == name]) == as_set(alone), name
        # The cluster parameter keeps that cluster's flows only, in the same order.
        assert ask(datasets["all"], "observed_edges", cluster=name) == alone, name
    assert ask(datasets["all"], "observed_edges", cluster="elsewhere") == []


def test_suggest_for_one_cluster_equals_suggest_on_that_clusters_data_alone(
    datasets: dict[str, Path],
) -> None:
    for name in ("eu-1", UNPOLICED):
        chosen = suggest(datasets["all"], formats=("cilium", "kubernetes"), l7=True, cluster=name)
        alone = suggest(datasets[name], formats=("cilium", "kubernetes"), l7=True)
        assert chosen.cluster == alone.cluster == name
        assert chosen.stream() == alone.stream(), name
        assert chosen.summary() == alone.summary(), name
        assert f"of cluster {name}" in chosen.files[0].text.splitlines()[0]


def test_suggest_without_a_cluster_refuses_several_and_names_them(datasets: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as refused:
        suggest(datasets["all"])
    assert all(f"{name} (" in str(refused.value) for name in CLUSTERS)
    assert "--cluster" in str(refused.value)

    result = CliRunner().invoke(
        cli, ["suggest", "--dataset", str(datasets["all"]), "--since", "2000-01-01", "--until", "2100-01-01"]
    )
    assert result.exit_code == 2  # a missing option: a usage error
    assert all(name in result.output for name in CLUSTERS) and "--cluster NAME" in result.output

    with pytest.raises(ConfigError, match="cluster 'elsewhere' has no flows"):
        suggest(datasets["all"], cluster="elsewhere")


def replay(dataset: Path, policies: Path, *extra: str) -> Any:
    args = ["replay", str(policies), "--dataset", str(dataset), "--since", "2000-01-01", "--format", "json"]
    return CliRunner().invoke(cli, [*args, *extra])


def test_replay_judges_one_clusters_flows(datasets: dict[str, Path], tmp_path: Path) -> None:
    drafts = tmp_path / "eu-1.yaml"
    drafts.write_text(suggest(datasets["eu-1"], l7=True).stream())

    alone = replay(datasets["eu-1"], drafts)
    chosen = replay(datasets["all"], drafts, "--cluster", "eu-1")
    assert alone.exit_code == 0 and chosen.exit_code == 0, alone.output + chosen.output
    assert json.loads(chosen.output) == json.loads(alone.output)
    assert json.loads(alone.output)["would_break"] == 0

    refused = replay(datasets["all"], drafts)
    assert refused.exit_code == 2
    assert all(name in refused.output for name in CLUSTERS) and "--cluster NAME" in refused.output


def test_no_policy_findings_need_policy_evidence_in_their_own_cluster(datasets: dict[str, Path]) -> None:
    unselected = ("no_policy", "no_ingress_policy", "no_egress_policy")
    total = ask(datasets["all"], "least_privilege", limit=1_000_000)
    union = [row for name in CLUSTERS for row in ask(datasets[name], "least_privilege", limit=1_000_000)]
    assert as_set(total) == as_set(union)

    found = {row["cluster_name"] for row in total if row["finding"] in unselected}
    # The clusters with policies name their unselected workloads; the cluster without any policy-verdict
    # event cannot tell selected from unselected workloads, whatever the other clusters show.
    assert found == set(CLUSTERS) - {UNPOLICED}
    assert not [row for row in total if row["cluster_name"] == UNPOLICED and row["finding"] in unselected]
    assert [row for row in total if row["cluster_name"] == UNPOLICED and row["finding"] == "observed_ingress"]
    for row in total:
        if row["finding"] in unselected:
            assert f"flowpipe suggest --cluster {row['cluster_name']} --namespace " in row["suggestion"]


def test_a_pod_recorded_with_a_reserved_identity_is_resolved_within_its_own_cluster(tmp_path: Path) -> None:
    """The same pod name in two clusters, as two workloads: the L7 record that names the pod with the world
    identity takes the workload and labels of the pod in its own cluster, in observed_edges and in replay's
    edges alike (one rule, `flows_enriched`'s `*_unresolved_pod`)."""
    web = pod("shop", "web")
    api = {"a": pod("shop", "api"), "b": {**pod("shop", "api", tier="b"), "workload_name": "api-b"}}
    unresolved = {
        "namespace": "shop",
        "pod_name": api["a"]["pod_name"],
        "identity": 2,
        "labels": ["reserved:world"],
    }
    http = {
        "flow_type": "L7",
        "l7_type": "REQUEST",
        "l7_protocol": "http",
        "http_method": "GET",
        "http_url": "/",
    }
    rows = []
    for offset, cluster in enumerate(("a", "b")):  # cluster a's pod is seen first
        when = T0 + timedelta(seconds=offset)
        rows.append(full_row(time=when, **flow(web, api[cluster], 8080), cluster_name=cluster))
        rows.append(full_row(time=when, **flow(web, unresolved, 8080, **http), cluster_name=cluster))
    write_dataset(tmp_path, rows)

    edges = ask(tmp_path, "observed_edges")
    for cluster, workload, tier in (("a", "api", False), ("b", "api-b", True)):
        mine = [e for e in edges if e["cluster_name"] == cluster]
        assert {(e["destination_entity"], e["destination_workload"]) for e in mine} == {(None, workload)}
        assert {e["l7_protocol"] for e in mine} == {None, "http"}
        assert all(("k8s:tier=b" in e["destination_labels"]) is tier for e in mine), cluster

    with DuckDBEngine(tmp_path) as engine:
        replayed = engine.run(EDGES_SQL, edge_parameters([], cluster="b")).to_pylist()
    assert len(replayed) == 2
    assert {(e["destination_workload"], tuple(e["destination_labels"])) for e in replayed} == {
        (e["destination_workload"], tuple(e["destination_labels"])) for e in edges if e["cluster_name"] == "b"
    }

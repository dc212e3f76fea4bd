"""Several clusters in one dataset: `cluster_name` from the flows' node names or from `--cluster`, collectors of
three simulated clusters writing one dataset, every question answering per cluster and in total, and the question
gauges of the three collectors counting each cluster once."""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from support.collect import background_collect, fast_collect_config
from support.wait import wait_until

from flowpipe.cli import cli
from flowpipe.metrics.families import PipelineMetrics
from flowpipe.metrics.questions import DnsFailuresRefresher, dns_failures_runner, dns_lookup_counts
from flowpipe.query import DuckDBEngine, load_questions, run_question
from flowpipe.server import ObserverServer
from flowpipe.sim import Simulator, SimulatorConfig

START = datetime(2024, 6, 3, 8, 0, tzinfo=UTC)
UNNAMED = "default"
"""Cilium's default cluster name: Hubble then writes node names without a cluster prefix."""
CLUSTERS = {"eu-1": "eu-1", "us-1": "us-1", UNNAMED: "ap-1"}
"""Simulated cluster → the cluster name stored. The default simulated cluster names its nodes without a
cluster prefix (as a single-cluster Hubble does), so its name comes from `--cluster ap-1`."""
ALL_TIME = {"since": "2000-01-01", "until": "2100-01-01"}


def simulator(name: str, number: int) -> Simulator:
    return Simulator(
        SimulatorConfig(
            seed=20 + number, start=START, duration_seconds=1800, rate_flows_per_second=2.0, cluster_name=name
        )
    )


@pytest.fixture(scope="module")
def per_cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each cluster ingested alone from its jsonpb export: the reference answers."""
    root = tmp_path_factory.mktemp("clusters")
    datasets = {}
    for number, (sim_name, stored) in enumerate(CLUSTERS.items()):
        export = root / f"{sim_name}.jsonpb"
        with export.open("w") as out:
            simulator(sim_name, number).write_jsonpb(out)
        dataset = root / stored
        args = ["ingest", "--dataset", str(dataset), str(export)]
        if sim_name == UNNAMED:
            args += ["--cluster", stored]  # the flows do not say which cluster they come from
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        datasets[stored] = dataset
    return datasets


@pytest.fixture(scope="module")
def combined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset fed by three collectors, each following the relay of its own cluster."""
    dataset = tmp_path_factory.mktemp("combined") / "data"
    with ExitStack() as stack:
        expected = 0
        running = []
        for number, (sim_name, stored) in enumerate(CLUSTERS.items()):
            server = stack.enter_context(ObserverServer(buffer_size=100_000))
            expected += server.publish(simulator(sim_name, number).flow_bytes())
            config = fast_collect_config(
                server.address, dataset, writer_id=f"c-{stored}", cluster_name=stored
            )
            running.append(stack.enter_context(background_collect(config)))
        wait_until(lambda: count(dataset) == expected, what="every flow of the three clusters")
        for collector in running:
            collector.stop()
    return dataset


def count(dataset: Path) -> int:
    if not (dataset / "flows").exists():
        return 0
    with DuckDBEngine(dataset) as engine:
        return int(engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py())


def answer(dataset: Path, name: str) -> list[dict[str, Any]]:
    question = load_questions().question(name)
    values = {k: v for k, v in ALL_TIME.items() if question.parameter(k) is not None}
    if question.parameter("limit") is not None:
        values["limit"] = "1000000"
    with DuckDBEngine(dataset) as engine:
        return run_question(engine, question, values).table.to_pylist()


def as_set(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)


def test_cluster_name_comes_from_the_flows_or_from_the_flag(per_cluster: dict[str, Path]) -> None:
    for stored, dataset in per_cluster.items():
        with DuckDBEngine(dataset) as engine:
            names = engine.run("SELECT DISTINCT cluster_name, node_name LIKE '%/%' AS prefixed FROM flows")
        rows = names.to_pylist()
        assert {row["cluster_name"] for row in rows} == {stored}
        # named clusters carry the name in node names; the default one only got it from --cluster
        assert {row["prefixed"] for row in rows} == ({False} if stored == "ap-1" else {True})


def test_three_collectors_write_one_dataset_with_their_own_checkpoints(
    combined: Path, per_cluster: dict[str, Path]
) -> None:
    with DuckDBEngine(combined) as engine:
        counts = engine.run("SELECT cluster_name, count(*) AS n FROM flows GROUP BY cluster_name").to_pylist()
    assert {row["cluster_name"]: row["n"] for row in counts} == {
        stored: count(dataset) for stored, dataset in per_cluster.items()
    }
    states = sorted(path.name for path in (combined / "_state").glob("relay*.json"))
    assert states == [f"relay-cluster-{name}.json" for name in sorted(CLUSTERS.values())]


def test_every_question_answers_per_cluster_and_in_total(
    combined: Path, per_cluster: dict[str, Path]
) -> None:
    answered = []
    for question in load_questions():
        total = answer(combined, question.name)
        union = [row for dataset in per_cluster.values() for row in answer(dataset, question.name)]
        # The dataset of all clusters answers, cluster by cluster, what each cluster's own dataset answers.
        assert as_set(total) == as_set(union), question.name
        if total:
            assert "cluster_name" in total[0], f"{question.name} has no cluster_name column"
            clusters = {row["cluster_name"] for row in total}
            assert clusters <= set(CLUSTERS.values()), question.name
            if clusters == set(CLUSTERS.values()):
                answered.append(question.name)
    assert len(answered) >= 8, answered  # most questions find something in every cluster


def test_collectors_sharing_a_dataset_answer_the_dns_gauges_once_per_cluster(combined: Path) -> None:
    # each collector runs the question over the shared dataset for its own cluster (as `collect --cluster` does):
    # summed over the collectors, every cluster's lookups count once, as the question over all of them says
    lookups, failed = dns_lookup_counts(dns_failures_runner(str(combined), ALL_TIME)())
    assert {cluster for cluster, _ in lookups} == set(CLUSTERS.values())
    summed: dict[tuple[str, ...], float] = {}
    for cluster in CLUSTERS.values():
        registry = CollectorRegistry()
        metrics = PipelineMetrics.create(registry)
        runner = dns_failures_runner(str(combined), ALL_TIME, cluster=cluster)
        assert DnsFailuresRefresher(metrics, runner, cluster=cluster).refresh()
        for family in registry.collect():
            for sample in family.samples:
                if sample.name in ("flowpipe_dns_lookups", "flowpipe_dns_failed_lookups") and sample.value:
                    assert sample.labels["cluster"] == cluster, sample
                    key = (sample.name, *sample.labels.values())
                    summed[key] = summed.get(key, 0.0) + sample.value
    expected = {("flowpipe_dns_lookups", *key): n for key, n in lookups.items() if n}
    expected |= {("flowpipe_dns_failed_lookups", *key): n for key, n in failed.items() if n}
    assert summed == expected
    assert any(name == "flowpipe_dns_failed_lookups" for name, *_ in summed)

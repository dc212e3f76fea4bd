"""The edge grouping gives the same edges whether or not its lookup views were prepared (computed once), and
the same pod edges as the observed_edges question: one definition of how an edge names its ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.flowdata import T0, flow, write_dataset
from support.sim_dataset import ask

from flowpipe.config import ParquetSinkConfig
from flowpipe.drop_reasons import is_policy_decision
from flowpipe.policy.stored_edges import EDGES_SQL, prepare_edges
from flowpipe.query.engine import open_engine
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import read_events

_FLAGS = {"addresses": True, "names": True, "http": True, "kafka": True, "dns": True}


def _rows(table: Any) -> list[str]:
    columns = sorted(table.column_names)
    return sorted(repr(tuple(row[c] for c in columns)) for row in table.to_pylist())


@pytest.mark.parametrize("flags", [_FLAGS, dict.fromkeys(_FLAGS, False)])
def test_prepared_grouping_gives_the_same_edges(sim_faults: Any, flags: dict[str, bool]) -> None:
    params = {"since": None, "until": None, "cluster": None, **flags}
    with open_engine(str(sim_faults.root)) as engine:
        plain = engine.run(EDGES_SQL, params)
    with open_engine(str(sim_faults.root)) as engine:
        prepare_edges(engine)
        prepare_edges(engine)  # a second time: already prepared
        ((definition,),) = engine.connection.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'identity_workloads'"
        ).fetchall()
        prepared = engine.run(EDGES_SQL, params)
    # the simulator's faults include pods known only by identity and labels: the lookup is in use, and a table
    assert "_flowpipe_identity_workloads" in definition
    assert plain.num_rows > 100
    assert _rows(prepared) == _rows(plain)


def _pod_edges(rows: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """Requests between pods (not replies, not drops for other reasons than policy) as observed_edges names them:
    one row per workload pair, port and outcome, with the smallest label list of the workload's pods."""
    folded: dict[tuple[Any, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for e in rows:
        ends = (
            e["source_namespace"],
            e["source_workload"],
            e["destination_namespace"],
            e["destination_workload"],
        )
        key = (*ends, e["l4_protocol"], e["destination_port"], e["status"])
        labels = (tuple(e["source_labels"]), tuple(e["destination_labels"]))
        known = folded.get(key)
        folded[key] = labels if known is None else (min(known[0], labels[0]), min(known[1], labels[1]))
    return {(*key, *labels) for key, labels in folded.items()}


def _pods(edge: dict[str, Any], side: str) -> bool:
    labels = edge[f"{side}_labels"] or []
    return edge[f"{side}_namespace"] is not None and not any(
        label.startswith("reserved:") for label in labels
    )


def _both_users(root: Path) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """The pod edges of the observed_edges question and of the replay grouping, over every flow."""
    with open_engine(str(root)) as engine:
        found = ask(engine, "observed_edges", l7="false")
        prepare_edges(engine)
        params = {"since": None, "until": None, "cluster": None, **dict.fromkeys(_FLAGS, False)}
        grouped = engine.run(EDGES_SQL, params).to_pylist()
    observed = [e for e in found if _pods(e, "source") and _pods(e, "destination")]
    requests = [
        {**e, "status": "denied" if e["verdict"] == "DROPPED" else "delivered"}
        for e in grouped
        if not e["is_reply"] and _pods(e, "source") and _pods(e, "destination")
        and (e["verdict"] != "DROPPED" or is_policy_decision(e["drop_reason_desc"]))
    ]  # fmt: skip
    return _pod_edges(observed), _pod_edges(requests)


def test_observed_edges_and_the_replay_grouping_name_the_same_pod_edges(sim_faults: Any) -> None:
    """One definition of an edge's ends (`sql/_parts/edge_endpoints.sql`): the question suggest learns from and
    the grouping replay judges give every request between pods the same workloads, labels and outcome."""
    observed, replayed = _both_users(sim_faults.root)
    assert len(observed) > 50
    assert observed == replayed


def test_both_users_of_the_edge_definition_agree_on_the_real_captures(
    capture_files: list[Path], tmp_path: Path
) -> None:
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="captures"))
    for batch in read_events(capture_files):
        sink.write(batch)
    sink.close()
    observed, replayed = _both_users(tmp_path)
    assert len(observed) > 5
    assert observed == replayed


def _end(side: str, **values: Any) -> dict[str, Any]:
    return {f"{side}_{key}": value for key, value in values.items()}


def test_the_grouping_names_each_end_as_flows_enriched_names_its_flows(tmp_path: Path) -> None:
    """Flows are grouped by their ends as recorded and the groups named by the view's definition: every kind
    of end the view names apart (a pod known only by identity and labels, ends without an identity number,
    a pod recorded with a reserved identity, with and without its workload) gets the view's name, and a pod
    recorded with a reserved identity takes the workload of the pod of that name seen with its own identity,
    even when only a record replay does not judge (a socket-LB event) shows it."""
    fighter = (
        "k8s:app.kubernetes.io/name=tiefighter",
        "k8s:io.kubernetes.pod.namespace=default",
        "k8s:org=empire",
    )
    remote = _end("source", identity=31246, labels=list(fighter), ip="10.0.2.7")
    star = _end(
        "destination", namespace="default", pod_name="deathstar-6c94dcc57b-9p2xq", workload_name="deathstar",
        identity=15153, labels=["k8s:app.kubernetes.io/name=deathstar", "k8s:io.kubernetes.pod.namespace=default"],
        ip="10.0.2.9",
    )  # fmt: skip
    fighter_named = _end(
        "source", namespace="default", pod_name="tiefighter-7d9f8b6c5d-bcdfg", workload_name="tiefighter",
        identity=31246, labels=list(fighter), ip="10.0.2.8",
    )  # fmt: skip
    host_by_labels = _end("source", identity=None, labels=["reserved:host"], ip="172.18.0.2")
    unknown = _end("source", identity=0, labels=["reserved:unknown"], ip="fe80::1")
    dns_host_net = _end(
        "destination", namespace="kube-system", pod_name="node-local-dns-9d7hc", identity=2,
        labels=["reserved:world"], ip="172.18.0.3",
    )  # fmt: skip
    dns_own = _end(
        "destination", namespace="kube-system", pod_name="node-local-dns-9d7hc", workload_name="node-local-dns",
        identity=40001, labels=["k8s:k8s-app=node-local-dns", "k8s:io.kubernetes.pod.namespace=kube-system"],
        ip="172.18.0.3",
    )  # fmt: skip
    tcp = {"l4_protocol": "TCP", "is_reply": False, "verdict": "FORWARDED", "traffic_direction": "INGRESS"}
    udp = {"l4_protocol": "UDP", "is_reply": False, "verdict": "FORWARDED", "traffic_direction": "EGRESS"}
    rows = [
        flow(**remote, **star, **tcp, source_port=40000 + i, destination_port=80) for i in range(3)
    ] + [
        flow(**fighter_named, **star, **tcp, source_port=41000, destination_port=80),
        flow(**host_by_labels, **star, **tcp, source_port=42000, destination_port=80),
        flow(**unknown, **star, **{**tcp, "verdict": "DROPPED"}, source_port=43000, destination_port=80,
             drop_reason_desc="UNSUPPORTED_L3_PROTOCOL"),
        flow(**fighter_named, **dns_host_net, **udp, source_port=44000, destination_port=53),
        # the DNS pod with its own identity, only in a socket-LB event (not judged: it only names the pod)
        flow(**fighter_named, **dns_own, l4_protocol="UDP", verdict="TRACED", flow_type="SOCK", event_type=7,
             destination_port=53),
    ]  # fmt: skip
    for index, row in enumerate(rows):
        row["time"] = T0.replace(second=index)
    write_dataset(tmp_path, rows)
    params = {"since": None, "until": None, "cluster": None, **dict.fromkeys(_FLAGS, False)}
    with open_engine(str(tmp_path)) as engine:
        prepare_edges(engine)
        edges = engine.run(EDGES_SQL, params).to_pylist()
        viewed = engine.run(
            "SELECT source_namespace, source_workload, destination_namespace, destination_workload"
            " FROM flows_enriched WHERE is_traffic"
        ).to_pylist()
    ends = {(e["source_namespace"], e["source_workload"], e["destination_workload"]): e for e in edges}
    # every end as the view names it (the DNS pod aside: named by its own identity's record, as the view's
    # users that name edges do)
    assert set(ends) == {
        (v["source_namespace"], v["source_workload"], v["destination_workload"]) for v in viewed
    }
    assert sum(e["flows"] for e in edges) == len(rows) - 1
    by_labels = ends[("default", "tiefighter", "deathstar")]
    assert by_labels["flows"] == 4 and by_labels["source_labels"] == list(fighter)
    # an end without an identity number is named by its own labels (the host), or else by its address
    assert ends[(None, "host", "deathstar")]["source_ip"] == "172.18.0.2"
    assert ends[(None, "fe80::1", "deathstar")]["verdict"] == "DROPPED"
    # the DNS pod recorded with the world identity: the workload and labels of its own identity's record
    lookup = ends[("default", "tiefighter", "node-local-dns")]
    assert lookup["destination_namespace"] == "kube-system" and lookup["destination_port"] == 53
    assert lookup["destination_labels"] == dns_own["destination_labels"]
    assert lookup["destination_identity"] is None

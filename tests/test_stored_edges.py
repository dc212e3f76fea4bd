"""The edge grouping gives the same edges whether or not its lookup views were prepared (computed once), and
the same pod edges as the observed_edges question: one definition of how an edge names its ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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

"""Replay as a library call: the stored flows of a window, grouped into edges once, judged against policies
(and, with a baseline, against the policies in force today: the difference edge by edge)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from flowpipe.policy.clusters import choose_cluster
from flowpipe.policy.delta import DeltaReport, delta_parameters, replay_delta
from flowpipe.policy.model import Policy
from flowpipe.policy.replay import ReplayConfig, ReplayReport, replay_edges
from flowpipe.policy.stored_edges import EDGES_SQL, prepare_edges
from flowpipe.query.engine import open_engine
from flowpipe.query.run import newest_flow_time, resolve_window


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What a replay found: the report of `policies` (without a baseline), the delta against the baseline or the
    recorded verdicts (when asked for), and the newest flow's time when relative times counted back from it."""

    report: ReplayReport | None
    delta: DeltaReport | None
    anchor: datetime | None


def replay_stored_flows(
    dataset: str,
    policies: Sequence[Policy],
    baseline: Sequence[Policy] | None = None,
    *,
    since: str | None = None,
    until: str | None = None,
    cluster: str | None = None,
    config: ReplayConfig | None = None,
    judge_delta: bool = False,
) -> ReplayOutcome:
    """Replay the flows of `since`..`until` (of one cluster) through `policies`.

    Without a baseline the report is `replay_edges`'; with `judge_delta` (or a `baseline`) the delta is judged on
    the same edges too (`replay_delta`; without a baseline, against the recorded verdicts).
    """
    config = config or ReplayConfig()
    with open_engine(dataset, require_flows=True) as engine:
        start, end, anchor = resolve_window(newest_flow_time(engine), since, until)
        chosen = choose_cluster(engine, cluster or None, start, end, command="replay")
        # One grouping for both sets: it keeps what either set can tell apart.
        prepare_edges(engine)
        edges = engine.run(
            EDGES_SQL,
            delta_parameters(policies, baseline, since=start, until=end, cluster=chosen),
            question="replay edges",
        )
    rows = edges.to_pylist()
    delta = replay_delta(policies, baseline, rows, config) if judge_delta or baseline is not None else None
    report = replay_edges(policies, rows, config) if baseline is None else None
    return ReplayOutcome(report=report, delta=delta, anchor=anchor)

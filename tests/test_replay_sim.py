"""Replay against the simulator's ground truth: its own policies reproduce its policy drops, window by window."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from flowpipe.drop_reasons import is_policy_decision
from flowpipe.policy.load import parse_policies
from flowpipe.policy.replay import replay_flows


def policy_drop_requests(table: Any) -> int:
    rows = (
        table.filter(pc.equal(table["verdict"], "DROPPED"))
        .select(["drop_reason_desc", "is_reply"])
        .to_pylist()
    )
    return sum(1 for r in rows if is_policy_decision(r["drop_reason_desc"]) and not r["is_reply"])


def test_each_policy_revision_explains_the_drops_of_its_own_window(sim_faults: Any) -> None:
    history = sim_faults.simulator.policy_history()
    assert len(history) == 2  # the policy-regression fault changes production/api once
    (_start, before), (change, after) = history
    table = sim_faults.table
    for policies, since, until in ((before, None, change), (after, change, None)):
        window = table
        if since is not None:
            window = window.filter(pc.greater_equal(window["time"], since))
        if until is not None:
            window = window.filter(pc.less(window["time"], until))
        report = replay_flows(parse_policies(policies.to_yaml(), path="sim.yaml"), window)
        # every request the simulated datapath forwarded is allowed, every policy drop is denied
        assert report.would_break == 0, report.denied_edges[:3]
        assert report.would_allow_dropped == 0
        assert sum(e.dropped for e in report.denied_edges) == policy_drop_requests(window)


def test_the_final_policies_name_the_regression(sim_faults: Any) -> None:
    report = replay_flows(
        parse_policies(sim_faults.simulator.policies.to_yaml(), path="sim.yaml"), sim_faults.table
    )
    breaking = {(e.source, e.destination, e.port) for e in report.denied_edges if e.forwarded}
    assert breaking == {("production/api", "production/redis", 6379)}
    assert report.would_allow_dropped == 0
    # the compromised pod's probes stay denied
    probes = [e for e in report.denied_edges if e.source == "production/web" and e.dropped]
    assert len(probes) >= 5 and not any(e.forwarded for e in probes)

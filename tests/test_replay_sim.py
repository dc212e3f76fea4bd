"""Replay against the simulator's ground truth: its own policies reproduce its policy drops, window by window."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from flowpipe.drop_reasons import is_policy_decision
from flowpipe.policy.load import parse_policies
from flowpipe.policy.replay import replay_flows


def policy_drop_requests(table: Any) -> int:
    """Request records of denied connections: the policy drops, and the source's FORWARDED record of a
    connection that the destination dropped (one connection, denied at its other end)."""
    rows = table.select(
        ["verdict", "drop_reason_desc", "is_reply", "flow_type", "l7_type", "l4_protocol", "source_ip",
         "source_port", "destination_ip", "destination_port"]
    ).to_pylist()  # fmt: skip

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (
            r["source_ip"],
            r["source_port"],
            r["destination_ip"],
            r["destination_port"],
            r["l4_protocol"],
        )

    drops = [
        r
        for r in rows
        if r["verdict"] == "DROPPED" and is_policy_decision(r["drop_reason_desc"]) and not r["is_reply"]
    ]
    denied = {key(r) for r in drops if r["l4_protocol"] in ("TCP", "UDP") and r["l7_type"] is None}
    sent = [
        r
        for r in rows
        if r["verdict"] == "FORWARDED" and not r["is_reply"] and r["flow_type"] != "SOCK" and key(r) in denied
    ]
    return len(drops) + len(sent)


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

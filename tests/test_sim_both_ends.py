"""The simulator's cross-node ingress denial (fault `ingress-denied`) through every question that counts it, and
through suggest: one connection attempt per SYN and its retransmits, counted once per packet, never learned."""

from __future__ import annotations

from _sim_dataset import SimDataset

from flowpipe.sim import faults as f

GRAFANA, POSTGRES = ("monitoring", "grafana"), ("production", "postgres")


def _pair(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        r
        for r in rows
        if (r["source_namespace"], r["source_workload"]) == GRAFANA
        and (r["destination_namespace"], r["destination_workload"]) == POSTGRES
    ]


def test_the_ingress_denial_is_counted_once_per_packet_in_every_question(sim_faults: SimDataset) -> None:
    truth = sim_faults.truth.faults[f.INGRESS_DENIED]
    attempts, drops = truth.counts["attempts"], truth.counts["drop"]
    assert attempts > 0 and drops > attempts  # retransmits: more dropped SYNs than connection attempts
    # Each dropped SYN is also a policy-verdict event, and its source's node forwarded it first.
    assert truth.counts["policy_verdict"] == drops and truth.counts["trace"] == drops
    (talker,) = _pair(sim_faults.ask("top_talkers", limit=1000))
    assert (talker["flows"], talker["dropped"], talker["forwarded"]) == (drops, drops, 0)
    assert talker["connections"] == attempts
    unexpected = _pair(sim_faults.ask("unexpected_drops", show_expected="true"))
    assert sum(r["flows"] for r in unexpected) == drops
    assert {r["why"] for r in unexpected} == {"expected"}  # never delivered: a denial, not a regression
    (edge,) = _pair(sim_faults.ask("observed_edges"))
    assert (edge["status"], edge["flows"], edge["destination_port"]) == ("denied", attempts, 5432)
    # grafana's egress allowance is not in use: the connection never got through.
    observed = [
        r
        for r in sim_faults.ask("least_privilege")
        if (r["namespace"], r["workload"]) == GRAFANA and r["finding"] == "observed_egress"
    ]
    assert observed and all("production/postgres" not in str(r["detail"]) for r in observed)


def test_suggest_never_opens_the_denied_edge(sim_faults: SimDataset) -> None:
    from flowpipe.query import DuckDBEngine
    from flowpipe.suggest import SuggestConfig, suggest_policies

    with DuckDBEngine(sim_faults.root) as engine:
        suggestion = suggest_policies(
            engine, SuggestConfig(since="2000-01-01", until="2100-01-01", formats=("cilium",))
        )
    text = suggestion.stream()
    postgres = [doc for doc in text.split("\n---\n") if "name: flowpipe-postgres" in doc]
    assert postgres and all("grafana" not in doc for doc in postgres)
    grafana = [doc for doc in text.split("\n---\n") if "name: flowpipe-grafana" in doc]
    assert grafana and all("postgres" not in doc and "5432" not in doc for doc in grafana)

"""The simulator's cross-node ingress denial (fault `ingress-denied`) through every question that counts it, and
through suggest: one connection attempt per SYN and its retransmits, counted once per packet, never learned."""

from __future__ import annotations

from support.sim_dataset import SimDataset

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
    from flowpipe.app.suggest import SuggestConfig, suggest_policies
    from flowpipe.query import DuckDBEngine

    with DuckDBEngine(sim_faults.root) as engine:
        suggestion = suggest_policies(
            engine, SuggestConfig(since="2000-01-01", until="2100-01-01", formats=("cilium",))
        )
    text = suggestion.stream()
    postgres = [doc for doc in text.split("\n---\n") if "name: flowpipe-postgres" in doc]
    assert postgres and all("grafana" not in doc for doc in postgres)
    grafana = [doc for doc in text.split("\n---\n") if "name: flowpipe-grafana" in doc]
    assert grafana and all("postgres" not in doc and "5432" not in doc for doc in grafana)


def test_replay_sees_an_ingress_break_observed_only_at_the_sender(sim_faults: SimDataset) -> None:
    """The destination's records are missing (filtered, lost, not captured): a policy that lets api receive
    port 80 only, while web calls it on 8080, still breaks every one of those requests."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flowpipe.policy.load import parse_policies
    from flowpipe.policy.replay import replay_flows

    table = sim_faults.table
    # Keep what the senders' nodes reported: drop every INGRESS record of production/api.
    at_api = pc.and_(
        pc.equal(table["destination_namespace"], "production"),
        pc.equal(table["traffic_direction"], "INGRESS"),
    )
    api_pods = {
        r["destination_pod_name"]
        for r in table.select(["destination_namespace", "destination_pod_name"]).to_pylist()
        if r["destination_namespace"] == "production" and (r["destination_pod_name"] or "").startswith("api-")
    }
    at_api = pc.and_(at_api, pc.is_in(table["destination_pod_name"], pa.array(sorted(api_pods))))
    sender_only = table.filter(pc.invert(pc.fill_null(at_api, False)))
    policy = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: production}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
    report = replay_flows(parse_policies(policy, path="api.yaml"), sender_only)
    broken = [e for e in report.denied_edges if e.destination == "production/api" and e.forwarded]
    web = [e for e in broken if e.source == "production/web" and e.port == 8080]
    assert web and all(e.direction == "ingress" for e in web)
    # Every request record the senders reported to api:8080 that got through breaks, none is missed (api's
    # pods by identity: pods of another node are known there by identity and labels only).
    api_identities = {
        r["destination_identity"]
        for r in table.select(["destination_identity", "destination_pod_name"]).to_pylist()
        if r["destination_pod_name"] in api_pods
    }
    requests = [
        r
        for r in sender_only.select(
            ["source_labels", "destination_identity", "destination_port", "verdict", "is_reply", "flow_type"]
        ).to_pylist()
        if {"k8s:app=web", "k8s:io.kubernetes.pod.namespace=production"} <= set(r["source_labels"])
        and r["destination_identity"] in api_identities
        and r["destination_port"] == 8080
        and r["verdict"] in ("FORWARDED", "REDIRECTED")
        and not r["is_reply"]
        and r["flow_type"] != "SOCK"
    ]
    assert sum(e.forwarded for e in web) == len(requests) > 0
    assert report.would_break >= len(requests)


def test_pods_known_only_by_labels_and_service_addresses_are_named_as_pods(sim_faults: SimDataset) -> None:
    # The simulator's pods of one node reach other nodes' records with identity and labels only, and connect()
    # to a Service gives socket-LB events naming its ClusterIP: neither may show up as an unnamed pod or the world.
    pods = {(w.namespace, w.name) for w in sim_faults.simulator.cluster.workloads.values()}
    talkers = sim_faults.ask("top_talkers", limit=100000)
    for row in talkers:
        for side in ("source", "destination"):
            if row[f"{side}_workload"] in {name for _, name in pods} and row[f"{side}_namespace"] is None:
                raise AssertionError(f"a pod without its namespace: {row}")
    named = {(r["destination_namespace"], r["destination_workload"]) for r in talkers}
    assert ("production", "api") in named
    egress = sim_faults.ask("world_egress", limit=100000)
    assert egress and not [r for r in egress if str(r["destination"]).startswith(("10.96.", "10.244."))]
    edges = sim_faults.ask("observed_edges")
    assert not [
        e for e in edges if e["destination_entity"] == "world" and e["destination_ip"].startswith("10.")
    ]

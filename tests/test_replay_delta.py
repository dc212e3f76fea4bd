"""`replay --baseline` on the simulator: each proposed change gives exactly the breaks its flows say it must."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from flowpipe.cli import cli as main
from flowpipe.policy.delta import delta_parameters, replay_delta
from flowpipe.policy.load import parse_policies
from flowpipe.policy.stored_edges import EDGES_SQL
from flowpipe.query.engine import open_engine

Row = dict[str, Any]


def is_request(r: Row) -> bool:
    """A request record as the simulator emitted it (the replies, socket-LB events and L7 responses are not)."""
    if r["verdict"] not in ("FORWARDED", "REDIRECTED", "AUDIT", "DROPPED"):
        return False
    if r["flow_type"] == "SOCK" or r["event_type"] == 7 or r["is_reply"] or r["l7_type"] == "RESPONSE":
        return False
    if r["is_reply"] is None and r["l4_protocol"] == "TCP" and r["tcp_flags"]:
        return "SYN" in r["tcp_flags"] and "ACK" not in r["tcp_flags"]
    return True


def has(labels: Any, *wanted: str) -> bool:
    return all(f"k8s:{w}" in (labels or ()) for w in wanted)


def expected(sim: Any, match: Callable[[Row], bool]) -> int:
    return sum(1 for r in sim.rows() if is_request(r) and match(r))


def documents(sim: Any) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(sim.simulator.policies.to_yaml()))


def find(docs: list[dict[str, Any]], namespace: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["metadata"] == {"name": name, "namespace": namespace})


def tighten_port(docs: list[dict[str, Any]]) -> None:
    """production/web stops accepting 8443 from the ingress controller."""
    ports = find(docs, "production", "web")["spec"]["ingress"][0]["toPorts"][0]["ports"]
    ports[:] = [p for p in ports if p["port"] != "8443"]


def remove_dns(docs: list[dict[str, Any]]) -> None:
    """production/order-service loses its DNS allowance."""
    egress = find(docs, "production", "order-service")["spec"]["egress"]
    egress[:] = [
        e for e in egress if "toEndpoints" not in e or "k8s-app" not in e["toEndpoints"][0]["matchLabels"]
    ]


def add_deny(docs: list[dict[str, Any]]) -> None:
    """production/redis denies everything from Prometheus."""
    find(docs, "production", "redis")["spec"]["ingressDeny"] = [
        {
            "fromEndpoints": [
                {"matchLabels": {"app": "prometheus", "k8s:io.kubernetes.pod.namespace": "monitoring"}}
            ]
        }
    ]


def rename(docs: list[dict[str, Any]]) -> None:
    find(docs, "production", "api")["metadata"]["name"] = "api-v2"


CHANGES: dict[str, tuple[Callable[[list[dict[str, Any]]], None], Callable[[Row], bool], tuple[Any, ...]]] = {
    "tighten-port": (
        tighten_port,
        # by labels: some of the controller's records carry its labels without its namespace and pod name
        lambda r: (
            has(r["source_labels"], "app.kubernetes.io/name=ingress-nginx")
            and has(r["destination_labels"], "app=web", "io.kubernetes.pod.namespace=production")
            and r["destination_port"] == 8443
        ),
        # one edge: the controller's records with only its labels name it by its identity's workload
        (("ingress-nginx/ingress-nginx-controller", "production/web", "TCP", 8443),),
    ),
    "remove-dns": (
        remove_dns,
        lambda r: (
            has(r["source_labels"], "app=order-service", "io.kubernetes.pod.namespace=production")
            and has(r["destination_labels"], "k8s-app=kube-dns")
            and r["destination_port"] == 53
        ),
        (("production/order-service", "kube-system/coredns", "UDP", 53),),
    ),
    "add-deny": (
        add_deny,
        lambda r: (
            has(r["source_labels"], "app=prometheus", "io.kubernetes.pod.namespace=monitoring")
            and has(r["destination_labels"], "app=redis", "io.kubernetes.pod.namespace=production")
            and r["destination_port"] == 9121
        ),
        (("monitoring/prometheus", "production/redis", "TCP", 9121),),
    ),
}


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def delta_json(sim: Any, proposed: Path, baseline: Path, *extra: str) -> dict[str, Any]:
    """`flowpipe replay PROPOSED --baseline BASELINE --format json` over the whole simulated dataset."""
    args = [
        "replay",
        str(proposed),
        "--baseline",
        str(baseline),
        "--dataset",
        str(sim.root),
        "--since",
        "all",
    ]
    result = CliRunner().invoke(main, [*args, "--format", "json", *extra])
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


@pytest.fixture(scope="module")
def baseline_file(sim_faults: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("baseline") / "current.yaml", documents(sim_faults))


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_change_breaks_exactly_the_requests_its_flows_say(
    sim_faults: Any, baseline_file: Path, tmp_path: Path, change: str
) -> None:
    edit, match, edges = CHANGES[change]
    docs = documents(sim_faults)
    edit(docs)
    proposed = write(tmp_path / "proposed.yaml", docs)
    delta = delta_json(sim_faults, proposed, baseline_file)
    found = {(e["source"], e["destination"], e["protocol"], e["port"]) for e in delta["newly_denied"]}
    want = expected(sim_faults, match)
    assert want > 0
    assert found == set(edges)
    assert delta["newly_denied_requests"] == want
    assert delta["newly_allowed"] == []
    assert delta["unchanged"]["allowed"] + delta["unchanged"]["denied"] + want == delta["flows_evaluated"]
    # the rule behind each break is named, in the proposed file
    for edge in delta["newly_denied"]:
        assert edge["decided_by"] and all(r["file"] == str(proposed) for r in edge["decided_by"])


def test_the_rule_changes_name_each_rule_with_its_matches(
    sim_faults: Any, baseline_file: Path, tmp_path: Path
) -> None:
    docs = documents(sim_faults)
    remove_dns(docs)
    add_deny(docs)
    proposed = write(tmp_path / "proposed.yaml", docs)
    delta = delta_json(sim_faults, proposed, baseline_file)
    removed = [(r["policy"], r["rule"]) for r in delta["rules_removed"]]
    added = [(r["policy"], r["rule"]) for r in delta["rules_added"]]
    # the FQDN rule moves up from egress[2] to egress[1] and is no change
    assert removed == [("production/order-service", "egress[1]")]
    assert added == [("production/redis", "ingressDeny[0]")]
    assert delta["rules_changed"] == []
    dns = expected(sim_faults, CHANGES["remove-dns"][1])
    assert delta["rules_removed"][0]["matched_before"] >= dns
    deny = expected(sim_faults, CHANGES["add-deny"][1])
    assert delta["rules_added"][0]["matched_after"] == deny


def test_a_renamed_policy_is_no_change(sim_faults: Any, baseline_file: Path, tmp_path: Path) -> None:
    docs = documents(sim_faults)
    rename(docs)
    docs.reverse()  # and the documents reordered
    proposed = write(tmp_path / "proposed.yaml", docs)
    delta = delta_json(sim_faults, proposed, baseline_file, "--fail-on-break", "--fail-on-allow")
    assert delta["newly_denied"] == [] and delta["newly_allowed"] == []
    assert delta["rules_added"] == delta["rules_removed"] == delta["rules_changed"] == []
    assert delta["flows_evaluated"] > 0


def test_gates_exit_1_on_a_break_or_an_allowance(
    sim_faults: Any, baseline_file: Path, tmp_path: Path
) -> None:
    docs = documents(sim_faults)
    tighten_port(docs)
    proposed = write(tmp_path / "proposed.yaml", docs)
    args = ["replay", "--dataset", str(sim_faults.root), "--since", "all"]
    breaks = CliRunner().invoke(
        main, [*args, str(proposed), "--baseline", str(baseline_file), "--fail-on-break"]
    )
    assert breaks.exit_code == 1
    assert "would newly be denied" in breaks.stderr
    # the reverse change newly allows what the tightened set denies
    allows = CliRunner().invoke(
        main, [*args, str(baseline_file), "--baseline", str(proposed), "--fail-on-allow"]
    )
    assert allows.exit_code == 1
    assert "would newly be allowed" in allows.stderr
    assert CliRunner().invoke(main, [*args, str(baseline_file), "--baseline", str(proposed)]).exit_code == 0
    # invalid input is 2, with the file named
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nspec: [\n")
    invalid = CliRunner().invoke(main, [*args, str(proposed), "--baseline", str(bad)])
    assert invalid.exit_code == 2 and "bad.yaml" in invalid.output


def test_without_a_baseline_the_delta_is_against_the_recorded_verdicts(sim_faults: Any) -> None:
    policies = parse_policies(sim_faults.simulator.policies.to_yaml(), path="sim.yaml")
    with open_engine(str(sim_faults.root)) as engine:
        edges = engine.run(EDGES_SQL, delta_parameters(policies, None), question="replay edges")
    from flowpipe.policy.replay import replay_edges

    report = replay_edges(policies, edges)
    delta = replay_delta(policies, None, edges)
    assert delta.newly_denied_requests == report.would_break > 0
    assert delta.newly_allowed_requests == report.would_allow_dropped
    assert {(e.source, e.destination, e.port) for e in delta.newly_denied} == {
        (e.source, e.destination, e.port) for e in report.denied_edges if e.forwarded
    }

"""`flowpipe replay` and `flowpipe audit` end to end: policy files and a real dataset, state checked."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from support.flowdata import T0, write_dataset
from support.flowdata import flow as row
from support.policy import DB_NETWORK_POLICY, flow, pod

from flowpipe.cli import cli

WEB = pod("shop", "web")
API = pod("shop", "api")
DB = pod("shop", "db")

POLICIES = DB_NETWORK_POLICY + "  - from: [{podSelector: {matchLabels: {app: batch}}}]\n"


def dataset(tmp_path: Path) -> Path:
    rows = [
        flow(API, DB, 5432),
        flow(API, DB, 5432),
        # forwarded today (a connection of its own), denied by the policy: would break
        flow(WEB, DB, 5432, source_port=41000),
        flow(WEB, DB, 5432, source_port=41001, verdict="DROPPED", drop_reason_desc="POLICY_DENIED"),
        flow(DB, API, 40000, is_reply=True),
        flow(WEB, API, 8080),
    ]
    root = tmp_path / "data"
    write_dataset(root, [row(time=T0, **r) for r in rows])
    return root


def test_replay_json(tmp_path: Path) -> None:
    policy_file = tmp_path / "policies" / "db.yaml"
    policy_file.parent.mkdir()
    policy_file.write_text(POLICIES)
    result = CliRunner().invoke(
        cli, ["replay", str(policy_file.parent), "--dataset", str(dataset(tmp_path)), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["flows_evaluated"] == 5 and data["replies_skipped"] == 1
    assert data["would_break"] == 1 and data["would_allow_dropped"] == 0
    [edge] = data["denied_edges"]
    assert (edge["source"], edge["destination"], edge["port"], edge["flows"], edge["forwarded"]) == (
        "shop/web",
        "shop/db",
        5432,
        2,
        1,
    )
    assert data["rules"][0] == {
        "policy": "shop/db",
        "rule": "ingress[0]",
        "action": "allow",
        "matched_flows": 2,
        "file": str(policy_file),
    }
    assert [(r["policy"], r["rule"]) for r in data["unused_rules"]] == [("shop/db", "ingress[1]")]


def test_replay_table_and_window(tmp_path: Path) -> None:
    policy_file = tmp_path / "db.yaml"
    policy_file.write_text(POLICIES)
    root = dataset(tmp_path)
    result = CliRunner().invoke(cli, ["replay", str(policy_file), "--dataset", str(root)])
    assert result.exit_code == 0, result.output
    assert "would break 1 forwarded requests" in result.stdout and "shop/web" in result.stdout
    # a window after every flow: nothing to evaluate
    later = CliRunner().invoke(
        cli, ["replay", str(policy_file), "--dataset", str(root), "--since", "2030-01-01", "--format", "json"]
    )
    assert json.loads(later.stdout)["flows_evaluated"] == 0


def test_replay_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Deployment\napiVersion: apps/v1\n")
    result = CliRunner().invoke(cli, ["replay", str(bad), "--dataset", str(dataset(tmp_path))])
    assert result.exit_code == 2 and "bad.yaml (document 1)" in result.output  # invalid input
    empty = CliRunner().invoke(
        cli, ["replay", str(tmp_path / "bad.yaml"), "--dataset", str(tmp_path / "none")]
    )
    assert empty.exit_code == 2  # the policy input is read before the dataset


def test_audit_exit_code_follows_fail_on(tmp_path: Path) -> None:
    policy_file = tmp_path / "deny.yaml"
    policy_file.write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\n"
        "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n"
    )
    root = dataset(tmp_path)
    failing = CliRunner().invoke(cli, ["audit", str(policy_file), "--dataset", str(root), "--format", "json"])
    assert failing.exit_code == 1
    findings = json.loads(failing.stdout)
    assert [(f["severity"], f["check"], f["file"]) for f in findings] == [
        ("high", "egress-without-dns", str(policy_file))
    ]
    policy_file.write_text(policy_file.read_text().replace("[Ingress, Egress]", "[Ingress]"))
    passing = CliRunner().invoke(cli, ["audit", str(policy_file), "--dataset", str(root)])
    assert passing.exit_code == 0 and "no-default-deny" in passing.stdout
    strict = CliRunner().invoke(
        cli, ["audit", str(policy_file), "--dataset", str(root), "--fail-on", "medium"]
    )
    assert strict.exit_code == 1


def test_audit_without_flows_skips_observed_checks(tmp_path: Path) -> None:
    policy_file = tmp_path / "ghost.yaml"
    policy_file.write_text(POLICIES.replace("app: db", "app: ghost"))
    without = CliRunner().invoke(
        cli, ["audit", str(policy_file), "--dataset", str(tmp_path / "nothing"), "--format", "json"]
    )
    assert without.exit_code == 0 and "skipped" in without.stderr
    assert "selector-matches-nothing" not in without.stdout
    withflows = CliRunner().invoke(
        cli, ["audit", str(policy_file), "--dataset", str(dataset(tmp_path)), "--format", "json"]
    )
    assert "selector-matches-nothing" in withflows.stdout


def test_relative_windows_count_back_from_an_old_dataset() -> None:
    from datetime import UTC, datetime, timedelta

    from flowpipe.query.run import resolve_window

    now = datetime(2025, 1, 1, tzinfo=UTC)
    start, end, anchor = resolve_window(T0, "1h", None, now=now)  # the data is older than the window
    assert anchor == T0 and start == T0 - timedelta(hours=1) and end is None
    recent = now - timedelta(minutes=5)
    start, _, anchor = resolve_window(recent, "1h", None, now=now)
    assert anchor is None and start == now - timedelta(hours=1)


def test_replay_sees_ingress_breaks_of_connections_observed_only_at_the_sender(tmp_path: Path) -> None:
    """A hand-written policy that lets db receive port 80 only, while db really receives 8080 on connections
    that only the sender's node reported (FORWARDED EGRESS TO_OVERLAY): every one of them would break."""
    rows = [
        flow(API, DB, 8080, traffic_direction="EGRESS", trace_observation_point="TO_OVERLAY", source_port=p)
        for p in range(42000, 42040)
    ]
    root = tmp_path / "data"
    write_dataset(root, [row(time=T0, **r) for r in rows])
    policy_file = tmp_path / "db-80.yaml"
    policy_file.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: db, namespace: shop}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: db}}\n"
        "  ingress:\n  - fromEndpoints: [{matchLabels: {app: api}}]\n"
        '    toPorts: [{ports: [{port: "80", protocol: TCP}]}]\n'
    )
    result = CliRunner().invoke(cli, ["replay", str(policy_file), "--dataset", str(root), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["would_break"] == 40 and data["allowed"] == 0
    [edge] = data["denied_edges"]
    assert (edge["destination"], edge["port"], edge["direction"], edge["forwarded"]) == (
        "shop/db",
        8080,
        "ingress",
        40,
    )

"""SARIF 2.1.0 and JUnit XML of `audit` and `replay --baseline`: valid by the specification, located at the rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from support.review import check_junit, check_sarif

from flowpipe.cli import cli


@pytest.fixture
def policy_files(sim_faults: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The simulator's policies (current/) and a change that tightens a port and adds a deny rule (proposed/),
    under a repository-like folder that is the working directory, so the reports name relative paths."""
    monkeypatch.chdir(tmp_path)
    docs = list(yaml.safe_load_all(sim_faults.simulator.policies.to_yaml()))
    (tmp_path / "current").mkdir()
    (tmp_path / "current" / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    web = next(d for d in docs if d["metadata"] == {"name": "web", "namespace": "production"})
    web["spec"]["ingress"][0]["toPorts"][0]["ports"].pop()  # 8443 no more
    redis = next(d for d in docs if d["metadata"] == {"name": "redis", "namespace": "production"})
    redis["spec"]["ingressDeny"] = [
        {
            "fromEndpoints": [
                {"matchLabels": {"app": "prometheus", "k8s:io.kubernetes.pod.namespace": "monitoring"}}
            ]
        }
    ]
    (tmp_path / "proposed").mkdir()
    (tmp_path / "proposed" / "production.yaml").write_text(yaml.safe_dump_all(docs[:7], sort_keys=False))
    # the other namespaces as a `kubectl get -o yaml` List
    listed = {"apiVersion": "v1", "kind": "List", "items": docs[7:]}
    (tmp_path / "proposed" / "others.yaml").write_text(yaml.safe_dump(listed, sort_keys=False))
    return Path("proposed"), Path("current")


def test_replay_delta_sarif_and_junit_validate_and_point_at_the_rules(
    sim_faults: Any, policy_files: tuple[Path, Path]
) -> None:
    proposed, current = policy_files
    result = CliRunner().invoke(
        cli,
        ["replay", str(proposed), "--baseline", str(current), "--dataset", str(sim_faults.root), "--since", "all",
         "--sarif", "out/replay.sarif", "--junit", "out/replay.xml", "--fail-on-break"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    files = {p.as_posix(): p for p in (*proposed.glob("*.yaml"), *current.glob("*.yaml"))}
    results = check_sarif(json.loads(Path("out/replay.sarif").read_text()), files)
    lines = Path("proposed/production.yaml").read_text().splitlines()
    denied = [r for r in results if r["ruleId"] == "newly-denied"]
    assert {(r["properties"]["destination"], r["properties"]["port"]) for r in denied} == {
        ("production/web", 8443),
        ("production/redis", 9121),
    }
    for r in denied:
        physical = r["locations"][0]["physicalLocation"]
        assert physical["artifactLocation"]["uri"] == "proposed/production.yaml"
        line = lines[physical["region"]["startLine"] - 1]
        if r["properties"]["destination"] == "production/redis":
            # the deny rule's own entry under ingressDeny
            assert "fromEndpoints" in line and "ingressDeny" in lines[physical["region"]["startLine"] - 2]
        else:
            # web is isolated and no rule allows 8443 any more: its document
            assert line.startswith("apiVersion")
    changed = [r for r in results if r["ruleId"] == "rule-changed"]
    assert [r["locations"][0]["logicalLocations"][0]["name"] for r in changed] == [
        "production/web ingress[0]"
    ]
    root = check_junit(Path("out/replay.xml").read_text())
    failed = {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None}
    assert failed == {"production/web", "production/redis"}
    cases = {c.get("name") for c in root.iter("testcase")}
    assert len(cases) == len(sim_faults.simulator.policies.to_yaml().split("\n---\n"))


def test_audit_sarif_and_junit_validate(sim_faults: Any, policy_files: tuple[Path, Path]) -> None:
    proposed, _ = policy_files
    result = CliRunner().invoke(
        cli,
        ["audit", str(proposed), "--dataset", str(sim_faults.root), "--sarif", "audit.sarif", "--junit", "-",
         "--fail-on", "low", "--format", "json"],
    )  # fmt: skip
    findings = json.loads(result.stdout[: result.stdout.index("<?xml")])
    assert result.exit_code == (1 if findings else 0)
    files = {p.as_posix(): p for p in proposed.glob("*.yaml")}
    results = check_sarif(json.loads(Path("audit.sarif").read_text()), files)
    assert len(results) == len(findings) > 0
    assert {r["ruleId"] for r in results} == {f["check"] for f in findings}
    root = check_junit(result.stdout[result.stdout.index("<?xml") :])
    assert sum(1 for c in root.iter("testcase") if c.find("failure") is not None) > 0


def test_invalid_policy_input_exits_2_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {ingress: 3}\n"
    )
    result = CliRunner().invoke(cli, ["audit", str(bad), "--dataset", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "Traceback" not in result.output


def test_rules_are_located_at_their_entry_in_lists_and_specs(tmp_path: Path) -> None:
    from flowpipe.policy.load import load_policies
    from flowpipe.policy.review import PolicyLines

    text = """\
apiVersion: v1
kind: List
items:
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: one, namespace: shop}
  spec:
    endpointSelector: {matchLabels: {app: a}}
    ingress:
    - fromEndpoints: [{matchLabels: {app: b}}]
- apiVersion: cilium.io/v2
  kind: CiliumNetworkPolicy
  metadata: {name: two, namespace: shop}
  specs:
  - endpointSelector: {matchLabels: {app: a}}
    egress:
    - toEndpoints: [{matchLabels: {app: b}}]
  - endpointSelector: {matchLabels: {app: c}}
    egressDeny:
    - toEndpoints: [{matchLabels: {app: d}}]
    - toEndpoints: [{matchLabels: {app: e}}]
"""
    path = tmp_path / "listed.yaml"
    path.write_text(text)
    lines = text.splitlines()
    policies = {(p.name, p.spec_index): p for p in load_policies([path])}
    located = PolicyLines()

    def at(name: str, spec: int | None, rule: str | None) -> str:
        return lines[located.line(policies[(name, spec)], rule) - 1]

    assert at("one", None, None) == "- apiVersion: cilium.io/v2"
    assert at("one", None, "ingress[0]") == "    - fromEndpoints: [{matchLabels: {app: b}}]"
    assert at("two", 1, "specs[1].egressDeny[1]") == "    - toEndpoints: [{matchLabels: {app: e}}]"
    assert at("two", 0, "specs[0].egress[0]") == "    - toEndpoints: [{matchLabels: {app: b}}]"
    assert located.line(policies[("one", None)], "ingress[7]") == 9  # past the list: the list itself

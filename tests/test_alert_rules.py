"""flowpipe's alert rules: promtool accepts them and their unit tests pass, the PrometheusRule ships the same
rules, and every rule reads only metrics flowpipe exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from support.env import require_binary
from support.prom import ROOT, promql_metric_names

from flowpipe.metrics.families import series_names

RULES = ROOT / "docker" / "prometheus" / "flowpipe-alerts.yml"
RULE_TESTS = ROOT / "docker" / "prometheus" / "flowpipe-alerts.test.yml"
PROMETHEUS_RULE = ROOT / "docker" / "k8s" / "prometheusrule.yaml"
ALERTS = {
    "FlowpipeRelayDisconnected",
    "FlowpipeIngestLagHigh",
    "FlowpipeHubbleLostEvents",
    "FlowpipeFlushErrors",
    "FlowpipeUnexpectedDrops",
    "FlowpipeDNSFailureShareHigh",
}


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")
    return subprocess.run(
        [binary, *map(str, args)], cwd=RULES.parent, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.external
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, result.stdout + result.stderr


@pytest.mark.external
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.external
def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    # a rule that never fires makes its unit test fail: the tests above check something
    broken = RULES.read_text().replace("> 0.2", "> 2", 1)
    (tmp_path / "flowpipe-alerts.yml").write_text(broken)
    (tmp_path / "tests.yml").write_text(RULE_TESTS.read_text())
    binary = require_binary("promtool")
    result = subprocess.run(
        [binary, "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "FlowpipeDNSFailureShareHigh" in result.stdout + result.stderr


def test_every_alert_is_there_and_tested() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == ALERTS


def test_rules_read_only_flowpipe_metrics_with_severity_and_text() -> None:
    names = series_names()
    for rule in rules():
        assert promql_metric_names(str(rule["expr"])) <= names, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")  # type: ignore[index]
        assert {"summary", "description"} <= set(rule["annotations"])  # type: ignore[arg-type]


def test_the_dns_failure_share_reads_the_lookups_the_question_counts() -> None:
    # a counter fed flow by flow counts NXDOMAIN answers to search-path expansions as failures; the
    # dns_failures question's gauges do not
    (rule,) = [rule for rule in rules() if rule["alert"] == "FlowpipeDNSFailureShareHigh"]
    assert promql_metric_names(str(rule["expr"])) == {"flowpipe_dns_failed_lookups", "flowpipe_dns_lookups"}


def test_the_prometheus_rule_holds_the_same_rules() -> None:
    (document,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert (document["apiVersion"], document["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert document["spec"] == yaml.safe_load(RULES.read_text())


def test_both_prometheus_configs_load_the_rules() -> None:
    for name in ("prometheus.yml", "prometheus-compose.yml"):
        config = yaml.safe_load((RULES.parent / name).read_text())
        assert config["rule_files"] == [RULES.name], name
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus/flowpipe-alerts.yml"] == "/etc/prometheus/flowpipe-alerts.yml"

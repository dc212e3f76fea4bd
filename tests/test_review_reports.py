"""SARIF 2.1.0 and JUnit XML of `audit` and `replay --baseline`: valid by the specification, located at the rule.

The SARIF checks are written from the OASIS SARIF 2.1.0 specification (sections 3.13 sarifLog, 3.14 run,
3.18 toolComponent, 3.19 tool, 3.27 result, 3.28 location, 3.29 physicalLocation, 3.30 region, 3.4
artifactLocation, 3.11 message, 3.49 reportingDescriptor): a JSON schema of the required properties, types and
enumerations, checked with jsonschema, plus the cross-references a schema cannot say.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from flowpipe.cli import cli

MESSAGE = {
    "type": "object",
    "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
    "properties": {"text": {"type": "string"}, "markdown": {"type": "string"}, "id": {"type": "string"}},
}
REGION = {
    "type": "object",
    "properties": {
        "startLine": {"type": "integer", "minimum": 1},
        "startColumn": {"type": "integer", "minimum": 1},
        "endLine": {"type": "integer", "minimum": 1},
        "endColumn": {"type": "integer", "minimum": 1},
    },
}
LOCATION = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -1},
        "physicalLocation": {
            "type": "object",
            "anyOf": [{"required": ["address"]}, {"required": ["artifactLocation"]}],
            "properties": {
                "artifactLocation": {
                    "type": "object",
                    "properties": {
                        "uri": {"type": "string", "format": "uri-reference"},
                        "uriBaseId": {"type": "string"},
                    },
                },
                "region": REGION,
            },
        },
        "logicalLocations": {"type": "array", "items": {"type": "object"}},
        "message": MESSAGE,
    },
}
LEVEL = {"enum": ["none", "note", "warning", "error"]}
SARIF_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string", "format": "uri"},
        "version": {"enum": ["2.1.0"]},
        "runs": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["tool"],
                "properties": {
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "informationUri": {"type": "string", "format": "uri"},
                                    "rules": {
                                        "type": "array",
                                        "uniqueItems": True,
                                        "items": {
                                            "type": "object",
                                            "required": ["id"],
                                            "properties": {
                                                "id": {"type": "string"},
                                                "shortDescription": MESSAGE,
                                                "help": MESSAGE,
                                                "defaultConfiguration": {
                                                    "type": "object",
                                                    "properties": {"level": LEVEL},
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        },
                    },
                    "columnKind": {"enum": ["utf16CodeUnits", "unicodeCodePoints"]},
                    "automationDetails": {"type": "object", "properties": {"id": {"type": "string"}}},
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["message"],
                            "properties": {
                                "ruleId": {"type": "string"},
                                "ruleIndex": {"type": "integer", "minimum": -1},
                                "kind": {
                                    "enum": [
                                        "notApplicable",
                                        "pass",
                                        "fail",
                                        "review",
                                        "open",
                                        "informational",
                                    ]
                                },
                                "level": LEVEL,
                                "message": MESSAGE,
                                "locations": {"type": "array", "items": LOCATION},
                                "relatedLocations": {"type": "array", "items": LOCATION},
                                "partialFingerprints": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "properties": {"type": "object"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def check_sarif(document: dict[str, Any], files: dict[str, Path]) -> list[dict[str, Any]]:
    """Validate against the specification; every result is located in a real file at a real line. Its results."""
    jsonschema.Draft7Validator.check_schema(SARIF_SCHEMA)
    jsonschema.validate(document, SARIF_SCHEMA, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    (run,) = document["runs"]
    rules = run["tool"]["driver"]["rules"]
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    for result in run["results"]:
        # 3.27.5/3.27.6: ruleId and ruleIndex name the same reportingDescriptor
        assert result["ruleId"] in ids
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        # 3.27.10: a result with kind other than fail has level none (or note for informational tools)
        if result.get("kind", "fail") != "fail":
            assert result.get("level", "none") in ("none", "note")
        assert result["locations"], result
        for location in result["locations"] + result.get("relatedLocations", []):
            physical = location["physicalLocation"]
            uri = physical["artifactLocation"]["uri"]
            assert uri in files, uri
            line = physical["region"]["startLine"]
            assert 1 <= line <= len(files[uri].read_text().splitlines())
    results: list[dict[str, Any]] = run["results"]
    return results


def check_junit(text: str) -> ET.Element:
    """testsuites / testsuite / testcase (failure, system-out), with consistent counts."""
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert suites and all(child.tag == "testsuite" for child in root)
    total = failed = 0
    for suite in suites:
        cases = suite.findall("testcase")
        assert all(child.tag == "testcase" for child in suite)
        failures = [c for c in cases if c.find("failure") is not None]
        assert int(suite.get("tests", -1)) == len(cases)
        assert int(suite.get("failures", -1)) == len(failures)
        for case in cases:
            assert case.get("name") and case.get("classname") == suite.get("name")
            assert {child.tag for child in case} <= {"failure", "system-out"}
            for failure in case.findall("failure"):
                assert failure.get("message") and failure.text
        total, failed = total + len(cases), failed + len(failures)
    assert int(root.get("tests", -1)) == total and int(root.get("failures", -1)) == failed
    return root


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

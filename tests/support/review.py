"""Checks of SARIF 2.1.0 and JUnit XML reports, written from the specifications.

The SARIF checks follow the OASIS SARIF 2.1.0 specification (sections 3.13 sarifLog, 3.14 run, 3.18
toolComponent, 3.19 tool, 3.27 result, 3.28 location, 3.29 physicalLocation, 3.30 region, 3.4 artifactLocation,
3.11 message, 3.49 reportingDescriptor): a JSON schema of the required properties, types and enumerations,
checked with jsonschema, plus the cross-references a schema cannot say.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema

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
        # 3.27.9: a result whose kind is not `fail` has level `none`
        if result.get("kind", "fail") != "fail":
            assert result.get("level", "none") == "none"
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

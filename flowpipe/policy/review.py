"""Reports for code review tools: SARIF 2.1.0 and JUnit XML of `audit` findings and `replay` deltas.

Each SARIF result is located in the policy file, at the line of its document (`metadata`) or, where the
finding is about one rule, at that rule's entry in the YAML (`spec.ingress[2]`, `specs[1].egressDeny[0]`, the
item of a `List`): `PolicyLines` composes each file once with PyYAML, whose nodes keep their line. JUnit XML
has one test case per policy document, failed by the findings (or the breaks) that point at it.

Both are built as plain data (`dict` for SARIF, `xml.etree` for JUnit) and written as text by the callers.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any

import yaml

from flowpipe.policy.audit import SEVERITIES, Finding
from flowpipe.policy.delta import DeltaEdge, DeltaReport, RuleRef
from flowpipe.policy.model import Policy

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
TOOL_URI = "https://github.com/flowpipe/flowpipe"
_LEVELS = {"low": "note", "medium": "warning", "high": "error"}
_RULE_ID = re.compile(r"^(?:specs\[(\d+)\]\.)?(\w+)\[(\d+)\]$")


class PolicyLines:
    """The line (1-based) of each policy document and rule in the files they were loaded from."""

    def __init__(self) -> None:
        self._documents: dict[str, list[Any]] = {}

    def _nodes(self, path: str) -> list[Any]:
        found = self._documents.get(path)
        if found is None:
            try:
                found = list(yaml.compose_all(Path(path).read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                found = []  # the loader has read the file already; a file gone since is located at line 1
            self._documents[path] = found
        return found

    def line(self, policy: Policy, rule_id: str | None = None) -> int:
        """The line of `policy`'s document (its item in a `List`), or of its rule `rule_id` when found."""
        if policy.origin is None:
            return 1
        documents = self._nodes(policy.origin.path)
        if policy.origin.document_index >= len(documents) or documents[policy.origin.document_index] is None:
            return 1
        node = _item(documents[policy.origin.document_index], policy)
        line = node.start_mark.line + 1
        parsed = _RULE_ID.match(rule_id or "")
        if parsed is None:
            return line
        specs, section, index = parsed.groups()
        spec = _get(node, "spec")
        if specs is not None:
            listed = _get(node, "specs")
            entries = listed.value if isinstance(listed, yaml.SequenceNode) else []
            spec = entries[int(specs)] if int(specs) < len(entries) else None
        found = _entry(spec, section) if spec is not None else None
        if found is None or not isinstance(found[1], yaml.SequenceNode):
            return line
        key, rules = found
        entries = rules.value
        return (entries[int(index)] if int(index) < len(entries) else key).start_mark.line + 1


def _entry(node: Any, key: str) -> tuple[Any, Any] | None:
    """The (key, value) nodes of `key` in a mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return None
    return next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def _get(node: Any, key: str) -> Any:
    found = _entry(node, key)
    return found[1] if found else None


def _item(node: Any, policy: Policy) -> Any:
    """The node of `policy` in its document: the document itself, or its item of a `List`."""
    items = _get(node, "items")
    if not isinstance(items, yaml.SequenceNode):
        return node
    for item in items.value:
        metadata = _get(item, "metadata")
        name, namespace = _get(metadata, "name"), _get(metadata, "namespace")
        same_namespace = policy.namespace is None or namespace is None or namespace.value == policy.namespace
        if name is not None and name.value == policy.name and same_namespace:
            return item
    return node


def _uri(path: str) -> str:
    """A file as SARIF names it: relative paths as given (with `/`), so review tools match them to the repo."""
    pure = PurePath(path)
    return pure.as_posix() if not pure.is_absolute() else Path(path).as_uri()


def _location(
    lines: PolicyLines, policy: Policy | None, rule_id: str | None, fallback: str | None
) -> list[Any]:
    path = policy.file if policy is not None else fallback
    if path is None:
        return []
    line = lines.line(policy, rule_id) if policy is not None else 1
    physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(path)}, "region": {"startLine": line}}
    if not PurePath(path).is_absolute():
        physical["artifactLocation"]["uriBaseId"] = "%SRCROOT%"
    location: dict[str, Any] = {"physicalLocation": physical}
    if policy is not None:
        name = f"{policy.key} {rule_id}" if rule_id else policy.key
        location["logicalLocations"] = [{"name": name, "kind": "resource"}]
    return [location]


def _run(rules: list[dict[str, Any]], results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for result in results:
        result["ruleIndex"] = next(i for i, r in enumerate(rules) if r["id"] == result["ruleId"])
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {"driver": {"name": "flowpipe", "informationUri": TOOL_URI, "rules": rules}},
                "automationDetails": {"id": f"flowpipe/{name}/"},
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }


def _rule(rule_id: str, text: str, help_text: str, level: str) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": "".join(part.capitalize() for part in re.split(r"[-_]", rule_id)),
        "shortDescription": {"text": text},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": level},
    }


# -- audit ---------------------------------------------------------------------------------------------------


def audit_sarif(findings: Sequence[Finding], policies: Sequence[Policy]) -> dict[str, Any]:
    """SARIF 2.1.0 of `flowpipe audit`: one result per finding, rule ids are the check names."""
    by_key = _by_file_and_key(policies)
    lines = PolicyLines()
    rules: dict[str, dict[str, Any]] = {}
    results = []
    for finding in findings:
        level = _LEVELS[finding.severity]
        if finding.check not in rules:
            rules[finding.check] = _rule(
                finding.check, f"audit check {finding.check}", finding.suggestion, level
            )
        policy = by_key.get((finding.file, finding.policy)) if finding.policy else None
        fallback = finding.file or _namespace_file(policies, finding.namespace)
        results.append(
            {
                "ruleId": finding.check,
                "level": level,
                "kind": "fail",
                "message": {"text": f"{finding.message} What to do: {finding.suggestion}"},
                "locations": _location(lines, policy, finding.rule, fallback),
                "properties": {"severity": finding.severity, "namespace": finding.namespace},
            }
        )
    return _run(list(rules.values()), results, "audit")


def audit_junit(findings: Sequence[Finding], policies: Sequence[Policy], fail_on: str) -> ET.ElementTree:
    """JUnit XML of `flowpipe audit`: a test case per policy document (and per namespace with findings of its
    own); findings at or above `fail_on` fail it, the others are listed in its output."""
    floor = SEVERITIES.index(fail_on)  # type: ignore[arg-type]
    cases: dict[tuple[str, str], list[Finding]] = {(_classname(p), p.key): [] for p in policies}
    for finding in findings:
        if finding.policy:
            place = next(
                (
                    (_classname(p), p.key)
                    for p in policies
                    if p.key == finding.policy and p.file == finding.file
                ),
                (finding.file or "policies", finding.policy),
            )
        else:
            place = ("namespaces", f"namespace {finding.namespace or '(cluster)'}")
        cases.setdefault(place, []).append(finding)

    def failing(found: Iterable[Finding]) -> list[str]:
        return [_finding_text(f) for f in found if SEVERITIES.index(f.severity) >= floor]

    def passing(found: Iterable[Finding]) -> list[str]:
        return [_finding_text(f) for f in found if SEVERITIES.index(f.severity) < floor]

    return _junit(
        "flowpipe audit",
        [(cls, name, failing(found), passing(found)) for (cls, name), found in cases.items()],
    )


def _finding_text(finding: Finding) -> str:
    rule = f" {finding.rule}" if finding.rule else ""
    return f"[{finding.severity}] {finding.check}{rule}: {finding.message} What to do: {finding.suggestion}"


def _by_file_and_key(policies: Sequence[Policy]) -> dict[tuple[str | None, str | None], Policy]:
    found: dict[tuple[str | None, str | None], Policy] = {}
    for policy in policies:
        found.setdefault((policy.file, policy.key), policy)
    return found


def _namespace_file(policies: Sequence[Policy], namespace: str | None) -> str | None:
    """The file of the first policy in `namespace`: where a finding about the whole namespace is shown."""
    return next((p.file for p in policies if p.namespace == namespace and p.file), None)


def _classname(policy: Policy) -> str:
    return policy.file or "policies"


# -- replay delta ----------------------------------------------------------------------------------------------

_DELTA_RULES = (
    ("newly-denied", "Requests that get through today and the change would deny", "error"),
    ("newly-allowed", "Requests denied today that the change would allow", "warning"),
    ("rule-removed", "A rule the change removes, with the requests it matched", "none"),
    ("rule-changed", "A rule the change alters, with the requests it matched before and after", "none"),
    ("rule-added", "A rule the change adds, with the requests it matches", "none"),
)


def delta_sarif(report: DeltaReport) -> dict[str, Any]:
    """SARIF 2.1.0 of a replay delta: a result per newly denied and newly allowed edge (located at the rule or
    policy that decides it) and per rule added, removed or changed."""
    lines = PolicyLines()
    rules = [_rule(rid, text, text + ", from the stored flows.", level) for rid, text, level in _DELTA_RULES]
    results: list[dict[str, Any]] = []
    for rule_id, edges, level in (
        ("newly-denied", report.newly_denied, "error"),
        ("newly-allowed", report.newly_allowed, "warning"),
    ):
        for edge in edges:
            refs = edge.decided_by or ()
            locations = [loc for ref in refs for loc in _location(lines, ref.policy_object, ref.rule, None)]
            results.append(
                {
                    "ruleId": rule_id,
                    "level": level,
                    "kind": "fail",
                    "message": {"text": _edge_text(rule_id, edge)},
                    "locations": locations[:1],
                    "relatedLocations": [dict(loc, id=i) for i, loc in enumerate(locations[1:], 1)],
                    "partialFingerprints": {"flowpipeEdge/v1": _fingerprint(edge)},
                    "properties": {
                        "requests": edge.flows,
                        "forwarded": edge.forwarded,
                        "dropped": edge.dropped,
                        "source": edge.source,
                        "destination": edge.destination,
                        "protocol": edge.protocol,
                        "port": edge.port,
                    },
                }
            )
    for change in report.rules:
        results.append(
            {
                "ruleId": f"rule-{change.change}",
                "level": "none",  # SARIF 3.27.9: a result whose kind is not `fail` has level `none`
                "kind": "informational",
                "message": {
                    "text": f"{change.policy} {change.rule} ({change.action}) {change.change}: matched "
                    f"{change.matched_before} requests before, {change.matched_after} after"
                },
                "locations": _location(lines, change.ref.policy_object, change.ref.rule, None),
                "properties": {"side": change.ref.side},
            }
        )
    return _run(rules, results, "replay")


def delta_junit(report: DeltaReport, *, fail_on_allow: bool = False) -> ET.ElementTree:
    """JUnit XML of a replay delta: a test case per policy document of the proposed set (and per baseline
    document the change removes); a newly denied edge fails the documents that deny it, a newly allowed edge
    fails the documents that allow it with `fail_on_allow` (else it is listed in their output)."""
    cases: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for policy in report.policies.get("proposed", []):
        cases[(_classname(policy), policy.key)] = ([], [])
    proposed = {(_classname(p), p.key) for p in report.policies.get("proposed", [])}
    unplaced = ("policies", "(no policy)")
    for kind, edges in (("newly-denied", report.newly_denied), ("newly-allowed", report.newly_allowed)):
        for edge in edges:
            places = {(_classname(r.policy_object), r.policy) for r in edge.decided_by} or {unplaced}
            for place in places:
                failures, notes = cases.setdefault(place, ([], []))
                failing = kind == "newly-denied" or fail_on_allow
                (failures if failing else notes).append(_edge_text(kind, edge))
    for change in report.rules:
        place = (_classname(change.ref.policy_object), change.policy)
        if change.change == "removed" and place not in proposed:
            place = (place[0], f"{change.policy} (removed)")
        cases.setdefault(place, ([], []))[1].append(
            f"{change.rule} {change.change}: matched {change.matched_before} requests before, "
            f"{change.matched_after} after"
        )
    return _junit("flowpipe replay", [(cls, name, f, n) for (cls, name), (f, n) in cases.items()])


def _edge_text(kind: str, edge: DeltaEdge) -> str:
    port = f"{edge.protocol or '?'}/{edge.port if edge.port is not None else '*'}"
    l7 = f" {edge.l7}" if edge.l7 else ""
    what = "would be denied" if kind == "newly-denied" else "would be allowed"
    why = f" ({edge.reason})" if edge.reason else ""
    return f"{edge.flows} requests {edge.source} -> {edge.destination} {port}{l7} {what}{why}"


def _fingerprint(edge: DeltaEdge) -> str:
    return "|".join(str(x) for x in (edge.source, edge.destination, edge.protocol, edge.port, edge.l7))


def _junit(suite: str, cases: Sequence[tuple[str, str, list[str], list[str]]]) -> ET.ElementTree:
    failures = sum(1 for _, _, failed, _ in cases if failed)
    root = ET.Element("testsuites", name=suite, tests=str(len(cases)), failures=str(failures), errors="0")
    by_file: dict[str, list[tuple[str, list[str], list[str]]]] = defaultdict(list)
    for classname, name, failed, notes in cases:
        by_file[classname].append((name, failed, notes))
    for classname, members in by_file.items():
        element = ET.SubElement(
            root,
            "testsuite",
            name=_xml_text(classname),
            tests=str(len(members)),
            failures=str(sum(1 for _, failed, _ in members if failed)),
            errors="0",
            skipped="0",
        )
        for name, failed, notes in members:
            case = ET.SubElement(element, "testcase", classname=_xml_text(classname), name=_xml_text(name))
            if failed:
                failure = ET.SubElement(case, "failure", message=_xml_text(failed[0][:200]), type="policy")
                failure.text = _xml_text("\n".join(failed))
            if notes:
                ET.SubElement(case, "system-out").text = _xml_text("\n".join(notes))
    ET.indent(root)
    return ET.ElementTree(root)


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """`text` without the characters XML 1.0 cannot hold (names from flows are data, never markup)."""
    return _NOT_XML.sub("\ufffd", text)


def junit_text(tree: ET.ElementTree) -> str:
    """The XML document of a JUnit tree."""
    return ET.tostring(tree.getroot(), encoding="unicode", xml_declaration=True) + "\n"


__all__ = [
    "PolicyLines",
    "RuleRef",
    "audit_junit",
    "audit_sarif",
    "delta_junit",
    "delta_sarif",
    "junit_text",
]

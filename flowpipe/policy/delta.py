"""What a policy change does to real traffic: one grouping of the stored edges, judged by two policy sets.

`replay_delta(proposed, baseline, edges)` judges every request edge by both sets (each edge once per set,
decisions cached as in `replay_edges`) and reports the difference, edge by edge:

- `newly_denied`: requests the baseline allows and the proposed set denies (the breaks);
- `newly_allowed`: requests the baseline denies and the proposed set allows;
- rules added, removed and changed, with the requests each matched before and after;
- the totals that did not change.

Without a baseline (`baseline=None`) "today" is what the cluster recorded: a request got through when its
verdict passed (FORWARDED, REDIRECTED, AUDIT) and was denied when its drop was a policy decision, so
`newly_denied` is replay's `would_break` and `newly_allowed` its `would_allow_dropped`, edge by edge.

Rules are paired by what they say, not by name: a rule whose policy selects the same pods in the same namespace
and whose peers, ports and action are the same is unchanged, whatever its policy is called or where it sits in
its list (a renamed policy, or a rule moved up by the removal of another, is no change). Of the rules left, the
ones at the same place (policy key and rule id) are changed; the others are added or removed.

Both sets are grouped with one `EDGES_SQL` run whose parameters keep what either set can tell apart
(`delta_parameters`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa

from flowpipe.policy.model import Policy
from flowpipe.policy.replay import (
    PASSED_VERDICTS,
    Decision,
    PolicySet,
    ReplayConfig,
    _describe,
    _Judge,
    _l7_summary,
    is_policy_decision,
)
from flowpipe.policy.stored_edges import edge_parameters

Side = Literal["proposed", "baseline"]


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A policy (and one of its rules, when a rule decided) in one of the two sets, with where it was loaded."""

    side: Side
    policy: str
    rule: str | None
    file: str | None
    document_index: int | None
    policy_object: Policy = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeltaEdge:
    """Requests of one edge whose outcome changes: how many, and the policies and rules that decide it."""

    source: str
    destination: str
    protocol: str | None
    port: int | None
    l7: str | None
    direction: str
    reason: str
    flows: int
    forwarded: int
    dropped: int
    decided_by: tuple[RuleRef, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "source": self.source,
            "destination": self.destination,
            "protocol": self.protocol,
            "port": self.port,
            "l7": self.l7,
            "direction": self.direction,
            "reason": self.reason,
            "flows": self.flows,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "decided_by": [_ref_dict(r) for r in self.decided_by],
        }


@dataclass(frozen=True, slots=True)
class RuleChange:
    """A rule added, removed or changed, with the requests it matched before (baseline) and after (proposed)."""

    change: Literal["added", "removed", "changed"]
    policy: str
    rule: str
    action: str
    matched_before: int
    matched_after: int
    ref: RuleRef

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "change": self.change,
            "policy": self.policy,
            "rule": self.rule,
            "action": self.action,
            "matched_before": self.matched_before,
            "matched_after": self.matched_after,
            "file": self.ref.file,
        }


@dataclass(slots=True)
class DeltaReport:
    """The difference between two replays of the same edges; `to_dict()` is `flowpipe replay --baseline`'s JSON."""

    baseline: str = "recorded verdicts"
    flows_evaluated: int = 0
    replies_skipped: int = 0
    unchanged_allowed: int = 0
    unchanged_denied: int = 0
    newly_denied: list[DeltaEdge] = field(default_factory=list)
    newly_allowed: list[DeltaEdge] = field(default_factory=list)
    rules: list[RuleChange] = field(default_factory=list)
    policies: dict[Side, list[Policy]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def newly_denied_requests(self) -> int:
        """Requests that get through today and would be denied."""
        return sum(e.flows for e in self.newly_denied)

    @property
    def newly_allowed_requests(self) -> int:
        """Requests denied today that would be allowed."""
        return sum(e.flows for e in self.newly_allowed)

    @property
    def empty(self) -> bool:
        """True when no request changes outcome and no rule changes."""
        return not (self.newly_denied or self.newly_allowed or self.rules)

    def summary(self) -> str:
        """One line: what changes, against what."""
        counts = Counter(r.change for r in self.rules)
        return (
            f"{self.flows_evaluated} requests evaluated against {self.baseline} "
            f"({self.replies_skipped} replies skipped): {self.newly_denied_requests} newly denied in "
            f"{len(self.newly_denied)} edges, {self.newly_allowed_requests} newly allowed in "
            f"{len(self.newly_allowed)} edges; unchanged {self.unchanged_allowed} allowed, "
            f"{self.unchanged_denied} denied; rules {counts['added']} added, {counts['removed']} removed, "
            f"{counts['changed']} changed"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "baseline": self.baseline,
            "flows_evaluated": self.flows_evaluated,
            "replies_skipped": self.replies_skipped,
            "newly_denied_requests": self.newly_denied_requests,
            "newly_allowed_requests": self.newly_allowed_requests,
            "newly_denied": [e.to_dict() for e in self.newly_denied],
            "newly_allowed": [e.to_dict() for e in self.newly_allowed],
            "rules_added": [r.to_dict() for r in self.rules if r.change == "added"],
            "rules_removed": [r.to_dict() for r in self.rules if r.change == "removed"],
            "rules_changed": [r.to_dict() for r in self.rules if r.change == "changed"],
            "unchanged": {"allowed": self.unchanged_allowed, "denied": self.unchanged_denied},
            "warnings": list(self.warnings),
        }


def delta_parameters(
    proposed: Iterable[Policy],
    baseline: Iterable[Policy] | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    cluster: str | None = None,
) -> dict[str, object]:
    """The parameters of `EDGES_SQL` for judging the same edges by both sets: the fields either can tell apart."""
    return edge_parameters([*proposed, *(baseline or ())], since=since, until=until, cluster=cluster)


def replay_delta(
    proposed: Sequence[Policy],
    baseline: Sequence[Policy] | None,
    edges: pa.Table | Iterable[Mapping[str, Any]],
    config: ReplayConfig | None = None,
) -> DeltaReport:
    """Judge `edges` (grouped once, with `delta_parameters`) by both sets and report the difference."""
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    after = _Judge(PolicySet(proposed, config))
    before = _Judge(PolicySet(baseline, config)) if baseline is not None else None
    report = DeltaReport(
        baseline="the baseline policies" if baseline is not None else "recorded verdicts",
        policies={"proposed": list(proposed), "baseline": list(baseline or ())},
        warnings=list(after.policy_set.warnings) + (before.policy_set.warnings if before else []),
    )
    matched: dict[Side, Counter[tuple[int, int]]] = {"proposed": Counter(), "baseline": Counter()}
    changed: dict[str, dict[tuple[Any, ...], list[Any]]] = {"denied": {}, "allowed": {}}

    for row in rows:
        flows = int(row.get("flows") or 1)
        if row.get("is_reply"):
            report.replies_skipped += flows
            continue
        report.flows_evaluated += flows
        traffic, directions, decisions = after.row(row)
        for decision in decisions:
            for hit in decision.matched:
                matched["proposed"][hit] += flows
        allowed_after = all(d.allowed for d in decisions)
        verdict = row.get("verdict")
        if before is not None:
            _, _, old = before.row(row)
            for decision in old:
                for hit in decision.matched:
                    matched["baseline"][hit] += flows
            allowed_before = all(d.allowed for d in old)
            denied_before = not allowed_before
        else:
            old = []
            allowed_before = verdict in PASSED_VERDICTS
            denied_before = verdict == "DROPPED" and is_policy_decision(row.get("drop_reason_desc"))
        if allowed_after and allowed_before:
            report.unchanged_allowed += flows
            continue
        if not allowed_after and not allowed_before:  # (without a baseline: also drops for other reasons)
            report.unchanged_denied += flows
            continue
        if not allowed_after:
            kind, judged, refs = "denied", decisions, _blame(after, "proposed", decisions)
        elif denied_before:
            kind, judged = "allowed", old
            refs = _allowing(after, decisions) or (_blame(before, "baseline", old) if before else ())
        else:  # allowed now, neither allowed nor policy-denied before: a drop for another reason
            report.unchanged_allowed += flows
            continue
        if judged:
            pairs = [(d, x) for d, x in zip(directions, judged, strict=True) if not x.allowed]
            where = "+".join(d for d, _ in pairs)
            reason = "; ".join(f"{d}: {x.reason}" for d, x in pairs if x.reason)
        else:  # allowed now, recorded as a policy drop
            where, reason = "", f"policy drop recorded ({row.get('drop_reason_desc')})"
        key = (
            _describe(row, "source"),
            _describe(row, "destination"),
            traffic.protocol,
            traffic.port if traffic.protocol not in ("ICMPv4", "ICMPv6") else traffic.icmp_type,
            _l7_summary(traffic),
            where,
            reason,
        )
        counts = changed[kind].setdefault(key, [0, 0, 0, {}])
        counts[0] += flows
        counts[1] += flows if verdict in PASSED_VERDICTS else 0
        counts[2] += flows if verdict == "DROPPED" else 0
        counts[3].update(dict.fromkeys(refs))

    report.newly_denied = _edges(changed["denied"])
    report.newly_allowed = _edges(changed["allowed"])
    if before is not None:
        report.rules = _rule_changes(after.policy_set, before.policy_set, matched)
    return report


def _edges(found: Mapping[tuple[Any, ...], list[Any]]) -> list[DeltaEdge]:
    edges = [
        DeltaEdge(*key[:7], flows=v[0], forwarded=v[1], dropped=v[2], decided_by=tuple(v[3]))
        for key, v in found.items()
    ]
    return sorted(edges, key=lambda e: (-e.flows, e.source, e.destination, e.port or 0, e.l7 or ""))


def _ref(policy_set: PolicySet, side: Side, pi: int, ri: int | None) -> RuleRef:
    policy = policy_set.policies[pi]
    origin = policy.origin
    return RuleRef(
        side,
        policy.key,
        policy_set.rule_ids[pi][ri] if ri is not None else None,
        origin.path if origin else None,
        origin.document_index if origin else None,
        policy,
    )


def _blame(judge: _Judge, side: Side, decisions: Sequence[Decision]) -> tuple[RuleRef, ...]:
    """The deny rules, or the isolating policies, behind the denials among `decisions`."""
    return tuple(
        _ref(judge.policy_set, side, pi, ri) for d in decisions if not d.allowed for pi, ri in d.blame
    )


def _allowing(judge: _Judge, decisions: Sequence[Decision]) -> tuple[RuleRef, ...]:
    """The allow rules of the proposed set that let the request through."""
    return tuple(_ref(judge.policy_set, "proposed", pi, ri) for d in decisions for pi, ri in d.matched)


def _signature(policy: Policy, rule: Any) -> str:
    """What a rule says, with the pods its policy selects, whatever the policy's name and the rule's place."""
    return repr(
        (
            policy.namespace,
            policy.clusterwide,
            policy.selector,
            policy.node_selector,
            policy.isolates,
            replace(rule, flows=None),
        )
    )


def _rule_changes(
    after: PolicySet, before: PolicySet, matched: Mapping[Side, Counter[tuple[int, int]]]
) -> list[RuleChange]:
    """Rules added, removed and changed: paired first by what they say, then by place."""

    def rules(policy_set: PolicySet) -> list[tuple[int, int]]:
        return [
            (pi, ri)
            for pi, policy in enumerate(policy_set.policies)
            for ri, rule in enumerate(policy.rules)
            if not rule.allows_nothing
        ]

    def sig(policy_set: PolicySet, pi: int, ri: int) -> str:
        policy = policy_set.policies[pi]
        return _signature(policy, policy.rules[ri])

    pool: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for pi, ri in rules(before):
        pool[sig(before, pi, ri)].append((pi, ri))
    new: list[tuple[int, int]] = []
    for pi, ri in rules(after):
        same = pool.get(sig(after, pi, ri))
        if not same:
            new.append((pi, ri))
            continue
        # of the rules that say the same, the one at the same place, else in the policy of the same name
        key, rule_id = after.policies[pi].key, after.rule_ids[pi][ri]
        ranked = [
            (before.policies[bp].key != key, before.rule_ids[bp][br] != rule_id, n)
            for n, (bp, br) in enumerate(same)
        ]
        same.pop(min(ranked)[2])
    old = {
        (before.policies[pi].key, before.rule_ids[pi][ri]): (pi, ri)
        for found in pool.values()
        for pi, ri in found
    }
    out: list[RuleChange] = []
    for pi, ri in new:
        place = (after.policies[pi].key, after.rule_ids[pi][ri])
        rule = after.policies[pi].rules[ri]
        was = old.pop(place, None)
        out.append(
            RuleChange(
                "changed" if was else "added",
                place[0],
                place[1],
                rule.action,
                matched["baseline"][was] if was else 0,
                matched["proposed"][(pi, ri)],
                _ref(after, "proposed", pi, ri),
            )
        )
    for (key, rule_id), (pi, ri) in old.items():
        out.append(
            RuleChange(
                "removed",
                key,
                rule_id,
                before.policies[pi].rules[ri].action,
                matched["baseline"][(pi, ri)],
                0,
                _ref(before, "baseline", pi, ri),
            )
        )
    order = {"removed": 0, "changed": 1, "added": 2}
    return sorted(out, key=lambda r: (order[r.change], r.policy, r.rule))


def _ref_dict(ref: RuleRef) -> dict[str, Any]:
    return {
        "side": ref.side,
        "policy": ref.policy,
        "rule": ref.rule,
        "file": ref.file,
        "document": ref.document_index + 1 if ref.document_index is not None else None,
    }

"""Evaluate flows against a policy set with Kubernetes and Cilium semantics: allowed or denied, and by which rule.

The semantics are those of the real implementations (Cilium enforces both flavours, and produced the flows):

- A pod is isolated in a direction only when some policy that selects it isolates that direction (Kubernetes
  `policyTypes`; Cilium: the policy has rules in that direction, unless `enableDefaultDeny` says otherwise).
  A pod no policy isolates allows everything in that direction.
- Allow rules are additive: any one allow rule of any selecting policy allows the request.
- Cilium deny rules (`ingressDeny`, `egressDeny`) win over every allow rule.
- Replies are always allowed (connection tracking), so only requests are judged: `is_reply` not true and no L7
  `RESPONSE`. Without `is_reply` (old agents), a TCP packet counts as a request only when it opens a connection
  (SYN without ACK); other packets of unknown direction are skipped with the replies.
- A pod recorded with a reserved identity (`*_reserved_identity`, or only `reserved:` labels while the record
  names its namespace: hostNetwork pods, pods Cilium does not manage) is judged as that identity, as Cilium
  enforces on the identity: no policy selects it, and no label or namespace selector matches it.
- Ingress from the local host (`reserved:host`: kubelet probes) is always allowed, as with Cilium's default
  `allow-localhost: auto`; `ReplayConfig(allow_localhost=False)` judges it like any peer.
- CIDR rules (and NetworkPolicy `ipBlock`) select addresses outside the cluster, not pods or nodes, as in
  Cilium's default `policy-cidr-match-mode`; `ReplayConfig(cidr_match_nodes=True)` is the `nodes` mode.
- Every request is judged at both ends, wherever Hubble observed it: by the source's egress policies and by the
  destination's ingress policies, each with the identity and labels the record (or the edge grouping) gives that
  end. A connection often reaches the capture from one end only (the other node's records filtered or lost):
  a request seen only at the source's egress still meets the destination's ingress policy, and `would_break`
  counts it when that policy would deny it.

For speed, flows are first grouped into distinct edges (`EDGES_SQL`, run by DuckDB over the shared view
`flows_enriched`); each edge is judged once and weighted by its flow count, and selector results are cached per
distinct endpoint.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any

import pyarrow as pa

from flowpipe.policy import _match as m
from flowpipe.policy import _ports as ports
from flowpipe.policy.model import Direction, Policy, PortRule
from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters, prepare_edges
from flowpipe.query.engine import DuckDBEngine

try:  # the shared DropReason classification, where present
    from flowpipe.drop_reasons import is_policy_decision
except ImportError:  # pragma: no cover - fallback for a checkout without it

    def is_policy_decision(reason: str | int | None) -> bool:
        return reason in ("POLICY_DENIED", "POLICY_DENY", "AUTH_REQUIRED", 133, 181, 189)


PASSED_VERDICTS = frozenset({"FORWARDED", "REDIRECTED", "AUDIT"})
"""Verdicts of requests that got through today (AUDIT: policy audit mode let a would-be drop pass)."""

EVALUATED_VERDICTS = ("FORWARDED", "REDIRECTED", "AUDIT", "DROPPED")


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """The Cilium agent settings that change how policies are enforced (the defaults are Cilium's)."""

    allow_localhost: bool = field(
        default=True, metadata={"help": "Always allow ingress from the local node (allow-localhost: auto)."}
    )
    cidr_match_nodes: bool = field(
        default=False,
        metadata={"help": "CIDR rules also select node addresses (policy-cidr-match-mode: nodes)."},
    )


@dataclass(frozen=True, slots=True)
class RuleUse:
    """How many evaluated flows one rule matched (allow rules: allowed; deny rules: denied)."""

    policy: str
    rule: str
    action: str
    matched_flows: int
    file: str | None = None


@dataclass(frozen=True, slots=True)
class DeniedEdge:
    """Requests of one edge that the policies deny, where, and why."""

    source: str
    destination: str
    protocol: str | None
    port: int | None
    direction: str
    reason: str
    flows: int
    forwarded: int
    dropped: int
    l7: str | None = None


@dataclass(slots=True)
class ReplayReport:
    """The outcome of a replay; `to_dict()` is the JSON shape of `flowpipe replay --format json`."""

    flows_evaluated: int = 0
    replies_skipped: int = 0
    allowed: int = 0
    denied: int = 0
    would_break: int = 0
    would_allow_dropped: int = 0
    denied_edges: list[DeniedEdge] = field(default_factory=list)
    rules: list[RuleUse] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def unused_rules(self) -> list[RuleUse]:
        """Allow rules that matched no flow: candidates for removal (least privilege)."""
        return [r for r in self.rules if r.matched_flows == 0 and r.action == "allow"]

    def summary(self) -> str:
        """One line: what was evaluated and what the policies would change."""
        return (
            f"{self.flows_evaluated} requests evaluated ({self.replies_skipped} replies skipped): "
            f"{self.allowed} allowed, {self.denied} denied in {len(self.denied_edges)} edges; "
            f"would break {self.would_break} forwarded requests, would allow {self.would_allow_dropped} "
            f"policy-dropped requests; {len(self.unused_rules)} of {len(self.rules)} rules unused"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""

        def rule(r: RuleUse) -> dict[str, Any]:
            return {
                "policy": r.policy,
                "rule": r.rule,
                "action": r.action,
                "matched_flows": r.matched_flows,
                "file": r.file,
            }

        return {
            "flows_evaluated": self.flows_evaluated,
            "replies_skipped": self.replies_skipped,
            "allowed": self.allowed,
            "denied": self.denied,
            "would_break": self.would_break,
            "would_allow_dropped": self.would_allow_dropped,
            "denied_edges": [
                {
                    "source": e.source,
                    "destination": e.destination,
                    "protocol": e.protocol,
                    "port": e.port,
                    "l7": e.l7,
                    "direction": e.direction,
                    "reason": e.reason,
                    "flows": e.flows,
                    "forwarded": e.forwarded,
                    "dropped": e.dropped,
                }
                for e in self.denied_edges
            ],
            "rules": [rule(r) for r in self.rules],
            "unused_rules": [rule(r) for r in self.unused_rules],
            "warnings": list(self.warnings),
        }


@dataclass(slots=True)
class Decision:
    """The verdict of one direction: allowed or not, the rules that matched, and a reason when denied."""

    allowed: bool
    matched: list[tuple[int, int]]
    reason: str | None = None
    blame: tuple[tuple[int, int | None], ...] = ()
    """When denied: the (policy, rule) pairs of the deny rules that matched, or (policy, None) for each policy
    that isolates the direction without allowing the request."""


class _CompiledRule:
    __slots__ = ("cache", "index", "match_nodes", "peer_reqs", "rule")

    def __init__(self, index: int, rule: Any, policy: Policy, match_nodes: bool) -> None:
        self.index = index
        self.match_nodes = match_nodes
        self.rule = rule
        self.peer_reqs = [
            m.peer_requirements(p, policy) if p.kind == "endpoints" else None for p in rule.peers
        ]
        self.cache: dict[m.Endpoint, bool] = {}

    def peer_matches(self, endpoint: m.Endpoint) -> bool:
        hit = self.cache.get(endpoint)
        if hit is None:
            hit = any(
                m.peer_matches(p, r, endpoint, match_nodes=self.match_nodes)
                for p, r in zip(self.rule.peers, self.peer_reqs, strict=True)
            )
            self.cache[endpoint] = hit
        return hit

    def l4_matches(self, endpoint: m.Endpoint, traffic: ports.Traffic) -> tuple[PortRule, ...] | None:
        """None when the rule does not match the peer and L4; else its port rules that do (empty: any port)."""
        if not self.rule.peers or not self.peer_matches(endpoint):
            return None
        if not self.rule.ports:
            return ()
        found = tuple(pr for pr in self.rule.ports if ports.port_rule_l4_matches(pr, traffic))
        return found or None


class _LabelIndex:
    """Items (policies, or rules) by a label each one requires: the ones an endpoint can match, found by its
    labels instead of trying every item.

    An item whose requirements (any one of which must hold: a rule's peers) each hold an `In` requirement is
    filed under that label key and each of its values; every other item is tried for every endpoint. The
    items returned are a superset of the ones that match (each is still matched in full), in the given order.
    """

    __slots__ = ("always", "by_key")

    def __init__(self, items: Sequence[tuple[int, Sequence[tuple[m.Requirement, ...]] | None]]) -> None:
        self.always: list[int] = []
        self.by_key: dict[str, dict[str, list[int]]] = {}
        for item, alternatives in items:
            keys = [_indexed(reqs) for reqs in alternatives] if alternatives is not None else [None]
            if not keys or any(k is None for k in keys):
                self.always.append(item)
                continue
            for key, values in keys:  # type: ignore[misc]
                by_value = self.by_key.setdefault(key, {})
                for value in values:
                    found = by_value.setdefault(value, [])
                    if not found or found[-1] != item:
                        found.append(item)

    def candidates(self, endpoint: m.Endpoint) -> list[int]:
        """The items `endpoint` may match, in order."""
        if not self.by_key:
            return self.always
        found: set[int] = set()
        for key, by_value in self.by_key.items():
            for value in endpoint.values("any", key):
                found.update(by_value.get(value, ()))
        if not found:
            return self.always
        found.update(self.always)
        return sorted(found)


def _indexed(reqs: tuple[m.Requirement, ...]) -> tuple[str, frozenset[str]] | None:
    """The label an endpoint must carry to meet `reqs` (the first `In` requirement, the namespace's last), as
    (key, values); None when no label is required."""
    found = None
    for _, key, operator, values in reqs:
        if operator == "In":
            if key != m.POD_NAMESPACE_KEY:
                return key, values
            found = found or (key, values)
    return found


_PortRuleMatches = tuple[tuple[PortRule, ...], int, list[tuple[int, int]], list[tuple[int, int]]]
"""Rules that match a request at L3/L4 with the same port rules: (port rules, their number, the (policy, rule)
indexes of the allow rules, of the deny rules)."""


class PolicySet:
    """Compiled policies, ready to judge requests; caches which policies select each endpoint."""

    def __init__(self, policies: Sequence[Policy], config: ReplayConfig | None = None) -> None:
        self.policies = list(policies)
        self.config = config or ReplayConfig()
        cidr_match_nodes = self.config.cidr_match_nodes
        self._subjects = [m.subject_requirements(p) for p in self.policies]
        self._rules: dict[tuple[int, str], list[_CompiledRule]] = defaultdict(list)
        for pi, policy in enumerate(self.policies):
            for ri, rule in enumerate(policy.rules):
                self._rules[(pi, rule.direction)].append(_CompiledRule(ri, rule, policy, cidr_match_nodes))
        self._selecting: dict[tuple[str, m.Endpoint], list[int]] = {}
        self._rule_index: dict[tuple[int, str], _LabelIndex] = {}
        self._policy_index: dict[str | None, _LabelIndex] = {}
        # The policies that select pods, by their namespace (None: clusterwide). A namespaced policy requires its
        # namespace of every pod it selects, so a pod is checked against its namespace's policies only.
        self._by_namespace: dict[str | None, list[int]] = defaultdict(list)
        for i, (policy, reqs) in enumerate(zip(self.policies, self._subjects, strict=True)):
            if reqs is not None:
                self._by_namespace[policy.namespace].append(i)
        self._l4: dict[tuple[Any, ...], tuple[list[_PortRuleMatches], bool]] = {}
        # Whether the L7 rules of some port rules allow a call, by the port rules (a number for each distinct
        # set: copies of a policy share theirs) and the call: many edges make the same calls.
        self._port_rule_numbers: dict[tuple[PortRule, ...], int] = {}
        self._l7: dict[tuple[int, tuple[str | None, ...]], bool] = {}
        self.warnings = [f"{p.key}: {c}" for p in self.policies for c in p.comments]
        # What the rules can tell apart: requests that differ only in other fields share their decisions.
        kept = edge_parameters(self.policies)
        self.judges_http, self.judges_kafka, self.judges_dns = (
            bool(kept["http"]),
            bool(kept["kafka"]),
            bool(kept["dns"]),
        )

    @cached_property
    def rule_ids(self) -> list[list[str]]:
        """Each policy's rule ids (`Policy.rule_ids`), by policy index."""
        return [p.rule_ids() for p in self.policies]

    def decision_key(self, traffic: ports.Traffic) -> ports.Traffic:
        """`traffic` without the L7 fields that no rule of the set looks at."""
        if traffic.l7 is None or (
            (self.judges_http or traffic.l7 != "http")
            and (self.judges_kafka or traffic.l7 != "kafka")
            and (self.judges_dns or traffic.l7 != "dns" or traffic.dns_query is None)
        ):
            return traffic
        if traffic.l7 == "dns":
            return replace(traffic, dns_query="x")  # any name: every DNS rule of the set is `*`
        return replace(traffic, http_method=None, http_url=None, kafka_api_key=None, kafka_topic=None)

    def selecting(self, direction: Direction, endpoint: m.Endpoint) -> list[int]:
        """Indexes of the policies that select `endpoint` and say something about `direction`."""
        key = (direction, endpoint)
        found = self._selecting.get(key)
        if found is None:
            candidates = [] if not endpoint.is_pod else self._policies_of(None, endpoint)
            for namespace in endpoint.values("k8s", m.POD_NAMESPACE_KEY) if endpoint.is_pod else ():
                candidates = sorted(candidates + self._policies_of(namespace, endpoint))
            found = [
                i
                for i in candidates
                if (direction in self.policies[i].isolates or self._rules.get((i, direction)))
                and m.requirements_match(self._subjects[i], endpoint)  # type: ignore[arg-type]
            ]
            self._selecting[key] = found
        return found

    def _policies_of(self, namespace: str | None, endpoint: m.Endpoint) -> list[int]:
        """The policies of `namespace` (None: clusterwide) that may select `endpoint` (by an indexed label)."""
        index = self._policy_index.get(namespace)
        if index is None:
            policies = self._by_namespace.get(namespace, [])
            index = self._policy_index[namespace] = _LabelIndex([(i, (self._subjects[i],)) for i in policies])  # type: ignore[misc]
        return index.candidates(endpoint)

    def _rules_of(self, policy: int, direction: Direction, peer: m.Endpoint) -> list[_CompiledRule]:
        """The rules of a policy in one direction that may match `peer` (rules without peers never do)."""
        rules = self._rules.get((policy, direction))
        if not rules:
            return []
        index = self._rule_index.get((policy, direction))
        if index is None:
            index = self._rule_index[(policy, direction)] = _LabelIndex(
                [
                    (i, None if any(r is None for r in c.peer_reqs) else c.peer_reqs)  # type: ignore[misc]
                    for i, c in enumerate(rules)
                    if c.rule.peers
                ]
            )
        return [rules[i] for i in index.candidates(peer)]

    def decide(
        self, direction: Direction, subject: m.Endpoint, peer: m.Endpoint, traffic: ports.Traffic
    ) -> Decision:
        """Judge one request in one direction at `subject` (the destination for ingress, the source for egress)."""
        selecting = self.selecting(direction, subject) if subject.is_pod else []
        if not selecting:
            return Decision(True, [])
        # The rules that match at L3/L4 are the same for every call on one connection: found once, then only
        # their L7 rules are matched against each call.
        l4 = (direction, subject, peer, traffic.protocol, traffic.port, traffic.icmp_type)
        found = self._l4.get(l4)
        if found is None:
            # The matching rules by their port rules: copies of a policy share theirs, matched once per call.
            groups: dict[int, _PortRuleMatches] = {}
            for pi in selecting:
                for compiled in self._rules_of(pi, direction, peer):
                    port_rules = compiled.l4_matches(peer, traffic)
                    if port_rules is not None:
                        number = self._port_rule_numbers.setdefault(port_rules, len(self._port_rule_numbers))
                        group = groups.setdefault(number, (port_rules, number, [], []))
                        group[3 if compiled.rule.action == "deny" else 2].append((pi, compiled.index))
            isolated = any(direction in self.policies[pi].isolates for pi in selecting)
            found = self._l4[l4] = (list(groups.values()), isolated)
        candidates, isolated = found
        allows: list[tuple[int, int]] = []
        denies: list[tuple[int, int]] = []
        call = (
            (traffic.l7, traffic.http_method, traffic.http_url, traffic.kafka_api_key, traffic.kafka_topic,
             traffic.dns_query)
            if traffic.l7 is not None
            else None
        )  # fmt: skip
        for port_rules, number, allowing, denying in candidates:
            if port_rules and call is not None:  # (no L7 call: `port_rule_l7_matches` is true)
                known = self._l7.get((number, call))
                if known is None:
                    known = any(ports.port_rule_l7_matches(pr, traffic) for pr in port_rules)
                    self._l7[(number, call)] = known
                if not known:
                    continue
            allows.extend(allowing)
            denies.extend(denying)
        if len(candidates) > 1:  # in policy and rule order, as the rules were listed
            allows.sort()
            denies.sort()
        if denies:
            names = ", ".join(f"{self.policies[p].key} {self.rule_ids[p][r]}" for p, r in denies)
            return Decision(False, allows + denies, f"denied by {names}", tuple(denies))
        if allows or not isolated:
            return Decision(True, allows)
        if direction == "ingress" and self.config.allow_localhost and "host" in peer.reserved:
            return Decision(True, allows)
        isolating = [p for p in selecting if direction in self.policies[p].isolates]
        names = ", ".join(sorted({self.policies[p].key for p in isolating}))
        return Decision(
            False,
            [],
            f"no {direction} rule allows it (isolated by {names})",
            tuple((p, None) for p in isolating),
        )


def replay_flows(
    policies: Sequence[Policy],
    flows: pa.Table,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    config: ReplayConfig | None = None,
) -> ReplayReport:
    """Replay a table of flow rows (FLOW_SCHEMA) through `policies`.

    >>> report = replay_flows(load_policies(["policies/"]), flows)    # doctest: +SKIP
    >>> report.would_break
    0
    """
    with DuckDBEngine(
        None, tables={"flows": flows}
    ) as engine:  # the views every question reads, over `flows`
        prepare_edges(engine)
        edges = engine.run(
            EDGES_SQL, edge_parameters(policies, since=since, until=until), question="replay edges"
        )
    return replay_edges(policies, edges, config)


def replay_edges(
    policies: Sequence[Policy],
    edges: pa.Table | Iterable[Mapping[str, Any]],
    config: ReplayConfig | None = None,
    *,
    rules: bool = True,
) -> ReplayReport:
    """Replay distinct edges (the columns of `EDGES_SQL`, with a `flows` count) through `policies`.

    `rules=False` leaves `ReplayReport.rules` empty (the flows each rule matched are not counted): for a caller
    that wants the verdicts only."""
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    policy_set = PolicySet(policies, config)
    report = ReplayReport(warnings=list(policy_set.warnings))
    matched: Counter[tuple[int, int]] = Counter()
    denied: dict[tuple[Any, ...], list[int]] = {}
    judge = _Judge(policy_set)

    for row in rows:
        flows = int(row.get("flows") or 1)
        if row.get("is_reply"):
            report.replies_skipped += flows
            continue
        traffic, directions, decisions = judge.row(row)
        reasons: list[str] = []
        for direction, decision in zip(directions, decisions, strict=True):
            if rules:
                for hit in decision.matched:
                    matched[hit] += flows
            if not decision.allowed and decision.reason:
                reasons.append(f"{direction}: {decision.reason}")
        verdict = row.get("verdict")
        report.flows_evaluated += flows
        if not reasons:
            report.allowed += flows
            if verdict == "DROPPED" and is_policy_decision(row.get("drop_reason_desc")):
                report.would_allow_dropped += flows
            continue
        report.denied += flows
        passed = verdict in PASSED_VERDICTS
        if passed:
            report.would_break += flows
        edge = (
            _describe(row, "source"),
            _describe(row, "destination"),
            traffic.protocol,
            traffic.port if traffic.protocol not in ("ICMPv4", "ICMPv6") else traffic.icmp_type,
            "+".join(d for d, decision in zip(directions, decisions, strict=True) if not decision.allowed),
            "; ".join(reasons),
            _l7_summary(traffic),
        )
        counts = denied.setdefault(edge, [0, 0, 0])
        counts[0] += flows
        counts[1] += flows if passed else 0
        counts[2] += flows if verdict == "DROPPED" else 0

    report.denied_edges = sorted(
        (
            DeniedEdge(
                source=k[0],
                destination=k[1],
                protocol=k[2],
                port=k[3],
                direction=k[4],
                reason=k[5],
                l7=k[6],
                flows=v[0],
                forwarded=v[1],
                dropped=v[2],
            )
            for k, v in denied.items()
        ),
        key=lambda e: (-e.forwarded, -e.flows, e.source, e.destination, e.port or 0, e.l7 or ""),
    )
    for pi, policy in enumerate(policy_set.policies if rules else ()):
        for ri, rule in enumerate(policy.rules):
            if rule.allows_nothing:
                continue  # a default-deny entry matches nothing by design
            report.rules.append(
                RuleUse(policy.key, policy_set.rule_ids[pi][ri], rule.action, matched[(pi, ri)], policy.file)
            )
    return report


def denied_directions(
    policies: Sequence[Policy],
    edges: pa.Table | Iterable[Mapping[str, Any]],
    config: ReplayConfig | None = None,
) -> list[tuple[Direction, ...]]:
    """For each edge (replies included, which are never denied), the directions in which `policies` deny it.

    >>> denied_directions(existing, learned_requests(rows))       # doctest: +SKIP
    [(), ('ingress',), ('egress', 'ingress'), ...]
    """
    rows = edges.to_pylist() if isinstance(edges, pa.Table) else list(edges)
    judge = _Judge(PolicySet(policies, config))
    out: list[tuple[Direction, ...]] = []
    for row in rows:
        if row.get("is_reply"):
            out.append(())
            continue
        _, directions, decisions = judge.row(row)
        out.append(
            tuple(d for d, decision in zip(directions, decisions, strict=True) if not decision.allowed)
        )
    return out


_SIDE_COLUMNS = {
    side: tuple(
        f"{side}_{c}" for c in ("labels", "namespace", "reserved_identity", "identity", "ip", "names")
    )
    for side in ("source", "destination")
}


class _Judge:
    """Judges edge rows against a policy set, sharing endpoints and decisions between rows."""

    def __init__(self, policy_set: PolicySet) -> None:
        self.policy_set = policy_set
        self.endpoints: dict[tuple[Any, ...], m.Endpoint] = {}
        # Edges that differ only in verdict or observation point share their decisions.
        self.decisions: dict[tuple[Direction, m.Endpoint, m.Endpoint, ports.Traffic], Decision] = {}

    def endpoint(self, row: Mapping[str, Any], side: str) -> m.Endpoint:
        labels_key, namespace_key, held_key, identity_key, ip_key, names_key = _SIDE_COLUMNS[side]
        labels = tuple(row.get(labels_key) or ())
        namespace = row.get(namespace_key)
        held = row.get(held_key)
        if namespace is not None and (
            held or (labels and all(lbl.startswith("reserved:") for lbl in labels))
        ):
            # A pod recorded with a reserved identity is that identity to Cilium: no policy selects it, and
            # selectors match it as that identity (world: by CIDR), never by its namespace or labels.
            namespace, labels = None, (f"reserved:{held}",) if held else labels
        key = (namespace, labels, row.get(identity_key), row.get(ip_key), tuple(row.get(names_key) or ()))
        found = self.endpoints.get(key)
        if found is None:
            found = self.endpoints[key] = m.Endpoint(*key)
        return found

    def row(self, row: Mapping[str, Any]) -> tuple[ports.Traffic, tuple[Direction, ...], list[Decision]]:
        """The traffic of a request row, the directions judged (both ends, wherever Hubble observed it), and the
        decisions."""
        src, dst = self.endpoint(row, "source"), self.endpoint(row, "destination")
        traffic = ports.Traffic(
            protocol=row.get("l4_protocol"),
            port=row.get("destination_port"),
            icmp_type=row.get("icmp_type"),
            l7=row.get("l7_protocol"),
            http_method=row.get("http_method"),
            http_url=row.get("http_url"),
            kafka_api_key=row.get("kafka_api_key"),
            kafka_topic=row.get("kafka_topic"),
            dns_query=row.get("dns_query"),
        )
        directions: tuple[Direction, ...] = ("egress", "ingress")
        decisions = []
        key = self.policy_set.decision_key(traffic)
        for direction in directions:
            subject, peer = (src, dst) if direction == "egress" else (dst, src)
            case = (direction, subject, peer, key)
            decision = self.decisions.get(case)
            if decision is None:
                decision = self.decisions[case] = self.policy_set.decide(direction, subject, peer, key)
            decisions.append(decision)
        return traffic, directions, decisions


def _describe(row: Mapping[str, Any], side: str) -> str:
    """A readable name for one end of an edge: `ns/workload`, or the reserved identity and address."""
    namespace = row.get(f"{side}_namespace")
    workload = row.get(f"{side}_workload")
    if namespace is not None:
        return f"{namespace}/{workload or '?'}"
    reserved = [
        lbl.split(":", 1)[1] for lbl in row.get(f"{side}_labels") or () if lbl.startswith("reserved:")
    ]
    identity = row.get(f"{side}_identity")
    name = reserved[0] if reserved else m.RESERVED_IDENTITIES.get(identity or 0, "world")
    names = row.get(f"{side}_names") or ()
    address = names[0] if names else row.get(f"{side}_ip")
    return f"{name}:{address}" if address else name


def _l7_summary(traffic: ports.Traffic) -> str | None:
    if traffic.l7 == "http":
        return f"{traffic.http_method or '?'} {ports.split_url(traffic.http_url or '')[1].split('?', 1)[0]}"
    if traffic.l7 == "kafka":
        return f"kafka {ports.kafka_api_key_name(traffic.kafka_api_key) or '?'} {traffic.kafka_topic or ''}".rstrip()
    if traffic.l7 == "dns":
        return f"dns {traffic.dns_query or '?'}"
    return None

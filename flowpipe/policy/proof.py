"""Proving a draft before it is offered: the documents as written, read back and replayed against what they were
learned from.

`prove_draft` takes the drafted policies as the cluster would get them (parsed back from the exact text that is
written, so that rendering itself is under test and nothing a flow carries can add a document) and replays
through them, together with any existing policies:

- the learned requests (`edges.learned_requests` of the observed edges): every one must be allowed;
- with `stored`, the stored flows of the window (`StoredEdges`): no request that was forwarded may be denied,
  except, next to existing policies, what those already deny (the additions must break nothing).

Requests of edges the draft left out on purpose (`draft.LeftOut.subjects`: the drafted end that misses a rule)
are denied as expected and returned apart (`Proof.expected`), as are requests a format cannot express at all
(ICMP in a NetworkPolicy: `Proof.unexpressible`). Any other denial is in `Proof.broken`: the caller withholds
the drafts that deny it and lists it. Nothing here refuses the whole set.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flowpipe.policy.load import parse_policies
from flowpipe.policy.model import Policy
from flowpipe.policy.render import render_policy
from flowpipe.policy.replay import DeniedEdge, ReplayConfig, replay_edges
from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters, prepare_edges
from flowpipe.query.engine import Engine

MAX_NAMED_EDGES = 20
"""Edges named in a summary list before `... and N more`."""
_L4 = ("TCP", "UDP", "SCTP")
Subject = tuple[str, str, str | None, int | None]
"""(`namespace/workload`, direction, protocol, port) of a drafted end that misses a rule on purpose."""


@dataclass(slots=True)
class Proof:
    """What the replay of a draft showed: requests allowed, what it denies and why, what it relies on."""

    requests: int = 0
    """Learned requests the draft allows."""
    learned_denied: list[DeniedEdge] = field(default_factory=list)
    """Every learned request the draft denies (expected, unexpressible or broken)."""
    flows: int | None = None
    """Stored requests the draft allows (None: the stored flows were not replayed)."""
    requires: list[str] = field(default_factory=list)
    expected: list[DeniedEdge] = field(default_factory=list)
    """Denied requests of edges the draft left out on purpose."""
    unexpressible: list[DeniedEdge] = field(default_factory=list)
    """Denied requests the format cannot express (ICMP in a NetworkPolicy)."""
    broken: list[DeniedEdge] = field(default_factory=list)
    """Denied learned requests nothing explains: the drafts that deny them are not offered."""
    broken_stored: list[DeniedEdge] = field(default_factory=list)
    """Denied forwarded stored requests nothing explains."""


class StoredEdges:
    """A window's stored flows (of one cluster, when given) grouped into replay edges, queried once per distinct
    need of the drafts."""

    def __init__(
        self, engine: Engine, since: datetime | None, until: datetime | None, cluster: str | None = None
    ) -> None:
        self._engine, self._since, self._until, self._cluster = engine, since, until, cluster
        self._edges: dict[tuple[tuple[str, object], ...], list[dict[str, Any]]] = {}

    def edges(self, policies: Sequence[Policy]) -> list[dict[str, Any]]:
        """The edges with what `policies` can tell apart (see `edge_parameters`), HTTP and Kafka calls aside.

        Stored flows are replayed at L3/L4: the L7 rules are proved on the learned requests, one per distinct
        call, and the stored flows hold the same calls again (with query strings: many more of them).
        """
        params = edge_parameters(policies, since=self._since, until=self._until, cluster=self._cluster)
        params.update(http=False, kafka=False)
        key = tuple(sorted(params.items()))
        if key not in self._edges:
            prepare_edges(self._engine)
            table = self._engine.run(EDGES_SQL, params, question="replay of the stored flows")
            self._edges[key] = table.to_pylist()
        return self._edges[key]


def as_deployed(policies: Sequence[Policy]) -> list[Policy]:
    """The policies as the cluster gets them: rendered, then read back."""
    if not policies:
        return []
    return parse_policies("---\n".join(render_policy(p) for p in policies), path="<draft>")


def prove_draft(
    deployed: Sequence[Policy],
    learned: Sequence[dict[str, Any]],
    *,
    flavour: str,
    existing: Sequence[Policy] = (),
    stored: StoredEdges | None = None,
    cidr_match_nodes: bool = False,
    left_out: Collection[Subject] = (),
) -> Proof:
    """Replay `learned` (and `stored`) through `existing` plus `deployed` (the drafts as read back from the text
    written); sort every denied request into expected, unexpressible and broken.

    `cidr_match_nodes`: the draft names node addresses by CIDR, which Cilium applies to nodes only with
    `policy-cidr-match-mode: nodes`; the replay uses that mode and the proof says the draft requires it.
    """
    proof = Proof()
    config = ReplayConfig(cidr_match_nodes=cidr_match_nodes)
    if cidr_match_nodes:
        proof.requires.append("Cilium policy-cidr-match-mode: nodes (ipBlocks that name node addresses)")
    policies = list(existing) + list(deployed)
    report = replay_edges(policies, learned, config, rules=False)
    _sort(report.denied_edges, flavour, left_out, proof, proof.broken)
    proof.requests = report.allowed
    proof.learned_denied = list(report.denied_edges)
    if stored is not None:
        edges = stored.edges(policies)
        flows = replay_edges(policies, edges, config, rules=False)
        denied = [e for e in flows.denied_edges if e.forwarded]
        if existing:
            # What the existing policies deny already is theirs to answer for; the additions must break nothing.
            before = {_key(e) for e in replay_edges(existing, edges, config, rules=False).denied_edges}
            denied = [e for e in denied if _key(e) not in before]
        _sort(denied, flavour, left_out, proof, proof.broken_stored)
        proof.flows = flows.allowed
    return proof


def _key(edge: DeniedEdge) -> tuple[Any, ...]:
    return (edge.source, edge.destination, edge.protocol, edge.port, edge.l7)


def subjects(edge: DeniedEdge) -> list[Subject]:
    """The ends that deny `edge`, as (`namespace/workload`, direction, protocol, port)."""
    return [
        (edge.source if d == "egress" else edge.destination, d, edge.protocol, edge.port)
        for d in edge.direction.split("+")
        if d
    ]


def _sort(
    denied: Iterable[DeniedEdge],
    flavour: str,
    left_out: Collection[Subject],
    proof: Proof,
    broken: list[DeniedEdge],
) -> None:
    for edge in denied:
        if all(s in left_out for s in subjects(edge)):
            proof.expected.append(edge)
        elif flavour == "kubernetes" and edge.protocol not in _L4:
            proof.unexpressible.append(edge)
        else:
            broken.append(edge)


def edge_text(edge: DeniedEdge) -> str:
    """`source -> destination PROTOCOL/port [L7 call]` of a denied edge."""
    port = "" if edge.port is None else f"/{edge.port}"
    l7 = f" {edge.l7}" if edge.l7 else ""
    return f"{edge.source} -> {edge.destination} {edge.protocol or '?'}{port}{l7}"

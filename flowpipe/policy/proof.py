"""Proving a draft before it is offered: rendered, read back and replayed against what it was learned from.

`prove_draft` takes drafted policies as the cluster would get them (rendered to YAML and parsed back, so that
rendering itself is under test) and replays through them, together with any existing policies:

- the learned requests (`edges.learned_requests` of the observed edges): every one must be allowed;
- with `stored`, the stored flows of the window (`StoredEdges`): no request that was forwarded may be denied,
  except, next to existing policies, what those already deny (the additions must break nothing).

A request that a format cannot express at all (ICMP in a NetworkPolicy, which has no ICMP rules) is not a
refusal: it is returned in `Proof.not_allowed`, for the files and the summary to name. Any other denial raises
`DraftRefusedError` naming the edges.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flowpipe.errors import DraftRefusedError
from flowpipe.policy.load import parse_policies
from flowpipe.policy.model import Policy
from flowpipe.policy.render import render_policy
from flowpipe.policy.replay import DeniedEdge, ReplayConfig, replay_edges
from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters
from flowpipe.query.engine import Engine

MAX_NAMED_EDGES = 20
"""Edges named in a refusal's message (all of them are in `DraftRefusedError.edges`)."""
_L4 = ("TCP", "UDP", "SCTP")


@dataclass(slots=True)
class Proof:
    """What the replay of a draft showed: requests allowed, and what the draft cannot allow or relies on."""

    requests: int = 0
    """Learned requests the draft allows."""
    flows: int | None = None
    """Stored requests the draft allows (None: the stored flows were not replayed)."""
    not_allowed: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)


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
            table = self._engine.run(EDGES_SQL, params, question="replay of the stored flows")
            self._edges[key] = table.to_pylist()
        return self._edges[key]


def as_deployed(policies: Sequence[Policy]) -> list[Policy]:
    """The policies as the cluster gets them: rendered, then read back."""
    if not policies:
        return []
    return parse_policies("---\n".join(render_policy(p) for p in policies), path="<draft>")


def prove_draft(
    policies: Sequence[Policy],
    learned: Sequence[dict[str, Any]],
    *,
    existing: Sequence[Policy] = (),
    stored: StoredEdges | None = None,
    cidr_match_nodes: bool = False,
) -> Proof:
    """Replay `learned` (and `stored`) through `existing` plus the deployed `policies`; raise if any is denied.

    `cidr_match_nodes`: the draft names node addresses by CIDR, which Cilium applies to nodes only with
    `policy-cidr-match-mode: nodes`; the replay uses that mode and the proof says the draft requires it.
    """
    kind = policies[0].flavour if policies else "cilium"
    proof = Proof()
    config = ReplayConfig(cidr_match_nodes=cidr_match_nodes)
    if cidr_match_nodes:
        proof.requires.append("Cilium policy-cidr-match-mode: nodes (ipBlocks that name node addresses)")
    deployed = list(existing) + as_deployed(policies)
    report = replay_edges(deployed, learned, config)
    proof.not_allowed, broken = _classify(report.denied_edges, kind)
    if broken:
        raise _refusal(kind, "the requests it was learned from", broken)
    proof.requests = report.allowed
    if stored is not None:
        edges = stored.edges(deployed)
        flows = replay_edges(deployed, edges, config)
        denied = [e for e in flows.denied_edges if e.forwarded]
        if existing:
            # What the existing policies deny already is theirs to answer for; the additions must break nothing.
            before = {_key(e) for e in replay_edges(existing, edges, config).denied_edges}
            denied = [e for e in denied if _key(e) not in before]
        declared, broken = _classify(denied, kind)
        if broken:
            raise _refusal(kind, "the stored flows of the window", broken)
        proof.flows = flows.allowed
        proof.not_allowed = sorted(set(proof.not_allowed) | set(declared))
    return proof


def _key(edge: DeniedEdge) -> tuple[Any, ...]:
    return (edge.source, edge.destination, edge.protocol, edge.port, edge.l7)


def _classify(denied: Iterable[DeniedEdge], kind: str) -> tuple[list[str], list[DeniedEdge]]:
    """Denied edges a format cannot express at all (named, allowed to stand) and the others (a refusal)."""
    declared, broken = [], []
    for edge in denied:
        if kind == "kubernetes" and edge.protocol not in _L4:
            declared.append(f"{edge_text(edge)}: a NetworkPolicy cannot allow {edge.protocol} alone")
        else:
            broken.append(edge)
    return sorted(set(declared)), broken


def edge_text(edge: DeniedEdge) -> str:
    """`source -> destination PROTOCOL/port [L7 call]` of a denied edge."""
    port = "" if edge.port is None else f"/{edge.port}"
    l7 = f" {edge.l7}" if edge.l7 else ""
    return f"{edge.source} -> {edge.destination} {edge.protocol or '?'}{port}{l7}"


def refusal(kind: str, what: str, names: Sequence[str], requests: int) -> DraftRefusedError:
    """The error for a draft that would deny `requests` of `what`, in the edges `names`."""
    shown = "\n".join(f"  {n}" for n in names[:MAX_NAMED_EDGES])
    more = f"\n  ... and {len(names) - MAX_NAMED_EDGES} more" if len(names) > MAX_NAMED_EDGES else ""
    return DraftRefusedError(
        f"the {kind} draft would deny {requests} of {what} in {len(names)} edges, so it is not offered:\n"
        f"{shown}{more}\nNarrow the draft with --namespace, or report the edges if they look expressible.",
        edges=names,
    )


def _refusal(kind: str, what: str, broken: Sequence[DeniedEdge]) -> DraftRefusedError:
    names = [f"{edge_text(e)} ({e.flows} requests; {e.reason})" for e in broken]
    return refusal(kind, what, names, sum(e.flows for e in broken))

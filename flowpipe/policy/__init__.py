"""Network policies: typed model, YAML load and render, drafts from observed edges, replay, proof, audit, Istio."""

from flowpipe.policy.audit import Finding, Inventory, audit_policies
from flowpipe.policy.draft import Draft, draft_policies, workload_selectors
from flowpipe.policy.edges import OBSERVED_EDGE_SCHEMA, learned_requests
from flowpipe.policy.istio import IstioPolicy, draft_authorization_policies, render_istio, unallowed_requests
from flowpipe.policy.load import load_policies, parse_policies
from flowpipe.policy.model import (
    ANY_PEER,
    FQDNSelector,
    HTTPRule,
    KafkaRule,
    LabelExpression,
    LabelSelector,
    Peer,
    Policy,
    Port,
    PortRule,
    Rule,
)
from flowpipe.policy.proof import Proof, StoredEdges, prove_draft
from flowpipe.policy.render import policy_document, render_policy, render_yaml
from flowpipe.policy.replay import ReplayConfig, ReplayReport, denied_directions, replay_edges, replay_flows
from flowpipe.policy.stored_edges import EDGES_SQL, edge_parameters

__all__ = [
    "ANY_PEER",
    "EDGES_SQL",
    "OBSERVED_EDGE_SCHEMA",
    "Draft",
    "FQDNSelector",
    "Finding",
    "HTTPRule",
    "Inventory",
    "IstioPolicy",
    "KafkaRule",
    "LabelExpression",
    "LabelSelector",
    "Peer",
    "Policy",
    "Port",
    "PortRule",
    "Proof",
    "ReplayConfig",
    "ReplayReport",
    "Rule",
    "StoredEdges",
    "audit_policies",
    "denied_directions",
    "draft_authorization_policies",
    "draft_policies",
    "edge_parameters",
    "learned_requests",
    "load_policies",
    "parse_policies",
    "policy_document",
    "prove_draft",
    "render_istio",
    "render_policy",
    "render_yaml",
    "replay_edges",
    "replay_flows",
    "unallowed_requests",
    "workload_selectors",
]

"""Network policies: typed model, YAML load and render, drafts from observed edges, replay of flows, audit."""

from flowpipe.policy.audit import Finding, Inventory, audit_policies
from flowpipe.policy.draft import Draft, draft_policies
from flowpipe.policy.edges import OBSERVED_EDGE_SCHEMA, learned_requests
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
from flowpipe.policy.render import policy_document, render_policy, render_yaml
from flowpipe.policy.replay import ReplayConfig, ReplayReport, replay_edges, replay_flows

__all__ = [
    "ANY_PEER",
    "OBSERVED_EDGE_SCHEMA",
    "Draft",
    "FQDNSelector",
    "Finding",
    "HTTPRule",
    "Inventory",
    "KafkaRule",
    "LabelExpression",
    "LabelSelector",
    "Peer",
    "Policy",
    "Port",
    "PortRule",
    "ReplayConfig",
    "ReplayReport",
    "Rule",
    "audit_policies",
    "draft_policies",
    "learned_requests",
    "load_policies",
    "parse_policies",
    "policy_document",
    "render_policy",
    "render_yaml",
    "replay_edges",
    "replay_flows",
]

"""Every Cilium DropReason classified once: its reason class, and whether it is a deliberate policy decision.

Hubble reports why the datapath dropped a packet with one of ~75 `flow.DropReason` values. For dashboards and
questions that is too fine and too raw: an on-call engineer wants to know whether a drop was *enforcement*
(a network policy said no: expected, and the reason policies exist) or *trouble* (conntrack, routing, invalid
packets, a datapath error: never intended). This module is the one place that says which is which. The
Prometheus sink labels drops with `reason_class`, and the `unexpected_drops` question joins the same table
(`drop_reason_table()`), so a dashboard and a question never disagree about what a reason means.

Classes (a small fixed set, safe as a metric label):

- `policy`: a network policy (or an equivalent rule: auth requirement, LoadBalancer source ranges) denied it.
  The only class whose drops are deliberate decisions (`policy_decision`).
- `conntrack`: connection-tracking state: a packet that fits no known connection, a full or missing CT map.
- `routing`: no route, no local endpoint, stale or unroutable address, no egress gateway, FIB lookup failure.
- `invalid_packet`: malformed or unacceptable packets: bad headers or addresses, fragments, TTL exceeded.
- `unsupported_protocol`: a protocol (L2, L3, L4, ICMP type or code) the datapath does not handle there.
- `service`: load balancing: no backend for a service, a ClusterIP not translated, socket LB failures.
- `nat`: masquerading and NAT46/64 failures.
- `encapsulation`: tunnel and overlay problems: tunnel keys and options, VNI, cluster id, no tunnel endpoint.
- `identity`: the sender's security identity is invalid or unknown.
- `proxy`: redirection to the L7 proxy failed.
- `encryption`: traffic that had to be encrypted was not.
- `rate_limit`: bandwidth manager or rate limiter.
- `not_ready`: the host or endpoint (or its policy) is not set up yet.
- `datapath`: internal datapath errors: missed tail call, packet write or checksum errors.
- `handled`: not a loss: the datapath consumed the packet on purpose (IGMP, multicast, punt to proxy).
- `unknown`: no reason given, or a reason newer than this table.

`expected` is true for `policy` and `handled`: every other class is trouble that nobody configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import pyarrow as pa

POLICY = "policy"
HANDLED = "handled"
UNKNOWN_CLASS = "unknown"

REASON_CLASSES: tuple[str, ...] = (
    POLICY,
    "conntrack",
    "routing",
    "invalid_packet",
    "unsupported_protocol",
    "service",
    "nat",
    "encapsulation",
    "identity",
    "proxy",
    "encryption",
    "rate_limit",
    "not_ready",
    "datapath",
    HANDLED,
    UNKNOWN_CLASS,
)
"""Every reason class, in the order dashboards list them."""

EXPECTED_CLASSES = frozenset({POLICY, HANDLED})
"""Classes whose drops are intended (enforcement, or packets the datapath consumed on purpose)."""


@dataclass(frozen=True, slots=True)
class DropReason:
    """One `flow.DropReason` value: number, enum name, class, and whether it is a policy decision."""

    value: int
    name: str
    reason_class: str

    @property
    def policy_decision(self) -> bool:
        """True when a policy (or an equivalent configured rule) decided this drop."""
        return self.reason_class == POLICY

    @property
    def expected(self) -> bool:
        """True for enforcement and deliberate handling; false for every kind of trouble."""
        return self.reason_class in EXPECTED_CLASSES


# value, enum name (flow.DropReason, Cilium v1.19), class.
# Deprecated values stay: old captures still carry them.
_TABLE: tuple[tuple[int, str, str], ...] = (
    (0, "DROP_REASON_UNKNOWN", UNKNOWN_CLASS),
    (130, "INVALID_SOURCE_MAC", "invalid_packet"),
    (131, "INVALID_DESTINATION_MAC", "invalid_packet"),
    (132, "INVALID_SOURCE_IP", "invalid_packet"),
    (133, "POLICY_DENIED", POLICY),
    (134, "INVALID_PACKET_DROPPED", "invalid_packet"),
    (135, "CT_TRUNCATED_OR_INVALID_HEADER", "conntrack"),
    (136, "CT_MISSING_TCP_ACK_FLAG", "conntrack"),
    (137, "CT_UNKNOWN_L4_PROTOCOL", "conntrack"),
    (138, "CT_CANNOT_CREATE_ENTRY_FROM_PACKET", "conntrack"),
    (139, "UNSUPPORTED_L3_PROTOCOL", "unsupported_protocol"),
    (140, "MISSED_TAIL_CALL", "datapath"),
    (141, "ERROR_WRITING_TO_PACKET", "datapath"),
    (142, "UNKNOWN_L4_PROTOCOL", "unsupported_protocol"),
    (143, "UNKNOWN_ICMPV4_CODE", "unsupported_protocol"),
    (144, "UNKNOWN_ICMPV4_TYPE", "unsupported_protocol"),
    (145, "UNKNOWN_ICMPV6_CODE", "unsupported_protocol"),
    (146, "UNKNOWN_ICMPV6_TYPE", "unsupported_protocol"),
    (147, "ERROR_RETRIEVING_TUNNEL_KEY", "encapsulation"),
    (148, "ERROR_RETRIEVING_TUNNEL_OPTIONS", "encapsulation"),
    (149, "INVALID_GENEVE_OPTION", "encapsulation"),
    (150, "UNKNOWN_L3_TARGET_ADDRESS", "routing"),
    (151, "STALE_OR_UNROUTABLE_IP", "routing"),
    (152, "NO_MATCHING_LOCAL_CONTAINER_FOUND", "routing"),
    (153, "ERROR_WHILE_CORRECTING_L3_CHECKSUM", "datapath"),
    (154, "ERROR_WHILE_CORRECTING_L4_CHECKSUM", "datapath"),
    (155, "CT_MAP_INSERTION_FAILED", "conntrack"),
    (156, "INVALID_IPV6_EXTENSION_HEADER", "invalid_packet"),
    (157, "IP_FRAGMENTATION_NOT_SUPPORTED", "invalid_packet"),
    (158, "SERVICE_BACKEND_NOT_FOUND", "service"),
    (160, "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT", "encapsulation"),
    (161, "FAILED_TO_INSERT_INTO_PROXYMAP", "proxy"),
    (162, "REACHED_EDT_RATE_LIMITING_DROP_HORIZON", "rate_limit"),
    (163, "UNKNOWN_CONNECTION_TRACKING_STATE", "conntrack"),
    (164, "LOCAL_HOST_IS_UNREACHABLE", "routing"),
    # The endpoint's policy is not computed yet (a new pod): nobody decided this drop.
    (165, "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION", "not_ready"),
    (166, "UNSUPPORTED_L2_PROTOCOL", "unsupported_protocol"),
    (167, "NO_MAPPING_FOR_NAT_MASQUERADE", "nat"),
    (168, "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE", "nat"),
    (169, "FIB_LOOKUP_FAILED", "routing"),
    (170, "ENCAPSULATION_TRAFFIC_IS_PROHIBITED", "encapsulation"),
    (171, "INVALID_IDENTITY", "identity"),
    (172, "UNKNOWN_SENDER", "identity"),
    (173, "NAT_NOT_NEEDED", "nat"),
    (174, "IS_A_CLUSTERIP", "service"),
    (175, "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", "invalid_packet"),
    (176, "FORBIDDEN_ICMPV6_MESSAGE", "invalid_packet"),
    # loadBalancerSourceRanges of a Service: a rule the user configured, enforced like a policy.
    (177, "DENIED_BY_LB_SRC_RANGE_CHECK", POLICY),
    (178, "SOCKET_LOOKUP_FAILED", "service"),
    (179, "SOCKET_ASSIGN_FAILED", "service"),
    (180, "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL", "proxy"),
    (181, "POLICY_DENY", POLICY),
    (182, "VLAN_FILTERED", "unsupported_protocol"),
    (183, "INVALID_VNI", "encapsulation"),
    (184, "INVALID_TC_BUFFER", "datapath"),
    (185, "NO_SID", "routing"),
    (186, "MISSING_SRV6_STATE", "routing"),
    (187, "NAT46", "nat"),
    (188, "NAT64", "nat"),
    # Mutual authentication required by a policy and not (yet) done: enforcement of that policy.
    (189, "AUTH_REQUIRED", POLICY),
    (190, "CT_NO_MAP_FOUND", "conntrack"),
    (191, "SNAT_NO_MAP_FOUND", "nat"),
    (192, "INVALID_CLUSTER_ID", "encapsulation"),
    (193, "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP", "unsupported_protocol"),
    (194, "NO_EGRESS_GATEWAY", "routing"),
    (195, "UNENCRYPTED_TRAFFIC", "encryption"),
    (196, "TTL_EXCEEDED", "invalid_packet"),
    (197, "NO_NODE_ID", "routing"),
    (198, "DROP_RATE_LIMITED", "rate_limit"),
    (199, "IGMP_HANDLED", HANDLED),
    (200, "IGMP_SUBSCRIBED", HANDLED),
    (201, "MULTICAST_HANDLED", HANDLED),
    (202, "DROP_HOST_NOT_READY", "not_ready"),
    (203, "DROP_EP_NOT_READY", "not_ready"),
    (204, "DROP_NO_EGRESS_IP", "routing"),
    (205, "DROP_PUNT_PROXY", HANDLED),
)

DROP_REASONS: Mapping[str, DropReason] = MappingProxyType(
    {name: DropReason(value, name, reason_class) for value, name, reason_class in _TABLE}
)
"""Enum name → `DropReason`, for every value of `flow.DropReason`."""

_BY_VALUE: Mapping[int, DropReason] = MappingProxyType({r.value: r for r in DROP_REASONS.values()})


def lookup(reason: str | int | None) -> DropReason | None:
    """The `DropReason` for an enum name, an enum number, or a number as text; None if unknown.

    >>> lookup("POLICY_DENIED").reason_class
    'policy'
    >>> lookup(151).name
    'STALE_OR_UNROUTABLE_IP'
    """
    if reason is None:
        return None
    if isinstance(reason, int):
        return _BY_VALUE.get(reason)
    text = reason.strip()
    if text.isdigit():
        return _BY_VALUE.get(int(text))
    return DROP_REASONS.get(text)


def reason_class(reason: str | int | None) -> str:
    """The class of a drop reason (name, number or number as text); `unknown` when it is not known."""
    found = lookup(reason)
    return found.reason_class if found is not None else UNKNOWN_CLASS


def is_policy_decision(reason: str | int | None) -> bool:
    """True when the drop reason is a deliberate policy decision (class `policy`)."""
    return reason_class(reason) == POLICY


def class_lookup_keys() -> tuple[list[str], list[str]]:
    """Parallel lists (key, class) covering every enum name and every enum number as text.

    The flow table keeps the reason name in `drop_reason_desc`, but an unknown number arrives as its decimal
    string and old data only has the number in `drop_reason`: keying both lets one vectorized lookup
    (`pyarrow.compute.index_in`) classify a whole column.
    """
    keys: list[str] = []
    classes: list[str] = []
    for reason in DROP_REASONS.values():
        keys += [reason.name, str(reason.value)]
        classes += [reason.reason_class, reason.reason_class]
    return keys, classes


DROP_REASON_SCHEMA = pa.schema(
    [
        pa.field("drop_reason", pa.int32(), nullable=False),
        pa.field("drop_reason_desc", pa.string(), nullable=False),
        pa.field("reason_class", pa.string(), nullable=False),
        pa.field("policy_decision", pa.bool_(), nullable=False),
        pa.field("expected", pa.bool_(), nullable=False),
    ]
)


def drop_reason_table() -> pa.Table:
    """The classification as an Arrow table, one row per enum value, to join in SQL.

    Columns match the flow table's names, so a question can register it and join on `drop_reason_desc`:

    >>> con.register("drop_reasons", drop_reason_table())          # doctest: +SKIP
    >>> con.sql("SELECT f.*, r.reason_class FROM flows f LEFT JOIN drop_reasons r USING (drop_reason_desc)")
    """
    reasons = sorted(DROP_REASONS.values(), key=lambda r: r.value)
    return pa.Table.from_pydict(
        {
            "drop_reason": [r.value for r in reasons],
            "drop_reason_desc": [r.name for r in reasons],
            "reason_class": [r.reason_class for r in reasons],
            "policy_decision": [r.policy_decision for r in reasons],
            "expected": [r.expected for r in reasons],
        },
        schema=DROP_REASON_SCHEMA,
    )

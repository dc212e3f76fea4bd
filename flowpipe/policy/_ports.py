"""Matching the L4 and L7 part of a request: ports and ranges, ICMP types, HTTP, Kafka and DNS rules.

HTTP `method`/`path`/`host` are regular expressions matched against the whole value; the path is the request
target including its query string, as Envoy's `:path` header is. Kafka roles expand to the API keys a producer
or a consumer needs, as Cilium's do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from flowpipe.errors import PolicyError
from flowpipe.policy._match import fqdn_regex
from flowpipe.policy.model import FQDNSelector, HTTPRule, KafkaRule, Port, PortRule

KAFKA_API_KEYS = [
    "produce",
    "fetch",
    "offsets",
    "metadata",
    "leaderandisr",
    "stopreplica",
    "updatemetadata",
    "controlledshutdown",
    "offsetcommit",
    "offsetfetch",
    "findcoordinator",
    "joingroup",
    "heartbeat",
    "leavegroup",
    "syncgroup",
    "describegroups",
    "listgroups",
    "saslhandshake",
    "apiversions",
    "createtopics",
    "deletetopics",
]
"""Kafka API keys by number (the order is the protocol's numbering)."""

KAFKA_ROLES: dict[str, frozenset[str]] = {
    # Cilium's role shorthands: the API keys a producer or a consumer needs.
    "produce": frozenset({"produce", "metadata", "apiversions"}),
    "consume": frozenset(
        {
            "fetch",
            "offsets",
            "metadata",
            "offsetcommit",
            "offsetfetch",
            "findcoordinator",
            "joingroup",
            "heartbeat",
            "leavegroup",
            "syncgroup",
            "apiversions",
        }
    ),
}

ICMP_TYPE_NAMES: dict[str, dict[str, int]] = {
    "ICMP": {
        "EchoReply": 0,
        "DestinationUnreachable": 3,
        "Redirect": 5,
        "Echo": 8,
        "EchoRequest": 8,
        "RouterAdvertisement": 9,
        "RouterSelection": 10,
        "TimeExceeded": 11,
        "ParameterProblem": 12,
        "Timestamp": 13,
        "TimestampReply": 14,
        "Photuris": 40,
        "ExtendedEchoRequest": 42,
        "ExtendedEchoReply": 43,
    },
    "ICMPv6": {
        "DestinationUnreachable": 1,
        "PacketTooBig": 2,
        "TimeExceeded": 3,
        "ParameterProblem": 4,
        "EchoRequest": 128,
        "EchoReply": 129,
        "MulticastListenerQuery": 130,
        "MulticastListenerReport": 131,
        "MulticastListenerDone": 132,
        "RouterSolicitation": 133,
        "RouterAdvertisement": 134,
        "NeighborSolicitation": 135,
        "NeighborAdvertisement": 136,
        "RedirectMessage": 137,
        "RouterRenumbering": 138,
        "ICMPNodeInformationQuery": 139,
        "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141,
        "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144,
        "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146,
        "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160,
        "ExtendedEchoReply": 161,
    },
}
_FLOW_ICMP = {"ICMPv4": "ICMP", "ICMPv6": "ICMPv6"}


@dataclass(frozen=True, slots=True)
class Traffic:
    """The L4 and L7 facts of a request that rules look at."""

    protocol: str | None
    port: int | None
    icmp_type: int | None = None
    l7: str | None = None
    http_method: str | None = None
    http_url: str | None = None
    kafka_api_key: str | None = None
    kafka_topic: str | None = None
    dns_query: str | None = None


def icmp_type_number(value: int | str, family: str) -> int | None:
    """An ICMP type from a number or a Cilium type name (`EchoRequest`); None if unknown."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    return ICMP_TYPE_NAMES.get(family, {}).get(value)


def port_matches(port: Port, traffic: Traffic) -> bool:
    """True when the request's protocol and destination port (or ICMP type) are covered by `port`."""
    if port.is_icmp:
        if _FLOW_ICMP.get(traffic.protocol or "") != port.protocol:
            return False
        if port.port is None:
            return True
        return icmp_type_number(port.port, port.protocol) == traffic.icmp_type
    if port.protocol == "ANY":
        if traffic.protocol not in ("TCP", "UDP", "SCTP"):
            return False
    elif traffic.protocol != port.protocol:
        return False
    number = port.port
    if isinstance(number, str):
        if not number.isdigit():
            return False  # a named port: flows carry numbers, so it cannot be resolved here
        number = int(number)
    if number is None or number == 0:
        return True
    if traffic.port is None:
        return False
    if port.end_port is not None and port.end_port >= number:
        return number <= traffic.port <= port.end_port
    return traffic.port == number


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyError(f"invalid regular expression {pattern!r}: {exc}") from exc


@lru_cache(maxsize=65536)
def split_url(url: str) -> tuple[str, str]:
    """(host, request target) of an HTTP URL as Hubble records it; the target keeps the query string."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.netloc, target


def http_matches(rule: HTTPRule, traffic: Traffic) -> bool:
    """True when the HTTP request meets the rule's method, path and host expressions."""
    host, target = split_url(traffic.http_url or "")
    if rule.method is not None and not _regex(rule.method).fullmatch(traffic.http_method or ""):
        return False
    if rule.path is not None and not _regex(rule.path).fullmatch(target):
        return False
    return rule.host is None or bool(_regex(rule.host).fullmatch(host))


def kafka_api_key_name(value: str | None) -> str | None:
    """A Kafka API key from Hubble (`produce`, `Fetch`, `offset_commit`, `1`) as Cilium's lower-case name."""
    if value is None:
        return None
    if value.isdigit():
        number = int(value)
        return KAFKA_API_KEYS[number] if number < len(KAFKA_API_KEYS) else value
    return re.sub(r"[^a-z0-9]", "", value.lower())


def kafka_role(api_key: str | None) -> str | None:
    """`produce` or `consume` for an API key that only one of the two roles uses, else None."""
    name = kafka_api_key_name(api_key)
    if name == "produce":
        return "produce"
    if name in KAFKA_ROLES["consume"] and name not in KAFKA_ROLES["produce"]:
        return "consume"
    return None


def kafka_matches(rule: KafkaRule, traffic: Traffic) -> bool:
    """True when the Kafka request's API key and topic are allowed by the rule."""
    name = kafka_api_key_name(traffic.kafka_api_key)
    if rule.role is not None and (
        name is None or name not in KAFKA_ROLES.get(rule.role.lower(), frozenset())
    ):
        return False
    if rule.api_key is not None and name != kafka_api_key_name(rule.api_key):
        return False
    # A request without a topic (metadata, heartbeat) is not limited by the topic.
    return rule.topic is None or traffic.kafka_topic is None or traffic.kafka_topic == rule.topic


def port_rule_matches(port_rule: PortRule, traffic: Traffic) -> bool:
    """True when the request's L4 is covered and, for L7 records of a restricted kind, an L7 rule allows it.

    An L3/L4 flow to a port with L7 rules is allowed: the connection is redirected to the proxy, which then
    judges each request (the L7 records).
    """
    return port_rule_l4_matches(port_rule, traffic) and port_rule_l7_matches(port_rule, traffic)


def port_rule_l4_matches(port_rule: PortRule, traffic: Traffic) -> bool:
    """True when the request's protocol and port (or ICMP type) are among the port rule's (none: all)."""
    return not port_rule.ports or any(port_matches(p, traffic) for p in port_rule.ports)


def port_rule_l7_matches(port_rule: PortRule, traffic: Traffic) -> bool:
    """True when the port rule has no L7 rules for the request's kind, or one of them allows the request."""
    if traffic.l7 == "http" and port_rule.http:
        return any(http_matches(r, traffic) for r in port_rule.http)
    if traffic.l7 == "kafka" and port_rule.kafka:
        return any(kafka_matches(r, traffic) for r in port_rule.kafka)
    if traffic.l7 == "dns" and port_rule.dns:
        if traffic.dns_query is None:
            # Unknown query (or not kept, because every DNS rule replayed allows all names): only `*` allows it.
            return any(s.match_pattern == "*" for s in port_rule.dns)
        query = traffic.dns_query.lower().rstrip(".")
        return fqdn_matches_any(port_rule.dns, query)
    return True


def fqdn_matches_any(selectors: Iterable[FQDNSelector], name: str) -> bool:
    """True when `name` matches any of the selectors."""
    return any(fqdn_regex(s).fullmatch(name) for s in selectors)

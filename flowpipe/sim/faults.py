"""The injected troubles of the simulator, and the ground truth that records exactly what each one emitted."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from flowpipe.errors import ConfigError
from flowpipe.sim.wire import CLASS_NAMES, TimeFormatter

DNS_NXDOMAIN = "dns-nxdomain"
DNS_SERVFAIL = "dns-servfail"
DNS_REFUSED = "dns-refused"
DNS_NO_RESPONSE = "dns-no-response"
DNS_POLICY_DROP = "dns-policy-drop"
PORT_SCAN = "port-scan"
POLICY_REGRESSION = "policy-regression"
CT_MAP_FULL = "ct-map-full"
STALE_IP = "stale-ip"
UNSELECTED_WORKLOAD = "unselected-workload"
WORLD_INGRESS = "world-ingress"


@dataclass(frozen=True)
class FaultSpec:
    """One switchable trouble: what it is and when it happens (fractions of the simulated duration)."""

    name: str
    description: str
    window: tuple[float, float] = (0.0, 1.0)


FAULTS: tuple[FaultSpec, ...] = (
    FaultSpec(
        DNS_NXDOMAIN, "production/api looks up a misspelt service name (postgress...) and gets NXDOMAIN"
    ),
    FaultSpec(
        DNS_SERVFAIL,
        "the upstream resolver answers SERVFAIL for sqs.eu-west-1.amazonaws.com during a burst",
        (0.30, 0.40),
    ),
    FaultSpec(DNS_REFUSED, "monitoring/grafana looks up ldap.corp.internal. and the forwarder refuses it"),
    FaultSpec(
        DNS_NO_RESPONSE,
        "production/order-service looks up events.analytics-partner.io. and never gets an answer",
    ),
    FaultSpec(
        DNS_POLICY_DROP,
        "staging has a default-deny egress policy without a DNS allowance: lookups are dropped",
    ),
    FaultSpec(
        PORT_SCAN,
        "a compromised production/web pod probes its neighbours on many ports (policy drops)",
        (0.45, 0.55),
    ),
    FaultSpec(
        POLICY_REGRESSION,
        "a new revision of policy production/api drops api -> redis:6379 from a known moment",
        (0.60, 1.0),
    ),
    FaultSpec(
        CT_MAP_FULL, "the conntrack table of node worker-2 is full: new connections are dropped", (0.20, 0.25)
    ),
    FaultSpec(
        STALE_IP,
        "a production/order-service pod sends from the address it had before a restart",
        (0.70, 0.78),
    ),
    FaultSpec(
        UNSELECTED_WORKLOAD, "no policy selects production/report-export: its flows carry no attribution"
    ),
    FaultSpec(
        WORLD_INGRESS,
        "production/api is reachable from the internet (world) on 8080, allowed by a broad rule",
    ),
)
FAULT_NAMES: tuple[str, ...] = tuple(f.name for f in FAULTS)
_SPECS = {f.name: f for f in FAULTS}


def fault_spec(name: str) -> FaultSpec:
    """The spec of fault `name`."""
    return _SPECS[name]


def parse_faults(names: Iterable[str]) -> frozenset[str]:
    """Fault names from user input: names, comma lists, `all` or `none`; unknown names raise ConfigError."""
    chosen: set[str] = set()
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if not name:
                continue
            if name == "all":
                chosen.update(FAULT_NAMES)
            elif name == "none":
                continue
            elif name in _SPECS:
                chosen.add(name)
            else:
                raise ConfigError(
                    f"unknown fault {name!r}; known faults: all, none, {', '.join(FAULT_NAMES)}"
                )
    return frozenset(chosen)


COUNT_KEYS = ("flows", *CLASS_NAMES, "dropped", "attempts")
"""Per-fault counters: every flow; flows by class (trace, drop, policy_verdict, l7_request, l7_response); flows
whose verdict is DROPPED; attempts (connections, lookups or probes of which at least one flow was emitted)."""


class Tally:
    """Mutable counters of one tag, filled while flows are emitted."""

    __slots__ = ("counts", "first_ns", "last_ns")

    def __init__(self) -> None:
        self.counts = [0] * len(COUNT_KEYS)
        self.first_ns = -1
        self.last_ns = -1

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dict(zip(COUNT_KEYS, self.counts, strict=True))


def iso_time(time_ns: int | None) -> str | None:
    """RFC 3339 UTC text of a nanosecond time, written exactly as flows write their times (None for none)."""
    if time_ns is None or time_ns < 0:
        return None
    return TimeFormatter()(time_ns)


@dataclass
class FaultTruth:
    """What one injected fault emitted: who, what, why, when and exactly how many flows of each kind.

    `reason` is a drop reason name (POLICY_DENIED, CT_MAP_INSERTION_FAILED, STALE_OR_UNROUTABLE_IP), a DNS outcome
    (NXDOMAIN, SERVFAIL, REFUSED, NO_RESPONSE) or a policy gap (NO_POLICY, WORLD_INGRESS). Times are RFC 3339 UTC
    written like flow times (`Timestamp.FromJsonString` reads them back to the nanosecond).
    `counts` use the keys of `COUNT_KEYS`; `details` holds fault-specific facts (probed ports, policy names...).
    """

    name: str
    description: str
    reason: str
    source_namespace: str | None = None
    source_workload: str | None = None
    source_pod: str | None = None
    destination_namespace: str | None = None
    destination_workload: str | None = None
    destination_name: str | None = None
    port: int | None = None
    protocol: str | None = None
    window_start: str | None = None
    window_end: str | None = None
    changed_at: str | None = None
    first_seen: str | None = None
    last_seen: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroundTruth:
    """Everything the tests need to know about one simulated run, as data and as JSON."""

    seed: int
    cluster_name: str
    start: str
    end: str
    rate_flows_per_second: float
    faults_enabled: list[str]
    faults: dict[str, FaultTruth] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    policies: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The ground truth as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> GroundTruth:
        """Read back what `to_json` wrote."""
        data = json.loads(text)
        data["faults"] = {name: FaultTruth(**value) for name, value in data["faults"].items()}
        return cls(**data)


def fill_counts(truth: FaultTruth, tally: Tally) -> None:
    """Copy a tally's counters and first/last times into a fault's truth."""
    truth.counts = tally.as_dict()
    truth.first_seen = iso_time(tally.first_ns)
    truth.last_seen = iso_time(tally.last_ns)

"""The injected troubles of the simulator, and the ground truth that records exactly what each one emitted."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from flowpipe.errors import ConfigError
from flowpipe.sim.resolver import NODE_LOCAL_DNS, in_cluster_domain, search_names
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
INGRESS_DENIED = "ingress-denied"
DNS_UPSTREAM_UNSEEN = "dns-upstream-unseen"


NXDOMAIN_QUERY = "postgress"
REFUSED_QUERY = "ldap.corp.internal"
NO_RESPONSE_QUERY = "events.analytics-partner.io."
SERVFAIL_NAME = "sqs.eu-west-1.amazonaws.com"
UPSTREAM_UNSEEN_NAME = "collector.observability-vendor.io"
UPSTREAM_UNSEEN_CLIENT = ("production", "web")
CT_FULL_NODE = "worker-2"

_COREDNS = ("kube-system", "coredns")


@dataclass(frozen=True)
class FaultSpec:
    """One switchable trouble: what it is, when it happens (fractions of the simulated duration), and the fixed
    facts its ground truth reports (who, to whom, which port and protocol, why)."""

    name: str
    description: str
    reason: str
    window: tuple[float, float] = (0.0, 1.0)
    source: tuple[str, str | None] | None = None
    destination: tuple[str, str] | None = None
    destination_name: str | None = None
    port: int | None = None
    protocol: str | None = None
    details: tuple[tuple[str, Any], ...] = ()


def _dns(
    name: str, description: str, reason: str, source: tuple[str, str], query: str, **extra: Any
) -> FaultSpec:
    # The application asks `query` without the final dot: `names` is its search path, every name of it answered.
    extra.setdefault("names", list(search_names(query.rstrip("."), source[0])))
    return FaultSpec(name, description, reason, extra.pop("window", (0.0, 1.0)), source, _COREDNS, query, 53, "UDP",
                     tuple(extra.items()))  # fmt: skip


def _upstream_unseen() -> FaultSpec:
    asked = search_names(UPSTREAM_UNSEEN_NAME, UPSTREAM_UNSEEN_CLIENT[0])
    return _dns(
        DNS_UPSTREAM_UNSEEN,
        f"{'/'.join(UPSTREAM_UNSEEN_CLIENT)} looks up {UPSTREAM_UNSEEN_NAME} through node-local-dns: the names it "
        "forwards to CoreDNS are NXDOMAIN, the name itself goes upstream, unseen",
        "FINAL_NOT_SEEN", NODE_LOCAL_DNS, UPSTREAM_UNSEEN_NAME, names=[q for q in asked if in_cluster_domain(q)],
        asked_by="/".join(UPSTREAM_UNSEEN_CLIENT), names_unseen=[q for q in asked if not in_cluster_domain(q)],
    )  # fmt: skip


FAULTS: tuple[FaultSpec, ...] = (
    _dns(DNS_NXDOMAIN, f"production/api looks up a misspelt service name, {NXDOMAIN_QUERY}: every name of its search "
         "path is NXDOMAIN", "NXDOMAIN", ("production", "api"), NXDOMAIN_QUERY, rcode=3),
    _dns(DNS_SERVFAIL, f"the upstream resolver answers SERVFAIL for {SERVFAIL_NAME} during a burst", "SERVFAIL",
         ("production", "order-service"), SERVFAIL_NAME, rcode=2, window=(0.30, 0.40)),
    _dns(DNS_REFUSED, f"monitoring/grafana looks up {REFUSED_QUERY} and the forwarder refuses it", "REFUSED",
         ("monitoring", "grafana"), REFUSED_QUERY, rcode=5),
    _dns(DNS_NO_RESPONSE, f"production/order-service looks up {NO_RESPONSE_QUERY.rstrip('.')}: the names of its "
         "search path are NXDOMAIN, the name itself never gets an answer",
         "NO_RESPONSE", ("production", "order-service"), NO_RESPONSE_QUERY),
    FaultSpec(DNS_POLICY_DROP, "staging has a default-deny egress policy without a DNS allowance: lookups drop",
              "POLICY_DENIED", source=("staging", None), destination=_COREDNS, port=53, protocol="UDP",
              details=(("workloads", ["staging/web", "staging/api"]), ("policy", "staging/default-deny"),
                       ("missing_policy", "staging/allow-dns"))),
    FaultSpec(PORT_SCAN, "a compromised production/web pod probes its neighbours on many ports (policy drops)",
              "POLICY_DENIED", (0.45, 0.55), ("production", "web"), protocol="TCP",
              details=(("policy", "production/web"),)),
    FaultSpec(POLICY_REGRESSION, "a new revision of policy production/api drops api -> redis:6379 from a moment on",
              "POLICY_DENIED", (0.60, 1.0), ("production", "api"), ("production", "redis"), port=6379,
              protocol="TCP", details=(("policy", "production/api"),)),
    FaultSpec(CT_MAP_FULL, f"the conntrack table of node {CT_FULL_NODE} is full: new connections are dropped",
              "CT_MAP_INSERTION_FAILED", (0.20, 0.25), protocol="TCP"),
    FaultSpec(STALE_IP, "a production/order-service pod sends from the address it had before a restart",
              "STALE_OR_UNROUTABLE_IP", (0.70, 0.78), ("production", "order-service"), ("production", "kafka"),
              port=9092, protocol="TCP"),
    FaultSpec(UNSELECTED_WORKLOAD, "no policy selects production/report-export: its flows carry no attribution",
              "NO_POLICY", source=("production", "report-export"),
              details=(("workload", "production/report-export"),
                       ("counts_cover", "flows from or to production/report-export, except other faults' flows"))),
    FaultSpec(WORLD_INGRESS, "production/api is reachable from the internet (world) on 8080, allowed by a broad rule",
              "WORLD_INGRESS", destination=("production", "api"), port=8080, protocol="TCP",
              details=(("policy", "production/api"), ("source_identity", 2))),
    FaultSpec(INGRESS_DENIED, "monitoring/grafana queries production/postgres directly: its own egress policy allows "
              "it, postgres' ingress policy does not; each SYN is forwarded at grafana's node and dropped at "
              "postgres' (a drop notification and a policy-verdict event), and retried", "POLICY_DENIED",
              source=("monitoring", "grafana"), destination=("production", "postgres"), port=5432, protocol="TCP",
              details=(("policy", "production/postgres"), ("allowed_by", "monitoring/grafana"))),
    _upstream_unseen(),
)  # fmt: skip
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
    (NXDOMAIN, SERVFAIL, REFUSED, NO_RESPONSE; FINAL_NOT_SEEN where the final name is not visible) or a policy gap (NO_POLICY, WORLD_INGRESS). Times are RFC 3339 UTC
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
    """Everything the tests need to know about one simulated run, as data and as JSON.

    `totals` counts every emitted flow by class (see `COUNT_KEYS`); `faults` has one entry per enabled fault.
    `policies` are the CiliumNetworkPolicy documents in force at the end of the run, `policy_selection` says which
    workloads each one selects and which directions it enforces, `unselected_workloads` which no policy selects.
    """

    seed: int
    cluster_name: str
    start: str
    end: str
    rate_flows_per_second: float
    faults_enabled: list[str]
    faults: dict[str, FaultTruth] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    policies: list[dict[str, Any]] = field(default_factory=list)
    policy_selection: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    unselected_workloads: list[str] = field(default_factory=list)
    capture_files: dict[str, Any] = field(default_factory=dict)
    """When the run was written as overlapping files (`flowpipe.sim.overlap`): lines per file, distinct flows,
    repeated lines."""

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


def truth_of(spec: FaultSpec, window: tuple[str | None, str | None]) -> FaultTruth:
    """The ground-truth record of a fault with its fixed facts filled in (counts come later)."""
    source = spec.source or (None, None)
    destination = spec.destination or (None, None)
    return FaultTruth(
        name=spec.name, description=spec.description, reason=spec.reason, source_namespace=source[0],
        source_workload=source[1], destination_namespace=destination[0], destination_workload=destination[1],
        destination_name=spec.destination_name, port=spec.port, protocol=spec.protocol, window_start=window[0],
        window_end=window[1], details=dict(spec.details),
    )  # fmt: skip


def fill_counts(truth: FaultTruth, tally: Tally) -> None:
    """Copy a tally's counters and first/last times into a fault's truth."""
    truth.counts = tally.as_dict()
    truth.first_seen = iso_time(tally.first_ns)
    truth.last_seen = iso_time(tally.last_ns)

"""The simulator driver: configuration, the time-ordered flow stream, its renderings and its ground truth."""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from itertools import pairwise
from typing import IO, Any

from flowpipe._proto.flow import flow_pb2
from flowpipe._proto.observer import observer_pb2
from flowpipe.errors import ConfigError
from flowpipe.sim import edges as e
from flowpipe.sim import faults as f
from flowpipe.sim.cluster import DEFAULT_CLUSTER_NAME, Cluster, build_cluster
from flowpipe.sim.edges import Edge, build_edges
from flowpipe.sim.faults import FAULT_NAMES, FaultTruth, GroundTruth, Tally, fill_counts, iso_time
from flowpipe.sim.policies import PolicySet, cluster_policies
from flowpipe.sim.traffic import TagRegistry, Traffic
from flowpipe.sim.wire import CLASS_NAMES, Renderer, Template

DEFAULT_START = datetime(2025, 1, 6, 9, 0, 0, tzinfo=UTC)
"""The simulated start time when none is given (a fixed moment, so runs are reproducible)."""

_POLICY_REVISION = 17
_DROPPED = 1 + len(CLASS_NAMES)
"""Index of the DROPPED-verdict counter in a tally (after `flows` and one counter per record class)."""
_ATTEMPTS = _DROPPED + 1
_FIRST_GUESS_FLOWS_PER_CONNECTION = 12.0


@dataclass(frozen=True)
class SimulatorConfig:
    """What to simulate: seed, simulated time span, average flow rate and the injected faults."""

    seed: int = field(default=1, metadata={"help": "Random seed: the same seed gives the same flows."})
    start: datetime = field(default=DEFAULT_START, metadata={"help": "Simulated start time (UTC)."})
    duration_seconds: float = field(default=600.0, metadata={"help": "Simulated duration in seconds."})
    rate_flows_per_second: float = field(
        default=1000.0, metadata={"help": "Average flows per second of simulated time."}
    )
    faults: frozenset[str] = field(default=frozenset(FAULT_NAMES), metadata={"help": "Injected faults."})
    cluster_name: str = field(
        default=DEFAULT_CLUSTER_NAME, metadata={"help": "Cluster name (node_name prefix)."}
    )
    max_flows: int | None = field(default=None, metadata={"help": "Stop after this many flows."})

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ConfigError("simulator start time must carry a time zone (UTC)")
        if not self.duration_seconds > 0 or not math.isfinite(self.duration_seconds):
            raise ConfigError(f"duration must be > 0 seconds, got {self.duration_seconds}")
        if not self.rate_flows_per_second > 0 or not math.isfinite(self.rate_flows_per_second):
            raise ConfigError(f"rate must be > 0 flows/s, got {self.rate_flows_per_second}")
        if self.max_flows is not None and self.max_flows < 0:
            raise ConfigError(f"max_flows must be >= 0, got {self.max_flows}")
        unknown = set(self.faults) - set(FAULT_NAMES)
        if unknown:
            raise ConfigError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULT_NAMES)}")
        if not self.cluster_name:
            raise ConfigError("cluster name must not be empty")

    @property
    def start_ns(self) -> int:
        """The start as integer nanoseconds since the epoch."""
        delta = self.start - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000

    @property
    def end_ns(self) -> int:
        """The end (exclusive) as integer nanoseconds since the epoch."""
        return self.start_ns + round(self.duration_seconds * 1e9)


@dataclass
class _Phase:
    end_ns: int
    edges: list[Edge]
    cumulative: list[float]
    tags: list[tuple[int, int, int]]


class Simulator:
    """A deterministic simulated cluster that emits Hubble flows in time order.

    ```python
    sim = Simulator(SimulatorConfig(seed=7, duration_seconds=60, rate_flows_per_second=500))
    for flow in sim.flows():          # flow_pb2.Flow, time ordered
        ...
    sim.ground_truth().faults["dns-nxdomain"].counts   # exactly what was emitted so far
    ```
    Each call to `flows()`, `responses()`, `json_lines()` or `write_jsonpb()` starts a fresh run from the seed;
    the ground truth follows the most recent run, flow by flow.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.cluster: Cluster = build_cluster(self.config.seed, self.config.cluster_name)
        self.policy_timeline = self._policy_timeline()
        self._tags = TagRegistry()
        self._tallies: list[Tally] = []
        self._totals = Tally()
        self._traffic: Traffic | None = None

    # --- public views of the model ----------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        """The node names as Hubble writes them (`<cluster>/<node>`)."""
        return [self.cluster.node_name(n) for n in self.cluster.nodes]

    @property
    def namespaces(self) -> list[str]:
        """The namespaces of the cluster."""
        return sorted(self.cluster.namespaces)

    @property
    def policies(self) -> PolicySet:
        """The policies in force at the end of the run (after any injected policy change)."""
        return self.policy_timeline[-1][1]

    def policy_history(self) -> list[tuple[datetime, PolicySet]]:
        """Every policy set with the moment it took effect."""
        return [(datetime.fromtimestamp(t / 1e9, UTC), p) for t, p in self.policy_timeline]

    def _policy_timeline(self) -> list[tuple[int, PolicySet]]:
        faults = self.config.faults
        options = {
            "dns_allowed_in_staging": f.DNS_POLICY_DROP not in faults,
            "api_allows_world": f.WORLD_INGRESS in faults,
            "report_export_selected": f.UNSELECTED_WORKLOAD not in faults,
            "grafana_reaches_postgres": f.INGRESS_DENIED in faults,
        }
        timeline = [(self.config.start_ns, cluster_policies(**options, revision=_POLICY_REVISION))]
        if f.POLICY_REGRESSION in faults:
            at = self._at(f.fault_spec(f.POLICY_REGRESSION).window[0])
            timeline.append(
                (at, cluster_policies(**options, api_allows_redis=False, revision=_POLICY_REVISION + 1))
            )
        return timeline

    def _at(self, fraction: float) -> int:
        return self.config.start_ns + int(fraction * (self.config.end_ns - self.config.start_ns))

    # --- the run -------------------------------------------------------------------------------------------------

    def _phases(self, edges: list[Edge], tags: TagRegistry) -> list[_Phase]:
        bounds = sorted({0.0, 1.0} | {x for edge in edges for x in edge.window})
        phases = []
        for low, high in pairwise(bounds):
            active = [edge for edge in edges if edge.window[0] <= low and high <= edge.window[1]]
            cumulative, total = [], 0.0
            for edge in active:
                total += edge.weight
                cumulative.append(total)
            phase_tags = [
                (tags.tag(edge.fault), tags.tag(edge.deny_fault), tags.tag(edge.before_fault, "before"))
                for edge in active
            ]
            phases.append(
                _Phase(self._at(high) if high < 1.0 else self.config.end_ns, active, cumulative, phase_tags)
            )
        return phases

    def _records(self) -> Iterator[tuple[Any, ...]]:
        """The records of a fresh run, counted into the ground truth as they are yielded."""
        config = self.config
        rng = random.Random(f"traffic:{config.seed}")
        heap: list[tuple[Any, ...]] = []
        tags = TagRegistry()
        for name in f.FAULT_NAMES:
            if name in config.faults:
                tags.tag(name)
        edges = build_edges(self.cluster, config.faults)
        traffic = Traffic(
            self.cluster,
            rng,
            config.faults,
            self.policy_timeline,
            (config.start_ns, config.end_ns),
            tags,
            partial(heapq.heappush, heap),
        )
        phases = self._phases(edges, tags)
        self._tags, self._traffic, self._totals = tags, traffic, Tally()
        self._tallies = [Tally() for _ in tags.keys]
        tallies, totals = self._tallies, self._totals.counts
        end = config.end_ns
        limit = config.max_flows if config.max_flows is not None else -1
        emitted = 0
        per_connection = _FIRST_GUESS_FLOWS_PER_CONNECTION
        rate = config.rate_flows_per_second
        pop = heapq.heappop
        t = config.start_ns
        phase_index = 0
        phase = phases[0]
        while True:
            t_next = t + int(rng.expovariate(rate / per_connection) * 1e9)
            bound = min(t_next, end)
            while heap and heap[0][0] < bound:
                rec = pop(heap)
                if emitted == limit:
                    return
                emitted += 1
                template: Template = rec[2]
                totals[0] += 1
                totals[1 + template.cls] += 1
                if template.dropped:
                    totals[_DROPPED] += 1
                tag = rec[8]
                if tag >= 0:
                    tally = tallies[tag]
                    counts = tally.counts
                    counts[0] += 1
                    counts[1 + template.cls] += 1
                    if template.dropped:
                        counts[_DROPPED] += 1
                    if rec[9]:
                        counts[_ATTEMPTS] += 1
                    if tally.first_ns < 0:
                        tally.first_ns = rec[0]
                    tally.last_ns = rec[0]
                yield rec
            if t_next >= end:
                return
            while t_next >= phase.end_ns:
                phase_index += 1
                phase = phases[phase_index]
            index = bisect_right(phase.cumulative, rng.random() * phase.cumulative[-1])
            index = min(index, len(phase.edges) - 1)
            made = traffic.made
            traffic.connect(t_next, phase.edges[index], phase.tags[index])
            per_connection += 0.02 * (traffic.made - made - per_connection)
            t = t_next

    def _renderer(self) -> Renderer:
        return Renderer(random.Random(f"uuid:{self.config.seed}").getrandbits(128))

    def _encoded(self) -> Iterator[tuple[int, Template, bytes]]:
        encode = self._renderer().flow_bytes
        for n, rec in enumerate(self._records()):
            yield rec[0], rec[2], encode(rec, n)

    def flow_bytes(self) -> Iterator[bytes]:
        """Serialized `flow.Flow` messages of a fresh run, in time order: the cheapest form to ship or store."""
        for _, _, data in self._encoded():
            yield data

    def flows(self) -> Iterator[flow_pb2.Flow]:
        """`flow.Flow` messages of a fresh run, in time order."""
        parse = flow_pb2.Flow.FromString
        for _, _, data in self._encoded():
            yield parse(data)

    def response_bytes(self) -> Iterator[tuple[str, int, bytes]]:
        """(node_name, time_ns, serialized `observer.GetFlowsResponse`) of a fresh run, in time order."""
        encode = self._renderer().response_bytes
        for n, rec in enumerate(self._records()):
            yield rec[2].node, rec[0], encode(rec, n)

    def responses(self) -> Iterator[observer_pb2.GetFlowsResponse]:
        """`observer.GetFlowsResponse` envelopes (flow, node_name, time) of a fresh run, in time order."""
        parse = observer_pb2.GetFlowsResponse.FromString
        for _, _, data in self.response_bytes():
            yield parse(data)

    def json_lines(self) -> Iterator[str]:
        """`hubble observe -o jsonpb` lines (compact JSON, proto field names, no newline) of a fresh run."""
        line = self._renderer().json_line
        for n, rec in enumerate(self._records()):
            yield line(rec, n)

    def write_jsonpb(self, out: IO[str], batch: int = 4096) -> int:
        """Write a fresh run as jsonpb lines to `out`; returns the number of flows written."""
        written = 0
        pending: list[str] = []
        for text in self.json_lines():
            pending.append(text)
            if len(pending) >= batch:
                out.write("\n".join(pending) + "\n")
                written += len(pending)
                pending.clear()
        if pending:
            out.write("\n".join(pending) + "\n")
            written += len(pending)
        return written

    # --- ground truth ----------------------------------------------------------------------------------------

    def ground_truth(self) -> GroundTruth:
        """What the most recent run emitted so far: totals and, per enabled fault, exact counts and facts."""
        config = self.config
        totals = self._totals.as_dict()
        workloads = list(self.cluster.workloads.values())
        truth = GroundTruth(
            seed=config.seed,
            cluster_name=config.cluster_name,
            start=iso_time(config.start_ns) or "",
            end=iso_time(config.end_ns) or "",
            rate_flows_per_second=config.rate_flows_per_second,
            faults_enabled=[name for name in FAULT_NAMES if name in config.faults],
            totals={k: v for k, v in totals.items() if k != "attempts"},
            policies=self.policies.to_documents(),
            policy_selection=self.policies.selection(workloads),
            unselected_workloads=self.policies.unselected_workloads(workloads),
        )
        for name in truth.faults_enabled:
            fault = self._describe(name)
            tag = self._tags.tag(name)
            fill_counts(fault, self._tallies[tag] if self._tallies else Tally())
            truth.faults[name] = fault
        return truth

    def _describe(self, name: str) -> FaultTruth:
        spec = f.fault_spec(name)
        truth = f.truth_of(spec, (iso_time(self._at(spec.window[0])), iso_time(self._at(spec.window[1]))))
        traffic = self._traffic
        if name == f.PORT_SCAN:
            truth.source_pod = self.cluster.pods_of("production", "web")[0].name
            truth.details["candidate_ports"] = list(e.PROBE_PORTS)
            if traffic is not None:
                truth.details["candidate_targets"] = len(traffic.scan_targets)
                truth.details["source_port"] = traffic.scan_source_port
        elif name == f.POLICY_REGRESSION:
            before = self._tallies[self._tags.tag(name, "before")] if self._tallies else Tally()
            truth.changed_at = truth.window_start
            truth.details.update(revision_before=_POLICY_REVISION, revision_after=_POLICY_REVISION + 1,
                                 forwarded_before=before.as_dict())  # fmt: skip
        elif name == f.CT_MAP_FULL:
            truth.details["node"] = self.cluster.node_name(self.cluster.node_by_name(f.CT_FULL_NODE))
        elif name == f.STALE_IP and traffic is not None:
            truth.source_pod = traffic.stale_pod.name
            truth.details["stale_ip"] = traffic.stale_view.ip
        return truth


__all__ = ["CLASS_NAMES", "DEFAULT_START", "Simulator", "SimulatorConfig"]

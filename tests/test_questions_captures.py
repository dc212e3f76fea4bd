"""The policy questions on real Hubble captures: they run, and their counts agree with counts computed here from
the raw JSON lines by a small reference implementation of the documented rules (independent of the SQL)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support.sim_dataset import ask

from flowpipe.app.ingest import ingest_files
from flowpipe.config import ParquetSinkConfig
from flowpipe.drop_reasons import lookup
from flowpipe.query import DuckDBEngine, load_questions

Row = dict[str, Any]
ALL = {"since": "1970-01-01", "until": "2100-01-01", "limit": "100000"}
RESERVED = {
    1: "host",
    2: "world",
    3: "unmanaged",
    4: "health",
    5: "init",
    6: "remote-node",
    7: "kube-apiserver",
    8: "ingress",
    9: "world",
    10: "world",
}
STABLE_KEYS = ("app.kubernetes.io/name", "app", "k8s-app", "name")
_SUFFIX = "[bcdfghjklmnpqrstvwxz2456789]"
POD_SUFFIXES = (
    re.compile(rf"^(.+)-{_SUFFIX}{{6,10}}-{_SUFFIX}{{5}}$"),
    re.compile(rf"^(.+)-[0-9]{{8,}}-{_SUFFIX}{{5}}$"),
    re.compile(rf"^(.+)-{_SUFFIX}{{5}}$"),
    re.compile(r"^(.+)-[0-9]+$"),
)
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


# -- reading the raw JSON -------------------------------------------------------------------------------------


def raw_flows(files: list[Path]) -> list[Row]:
    """Every flow in the capture files, as Hubble wrote it (the `flow` object, with the envelope's fallbacks)."""
    flows = []
    for path in files:
        for event in _events(path.read_text(encoding="utf-8")):
            flow = event.get("flow", event if "verdict" in event else None)
            if flow is None:
                continue
            flows.append(
                {**flow, "_time": flow.get("time") or event.get("time"), "_node_name": event.get("node_name")}
            )
    return flows


def _events(text: str) -> Iterator[Row]:
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)
        return
    yield from whole if isinstance(whole, list) else [whole]


class Flow:
    """The facts of one raw flow the questions use, read the way the documented rules say."""

    def __init__(self, raw: Row) -> None:
        self.raw = raw
        self.time = pd.Timestamp(raw["_time"])
        self.verdict = raw.get("verdict")
        self.event_type = (raw.get("event_type") or {}).get("type")
        self.sub_type = (raw.get("event_type") or {}).get("sub_type")
        self.direction = raw.get("traffic_direction")
        self.point = raw.get("trace_observation_point")
        reply = raw.get("is_reply")
        self.is_reply = reply if reply is not None else (True if raw.get("reply") else None)
        l7 = raw.get("l7") or {}
        self.l7_type = l7.get("type")
        self.dns = l7.get("dns")
        self.http = l7.get("http")
        l4 = raw.get("l4") or {}
        self.protocol, ports = next(iter(l4.items()), (None, {}))
        self.source_port = ports.get("source_port", 0) if self.protocol in ("TCP", "UDP", "SCTP") else None
        self.destination_port = (
            ports.get("destination_port", 0) if self.protocol in ("TCP", "UDP", "SCTP") else None
        )
        ip = raw.get("IP") or {}
        self.src = Endpoint(raw.get("source") or {}, ip.get("source"))
        self.dst = Endpoint(raw.get("destination") or {}, ip.get("destination"))
        self.destination_names = raw.get("destination_names") or []
        self.node = raw.get("node_name") or raw.get("_node_name")
        self.flags = ((l4.get("TCP") or {}).get("flags")) or {}
        self.icmp_type = ports.get("type") if self.protocol in ("ICMPv4", "ICMPv6") else None
        self.l7 = l7

    @property
    def is_traffic(self) -> bool:
        return self.raw.get("Type") != "SOCK" and self.event_type != 7

    @property
    def is_request(self) -> bool:
        return self.is_traffic and self.is_reply is not True and self.l7_type != "RESPONSE"

    def reason(self) -> str:
        number = self.raw.get("drop_reason") or 0
        if self.raw.get("drop_reason_desc"):
            return str(self.raw["drop_reason_desc"])
        if number:
            return str(number)
        if self.event_type == 1 and self.sub_type:
            return str(self.sub_type)
        return "0"


class Endpoint:
    """One side of a flow, named by the rules of `flows_enriched`, written again here in Python."""

    def __init__(self, raw: Row, ip: str | None) -> None:
        self.pod = raw.get("pod_name") or None
        self.identity = raw.get("identity") or 0
        self.labels = raw.get("labels") or []
        # A pod identity with labels but no namespace field: the namespace label names it.
        self.namespace = raw.get("namespace") or (
            self._k8s_label("io.kubernetes.pod.namespace") if 256 <= self.identity < 2**24 else None
        )
        self.ip = ip or None
        workloads = raw.get("workloads") or []
        self.workload_name = (workloads[0].get("name") or None) if workloads else None

    @property
    def entity(self) -> str | None:
        if self.namespace and self.pod:
            return None  # a record naming its pod is about that pod, whatever identity it carries
        return self.reserved

    @property
    def reserved_identity(self) -> str | None:
        return self.reserved if self.namespace and self.pod else None

    @property
    def reserved(self) -> str | None:
        if 256 <= self.identity < 2**24 and self.namespace:
            return None
        if self.identity in RESERVED:
            return RESERVED[self.identity]
        if self.identity >= 2**24:
            return "world"
        for name in ("kube-apiserver", "host", "remote-node", "health"):
            if f"reserved:{name}" in self.labels:
                return name
        if {"reserved:world", "reserved:world-ipv4", "reserved:world-ipv6"} & set(self.labels):
            return "world"
        for name in ("init", "unmanaged", "ingress"):
            if f"reserved:{name}" in self.labels:
                return name
        return None

    def _k8s_label(self, key: str) -> str | None:
        for label in self.labels:
            if label.startswith(f"k8s:{key}="):
                return label.split("=", 1)[1] or None
        return None

    @property
    def workload(self) -> str | None:
        if self.workload_name or self.entity:
            return self.workload_name or self.entity
        for key in STABLE_KEYS:
            value = self._k8s_label(key)
            if value:
                return value
        if self.namespace and self.pod:
            for pattern in POD_SUFFIXES:
                match = pattern.match(self.pod)
                if match:
                    return match.group(1)
            return self.pod
        return self.ip

    @property
    def id(self) -> str | None:
        if self.namespace and self.workload:
            return f"{self.namespace}/{self.workload}"
        label_namespace = self._k8s_label("io.kubernetes.pod.namespace")
        if self.entity is None and self.workload and label_namespace:
            return f"{label_namespace}/{self.workload}"
        return self.workload


# -- the edge definition, again -------------------------------------------------------------------------------


def is_counted_request(f: Flow) -> bool:
    """A request record of the edge definition: no reply, L7 response or socket event; a TCP record without
    is_reply only when it opens the connection (SYN without ACK)."""
    if not f.is_request:
        return False
    if f.is_reply is None and f.protocol == "TCP" and f.flags:
        return bool(f.flags.get("SYN")) and not f.flags.get("ACK")
    return True


def requests_once(flows: list[Flow]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Each request (a 5-tuple connection, or an ICMP / L7 call per observing side) with its packets counted
    once: the most records one observer (node, event type, point, direction, verdict) wrote for it."""
    per_observer: dict[tuple[Any, ...], Counter[tuple[Any, ...]]] = defaultdict(Counter)
    flows_of: dict[tuple[Any, ...], list[Flow]] = defaultdict(list)
    for f in flows:
        if not is_counted_request(f):
            continue
        connection = f.l7_type is None and f.protocol in ("TCP", "UDP", "SCTP") and f.source_port is not None
        key: tuple[Any, ...] = (f.src.ip, f.source_port, f.dst.ip, f.destination_port, f.protocol)
        if not connection:
            l7 = json.dumps(f.l7, sort_keys=True) if f.l7 else None
            key += (f.icmp_type, l7, f.direction or "")
        reason = lookup(f.reason())
        policy = f.verdict == "DROPPED" and reason is not None and reason.policy_decision
        observer = (f.node, f.event_type, f.point, f.direction, f.verdict, policy)
        per_observer[key][observer] += 1
        flows_of[key].append(f)
    out = {}
    for key, observers in per_observer.items():
        out[key] = {
            "packets": max(observers.values()),
            "dropped": max((n for o, n in observers.items() if o[4] == "DROPPED"), default=0),
            "denied": any(o[5] for o in observers),
            "flows": flows_of[key],
        }
    return out


# -- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flows(capture_files: list[Path]) -> list[Flow]:
    return [Flow(raw) for raw in raw_flows(capture_files)]


@pytest.fixture(scope="module")
def engine(capture_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEngine]:
    root = tmp_path_factory.mktemp("captures")
    result = ingest_files(capture_files, ParquetSinkConfig(path=str(root), writer_id="captures"))
    assert not result.skipped_by_reason, result.skipped_samples
    with DuckDBEngine(root) as opened:
        yield opened


def query(engine: DuckDBEngine, name: str, **values: object) -> list[Row]:
    return ask(engine, name, **{**ALL, **values})


def test_every_question_runs_on_the_captures(engine: DuckDBEngine, flows: list[Flow]) -> None:
    assert engine.run("SELECT count(*) AS n FROM flows").column("n")[0].as_py() == len(flows)
    for question in load_questions():
        values = {k: v for k, v in ALL.items() if question.parameter(k) is not None}
        assert ask(engine, question.name, **values) is not None


# -- unexpected_drops -------------------------------------------------------------------------------------------


def _edge(flow: Flow) -> tuple[Any, ...]:
    return (flow.src.id, flow.dst.id, flow.destination_port, flow.protocol)


def expected_drops(flows: list[Flow]) -> Counter[tuple[str, str]]:
    """(why, reason) → drop notifications, by the rules in the question's description."""
    delivered: dict[tuple[Any, ...], pd.Timestamp] = {}
    served: set[tuple[Any, ...]] = set()
    for f in flows:
        if (
            f.is_request
            and f.verdict in ("FORWARDED", "REDIRECTED")
            and (f.direction == "INGRESS" or f.point == "TO_ENDPOINT")
        ):
            key = _edge(f)
        elif not f.is_request and f.verdict == "FORWARDED":
            key = (f.dst.id, f.src.id, f.source_port, f.protocol)
        else:
            continue
        delivered[key] = min(delivered.get(key, f.time), f.time)
        served.add(key[1:])
    counts: Counter[tuple[str, str]] = Counter()
    for f in flows:
        if f.verdict != "DROPPED" or f.event_type == 5:
            continue
        known = lookup(f.reason())
        reason = known.name if known else f.reason()
        first = delivered.get(_edge(f))
        infra = {"host", "kube-apiserver", "health", "remote-node"}
        if known is None or not known.expected:
            why = "non_policy"
        elif not known.policy_decision:
            why = "expected"
        elif f.is_request and f.destination_port == 53:
            why = "dns_blocked"
        elif first is not None and f.time > first:
            why = "regression"
        elif (
            f.src.namespace == "kube-system"
            or f.src.entity in infra
            or f.dst.entity in infra
            or (f.dst.namespace == "kube-system" and _edge(f)[1:] in served)
        ):
            why = "infrastructure"
        else:
            why = "expected"
        counts[(why, reason)] += 1
    return counts


def test_unexpected_drops_match_the_raw_drops(engine: DuckDBEngine, flows: list[Flow]) -> None:
    expected = expected_drops(flows)
    assert expected, "the captures hold drops"
    rows = query(engine, "unexpected_drops", show_expected="true")
    found: Counter[tuple[str, str]] = Counter()
    for row in rows:
        found[(row["why"], row["drop_reason_desc"])] += row["flows"]
    assert found == expected
    hidden = query(engine, "unexpected_drops")
    assert sum(r["flows"] for r in hidden) == sum(n for (why, _), n in expected.items() if why != "expected")
    # Known answers among them: the starwars ICMPv6 drops and the exporter's invalid source address.
    assert expected[("non_policy", "UNSUPPORTED_L3_PROTOCOL")] == 2
    assert expected[("non_policy", "INVALID_SOURCE_IP")] == 1


# -- dns_failures -------------------------------------------------------------------------------------------------


def test_dns_failures_match_the_raw_dns_records(engine: DuckDBEngine, flows: list[Flow]) -> None:
    records = [f for f in flows if f.dns is not None and f.l7_type in ("REQUEST", "RESPONSE")]
    assert records, "the captures hold DNS records"
    newest = max(f.time for f in records)
    timeout = pd.Timedelta(seconds=5)

    def client(f: Flow) -> Endpoint:
        return f.dst if f.l7_type == "RESPONSE" else f.src

    def qtypes(f: Flow) -> list[str]:
        return f.dns.get("qtypes") or []  # type: ignore[union-attr]

    responses = [f for f in records if f.l7_type == "RESPONSE"]
    unanswered: Counter[tuple[Any, ...]] = Counter()
    for q in records:
        if q.l7_type != "REQUEST" or q.verdict != "FORWARDED" or newest - q.time < timeout:
            continue
        answered = any(
            r.dst.ip == q.src.ip
            and r.destination_port == q.source_port
            and r.dns["query"] == q.dns["query"]
            and (not qtypes(r) or not qtypes(q) or qtypes(r) == qtypes(q))
            and q.time <= r.time <= q.time + timeout
            for r in responses
        )
        if not answered:
            unanswered[(client(q).id, q.dns["query"])] += 1
    rcode_failures = Counter(
        (client(r).id, r.dns["query"], RCODES.get(r.dns.get("rcode", 0), "other"))
        for r in responses
        if r.dns.get("rcode", 0) != 0
    )
    lookups = Counter(client(f).id for f in records if f.l7_type == "REQUEST")

    rows = query(engine, "dns_failures", include_search_expansions="true")
    by_kind: dict[str, Counter[tuple[Any, ...]]] = defaultdict(Counter)
    for row in rows:
        name = (
            f"{row['source_namespace']}/{row['source_workload']}"
            if row["source_namespace"]
            else row["source_workload"]
        )
        if row["kind"] == "no_answer":
            by_kind["no_answer"][(name, row["query"])] += row["failures"]
        elif row["kind"] == "rcode":
            by_kind["rcode"][(name, row["query"], row["rcode_name"])] += row["failures"]
        if row["kind"] in ("no_answer", "rcode"):
            assert row["lookups"] == lookups[name]
    assert by_kind["no_answer"] == unanswered
    assert by_kind["rcode"] == rcode_failures
    assert not [r for r in rows if r["kind"] == "dropped"]  # no DNS packet was dropped in these captures


# -- the other questions ------------------------------------------------------------------------------------------


def test_world_egress_and_cross_namespace_match_the_raw_requests(
    engine: DuckDBEngine, flows: list[Flow]
) -> None:
    # Request packets counted once (the edge definition), named from the request's records.
    requests = list(requests_once(flows).values())

    def first(values: Iterator[str | None]) -> str | None:
        return min((v for v in values if v), default=None)

    to_world: Counter[tuple[str | None, str | None]] = Counter()
    crossing: Counter[tuple[str | None, str | None]] = Counter()
    for request in requests:
        records: list[Flow] = request["flows"]
        source_ns = first(f.src.namespace for f in records)
        destination_ns = first(f.dst.namespace for f in records)
        if destination_ns is None and records[0].dst.entity == "world":
            for name in records[0].destination_names or [records[0].dst.ip]:
                to_world[(records[0].src.id, name)] += request["packets"]
        if source_ns and destination_ns and source_ns != destination_ns:
            crossing[(source_ns, destination_ns)] += request["packets"]
    found = Counter()
    for row in query(engine, "world_egress"):
        name = (
            f"{row['source_namespace']}/{row['source_workload']}"
            if row["source_namespace"]
            else row["source_workload"]
        )
        found[(name, row["destination"])] += row["flows"]
    assert found == to_world  # these captures hold no request to the world that opens a connection

    found = Counter()
    for row in query(engine, "cross_namespace"):
        found[(row["source_namespace"], row["destination_namespace"])] += row["flows"]
    assert found == crossing


def test_policy_verdicts_and_http_errors_match(engine: DuckDBEngine, flows: list[Flow]) -> None:
    verdicts = Counter((f.verdict, f.direction) for f in flows if f.event_type == 5)
    assert verdicts
    found = Counter()
    for row in query(engine, "policy_verdicts"):
        assert row["policy"] is None  # these agents predate policy attribution
        found[(row["verdict"], row["direction"])] += row["flows"]
    assert found == verdicts
    errors = sum(1 for f in flows if f.http and f.l7_type == "RESPONSE" and (f.http.get("code") or 0) >= 400)
    assert sum(r["errors"] for r in query(engine, "http_errors")) == errors
    responses = [f for f in flows if f.http and f.l7_type == "RESPONSE"]
    assert responses and sum(r["errors"] for r in query(engine, "http_errors", min_code="100")) == len(
        responses
    )


def test_allow_sets_and_new_connections_match(engine: DuckDBEngine, flows: list[Flow]) -> None:
    observed: Counter[tuple[str, str]] = Counter()
    for f in flows:
        if not f.is_request or f.verdict not in ("FORWARDED", "REDIRECTED", "AUDIT"):
            continue
        if f.direction == "INGRESS" and f.dst.namespace:
            observed[(f.dst.id, "observed_ingress")] += 1  # type: ignore[index]
        elif f.direction == "EGRESS" and f.src.namespace:
            observed[(f.src.id, "observed_egress")] += 1  # type: ignore[index]
    # Selection: requests a policy would decide (not the node's own probes), and whether any got a verdict.
    requests: Counter[tuple[str, str]] = Counter()
    verdicts: Counter[tuple[str, str]] = Counter()
    for f in flows:
        if not f.is_request:
            continue
        if (
            f.direction == "INGRESS"
            and f.dst.namespace
            and f.src.entity not in ("host", "remote-node", "health")
        ):
            subject = (f.dst.id, "ingress")
        elif f.direction == "EGRESS" and f.src.namespace:
            subject = (f.src.id, "egress")
        else:
            continue
        requests[subject] += 1  # type: ignore[index]
        verdicts[subject] += f.event_type == 5  # type: ignore[index]
    selected = {workload for (workload, _), n in verdicts.items() if n}
    unselected = {(w, "no_policy") for w, _ in requests if w not in selected}
    partly = {(w, f"no_{d}_policy") for (w, d) in requests if w in selected and not verdicts[(w, d)]}
    found = Counter()
    gaps = set()
    for row in query(engine, "least_privilege"):
        name = f"{row['namespace']}/{row['workload']}"
        if row["finding"].startswith("observed_"):
            found[(name, row["finding"])] += row["flows"]
        elif row["finding"].startswith("no_"):
            gaps.add((name, row["finding"]))
    assert found == observed and observed
    assert gaps == unselected | partly and partly

    # The edge definition's requests: without is_reply, a TCP record counts only when it opens the connection.
    edges = {
        (f.src.namespace, f.src.workload, f.dst.namespace, f.dst.workload, f.destination_port, f.protocol)
        for f in flows
        if is_counted_request(f)
    }
    rows = query(engine, "new_connections", baseline_since="1970-01-01")
    assert {
        (
            r["source_namespace"],
            r["source_workload"],
            r["destination_namespace"],
            r["destination_workload"],
            r["destination_port"],
            r["l4_protocol"],
        )
        for r in rows
    } == edges
    assert query(engine, "lost_events") == []


def test_top_talkers_count_each_request_packet_once(engine: DuckDBEngine, flows: list[Flow]) -> None:
    requests = requests_once(flows)
    rows = query(engine, "top_talkers")
    assert sum(r["flows"] for r in rows) == sum(r["packets"] for r in requests.values()) > 0
    assert sum(r["dropped"] for r in rows) == sum(r["dropped"] for r in requests.values())
    # Fewer than the raw request records: the captures report packets at several points and at both ends.
    assert sum(r["flows"] for r in rows) < sum(len(r["flows"]) for r in requests.values())


def test_a_pod_seen_by_labels_only_is_one_talker(engine: DuckDBEngine, flows: list[Flow]) -> None:
    # kind-starwars: 19 of tiefighter's records at deathstar's node carry only its identity and labels.
    partial = [
        f for f in flows if f.raw.get("source", {}).get("identity") and not f.raw["source"].get("namespace")
    ]
    assert any(f.src.namespace == "default" and f.src.workload == "tiefighter" for f in partial)
    rows = [
        r
        for r in query(engine, "top_talkers")
        if r["source_workload"] == "tiefighter" and r["destination_workload"] == "deathstar"
    ]
    assert [(r["source_namespace"], r["destination_namespace"]) for r in rows] == [("default", "default")]

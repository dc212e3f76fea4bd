"""`dns_failures` counts lookups, not answers: search-path expansions on a hand-written capture of the GKE pattern,
and on the real captures (which hold no failed lookup). The gauges `flowpipe_dns_lookups` and
`flowpipe_dns_failed_lookups` say the same as the question, there, on the real captures and on the simulator."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support.metrics import follower_for
from support.sim_dataset import ALL_TIME, SimDataset, ask

from flowpipe.app.ingest import ingest_files
from flowpipe.config import ParquetSinkConfig
from flowpipe.metrics.families import NO_CLUSTER, NO_NAMESPACE, PipelineMetrics
from flowpipe.metrics.questions import DNS_FAILED_KINDS, DnsFailuresRefresher, dns_failures_runner
from flowpipe.query import DuckDBEngine

Row = dict[str, Any]
START = datetime(2021, 6, 16, 16, 52, 13, tzinfo=UTC)
NODE_DOMAINS = ("c.my-project.internal", "google.internal")
KUBE_DNS = ("kube-system", "kube-dns-6c7b8dc9f9-gnxh2", "10.0.2.12", "kube-dns")
PODS = {
    "telemetry": ("istio-system", "istio-telemetry-85cf8ddf5f-kw64q", "10.0.0.53", "telemetry"),
    "fluentbit": ("kube-system", "fluentbit-gke-4xq7z", "10.0.2.20", "fluentbit-gke"),
    "billing": ("default", "billing-6d5f8b7c9d-x2k4p", "10.0.1.17", "billing"),
}


class Capture:
    """jsonpb lines of L7 DNS requests and responses between pods and kube-dns, written as GKE's Hubble does."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.time = START
        self.port = 40000

    def query(self, client: str, name: str, rcode: int, ips: tuple[str, ...] = ()) -> None:
        """One request and its answer (`rcode`, `ips`), 0.4 ms apart, from a new client port."""
        pod = PODS[client]
        self.port += 1
        answer: Row = {"rcode": rcode} if rcode else {}
        if ips:
            answer["ips"] = list(ips)
        self._record("REQUEST", pod, KUBE_DNS, self.port, 53, {"query": name, "qtypes": ["A"]})
        self.time += timedelta(microseconds=400)
        self._record("RESPONSE", KUBE_DNS, pod, 53, self.port, {"query": name, "qtypes": ["A"], **answer})
        self.time += timedelta(microseconds=600)

    def lookup(self, client: str, stem: str, final: str) -> None:
        """A resolver's lookup of `stem` (ndots:5): its search path until a name exists. `final`: `service` (the
        name resolves as `<stem>.svc.cluster.local.`), `resolves` / `nxdomain` (the name itself answers so),
        `unseen` (the name itself is asked of a server this capture does not show)."""
        namespace = PODS[client][0]
        suffixes = (f"{namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local", *NODE_DOMAINS)
        for suffix in suffixes:
            if final == "service" and suffix == "svc.cluster.local":
                self.query(client, f"{stem}.{suffix}.", 0, ("10.4.0.9",))
                return
            self.query(client, f"{stem}.{suffix}.", 3)
        if final in ("resolves", "nxdomain"):
            self.query(
                client,
                stem + ".",
                0 if final == "resolves" else 3,
                ("142.250.1.95",) if final == "resolves" else (),
            )

    def pause(self, seconds: float) -> None:
        self.time += timedelta(seconds=seconds)

    def _record(
        self, kind: str, src: tuple[str, ...], dst: tuple[str, ...], sport: int, dport: int, dns: Row
    ) -> None:
        stamp = self.time.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
        flow = {
            "time": stamp,
            "verdict": "FORWARDED",
            "IP": {"source": src[2], "destination": dst[2], "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": sport, "destination_port": dport}},
            "source": _endpoint(src),
            "destination": _endpoint(dst),
            "Type": "L7",
            "node_name": "gke-demo-default-pool-1",
            "traffic_direction": "EGRESS",
            "is_reply": kind == "RESPONSE",
            "l7": {"type": kind, "dns": dns},
            "Summary": f"DNS {kind} {dns['query']}",
        }
        self.lines.append(json.dumps({"flow": flow, "node_name": flow["node_name"], "time": stamp}))


def _endpoint(pod: tuple[str, ...]) -> Row:
    namespace, name, _, app = pod
    labels = [f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={namespace}"]
    return {"identity": 30000 + len(app), "namespace": namespace, "labels": labels, "pod_name": name}


@pytest.fixture(scope="module")
def gke_pattern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rounds of: `zipkin.istio-system` resolving at its second name, `logging.googleapis.com` and
    `monitoring.googleapis.com` whose names in the cluster and node domains fail and whose own name is never seen,
    a typo'd `postgress` failing at every name, and `storage.googleapis.com` resolving after its search path."""
    capture = Capture()
    for _ in range(2):
        capture.lookup("telemetry", "zipkin.istio-system", "service")
        capture.pause(2)
        capture.lookup("fluentbit", "logging.googleapis.com", "unseen")
        capture.pause(1)
        capture.lookup("fluentbit", "monitoring.googleapis.com", "unseen")
        capture.pause(1)
        capture.lookup("billing", "postgress", "nxdomain")
        capture.pause(1)
        capture.lookup("billing", "storage.googleapis.com", "resolves")
        capture.pause(1)
    root = tmp_path_factory.mktemp("gke-dns")
    source = root / "flows.json"
    source.write_text("\n".join(capture.lines) + "\n", encoding="utf-8")
    ingest_files([source], ParquetSinkConfig(path=str(root / "ds"), writer_id="test"))
    return root / "ds"


def _failures(dataset: Path, **values: object) -> list[Row]:
    with DuckDBEngine(dataset) as engine:
        return ask(engine, "dns_failures", **values)


def test_expansions_of_a_name_that_resolved_are_no_failure(gke_pattern: Path) -> None:
    rows = _failures(gke_pattern)
    assert not [r for r in rows if r["source_workload"] == "telemetry"]
    assert not [r for r in rows if r["query"] and "zipkin" in r["query"]]
    assert not [r for r in rows if r["query"] and "storage.googleapis.com" in r["query"]]


def test_a_typo_fails_once_by_the_name_asked(gke_pattern: Path) -> None:
    rows = [r for r in _failures(gke_pattern) if r["kind"] == "rcode"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["source_namespace"], row["source_workload"], row["query"], row["rcode_name"]) == (
        "default",
        "billing",
        "postgress",
        "NXDOMAIN",
    )
    # Two lookups, each of six names: the node's search domains are recognised as part of the search path.
    assert row["failures"] == 2
    assert row["names"] == sorted(
        ["postgress.default.svc.cluster.local.", "postgress.svc.cluster.local.", "postgress.cluster.local."]
        + [f"postgress.{d}." for d in NODE_DOMAINS]
        + ["postgress."]
    )
    # billing made four lookups: two of postgress, two of storage.googleapis.com
    assert row["lookups"] == 4 and row["failure_share"] == 0.5


def test_a_lookup_whose_own_name_was_never_seen_is_its_own_kind(gke_pattern: Path) -> None:
    rows = [r for r in _failures(gke_pattern) if r["kind"] == "unresolved_final_not_seen"]
    assert {r["query"] for r in rows} == {"logging.googleapis.com", "monitoring.googleapis.com"}
    for row in rows:
        assert (row["source_namespace"], row["source_workload"]) == ("kube-system", "fluentbit-gke")
        assert (row["failures"], row["lookups"], row["rcode_name"]) == (2, 4, "NXDOMAIN")
        assert len(row["names"]) == 5 and f"{row['query']}.svc.cluster.local." in row["names"]
        assert "may have resolved" in row["note"]
    assert {r["kind"] for r in _failures(gke_pattern)} == {"rcode", "unresolved_final_not_seen"}


def test_search_expansions_on_demand(gke_pattern: Path) -> None:
    rows = _failures(gke_pattern, include_search_expansions="true")
    assert {r["kind"] for r in rows} == {"rcode"}
    # every NXDOMAIN answer, one row per name: 1 of zipkin, 5 + 5 unseen, 6 of postgress, 5 of storage
    assert sum(r["failures"] for r in rows) == 2 * (1 + 5 + 5 + 6 + 5)
    assert ("zipkin.istio-system.istio-system.svc.cluster.local.", 2) in {
        (r["query"], r["failures"]) for r in rows
    }


def test_namespace_filter_matches_the_client(gke_pattern: Path) -> None:
    rows = _failures(gke_pattern, namespace="default")
    assert [(r["kind"], r["query"]) for r in rows] == [("rcode", "postgress")]


@pytest.mark.parametrize("capture", ["kind-bookinfo", "gke-sample"])
def test_real_captures_have_no_failed_lookup(hubble_captures: Path, tmp_path: Path, capture: str) -> None:
    files = sorted((hubble_captures / capture).glob("*.json"))
    ingest_files(files, ParquetSinkConfig(path=str(tmp_path / "ds"), writer_id="test"))
    rows = _failures(tmp_path / "ds", limit="100000")
    assert not [r for r in rows if r["kind"] in ("rcode", "unresolved_final_not_seen")]
    if capture == "kind-bookinfo":
        # 148 DNS records: 37 A and 37 AAAA lookups, each answered NOERROR at its first name
        raw = _failures(tmp_path / "ds", include_search_expansions="true", limit="100000")
        assert not [r for r in raw if r["kind"] == "rcode"]


# -- the gauges, as collect and serve-metrics set them --------------------------------------------------------------

Gauges = tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]


def _gauges(dataset: Path) -> Gauges:
    """(cluster, namespace) → `flowpipe_dns_lookups` and (cluster, namespace, reason) → `flowpipe_dns_failed_lookups`
    (those above 0), as the refresher sets them from the question over all of `dataset`."""
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset")
    assert DnsFailuresRefresher(metrics, dns_failures_runner(str(dataset), ALL_TIME)).refresh()
    samples = [sample for family in registry.collect() for sample in family.samples]
    lookups = {
        (s.labels["cluster"], s.labels["namespace"]): s.value
        for s in samples
        if s.name == "flowpipe_dns_lookups"
    }
    failed = {
        (s.labels["cluster"], s.labels["namespace"], s.labels["reason"]): s.value
        for s in samples
        if s.name == "flowpipe_dns_failed_lookups" and s.value
    }
    return lookups, failed


def _the_question_says(dataset: Path) -> Gauges:
    """The same, added up by hand from `flowpipe query dns_failures`: its failures by client namespace and reason
    (the rcode for kind `rcode`), and the lookups of every client workload (`show_lookups=true`, which adds those
    rows and changes no other)."""
    rows = _failures(dataset, limit="100000")
    every = _failures(dataset, limit="100000", show_lookups="true")
    assert [r for r in every if r["kind"] != "lookups"] == rows
    lookups: dict[tuple[str, ...], float] = defaultdict(float)
    by_workload = {}
    for row in every:
        if row["kind"] == "lookups":
            where = (row["cluster_name"] or NO_CLUSTER, row["source_namespace"] or NO_NAMESPACE)
            lookups[where] += row["lookups"]
            by_workload[(*where, row["source_workload"])] = row["lookups"]
    failed: dict[tuple[str, ...], float] = defaultdict(float)
    for row in rows:
        if row["kind"] not in DNS_FAILED_KINDS:
            continue
        where = (row["cluster_name"] or NO_CLUSTER, row["source_namespace"] or NO_NAMESPACE)
        failed[(*where, row["rcode_name"] if row["kind"] == "rcode" else row["kind"])] += row["failures"]
        # the lookups its failure_share is a share of are the workload's lookups
        assert row["lookups"] == by_workload[(*where, row["source_workload"])], row
    return dict(lookups), dict(failed)


def _streamed(dataset: Path) -> dict[tuple[str, str], float]:
    """(namespace, reason) → `flowpipe_observed_dns_failures_total`: error answers counted flow by flow."""
    follower, registry = follower_for(dataset)
    follower.scan()
    return {
        (s.labels["namespace"], s.labels["reason"]): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "flowpipe_observed_dns_failures_total"
    }


def test_the_gauges_count_a_lookup_across_its_search_path(gke_pattern: Path) -> None:
    lookups, failed = _gauges(gke_pattern)
    assert lookups == {
        (NO_CLUSTER, "istio-system"): 2,
        (NO_CLUSTER, "kube-system"): 4,
        (NO_CLUSTER, "default"): 4,
    }
    # zipkin resolved at its second name and storage.googleapis.com at the name itself: their NXDOMAIN answers
    # are no failure; the typo'd postgress failed twice, the names never seen resolved are their own reason
    assert failed == {
        (NO_CLUSTER, "default", "NXDOMAIN"): 2,
        (NO_CLUSTER, "kube-system", "unresolved_final_not_seen"): 4,
    }
    assert (lookups, failed) == _the_question_says(gke_pattern)
    # a counter fed flow by flow counts every NXDOMAIN answer of a search path as a failure
    streamed = _streamed(gke_pattern)
    assert streamed[("istio-system", "NXDOMAIN")] == 2 and streamed[("default", "NXDOMAIN")] == 2 * (6 + 5)


def test_the_gauges_say_what_the_question_says_on_the_real_captures(
    capture_files: list[Path], tmp_path: Path
) -> None:
    ingest_files(capture_files, ParquetSinkConfig(path=str(tmp_path / "ds"), writer_id="test"))
    lookups, failed = _gauges(tmp_path / "ds")
    assert (lookups, failed) == _the_question_says(tmp_path / "ds")
    assert lookups[(NO_CLUSTER, "bookinfo")] == 74 and failed == {}  # 74 lookups, none failed


def test_the_gauges_say_what_the_question_says_on_the_simulator(sim_faults: SimDataset) -> None:
    lookups, failed = _gauges(sim_faults.root)
    assert (lookups, failed) == _the_question_says(sim_faults.root)
    reasons = {reason for _, _, reason in failed}
    assert {"NXDOMAIN", "SERVFAIL", "REFUSED", "no_answer", "dropped", "unresolved_final_not_seen"} <= reasons
    # the simulated resolvers search too: far more NXDOMAIN answers stream by than lookups fail with NXDOMAIN
    streamed = sum(n for (_, reason), n in _streamed(sim_faults.root).items() if reason == "NXDOMAIN")
    assert streamed > sum(n for (_, _, reason), n in failed.items() if reason == "NXDOMAIN")

"""PrometheusSink: each analytics family counts the right flows, for the right namespace, with bounded labels."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry
from support.flowdata import flow, flows_table

from flowpipe.errors import QueryError
from flowpipe.metrics.families import (
    MAX_CLUSTER_LABELS,
    MAX_ENUM_LABELS,
    NO_CLUSTER,
    NO_DIRECTION,
    NO_NAMESPACE,
    PipelineMetrics,
)
from flowpipe.metrics.questions import (
    DnsFailuresRefresher,
    QuestionRefreshers,
    UnexpectedDropsRefresher,
    dns_lookup_counts,
    unexpected_drop_counts,
)
from flowpipe.model import EventBatch
from flowpipe.sinks import Ack, Sink
from flowpipe.sinks.prometheus import DNS_RCODE_NAMES, NamespaceCap, PrometheusSink, _Groups


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sink(registry: CollectorRegistry) -> PrometheusSink:
    return PrometheusSink(PipelineMetrics.create(registry, role="dataset"), max_namespaces=10)


def drop(**values: Any) -> dict[str, Any]:
    return flow(verdict="DROPPED", event_type=1, **values)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with these labels, whatever their other labels (e.g. `cluster`)."""
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_every_family_is_per_cluster(sink: PrometheusSink, registry: CollectorRegistry) -> None:
    denied = {
        "traffic_direction": "INGRESS",
        "destination_namespace": "shop",
        "drop_reason_desc": "POLICY_DENIED",
    }
    sink.write(
        flows_table(
            [drop(cluster_name="eu", **denied)] * 2 + [drop(cluster_name="us", **denied)] + [drop(**denied)]
        )
    )
    name = "flowpipe_observed_drops_total"
    assert value(registry, name, cluster="eu", namespace="shop") == 2
    assert value(registry, name, cluster="us", namespace="shop") == 1
    assert value(registry, name, cluster=NO_CLUSTER, namespace="shop") == 1


def test_is_a_sink_and_acknowledges_every_batch_at_once(sink: PrometheusSink) -> None:
    assert isinstance(sink, Sink)
    assert sink.write(EventBatch(flows=flows_table([]))) == Ack(batches=1)
    assert sink.write(flows_table([drop(source_namespace="a")])) == Ack(batches=2)
    assert sink.poll() is None and sink.flush() is None and sink.close() is None


def test_drops_count_for_the_enforcing_endpoint(sink: PrometheusSink, registry: CollectorRegistry) -> None:
    rows = [
        # ingress request: the destination enforces
        drop(
            traffic_direction="INGRESS",
            is_reply=False,
            source_namespace="a",
            destination_namespace="b",
            drop_reason=133,
            drop_reason_desc="POLICY_DENIED",
        ),
        # egress request: the source enforces
        drop(
            traffic_direction="EGRESS",
            is_reply=False,
            source_namespace="a",
            destination_namespace="b",
            drop_reason=181,
            drop_reason_desc="POLICY_DENY",
        ),
        # a reply on an egress connection travels back to the client, which is the destination
        drop(
            traffic_direction="EGRESS",
            is_reply=True,
            source_namespace="b",
            destination_namespace="a",
            drop_reason=136,
            drop_reason_desc="CT_MISSING_TCP_ACK_FLAG",
        ),
        # no direction: the source of a request; the reason only as a number (old data)
        drop(source_namespace="c", destination_namespace="b", drop_reason=151),
        # a reason from a newer Cilium, and no namespace at all (host traffic)
        drop(traffic_direction="INGRESS", is_reply=False, drop_reason=250, drop_reason_desc="SOMETHING_NEW"),
        flow(
            verdict="FORWARDED", traffic_direction="INGRESS", source_namespace="a", destination_namespace="b"
        ),
    ]
    sink.write(flows_table(rows))
    name = "flowpipe_observed_drops_total"
    assert value(registry, name, namespace="b", direction="INGRESS", reason_class="policy") == 1
    assert value(registry, name, namespace="a", direction="EGRESS", reason_class="policy") == 1
    assert value(registry, name, namespace="a", direction="EGRESS", reason_class="conntrack") == 1
    assert value(registry, name, namespace="c", direction=NO_DIRECTION, reason_class="routing") == 1
    assert value(registry, name, namespace=NO_NAMESPACE, direction="INGRESS", reason_class="unknown") == 1
    total = sum(
        s.value
        for m in registry.collect()
        if m.name == "flowpipe_observed_drops"
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert total == 5  # the forwarded flow is not a drop


def test_dns_responses_failures_and_dropped_requests(
    sink: PrometheusSink, registry: CollectorRegistry
) -> None:
    def answer(rcode: int, client: str = "shop") -> dict[str, Any]:
        return flow(
            verdict="FORWARDED",
            l7_protocol="dns",
            l7_type="RESPONSE",
            is_reply=True,
            dns_rcode=rcode,
            traffic_direction="EGRESS",
            source_namespace="kube-system",
            destination_namespace=client,
        )

    rows = [
        answer(0),
        answer(0),
        answer(3),
        answer(3),
        answer(2, "billing"),
        answer(5),
        answer(42),
        # the request of a lookup is not a response
        flow(
            verdict="FORWARDED",
            l7_protocol="dns",
            l7_type="REQUEST",
            is_reply=False,
            dns_rcode=0,
            source_namespace="shop",
            destination_namespace="kube-system",
            traffic_direction="EGRESS",
        ),
        # DNS blocked by a default-deny: an L3/L4 packet to port 53, and an L7 request the proxy denied
        drop(
            l4_protocol="UDP",
            destination_port=53,
            is_reply=False,
            traffic_direction="EGRESS",
            source_namespace="billing",
            destination_namespace="kube-system",
            drop_reason_desc="POLICY_DENIED",
        ),
        drop(
            l7_protocol="dns",
            l7_type="REQUEST",
            is_reply=False,
            traffic_direction="EGRESS",
            source_namespace="shop",
            destination_namespace="kube-system",
            drop_reason_desc="POLICY_DENIED",
        ),
        # not a DNS request: a dropped reply from port 53, and TCP to another port
        drop(
            l4_protocol="UDP",
            source_port=53,
            destination_port=40000,
            is_reply=True,
            traffic_direction="EGRESS",
            source_namespace="kube-system",
            destination_namespace="shop",
        ),
        drop(l4_protocol="TCP", destination_port=5353, source_namespace="shop"),
    ]
    sink.write(flows_table(rows))
    responses, failures = "flowpipe_observed_dns_responses_total", "flowpipe_observed_dns_failures_total"
    assert value(registry, responses, namespace="shop", rcode="NOERROR") == 2
    assert value(registry, responses, namespace="shop", rcode="NXDOMAIN") == 2
    assert value(registry, responses, namespace="billing", rcode="SERVFAIL") == 1
    assert value(registry, responses, namespace="shop", rcode="other") == 1
    assert value(registry, failures, namespace="shop", reason="NXDOMAIN") == 2
    assert value(registry, failures, namespace="shop", reason="REFUSED") == 1
    assert value(registry, failures, namespace="shop", reason="NOERROR") == 0
    assert value(registry, failures, namespace="billing", reason="dropped") == 1
    assert value(registry, failures, namespace="shop", reason="dropped") == 1
    # lookups as dns_failures counts them: the requests the proxy saw (the denied one included, once) and the
    # DNS request dropped below the proxy
    lookups = "flowpipe_observed_dns_lookups_total"
    assert value(registry, lookups, namespace="shop") == 2
    assert value(registry, lookups, namespace="billing") == 1


def test_a_drop_and_its_policy_verdict_event_count_as_one_drop(
    sink: PrometheusSink, registry: CollectorRegistry
) -> None:
    denied = {
        "traffic_direction": "INGRESS",
        "destination_namespace": "shop",
        "drop_reason_desc": "POLICY_DENIED",
    }
    dns = {"l4_protocol": "UDP", "destination_port": 53, "is_reply": False, "source_namespace": "billing"}
    dns |= {"traffic_direction": "EGRESS", "drop_reason_desc": "POLICY_DENIED"}
    sink.write(
        flows_table(
            [
                drop(**denied),
                flow(verdict="DROPPED", event_type=5, **denied),
                drop(**dns),
                flow(verdict="DROPPED", event_type=5, **dns),
            ]
        )
    )
    drops = "flowpipe_observed_drops_total"
    assert value(registry, drops, namespace="shop", direction="INGRESS", reason_class="policy") == 1
    assert value(registry, "flowpipe_observed_dns_failures_total", namespace="billing", reason="dropped") == 1
    assert value(registry, "flowpipe_observed_dns_lookups_total", namespace="billing") == 1
    verdicts = "flowpipe_observed_policy_verdicts_total"
    assert value(registry, verdicts, namespace="shop", direction="INGRESS", verdict="DROPPED") == 1


def test_rcode_names_cover_the_common_failures() -> None:
    assert {DNS_RCODE_NAMES[c] for c in (0, 2, 3, 5)} == {"NOERROR", "SERVFAIL", "NXDOMAIN", "REFUSED"}


def test_policy_verdicts_count_only_policy_verdict_events(
    sink: PrometheusSink, registry: CollectorRegistry
) -> None:
    rows = [
        flow(
            event_type=5,
            verdict="DROPPED",
            traffic_direction="INGRESS",
            is_reply=False,
            source_namespace="other",
            destination_namespace="shop",
        ),
        flow(
            event_type=5,
            verdict="FORWARDED",
            traffic_direction="EGRESS",
            is_reply=False,
            source_namespace="shop",
            destination_namespace="billing",
        ),
        flow(
            event_type=5, verdict="AUDIT", traffic_direction="EGRESS", is_reply=False, source_namespace="shop"
        ),
        flow(
            event_type=4, verdict="FORWARDED", traffic_direction="EGRESS", source_namespace="shop"
        ),  # a trace
    ]
    sink.write(flows_table(rows))
    name = "flowpipe_observed_policy_verdicts_total"
    assert value(registry, name, namespace="shop", direction="INGRESS", verdict="DROPPED") == 1
    assert value(registry, name, namespace="shop", direction="EGRESS", verdict="FORWARDED") == 1
    assert value(registry, name, namespace="shop", direction="EGRESS", verdict="AUDIT") == 1
    assert (
        sum(
            s.value
            for m in registry.collect()
            if m.name == "flowpipe_observed_policy_verdicts"
            for s in m.samples
            if s.name.endswith("_total")
        )
        == 3
    )


def test_world_requests_by_identity_or_label(sink: PrometheusSink, registry: CollectorRegistry) -> None:
    rows = [
        flow(
            event_type=4, verdict="FORWARDED", source_namespace="shop", destination_identity=2, is_reply=False
        ),
        flow(
            event_type=4,
            verdict="FORWARDED",
            source_namespace="shop",
            destination_identity=16777220,
            destination_labels=["cidr:203.0.113.0/24", "reserved:world-ipv4"],
            is_reply=False,
        ),
        flow(
            event_type=1,
            verdict="DROPPED",
            source_namespace="billing",
            destination_identity=9,
            is_reply=False,
        ),
        # not counted: the reply, the policy verdict event of the same packet, an in-cluster destination
        flow(
            event_type=4, verdict="FORWARDED", source_namespace="shop", destination_identity=2, is_reply=True
        ),
        flow(
            event_type=5, verdict="FORWARDED", source_namespace="shop", destination_identity=2, is_reply=False
        ),
        flow(
            event_type=4,
            verdict="FORWARDED",
            source_namespace="shop",
            destination_identity=30001,
            destination_labels=["k8s:app=api"],
            is_reply=False,
        ),
    ]
    sink.write(flows_table(rows))
    name = "flowpipe_observed_world_flows_total"
    assert value(registry, name, namespace="shop", verdict="FORWARDED") == 2
    assert value(registry, name, namespace="billing", verdict="DROPPED") == 1


def test_namespace_cap_keeps_the_largest_and_folds_the_rest(registry: CollectorRegistry) -> None:
    sink = PrometheusSink(PipelineMetrics.create(registry, role="dataset"), max_namespaces=2)
    rows = (
        [drop(source_namespace="big", traffic_direction="EGRESS")] * 5
        + [drop(source_namespace="mid", traffic_direction="EGRESS")] * 3
        + [drop(source_namespace="small", traffic_direction="EGRESS")] * 1
        + [drop(traffic_direction="EGRESS")] * 2
    )
    sink.write(flows_table(rows))
    assert sink.namespaces.admitted == {"big", "mid"}
    sink.write(
        flows_table(
            [drop(source_namespace="huge", traffic_direction="EGRESS")] * 50
            + [drop(source_namespace="mid", traffic_direction="EGRESS")]
        )
    )
    name = "flowpipe_observed_drops_total"
    labels = {"direction": "EGRESS", "reason_class": "unknown"}
    assert value(registry, name, namespace="big", **labels) == 5
    assert value(registry, name, namespace="mid", **labels) == 4
    assert value(registry, name, namespace="other", **labels) == 51  # small, then huge: the set never changes
    assert value(registry, name, namespace=NO_NAMESPACE, **labels) == 2  # "no namespace" is not a namespace


def test_namespace_cap_ranks_ties_by_name() -> None:
    cap = NamespaceCap(1)
    (folded,) = cap.apply(pa.array(["b", "a", "", "b", "a"]))
    assert folded.to_pylist() == ["other", "a", "", "other", "a"]


def test_label_sets_stay_bounded_however_many_namespaces(registry: CollectorRegistry) -> None:
    sink = PrometheusSink(PipelineMetrics.create(registry, role="dataset"), max_namespaces=5)
    for batch in range(4):
        sink.write(
            flows_table(
                [
                    drop(
                        source_namespace=f"ns-{batch}-{i}",
                        traffic_direction="EGRESS",
                        drop_reason_desc="POLICY_DENIED",
                    )
                    for i in range(200)
                ]
            )
        )
    namespaces = {
        s.labels["namespace"]
        for m in registry.collect()
        if m.name == "flowpipe_observed_drops"
        for s in m.samples
    }
    assert len(namespaces) == 6 and "other" in namespaces


def series_values(registry: CollectorRegistry, label: str) -> set[str]:
    """Every value of `label` among the exported samples."""
    return {s.labels[label] for m in registry.collect() for s in m.samples if label in s.labels}


def test_every_label_taken_from_the_flows_is_capped(registry: CollectorRegistry) -> None:
    # 3,000 made-up verdicts, directions, clusters and lost-event sources: a bounded number of series each,
    # the known names and the first newcomers keep theirs.
    metrics = PipelineMetrics.create(registry, role="collect")
    sink = PrometheusSink(metrics, max_namespaces=5)
    rows = [
        flow(
            verdict=f"VERDICT_{i}",
            traffic_direction=f"DIRECTION_{i}",
            cluster_name=f"cluster-{i}",
            event_type=5,  # a policy verdict event: counted with its verdict and direction
            source_namespace="shop",
        )
        for i in range(3000)
    ]
    rows.insert(0, drop(traffic_direction="EGRESS", source_namespace="shop", cluster_name="eu"))
    table = flows_table(rows)
    sink.write(table)
    metrics.observe_flows(table)
    for i in range(3000):
        metrics.add_lost_events(f"SOURCE_{i}", "node-1", 1)
    metrics.set_unexpected_drops({(f"cluster-x{i}", "regression"): 1 for i in range(3000)})
    verdicts, directions = series_values(registry, "verdict"), series_values(registry, "direction")
    clusters, sources = series_values(registry, "cluster"), series_values(registry, "source")
    assert len(verdicts) <= MAX_ENUM_LABELS + 10 and "other" in verdicts and "DROPPED" in verdicts
    assert len(directions) <= MAX_ENUM_LABELS + 5 and "other" in directions and "EGRESS" in directions
    assert len(clusters) <= MAX_CLUSTER_LABELS + 2 and "other" in clusters and "eu" in clusters
    assert len(sources) <= MAX_ENUM_LABELS + 10 and "other" in sources
    # nothing is lost: the folded values are counted as `other`
    received = sum(
        s.value for m in registry.collect() for s in m.samples if s.name == "flowpipe_flows_received_total"
    )
    assert received == len(rows)


def test_older_part_files_without_some_columns(sink: PrometheusSink, registry: CollectorRegistry) -> None:
    table = pa.table({"verdict": ["DROPPED"], "source_namespace": ["a"], "traffic_direction": ["EGRESS"]})
    sink.write(table)
    assert (
        value(
            registry,
            "flowpipe_observed_drops_total",
            namespace="a",
            direction="EGRESS",
            reason_class="unknown",
        )
        == 1
    )


def test_chunked_batches_give_the_same_counts(registry: CollectorRegistry) -> None:
    rows = [
        drop(
            source_namespace="a",
            traffic_direction="EGRESS",
            destination_identity=2,
            is_reply=False,
            destination_labels=["reserved:world"],
        )
    ] * 3
    table = pa.concat_tables([flows_table(rows[:1]), flows_table(rows[1:])])
    assert table.column("verdict").num_chunks == 2
    PrometheusSink(PipelineMetrics.create(registry, role="dataset")).write(table)
    assert value(registry, "flowpipe_observed_world_flows_total", namespace="a", verdict="DROPPED") == 3


# -- the unexpected_drops gauge ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refresher_with(
    runner: Callable[[], pa.Table | None], registry: CollectorRegistry, clock: Clock
) -> UnexpectedDropsRefresher:
    metrics = PipelineMetrics.create(registry, role="dataset")
    return UnexpectedDropsRefresher(metrics, runner, interval_seconds=60, clock=clock)


def test_unexpected_drops_gauge_from_question_results(registry: CollectorRegistry) -> None:
    results = [
        pa.table(
            {
                "why": ["regression", "dns_blocked", "regression", "expected"],
                "flows": [3, 1, 2, 9],
                "cluster_name": ["kind"] * 4,
            }
        )
    ]
    clock = Clock()
    refresher = refresher_with(lambda: results[-1], registry, clock)
    assert refresher.poll() is True and refresher.available
    assert value(registry, "flowpipe_unexpected_drops", cluster="kind", why="regression") == 5
    assert value(registry, "flowpipe_unexpected_drops", cluster="kind", why="dns_blocked") == 1
    assert value(registry, "flowpipe_unexpected_drops", cluster="kind", why="non_policy") == 0
    assert value(registry, "flowpipe_expected_drops", cluster="kind") == 9
    results.append(pa.table({"why": pa.array([], pa.string()), "flows": pa.array([], pa.int64())}))
    clock.now += 30
    assert refresher.poll() is False  # not due yet
    clock.now += 30
    assert refresher.poll() is True
    assert (
        registry.get_sample_value("flowpipe_unexpected_drops", {"cluster": "kind", "why": "regression"})
        is None
    )
    assert value(registry, "flowpipe_unexpected_drops", cluster=NO_CLUSTER, why="regression") == 0
    assert value(registry, "flowpipe_question_runs_total", question="unexpected_drops", outcome="ok") == 2


def test_without_the_question_the_gauge_is_not_exported(registry: CollectorRegistry) -> None:
    refresher = refresher_with(lambda: None, registry, Clock())
    assert refresher.refresh() is False
    assert refresher.available is False
    assert not [
        s
        for m in registry.collect()
        if m.name in ("flowpipe_unexpected_drops", "flowpipe_question_runs")
        for s in m.samples
    ]


def test_a_failed_run_keeps_the_last_values_and_is_counted(registry: CollectorRegistry) -> None:
    calls = []

    def runner() -> pa.Table:
        calls.append(1)
        if len(calls) > 1:
            raise QueryError("duckdb said no", question="unexpected_drops")
        return pa.table({"why": ["infrastructure"], "flows": [7]})

    refresher = refresher_with(runner, registry, Clock())
    refresher.refresh()
    assert refresher.refresh() is False
    assert value(registry, "flowpipe_unexpected_drops", cluster=NO_CLUSTER, why="infrastructure") == 7
    assert value(registry, "flowpipe_question_runs_total", question="unexpected_drops", outcome="failed") == 1
    assert value(registry, "flowpipe_errors_total", stage="processing", error_type="query_failed") == 1


# -- the dns_failures gauges -------------------------------------------------------------------------------------

DNS_ANSWER = pa.table(
    {
        "kind": ["rcode", "rcode", "no_answer", "dropped", "unresolved_final_not_seen", "no_l7_visibility",
                 "lookups", "lookups", "lookups", "lookups", "lookups"],
        "source_namespace": ["shop", "shop", "shop", "billing", "kube-system", "legacy",
                             "shop", "shop", "billing", "kube-system", None],
        "rcode_name": ["NXDOMAIN", "FORMERR", None, None, "NXDOMAIN", None, None, None, None, None, None],
        "failures": [2, 1, 3, 4, 5, None, None, None, None, None, None],
        "lookups": [30, 30, 30, 4, 5, 99, 20, 10, 4, 5, 2],
        "cluster_name": ["kind"] * 11,
    }
)  # fmt: skip
"""A dns_failures answer with `show_lookups=true`: failure rows by kind, a workload seen only at L3/L4, and the
lookups of every client workload (shop has two)."""


def test_dns_lookup_counts_take_failures_by_reason_and_lookups_by_workload() -> None:
    lookups, failed = dns_lookup_counts(DNS_ANSWER)
    assert lookups == {
        ("kind", "shop"): 30,
        ("kind", "billing"): 4,
        ("kind", "kube-system"): 5,
        ("kind", NO_NAMESPACE): 2,
    }
    assert failed == {
        ("kind", "shop", "NXDOMAIN"): 2,  # an rcode row's reason is its rcode
        ("kind", "shop", "FORMERR"): 1,
        ("kind", "shop", "no_answer"): 3,  # the other kinds are their own reason
        ("kind", "billing", "dropped"): 4,
        ("kind", "kube-system", "unresolved_final_not_seen"): 5,
    }
    # the namespaces with the most lookups keep their name; (no namespace) always does
    lookups, failed = dns_lookup_counts(DNS_ANSWER, max_namespaces=1)
    assert lookups == {("kind", "shop"): 30, ("kind", "other"): 9, ("kind", NO_NAMESPACE): 2}
    assert (
        failed[("kind", "other", "dropped")] == 4
        and failed[("kind", "other", "unresolved_final_not_seen")] == 5
    )
    assert dns_lookup_counts(DNS_ANSWER.slice(0, 0)) == ({}, {})


def test_dns_gauges_from_question_results(registry: CollectorRegistry) -> None:
    metrics = PipelineMetrics.create(registry, role="dataset")
    results = [DNS_ANSWER]
    clock = Clock()
    refresher = DnsFailuresRefresher(
        metrics, lambda: results[-1], interval_seconds=60, clock=clock, cluster="kind"
    )
    assert refresher.poll() is True and refresher.available
    assert value(registry, "flowpipe_dns_lookups", cluster="kind", namespace="shop") == 30
    assert value(registry, "flowpipe_dns_failed_lookups", cluster="kind", namespace="shop") == 6
    assert (
        value(registry, "flowpipe_dns_failed_lookups", cluster="kind", namespace="billing", reason="dropped")
        == 4
    )
    assert (
        registry.get_sample_value(
            "flowpipe_dns_failed_lookups", {"cluster": "kind", "namespace": "billing", "reason": "NXDOMAIN"}
        )
        == 0
    )
    assert value(registry, "flowpipe_question_runs_total", question="dns_failures", outcome="ok") == 1
    results.append(DNS_ANSWER.slice(0, 0))
    clock.now += 60
    assert refresher.poll() is True
    # nothing found: the cluster answered for, every reason at 0, and no namespace left from the run before
    assert (
        registry.get_sample_value("flowpipe_dns_lookups", {"cluster": "kind", "namespace": NO_NAMESPACE}) == 0
    )
    assert registry.get_sample_value("flowpipe_dns_lookups", {"cluster": "kind", "namespace": "shop"}) is None


def test_question_refreshers_run_every_question_each_on_its_own(registry: CollectorRegistry) -> None:
    metrics = PipelineMetrics.create(registry, role="dataset")
    clock = Clock()

    def failing() -> pa.Table:
        raise QueryError("duckdb said no", question="unexpected_drops")

    refreshers = QuestionRefreshers(
        [
            UnexpectedDropsRefresher(metrics, failing, interval_seconds=60, clock=clock),
            DnsFailuresRefresher(metrics, lambda: DNS_ANSWER, interval_seconds=30, clock=clock),
        ]
    )
    assert refreshers.interval_seconds == 30
    assert refreshers.poll() is True  # the first failed, the second still ran
    assert value(registry, "flowpipe_question_runs_total", question="unexpected_drops", outcome="failed") == 1
    assert value(registry, "flowpipe_dns_lookups", namespace="shop") == 30
    clock.now += 30
    assert refreshers.poll() is True
    assert value(registry, "flowpipe_question_runs_total", question="dns_failures", outcome="ok") == 2
    assert value(registry, "flowpipe_question_runs_total", question="unexpected_drops", outcome="failed") == 1


def test_counts_without_a_flows_column_are_rows() -> None:
    rows = pa.table({"why": ["a", "a", None], "cluster_name": ["eu", "eu", None]})
    assert unexpected_drop_counts(rows) == {("eu", "a"): 2.0, (NO_CLUSTER, "unknown"): 1.0}
    assert unexpected_drop_counts(pa.table({"x": [1]})) == {(NO_CLUSTER, "unknown"): 1.0}


# -- real captures -------------------------------------------------------------------------------------------------


def raw_flows(path: Path) -> list[dict[str, Any]]:
    """The flows of a capture, parsed here with json alone (jsonpb lines, exporter lines or one bare object)."""
    text = path.read_text()
    try:
        whole = json.loads(text)
        records = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    flows = []
    for record in records:
        if "flow" in record:
            flows.append(record["flow"])
        elif "verdict" in record or "source" in record:
            flows.append(record)
    return flows


def test_real_captures_counted_like_their_json(capture_files: list[Path]) -> None:
    from flowpipe.sources.file import read_events

    for path in capture_files:
        registry = CollectorRegistry()
        metrics = PipelineMetrics.create(registry, role="dataset")
        sink = PrometheusSink(metrics)
        for batch in read_events([path]):
            metrics.observe_batch(batch)
            sink.write(batch)
        flows = raw_flows(path)
        by_verdict: dict[str, int] = {}
        for item in flows:
            by_verdict[item.get("verdict", "unknown")] = by_verdict.get(item.get("verdict", "unknown"), 0) + 1
        for verdict, count in by_verdict.items():
            assert value(registry, "flowpipe_flows_received_total", verdict=verdict) == count, (
                path.name,
                verdict,
            )
        drops = sum(
            s.value
            for m in registry.collect()
            if m.name == "flowpipe_observed_drops"
            for s in m.samples
            if s.name.endswith("_total")
        )
        assert drops == by_verdict.get("DROPPED", 0), path.name
        dns_answers = sum(1 for f in flows if "dns" in f.get("l7", {}) and f["l7"].get("type") == "RESPONSE")
        counted = sum(
            s.value
            for m in registry.collect()
            if m.name == "flowpipe_observed_dns_responses"
            for s in m.samples
            if s.name.endswith("_total")
        )
        assert counted == dns_answers, path.name


@pytest.mark.parametrize("combinations_counted_by_number", [True, False])
def test_groups_count_each_combination_of_labels_once_where_the_mask_is_true(
    combinations_counted_by_number: bool,
) -> None:
    """The counts behind every analytics family: by combination number (few combinations) or by sorting."""
    cluster = pa.array(["a", "b", None, "a", "a", "b", "a"] * 30)
    verdict = pa.array(["DROPPED", "FORWARDED", "DROPPED", None, "DROPPED", "FORWARDED", "AUDIT"] * 30)
    namespace = pa.array([f"ns{i % 11}" if i % 13 else None for i in range(210)])
    mask = pa.array([i % 4 != 0 for i in range(210)])
    groups = _Groups()
    if not combinations_counted_by_number:
        groups._BINCOUNT_LIMIT = 0
    rows = groups.count({"cluster": cluster, "verdict": verdict, "namespace": namespace}, mask)
    expected = Counter(
        (c, v, n)
        for c, v, n, m in zip(
            cluster.to_pylist(), verdict.to_pylist(), namespace.to_pylist(), mask.to_pylist(), strict=True
        )
        if m
    )
    got = {(row["cluster"], row["verdict"], row["namespace"]): row["count"] for row in rows}
    assert got == dict(expected) and len(rows) == len(expected)
    assert [list(row) for row in rows[:1]] == [["cluster", "verdict", "namespace", "count"]]
    assert groups.count({"cluster": cluster}, pa.array([False] * 210)) == []

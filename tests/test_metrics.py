"""PipelineMetrics: names and help follow Prometheus conventions, promtool finds nothing, the HTTP endpoint works."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support.env import require_binary
from support.prom import free_port, http_get

from flowpipe.errors import ConfigError, FlowDecodeError
from flowpipe.metrics.families import (
    DNS_FAILURE_REASONS,
    MAX_NODE_LABELS,
    METRICS,
    NO_CLUSTER,
    NO_NAMESPACE,
    OTHER,
    UNEXPECTED_WHYS,
    BoundedLabel,
    PipelineMetrics,
    label_token,
    metric_names,
    parse_address,
    render,
    series_names,
    serve,
)
from flowpipe.model import EventBatch, LostEvent


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exercised(role: str = "collect") -> tuple[CollectorRegistry, PipelineMetrics, FakeClock]:
    """Metrics with a sample in every family of the role."""
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role=role, clock=clock)  # type: ignore[arg-type]
    flows = pa.table(
        {"verdict": ["FORWARDED", "DROPPED", None], "time": pa.array([None] * 3, pa.timestamp("ns"))}
    )
    metrics.observe_batch(
        EventBatch(
            flows=flows,
            lost_events=[LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=5, node_name="kind/worker")],
            decode_errors=[FlowDecodeError("bad", path="x.json", line_number=3, reason="invalid_json")],
        )
    )
    metrics.record_flush(rows=3, size_bytes=1200, seconds=0.05, newest_flow_time=clock.now - 10)
    metrics.set_connected(True)
    metrics.record_reconnect()
    metrics.record_checkpoint()
    metrics.record_dropped(2, reason="filter", intentional=True)
    metrics.record_error("receiving", "relay_unavailable")
    metrics.record_part_read("flows", ok=True)
    metrics.observed_drops.labels("kind", "shop", "INGRESS", "policy").inc()
    metrics.dns_responses.labels("kind", "shop", "NXDOMAIN").inc()
    metrics.dns_failures.labels("kind", "shop", "NXDOMAIN").inc()
    metrics.dns_lookups.labels("kind", "shop").inc()
    metrics.policy_verdicts.labels("kind", "shop", "INGRESS", "DROPPED").inc()
    metrics.world_flows.labels("kind", "shop", "FORWARDED").inc()
    metrics.set_unexpected_drops({("kind", "regression"): 4, ("kind", "expected"): 2})
    metrics.record_question_run("unexpected_drops", ok=True)
    return registry, metrics, clock


def families(registry: CollectorRegistry) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(render(registry).decode())}


# -- names and conventions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", METRICS, ids=lambda s: s.name)
def test_names_follow_prometheus_conventions(spec: object) -> None:
    name = spec.name  # type: ignore[attr-defined]
    assert re.fullmatch(r"flowpipe_[a-z][a-z0-9_]*[a-z0-9]", name)
    assert spec.help.strip() and spec.help.endswith(".")  # type: ignore[attr-defined]
    kind = spec.kind  # type: ignore[attr-defined]
    assert name.endswith("_total") == (kind == "counter")
    assert not re.search(
        r"_(milli|micro|nano)?(ms|millis|milliseconds|minutes|hours|kb|mb|kilobytes)(_|$)", name
    )
    if kind == "histogram" or "lag" in name or "age" in name or "duration" in name:
        assert name.endswith("_seconds")
    for label in spec.labels:  # type: ignore[attr-defined]
        assert label not in {
            "pod",
            "pod_name",
            "ip",
            "source_ip",
            "destination_ip",
            "port",
            "destination_port",
        }


def test_names_are_unique_and_attrs_exist() -> None:
    assert len({s.name for s in METRICS}) == len(METRICS)
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry)
    for spec in METRICS:
        assert hasattr(metrics, spec.attr) or spec.attr in ("ingest_lag", "checkpoint_age")


@pytest.mark.parametrize("role", ["collect", "dataset"])
def test_every_family_of_the_role_is_exported_with_help(role: str) -> None:
    registry, _, _ = exercised(role)
    exported = families(registry)
    expected = {name.removesuffix("_total") for name in metric_names(role=role)}  # the parser strips _total
    assert set(exported) == expected
    for family in exported.values():
        assert family.documentation  # type: ignore[attr-defined]


def test_roles_split_collect_only_and_dataset_only_families() -> None:
    collect, dataset = metric_names(role="collect"), metric_names(role="dataset")
    assert "flowpipe_relay_connected" in collect - dataset
    assert "flowpipe_dataset_parts_read_total" in dataset - collect
    assert {
        "flowpipe_observed_drops_total",
        "flowpipe_flows_received_total",
        "flowpipe_ingest_lag_seconds",
    } <= (collect & dataset)
    assert "flowpipe_flush_duration_seconds_bucket" in series_names(role="collect")
    assert "flowpipe_flush_duration_seconds_bucket" not in series_names(role="dataset")


@pytest.mark.parametrize("role", ["collect", "dataset"])
def test_promtool_check_metrics_reports_nothing(role: str) -> None:
    promtool = require_binary("promtool")
    registry, _, _ = exercised(role)
    text = render(registry)
    result = subprocess.run(
        [promtool, "check", "metrics"], check=False, input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_no_created_series() -> None:
    registry, _, _ = exercised()
    assert b"_created" not in render(registry)


# -- what the methods record ---------------------------------------------------------------------------------


def test_observe_batch_counts_verdicts_lost_events_and_decode_errors() -> None:
    registry, _, _ = exercised()
    sample = registry.get_sample_value
    assert sample("flowpipe_flows_received_total", {"verdict": "FORWARDED"}) == 1
    assert sample("flowpipe_flows_received_total", {"verdict": "unknown"}) == 1
    assert (
        sample("flowpipe_hubble_lost_events_total", {"source": "hubble_ring_buffer", "node": "kind/worker"})
        == 5
    )
    assert sample("flowpipe_decode_errors_total", {"reason": "invalid_json"}) == 1


def test_observe_batch_accepts_a_bare_table() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry)
    metrics.observe_batch(pa.table({"verdict": ["DROPPED", "DROPPED"]}))
    metrics.observe_flows(pa.table({"verdict": pa.array([], pa.string())}))
    assert registry.get_sample_value("flowpipe_flows_received_total", {"verdict": "DROPPED"}) == 2


def test_record_flush_and_connection() -> None:
    registry, metrics, clock = exercised()
    sample = registry.get_sample_value
    assert sample("flowpipe_flows_written_total") == 3
    assert sample("flowpipe_dataset_written_bytes_total") == 1200
    assert sample("flowpipe_batches_flushed_total") == 1
    assert sample("flowpipe_flush_duration_seconds_count") == 1
    assert sample("flowpipe_flush_duration_seconds_bucket", {"le": "0.05"}) == 1
    assert sample("flowpipe_relay_connected") == 1
    assert metrics.is_connected()
    metrics.set_connected(False)
    assert sample("flowpipe_relay_connected") == 0 and not metrics.is_connected()
    assert sample("flowpipe_relay_reconnects_total") == 1
    clock.now += 7
    assert metrics.seconds_since_flush() == 7


def test_ingest_lag_and_checkpoint_age_are_measured_at_scrape_time() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, clock=clock)
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") is None  # absent until known
    assert registry.get_sample_value("flowpipe_checkpoint_age_seconds") is None
    newest = datetime.fromtimestamp(clock.now - 30, UTC)
    metrics.record_flush(rows=1, size_bytes=10, seconds=0.1, newest_flow_time=newest)
    metrics.record_checkpoint()
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") == 30
    clock.now += 15  # nothing new arrives: the lag grows
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") == 45
    assert registry.get_sample_value("flowpipe_checkpoint_age_seconds") == 15
    metrics.set_newest_flow_time(clock.now - 100)  # an older flow never moves the lag back
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") == 45
    metrics.observe_newest_flow(
        pa.table(
            {"time": pa.array([datetime.fromtimestamp(clock.now - 2, UTC), None], pa.timestamp("ns", "UTC"))}
        )
    )
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") == pytest.approx(2)


def test_dataset_role_has_no_checkpoint_age() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset")
    metrics.record_checkpoint()
    assert registry.get_sample_value("flowpipe_checkpoint_age_seconds") is None
    assert registry.get_sample_value("flowpipe_relay_connected") is None


def test_unknown_role_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="role"):
        PipelineMetrics.create(CollectorRegistry(), role="sidecar")  # type: ignore[arg-type]


def test_known_failure_series_start_at_zero() -> None:
    registry = CollectorRegistry()
    PipelineMetrics.create(registry)
    assert (
        registry.get_sample_value(
            "flowpipe_flows_dropped_total", {"reason": "decode_error", "intentional": "false"}
        )
        == 0
    )
    assert (
        registry.get_sample_value("flowpipe_errors_total", {"stage": "sending", "error_type": "write_failed"})
        == 0
    )


def test_flowpipe_drops_keep_reason_and_intent() -> None:
    registry, metrics, _ = exercised()
    metrics.record_dropped(3, reason="decode_error", intentional=False)
    metrics.record_dropped(0, reason="never", intentional=False)
    sample = registry.get_sample_value
    assert sample("flowpipe_flows_dropped_total", {"reason": "filter", "intentional": "true"}) == 2
    assert sample("flowpipe_flows_dropped_total", {"reason": "decode_error", "intentional": "false"}) == 3
    assert sample("flowpipe_flows_dropped_total", {"reason": "never", "intentional": "false"}) is None


def test_unexpected_drops_gauge_is_replaced_by_each_run_with_every_why_per_cluster() -> None:
    registry, metrics, _ = exercised()

    def unexpected(cluster: str, why: str) -> float | None:
        return registry.get_sample_value("flowpipe_unexpected_drops", {"cluster": cluster, "why": why})

    metrics.set_unexpected_drops({("eu", "regression"): 1, ("eu", "dns_blocked"): 6, ("us", "expected"): 3})
    assert unexpected("eu", "regression") == 1 and unexpected("eu", "dns_blocked") == 6
    assert [unexpected("us", why) for why in UNEXPECTED_WHYS] == [0, 0, 0, 0]  # every why, 0 when none
    assert unexpected("us", "expected") is None
    assert registry.get_sample_value("flowpipe_expected_drops", {"cluster": "us"}) == 3
    assert registry.get_sample_value("flowpipe_expected_drops", {"cluster": "eu"}) == 0
    metrics.set_unexpected_drops({("eu", "dns_blocked"): 2})
    assert unexpected("eu", "regression") == 0 and unexpected("eu", "dns_blocked") == 2
    assert unexpected("us", "regression") is None  # a cluster no longer in the answer leaves the gauge
    metrics.set_unexpected_drops({})  # nothing found yet: still every why, at 0
    assert [unexpected(NO_CLUSTER, why) for why in UNEXPECTED_WHYS] == [0, 0, 0, 0]
    metrics.set_unexpected_drops({}, clusters=["eu"])
    assert unexpected("eu", "non_policy") == 0 and unexpected(NO_CLUSTER, "non_policy") is None


def test_dns_gauges_are_replaced_by_each_run_with_every_reason_per_namespace() -> None:
    registry, metrics, _ = exercised()

    def lookups(cluster: str, namespace: str) -> float | None:
        return registry.get_sample_value("flowpipe_dns_lookups", {"cluster": cluster, "namespace": namespace})

    def failed(cluster: str, namespace: str, reason: str) -> float | None:
        labels = {"cluster": cluster, "namespace": namespace, "reason": reason}
        return registry.get_sample_value("flowpipe_dns_failed_lookups", labels)

    metrics.set_dns_lookups(
        {("eu", "shop"): 40, ("eu", "web"): 3},
        {("eu", "shop", "NXDOMAIN"): 2, ("eu", "shop", "FORMERR"): 1, ("", "", "no_answer"): 4},
    )
    assert lookups("eu", "shop") == 40 and lookups("eu", "web") == 3
    assert failed("eu", "shop", "NXDOMAIN") == 2 and failed("eu", "shop", "FORMERR") == 1
    assert [failed("eu", "web", reason) for reason in DNS_FAILURE_REASONS] == [0] * len(DNS_FAILURE_REASONS)
    assert failed("eu", "web", "FORMERR") is None  # an unusual rcode only where a lookup ended with it
    # failures without a cluster, namespace or lookups still have a named series, and a lookup count (0)
    assert failed(NO_CLUSTER, NO_NAMESPACE, "no_answer") == 4 and lookups(NO_CLUSTER, NO_NAMESPACE) == 0
    metrics.set_dns_lookups({("eu", "shop"): 5}, {})
    assert lookups("eu", "shop") == 5 and failed("eu", "shop", "NXDOMAIN") == 0
    assert lookups("eu", "web") is None and failed(NO_CLUSTER, NO_NAMESPACE, "no_answer") is None
    metrics.set_dns_lookups({}, {})  # nothing found: still one series per reason, at 0
    assert lookups(NO_CLUSTER, NO_NAMESPACE) == 0 and failed(NO_CLUSTER, NO_NAMESPACE, "dropped") == 0
    metrics.set_dns_lookups({}, {}, clusters=["eu"])  # the cluster a collector answers for
    assert lookups("eu", NO_NAMESPACE) == 0 and lookups(NO_CLUSTER, NO_NAMESPACE) is None
    metrics.set_dns_lookups({("eu", "shop"): 1}, {}, clusters=["eu", "us"])
    assert lookups("eu", NO_NAMESPACE) is None and lookups("us", NO_NAMESPACE) == 0


def test_zero_first_counters_are_shown_at_zero_before_they_count() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset", zero_first=True)

    def drops() -> float | None:
        labels = {"cluster": "kind", "namespace": "shop", "direction": "INGRESS", "reason_class": "policy"}
        return registry.get_sample_value("flowpipe_observed_drops_total", labels)

    metrics.observed_drops.labels("kind", "shop", "INGRESS", "policy").inc(5)
    metrics.observe_flows(pa.table({"verdict": ["DROPPED", "DROPPED"]}))
    assert drops() == 0  # the series exists at 0: the first scrape sees it before any flow
    assert registry.get_sample_value("flowpipe_flows_received_total", {"verdict": "DROPPED"}) == 0
    metrics.observed_drops.labels(
        cluster="kind", namespace="shop", direction="INGRESS", reason_class="policy"
    ).inc(2)
    assert drops() == 0
    metrics.after_scrape()
    assert drops() == 7
    assert registry.get_sample_value("flowpipe_flows_received_total", {"verdict": "DROPPED"}) == 2
    metrics.observed_drops.labels("kind", "shop", "INGRESS", "policy").inc()  # a shown series counts at once
    assert drops() == 8
    plain = CollectorRegistry()
    PipelineMetrics.create(plain, role="dataset").observed_drops.labels("k", "a", "INGRESS", "policy").inc(3)
    labels = {"cluster": "k", "namespace": "a", "direction": "INGRESS", "reason_class": "policy"}
    assert plain.get_sample_value("flowpipe_observed_drops_total", labels) == 3


def test_the_metrics_server_releases_held_counts_after_each_scrape() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset", zero_first=True)
    metrics.dns_lookups.labels("kind", "shop").inc(4)
    with serve(registry, "127.0.0.1:0", after_scrape=metrics.after_scrape) as server:
        first = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
        second = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
    assert 'flowpipe_observed_dns_lookups_total{cluster="kind",namespace="shop"} 0.0' in first
    assert 'flowpipe_observed_dns_lookups_total{cluster="kind",namespace="shop"} 4.0' in second


# -- bounded labels --------------------------------------------------------------------------------------------


def test_bounded_label_admits_up_to_the_limit() -> None:
    bounded = BoundedLabel(2)
    assert [bounded(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_lost_event_nodes_are_capped() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry)
    for i in range(MAX_NODE_LABELS + 5):
        metrics.add_lost_events("PERF_EVENT_RING_BUFFER", f"node-{i}", 1)
    assert (
        registry.get_sample_value(
            "flowpipe_hubble_lost_events_total", {"source": "perf_event_ring_buffer", "node": OTHER}
        )
        == 5
    )
    metrics.add_lost_events(None, None, 2)
    metrics.add_lost_events("HUBBLE_RING_BUFFER", "node-1", 0)
    assert (
        registry.get_sample_value("flowpipe_hubble_lost_events_total", {"source": "unknown", "node": OTHER})
        == 2
    )


def test_free_text_never_becomes_a_raw_label() -> None:
    assert label_token("Connection reset by peer: [Errno 104]") == "Connection_reset_by_peer_Errno_104"
    assert label_token("") == "unknown"
    assert len(label_token("x" * 500)) == 64
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry)
    metrics.record_decode_errors([ValueError("a long message that must not be a label")])
    assert registry.get_sample_value("flowpipe_decode_errors_total", {"reason": "ValueError"}) == 1


# -- the HTTP endpoint ------------------------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9966") == ("127.0.0.1", 9966)
    assert parse_address(":9966") == ("0.0.0.0", 9966)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("9966", "localhost", "host:port", "1.2.3.4:70000", "[::1]"):
        with pytest.raises(ConfigError, match="metrics address"):
            parse_address(bad)


def test_serve_metrics_health_and_readiness() -> None:
    registry, metrics, _ = exercised()
    metrics.set_connected(False)
    with serve(registry, "127.0.0.1:0", ready=metrics.is_connected) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        status, body = http_get(f"{server.url}/metrics")
        assert status == 200
        parsed = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "flowpipe_observed_drops" in parsed
        assert http_get(f"{server.url}/healthz") == (200, b"ok\n")
        assert http_get(f"{server.url}/readyz")[0] == 503
        metrics.set_connected(True)
        assert http_get(f"{server.url}/readyz") == (200, b"ready\n")
        assert http_get(f"{server.url}/nothing")[0] == 404


def test_a_failing_readiness_check_means_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    with serve(CollectorRegistry(), ("127.0.0.1", 0), health=broken) as server:
        assert http_get(f"{server.url}/readyz")[0] == 503
        assert http_get(f"{server.url}/healthz")[0] == 200


def test_serve_releases_the_port_and_reports_a_taken_one() -> None:
    port = free_port()
    server = serve(CollectorRegistry(), f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        serve(CollectorRegistry(), f"127.0.0.1:{port}")
    server.close()
    again = serve(CollectorRegistry(), f"127.0.0.1:{port}")
    assert http_get(f"{again.url}/healthz")[0] == 200
    again.close()

"""`flowpipe collect` as a process: configuration, graceful stop, restart after a kill, and its endpoints.

Configured from the environment, stopped by SIGTERM (flushed, checkpointed, exit 0), killed with SIGKILL and
restarted (nothing lost, nothing twice), and its /metrics, /healthz, /readyz.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import click
import pytest
from prometheus_client import CollectorRegistry
from support.collect import (
    RECEIVING_MODES,
    chunks,
    dataset_table,
    dataset_uuids,
    fast_collect_config,
    retimed,
    sim_flow_bytes,
    start_collector,
    uuids_of,
)
from support.flowdata import T0, flow, flows_table
from support.processes import child_pids, process_gone, stop_process
from support.prom import (
    PrometheusServer,
    check_dashboard_queries,
    dashboard_expressions,
    free_port,
    http_get,
    question_available,
    run_prometheus,
    substitute_grafana_variables,
)
from support.wait import wait_until

from flowpipe._proto.flow import flow_pb2
from flowpipe.app.collect import collect
from flowpipe.cli.collect import collect_command
from flowpipe.config import ParquetSinkConfig
from flowpipe.errors import DatasetWriteError
from flowpipe.metrics.families import PipelineMetrics
from flowpipe.metrics.questions import dns_failures_runner, dns_lookup_counts
from flowpipe.model import EventBatch
from flowpipe.server import ObserverServer
from flowpipe.sinks.instrumented import READY_GRACE_SECONDS, InstrumentedParquetSink
from flowpipe.sinks.parquet import ParquetSink

FAST = ["--reconnect-backoff-initial-seconds", "0.05", "--reconnect-backoff-max-seconds", "0.5"]


def metric(url: str, name: str) -> float | None:
    """Sum of a metric family's samples on a /metrics page (None when absent)."""
    try:
        status, body = http_get(f"{url}/metrics")
    except OSError:  # not listening yet
        return None
    if status != 200:
        return None
    values = [
        float(match.group(1))
        for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.MULTILINE)
    ]
    return sum(values) if values else None


def test_sigterm_flushes_the_open_batch_saves_the_checkpoint_and_exits_0(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:1500]
    dataset = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        env = {  # every setting from the environment, as in a container
            "FLOWPIPE_RELAY_ADDRESS": server.address,
            "FLOWPIPE_DATASET": str(dataset),
            "FLOWPIPE_METRICS_ADDRESS": f"127.0.0.1:{port}",
            "FLOWPIPE_FLUSH_INTERVAL_SECONDS": "3600",  # only the stop flushes
            "FLOWPIPE_WRITER_ID": "from-env",
            "FLOWPIPE_WORKERS": "2",  # the stream read by a receiving process of its own
        }
        process = start_collector([], tmp_path / "collect.log", env=env)
        receivers: list[int] = []
        try:
            wait_until(
                lambda: metric(url, "flowpipe_flows_received_total") == len(flows), what="every flow received"
            )
            assert http_get(f"{url}/healthz")[0] == 200
            assert http_get(f"{url}/readyz")[0] == 200
            assert metric(url, "flowpipe_relay_connected") == 1
            assert dataset_uuids(dataset) == [], "nothing flushed before the stop"
            receivers = child_pids(process.pid)
            assert len(receivers) == 1, "one receiving process"
        finally:
            code = stop_process(process, signal.SIGTERM, timeout=20)
    log = (tmp_path / "collect.log").read_text()
    assert code == 0, log
    assert all(process_gone(pid) for pid in receivers), "the receiving process ended with the collector"
    assert sorted(dataset_uuids(dataset)) == sorted(uuids_of(flows)), "the open batch was flushed"
    assert all("-from-env-" in p.name for p in (dataset / "flows").rglob("*.parquet"))
    state = json.loads((dataset / "_state" / "relay.json").read_text())
    assert state["uuid"] in uuids_of(flows) and state["relay"] == server.address
    assert f"stopped: {len(flows):,} flows written" in log


def test_every_collect_option_reads_a_flowpipe_variable() -> None:
    options = [p for p in collect_command.params if isinstance(p, click.Option)]
    assert len(options) > 20
    missing = [
        o.opts[0] for o in options if not (isinstance(o.envvar, str) and o.envvar.startswith("FLOWPIPE_"))
    ]
    assert missing == []
    assert all(o.show_envvar for o in options), "--help names each variable"


def test_sigint_flushes_and_exits_0_with_list_filters_from_the_environment(tmp_path: Path) -> None:
    flows = [flow_pb2.Flow.FromString(f) for f in sim_flow_bytes()[:1500]]
    namespaces = sorted({f.source.namespace for f in flows if f.source.namespace})[:2]
    verdicts = ("DROPPED", "FORWARDED")
    expected = sorted(
        f.uuid
        for f in flows
        if (f.source.namespace in namespaces or f.destination.namespace in namespaces)
        and flow_pb2.Verdict.Name(f.verdict) in verdicts
        and f.node_name != "sim/worker-3"
    )
    assert 0 < len(expected) < len(flows)
    dataset = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ObserverServer(buffer_size=10_000) as server:
        server.publish(flows)
        env = {
            "FLOWPIPE_RELAY_ADDRESS": server.address,
            "FLOWPIPE_DATASET": str(dataset),
            "FLOWPIPE_METRICS_ADDRESS": f"127.0.0.1:{port}",
            "FLOWPIPE_FLUSH_INTERVAL_SECONDS": "3600",  # only the stop flushes
            "FLOWPIPE_NAMESPACE": " ".join(namespaces),  # lists: space-separated
            "FLOWPIPE_VERDICT": " ".join(verdicts),
            "FLOWPIPE_NODE": "sim/worker-1 worker-2 control-plane",
        }
        process = start_collector([], tmp_path / "collect.log", env=env)
        try:
            wait_until(
                lambda: metric(url, "flowpipe_flows_received_total") == len(expected),
                what="the filtered flows received",
            )
            assert dataset_uuids(dataset) == [], "nothing flushed before the stop"
        finally:
            code = stop_process(process, signal.SIGINT, timeout=20)
    log = (tmp_path / "collect.log").read_text()
    assert code == 0, log
    assert sorted(dataset_uuids(dataset)) == expected, "the open batch was flushed, filtered as asked"
    state = json.loads((dataset / "_state" / "relay.json").read_text())
    assert state["uuid"] in expected
    assert "received SIGINT" in log and f"stopped: {len(expected):,} flows written" in log


def test_readyz_says_not_ready_while_the_relay_is_away(tmp_path: Path) -> None:
    flows = sim_flow_bytes()[:200]
    urls: queue.Queue[str] = queue.Queue()
    errors: list[BaseException] = []
    stop = threading.Event()
    with ObserverServer(buffer_size=1000) as server:
        server.publish(flows[:100])
        config = dataclasses.replace(
            fast_collect_config(server.address, tmp_path / "data"), metrics_address="127.0.0.1:0"
        )

        def run() -> None:
            try:
                collect(config, stop=stop, on_started=lambda _source, metrics: urls.put(metrics.url))
            except BaseException as exc:  # noqa: BLE001  (asserted below)
                errors.append(exc)

        thread = threading.Thread(target=run, name="test-collect", daemon=True)
        thread.start()
        try:
            url = urls.get(timeout=30)
            wait_until(lambda: http_get(f"{url}/readyz")[0] == 200, what="ready while connected")
            server.stop()
            wait_until(lambda: http_get(f"{url}/readyz")[0] == 503, what="not ready without the relay")
            assert http_get(f"{url}/healthz")[0] == 200, "the process is still up"
            server.start()
            server.publish(flows[100:])
            wait_until(lambda: http_get(f"{url}/readyz")[0] == 200, what="ready again once reconnected")
            wait_until(lambda: len(dataset_uuids(tmp_path / "data")) == len(flows), what="every flow")
        finally:
            stop.set()
            thread.join(30)
    assert not thread.is_alive() and errors == []


def test_readiness_needs_the_parquet_sink_to_keep_flushing(tmp_path: Path) -> None:
    now = [1000.0]
    sink = ParquetSink(ParquetSinkConfig(path=str(tmp_path), writer_id="test", flush_interval_seconds=60.0))
    measured = InstrumentedParquetSink(
        sink, PipelineMetrics.create(CollectorRegistry(), role="collect"), clock=lambda: now[0]
    )
    assert measured.keeping_up(60.0), "nothing waiting"
    batch = EventBatch(flows=flows_table([flow(time=T0, uuid="a")]))
    assert measured.write(batch) is None
    now[0] += max(2 * 60.0, 60.0 + READY_GRACE_SECONDS)  # twice the interval, or the interval and the grace
    assert measured.keeping_up(60.0), "still within what a flush may take"
    now[0] += 1.0
    assert not measured.keeping_up(60.0), "a flow has waited unflushed too long"
    ack = measured.flush()
    assert ack is not None and ack.flows == 1
    assert measured.keeping_up(60.0), "flushed: nothing waits"
    (tmp_path / "flows").rename(tmp_path / "moved")
    (tmp_path / "flows").write_text("a file where the flows folder belongs")
    measured.write(EventBatch(flows=flows_table([flow(time=T0, uuid="b")])))
    with pytest.raises(DatasetWriteError):
        measured.flush()
    assert not measured.keeping_up(60.0), "a failed flush is not ready"


@pytest.mark.parametrize(("workers", "receiver"), RECEIVING_MODES)
def test_sigkill_five_times_then_restart_loses_and_repeats_nothing(
    tmp_path: Path, workers: int, receiver: str
) -> None:
    flows = sim_flow_bytes()[:3000]
    parts = chunks(flows, 6)
    dataset = tmp_path / "data"
    args = ["--dataset", str(dataset), "--flush-interval-seconds", "0.05", "--metrics-address", "off",
            "--workers", str(workers), "--receiver", receiver, *FAST]  # fmt: skip
    log_path = tmp_path / "collect.log"
    with ObserverServer(buffer_size=10_000) as server:
        args = ["--relay", server.address, *args]
        published = 0
        for kill in range(5):
            server.publish(parts[kill])
            published += len(parts[kill])
            before = len(set(dataset_uuids(dataset)))
            process = start_collector(args, log_path)
            # kill it once it wrote part of what it received, while it is still writing
            wait_until(
                lambda b=before: len(dataset_uuids(dataset)) > b, what=f"progress before kill {kill + 1}"
            )
            assert stop_process(process, signal.SIGKILL) == -signal.SIGKILL
        server.publish(parts[5])
        process = start_collector(args, log_path)
        try:
            wait_until(
                lambda: len(set(dataset_uuids(dataset))) == len(flows), what="every flow after the kills"
            )
        finally:
            assert stop_process(process, signal.SIGTERM) == 0
    written = dataset_uuids(dataset)
    assert len(written) == len(set(written)), "no flow written twice"
    assert sorted(written) == sorted(uuids_of(flows))


def check_dns_gauges(prom: PrometheusServer, dataset: Path, *, nxdomain_answers: int) -> None:
    """The collector's DNS gauges, as Prometheus has them, are the dns_failures answer over its dataset, and the
    "DNS failure share" panel is failed lookups over lookups; fewer lookups failed with NXDOMAIN than NXDOMAIN
    answers streamed by (the simulated resolvers search)."""
    lookups, failed = dns_lookup_counts(dns_failures_runner(str(dataset))())
    failed = {key: n for key, n in failed.items() if n}

    def series(counts: Mapping[tuple[str, ...], float], *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(sorted(zip(labels, key, strict=True))): n for key, n in counts.items()}

    wait_until(
        lambda: (
            prom.values("sum by (cluster, namespace) (flowpipe_dns_lookups)")
            == series(lookups, "cluster", "namespace")
        ),
        what="flowpipe_dns_lookups as the dns_failures question counts",
    )
    wait_until(
        lambda: (
            prom.values("sum by (cluster, namespace, reason) (flowpipe_dns_failed_lookups) > 0")
            == series(failed, "cluster", "namespace", "reason")
        ),
        what="flowpipe_dns_failed_lookups as the dns_failures question counts",
    )
    assert 0 < sum(n for (_, _, reason), n in failed.items() if reason == "NXDOMAIN") < nxdomain_answers
    (panel,) = [e for _, title, e in dashboard_expressions() if title == "DNS failure share"]
    share = prom.values(substitute_grafana_variables(panel))
    assert share == {(): pytest.approx(sum(failed.values()) / sum(lookups.values()))}


@pytest.mark.external
@pytest.mark.slow
def test_metrics_of_a_running_collector_and_every_dashboard_query(tmp_path: Path) -> None:
    # a minute of the simulated cluster with its faults, ending now (the questions look at the last hour)
    flows = retimed(sim_flow_bytes(3000, 8, 60.0), time.time_ns())  # a seed whose minute has every fault
    dataset = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with ObserverServer(buffer_size=300) as server:
        server.publish(flows[:1000])
        args = ["--relay", server.address, "--dataset", str(dataset), "--flush-interval-seconds", "0.2",
                "--metrics-address", f"127.0.0.1:{port}", "--question-interval-seconds", "1", *FAST]  # fmt: skip
        process = start_collector(args, tmp_path / "collect.log")
        try:
            buffered = sum(node.num_flows for node in server.store.node_stats())
            wait_until(
                lambda: metric(url, "flowpipe_flows_written_total") == buffered,
                what="the first flows written",
            )
            server.restart()  # a reconnect, counted
            wait_until(lambda: metric(url, "flowpipe_relay_reconnects_total"), what="the reconnect counted")
            wait_until(lambda: server.active_streams() == 1, what="the stream open again")
            server.stall(
                1.5
            )  # while the stream waits, the 300-flow ring buffers overwrite flows: Hubble loses them
            server.publish(flows[1000:])

            def all_accounted() -> bool:
                written = metric(url, "flowpipe_flows_written_total") or 0
                lost = metric(url, "flowpipe_hubble_lost_events_total") or 0
                return lost > 0 and written + lost == buffered + len(flows) - 1000

            wait_until(all_accounted, what="every flow written or reported lost")
            assert metric(url, "flowpipe_ingest_lag_seconds") is not None
            assert metric(url, "flowpipe_checkpoint_age_seconds") is not None
            written = dataset_table(dataset, columns=["verdict"])
            dropped = written.column("verdict").to_pylist().count("DROPPED")
            assert metric(url, 'flowpipe_flows_received_total{verdict="DROPPED"}') == dropped
            with run_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
                left_out = check_dashboard_queries(prom, role="collect", with_question=question_available())
                # the simulator's injected faults show in the right series, as the dataset holds them
                failures = prom.values("sum by (reason) (flowpipe_observed_dns_failures_total)", "reason")
                rcodes = dataset_table(dataset, columns=["dns_rcode"]).column("dns_rcode").to_pylist()
                assert rcodes.count(3) > 0, "the simulated minute has no NXDOMAIN answer"
                for name, code in (("NXDOMAIN", 3), ("SERVFAIL", 2), ("REFUSED", 5)):
                    assert failures.get(name, 0) == rcodes.count(code), (name, failures)
                if question_available():
                    wait_until(
                        lambda: prom.values("flowpipe_unexpected_drops", "why").get("regression", 0) > 0,
                        what="the api -> redis regression in flowpipe_unexpected_drops",
                    )
                    check_dns_gauges(prom, dataset, nxdomain_answers=rcodes.count(3))
            assert not [q for q in left_out if "flowpipe_relay" in q or "flush" in q], left_out
        finally:
            assert stop_process(process, signal.SIGTERM) == 0

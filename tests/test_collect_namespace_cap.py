"""`flowpipe collect --max-namespaces N`: a real Prometheus scraping the collector sees at most N namespaces by
name in the flow analytics families; the other namespaces are counted as `other`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.collect import dataset_table, sim_flow_bytes, start_collector
from support.processes import stop_process
from support.prom import free_port, run_prometheus
from support.wait import wait_until

from flowpipe.metrics.families import NO_NAMESPACE
from flowpipe.server import ObserverServer

pytestmark = [pytest.mark.external, pytest.mark.slow]

ANALYTICS = '{__name__=~"flowpipe_observed_.+"}'


def test_max_namespaces_caps_the_namespace_label(tmp_path: Path) -> None:
    flows = sim_flow_bytes(1500, 5, 300.0)
    dataset = tmp_path / "data"
    port = free_port()
    with ObserverServer(buffer_size=5000) as server:
        published = server.publish(flows)
        args = ["--relay", server.address, "--dataset", str(dataset), "--flush-interval-seconds", "0.2",
                "--metrics-address", f"127.0.0.1:{port}", "--max-namespaces", "2"]  # fmt: skip
        process = start_collector(args, tmp_path / "collect.log")
        try:
            with run_prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
                wait_until(
                    lambda: prom.values("sum(flowpipe_flows_written_total)").get(()) == published,
                    what="every flow written",
                )
                labels = wait_until(
                    lambda: set(prom.values(f"group by (namespace) ({ANALYTICS})", "namespace")),
                    what="the analytics series",
                )
        finally:
            assert stop_process(process, signal.SIGTERM) == 0, (tmp_path / "collect.log").read_text()[-3000:]
    stored = set(dataset_table(dataset, columns=["source_namespace"]).column("source_namespace").to_pylist())
    assert len(stored - {None}) > 2  # more namespaces than the cap admits
    named = labels - {NO_NAMESPACE, "other"}
    assert len(named) == 2 and named <= stored, labels
    assert "other" in labels, labels

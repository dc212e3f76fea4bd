"""`flowpipe serve-metrics`: reads each part file once, follows new ones, survives a broken file, clean output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from support.env import require_binary
from support.flowdata import T0, flow, synthetic_flows, write_dataset
from support.metrics import follower_for, received

from flowpipe.cli import cli
from flowpipe.metrics.families import DNS_FAILURE_REASONS, NO_NAMESPACE
from flowpipe.metrics.server import MAX_READ_ATTEMPTS
from flowpipe.model import LostEvent


def test_each_part_file_is_read_once_and_new_ones_are_followed(tmp_path: Path) -> None:
    follower, registry = follower_for(tmp_path)
    assert follower.scan() == 0  # no dataset yet: nothing to read, no error
    rows = synthetic_flows(300)
    write_dataset(tmp_path, rows[:200], writer_id="one")
    first = follower.scan()
    assert first >= 1 and received(registry) == 200
    assert follower.scan() == 0 and received(registry) == 200
    write_dataset(
        tmp_path,
        rows[200:],  # synthetic_flows(300) gives more than 300 rows: DNS lookups come in pairs
        writer_id="two",
        lost_events=[
            LostEvent(source="OBSERVER_EVENTS_QUEUE", num_events_lost=9, node_name="kind/node-0", time=T0)
        ],
    )
    assert follower.scan() >= 2
    assert received(registry) == len(rows)
    lost = registry.get_sample_value(
        "flowpipe_hubble_lost_events_total", {"source": "observer_events_queue", "node": "kind/node-0"}
    )
    assert lost == 9
    assert registry.get_sample_value("flowpipe_ingest_lag_seconds") is not None


def test_temporary_and_private_files_are_not_read(tmp_path: Path) -> None:
    (part,) = write_dataset(tmp_path, [flow(time=T0, verdict="DROPPED")])
    folder = Path(part).parent
    (folder / ".part-x.parquet.tmp").write_bytes(Path(part).read_bytes())
    (folder / "_private.parquet").write_bytes(Path(part).read_bytes())
    follower, registry = follower_for(tmp_path)
    follower.scan()
    assert received(registry) == 1


def test_a_broken_part_file_is_retried_then_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (good,) = write_dataset(tmp_path, [flow(time=T0, verdict="FORWARDED")])
    broken = Path(good).with_name("part-20240501T100000000000Z-broken-000001.parquet")
    broken.write_bytes(b"PAR1 this is not parquet")
    follower, registry = follower_for(tmp_path)
    for _ in range(MAX_READ_ATTEMPTS):
        follower.scan()
    assert received(registry) == 1
    labels = {"table": "flows", "outcome": "failed"}
    assert registry.get_sample_value("flowpipe_dataset_parts_read_total", labels) == 1
    assert (
        registry.get_sample_value(
            "flowpipe_errors_total", {"stage": "receiving", "error_type": "read_failed"}
        )
        == 1
    )
    assert str(broken) in caplog.text
    follower.scan()  # given up: not counted again
    assert registry.get_sample_value("flowpipe_dataset_parts_read_total", labels) == 1


def test_once_prints_metrics_that_promtool_accepts(tmp_path: Path) -> None:
    rows = synthetic_flows(400)
    write_dataset(
        tmp_path,
        rows,
        lost_events=[
            LostEvent(source="HUBBLE_RING_BUFFER", num_events_lost=2, node_name="kind/node-1", time=T0)
        ],
    )
    result = CliRunner().invoke(cli, ["serve-metrics", "--dataset", str(tmp_path), "--once"])
    assert result.exit_code == 0, result.output
    families = {f.name: f for f in text_string_to_metric_families(result.output)}
    assert sum(s.value for s in families["flowpipe_flows_received"].samples) == len(rows)
    assert families["flowpipe_observed_drops"].samples
    assert families["flowpipe_observed_dns_failures"].samples
    promtool = require_binary("promtool")
    lint = subprocess.run(
        [promtool, "check", "metrics"],
        input=result.output,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", (
        lint.stdout + lint.stderr
    )


def test_once_exports_the_dns_gauges_over_the_questions_window(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_flows(400))

    def dns_gauges(*args: str) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
        result = CliRunner().invoke(cli, ["serve-metrics", "--dataset", str(tmp_path), "--once", *args])
        assert result.exit_code == 0, result.output
        families = {f.name: f for f in text_string_to_metric_families(result.output)}
        lookups = {s.labels["namespace"]: s.value for s in families["flowpipe_dns_lookups"].samples}
        failed = {
            (s.labels["namespace"], s.labels["reason"]): s.value
            for s in families["flowpipe_dns_failed_lookups"].samples
        }
        return lookups, failed

    # the data is two hours of 2024: the questions' default window (the last hour) holds none of it
    assert dns_gauges() == ({NO_NAMESPACE: 0}, {(NO_NAMESPACE, reason): 0 for reason in DNS_FAILURE_REASONS})
    lookups, failed = dns_gauges("-p", "since=2024-05-01", "-p", "until=2024-05-02")
    assert lookups["shop"] > 0 and lookups["billing"] > 0
    assert (
        failed[("shop", "NXDOMAIN")] > 0 and failed[("shop", "SERVFAIL")] > 0
    )  # nope.invalid., flaky.example.org.
    assert failed[("shop", "dropped")] == 0  # every reason, 0 when none


def test_namespace_cap_flag(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_flows(400))
    result = CliRunner().invoke(
        cli, ["serve-metrics", "--dataset", str(tmp_path), "--once", "--max-namespaces", "1"]
    )
    assert result.exit_code == 0, result.output
    families = {f.name: f for f in text_string_to_metric_families(result.output)}
    namespaces = {s.labels["namespace"] for s in families["flowpipe_observed_drops"].samples}
    assert len(namespaces - {NO_NAMESPACE, "other"}) == 1 and "other" in namespaces


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-address", "nowhere"], "is not HOST:PORT"),
        (["-p", "since"], "is not KEY=VALUE"),
        (["-p", "show_expected=true", "-p", "nosuch=1"], "question parameter nosuch: no question"),
    ],
)
def test_bad_flags_are_reported(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["serve-metrics", "--dataset", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output

"""Time windows cover a capture's own records: anchored on the newest record of flows and lost events, `--since
all`, and a note when the default window leaves part of the data out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.flowdata import flow, write_dataset

from flowpipe.cli import cli
from flowpipe.model import LostEvent
from flowpipe.query.catalog import load_questions
from flowpipe.query.engine import open_engine
from flowpipe.query.run import relative_anchor, resolve_window, run_question, window_coverage
from flowpipe.query.timeparse import EARLIEST_FLOW_TIME, LATEST_FLOW_TIME, parse_time

T = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _run(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """Flows over three hours up to T (one a minute), and three lost-events records just after the last flow."""
    rows = [
        flow(time=T - timedelta(minutes=minute), node_name="kind/node-1", verdict="DROPPED", drop_reason=133,
             drop_reason_desc="POLICY_DENIED", source_namespace="shop", destination_namespace="db")
        for minute in range(180)
    ]  # fmt: skip
    lost = [
        LostEvent("HUBBLE_RING_BUFFER", 10 * n, node_name="kind/node-1", time=T + timedelta(seconds=n))
        for n in (1, 2, 3)
    ]
    write_dataset(tmp_path, rows, lost_events=lost)
    return tmp_path


def test_lost_events_just_after_the_last_flow_are_in_the_default_window(capture: Path) -> None:
    out, err = _run("query", "lost_events", "--dataset", str(capture), "--format", "json")
    (row,) = json.loads(out)
    assert row["records"] == 3 and row["events_lost"] == 60
    assert row["flows"] == 60, "the flows of the hour up to the newest record"
    assert "newest record (2024-05-01T12:00:03Z)" in err


def test_the_default_window_says_what_it_leaves_out_and_since_all_shows_it(capture: Path) -> None:
    out, err = _run("query", "drops_by_reason", "--dataset", str(capture), "--format", "json")
    assert sum(r["flows"] for r in json.loads(out)) == 60
    assert "leaves out 120 of 180 flows" in err
    assert "the data spans 2024-05-01T09:01:00Z to 2024-05-01T12:00:03Z" in err and "--since all" in err
    out, err = _run(
        "query", "drops_by_reason", "--dataset", str(capture), "--since", "all", "--format", "json"
    )
    assert sum(r["flows"] for r in json.loads(out)) == 180
    assert "leaves out" not in err
    out, err = _run("query", "drops_by_reason", "--dataset", str(capture), "--since", "2h")
    assert "leaves out" not in err, "a window the user chose is not commented"
    assert (
        "from the first record"
        in _run("query", "drops_by_reason", "--dataset", str(capture), "--since", "all")[0]
    )


def test_since_all_on_suggest_and_replay(capture: Path, tmp_path: Path) -> None:
    policy = tmp_path / "deny.yaml"
    policy.write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: none, namespace: db}\n"
        "spec: {podSelector: {}, policyTypes: [Ingress]}\n"
    )
    out, _ = _run("replay", str(policy), "--dataset", str(capture), "--since", "all", "--format", "json")
    everything, _ = _run("replay", str(policy), "--dataset", str(capture), "--format", "json")
    assert json.loads(out) == json.loads(everything)
    result = CliRunner().invoke(cli, ["suggest", "--dataset", str(capture), "--since", "all"])
    assert "1677" not in result.output and "Traceback" not in result.output


def test_time_values_all_and_one_anchoring_rule() -> None:
    assert parse_time("all") == EARLIEST_FLOW_TIME and parse_time("ALL", end=True) == LATEST_FLOW_TIME
    clock = datetime(2025, 1, 1, tzinfo=UTC)
    assert relative_anchor(T, timedelta(hours=1), now=clock) == (T, "data")
    assert relative_anchor(clock - timedelta(minutes=5), timedelta(hours=1), now=clock) == (clock, "now")
    assert relative_anchor(T, None, now=clock) == (clock, "now")
    assert relative_anchor(T, timedelta(hours=1), relative_to="now", now=clock) == (clock, "now")
    # replay follows the same rule
    start, end, anchor = resolve_window(T, "1h", "all", now=clock)
    assert (start, end, anchor) == (T - timedelta(hours=1), LATEST_FLOW_TIME, T)


def test_window_coverage_counts_what_a_window_leaves_out(capture: Path) -> None:
    with open_engine(str(capture)) as engine:
        coverage = window_coverage(engine, T - timedelta(minutes=30), T)
        assert (coverage.flows, coverage.flows_outside) == (180, 149)
        assert (coverage.lost_events, coverage.lost_events_outside) == (3, 3)
        assert coverage.partial and "3 of 3 lost-event records" in coverage.note(T, T)
        assert not window_coverage(engine, None, None).partial
        result = run_question(engine, load_questions().question("lost_events"), {"since": "all"})
        assert result.params["until"] >= T + timedelta(seconds=3)


def test_real_capture_default_window_against_the_raw_json(hubble_captures: Path, tmp_path: Path) -> None:
    path = hubble_captures / "kind-starwars" / "testdata1.jsonl"
    times = sorted(
        datetime.fromisoformat(json.loads(line)["flow"]["time"][:26] + "+00:00")
        for line in path.read_text().splitlines()
    )
    newest = times[-1]
    inside = sum(1 for t in times if t >= newest - timedelta(hours=1))
    data = tmp_path / "data"
    assert CliRunner().invoke(cli, ["ingest", str(path), "--dataset", str(data)]).exit_code == 0
    out, err = _run("query", "top_talkers", "--dataset", str(data), "--format", "json")
    assert f"leaves out {len(times) - inside} of {len(times)} flows" in err
    out, err = _run(
        "query",
        "top_talkers",
        "--dataset",
        str(data),
        "--since",
        "all",
        "-p",
        "limit=1000",
        "--format",
        "json",
    )
    assert sum(r["flows"] for r in json.loads(out)) <= len(times) and "leaves out" not in err

"""`flowpipe demo`: no configuration, a simulated relay collected over gRPC, the answers and what to run next."""

from __future__ import annotations

from pathlib import Path

from _collect_support import dataset_uuids
from click.testing import CliRunner

from flowpipe.cli import cli


def test_demo_collects_the_simulated_relay_and_answers_the_questions(tmp_path: Path) -> None:
    dataset = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--dataset", str(dataset), "--minutes", "3", "--rate", "40"])
    assert result.exit_code == 0, result.output
    written = dataset_uuids(dataset)
    assert len(written) == len(set(written)) > 3 * 60 * 20
    assert f"collected {len(written):,} flows" in result.output
    for title in ("Drops by reason", "Failing DNS lookups", "Unexpected drops", "where to look next"):
        assert title in result.output
    assert "POLICY_DENIED" in result.output and "NXDOMAIN" in result.output
    assert f"flowpipe serve-metrics --dataset {dataset}" in result.output


def test_demo_refuses_a_dataset_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--dataset", str(tmp_path)])
    assert result.exit_code == 2 and "is not empty" in result.output

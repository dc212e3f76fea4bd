"""`flowpipe demo`: no configuration, a simulated relay collected over gRPC, the answers and what to run next."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner
from support.collect import dataset_uuids

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
    assert f"serve-metrics --dataset {dataset}" in result.output


def test_demo_refuses_a_dataset_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--dataset", str(tmp_path)])
    assert result.exit_code == 2 and "is not empty" in result.output


def test_the_next_steps_run_as_printed_without_flowpipe_on_the_path(tmp_path: Path) -> None:
    # As after `make demo`: the virtualenv is not activated, so the steps name its script (or this interpreter).
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = CliRunner().invoke(cli, ["demo", "--minutes", "1", "--rate", "20"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steps = dict(
        line.strip().split(":  ", 1)
        for line in lines[lines.index("where to look next:") + 1 :]
        if ":  " in line
    )
    assert all(not command.strip().startswith("flowpipe ") for command in steps.values())
    kept = next(line for line in lines if line.startswith("The demo's dataset is kept in "))
    folder = Path(kept.removeprefix("The demo's dataset is kept in ").split(" for these commands")[0])
    try:
        assert "is not on your PATH" in result.output
        for what in ("every question", "one of them", "your own SQL"):
            done = subprocess.run(
                shlex.split(steps[what].strip()),
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, (what, done.stderr)
            assert "rows" in done.stdout
        assert f"rm -r {folder}" in kept
    finally:
        shutil.rmtree(folder, ignore_errors=True)

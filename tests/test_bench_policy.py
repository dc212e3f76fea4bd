"""The `suggest` and `replay` sections of `flowpipe bench`, run small: figures there, dataset written once."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from flowpipe.bench.policy import REPLAY_POLICIES
from flowpipe.cli import cli


def test_suggest_and_replay_sections(tmp_path: Path) -> None:
    args = [
        "bench",
        "--flows",
        "300",
        "--only",
        "suggest,replay",
        "--workdir",
        str(tmp_path),
        "--format",
        "json",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    figures = {f["name"]: f for f in json.loads(first.stdout)}
    assert set(figures) == {
        "suggest (Cilium)",
        "suggest --format both --l7",
        f"replay {REPLAY_POLICIES} policies",
    }
    assert all(f["value"] > 0 and f["unit"] == "s" for f in figures.values())
    assert (
        figures["suggest (Cilium)"]["target"] == 20.0 and "3,000 flows" in figures["suggest (Cilium)"]["note"]
    )
    assert "0 would break" in figures[f"replay {REPLAY_POLICIES} policies"]["note"]
    # the simulated dataset is kept in the work folder and reused by the next run of the same size
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "reusing 3,000 simulated flows" in again.stderr


def test_delta_section(tmp_path: Path) -> None:
    args = ["bench", "--flows", "300", "--only", "delta", "--workdir", str(tmp_path), "--format", "json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (figure,) = json.loads(result.stdout)
    assert figure["name"] == f"replay --baseline, {REPLAY_POLICIES} policies a side"
    assert figure["target"] == 10.0 and figure["value"] > 0
    # the proposed change breaks something, and the renamed policy is no rule change of its own
    assert re.search(r"[1-9][0-9,]* newly denied in [1-9]", figure["note"]), figure["note"]

"""The `scale` and `compaction` sections of `flowpipe bench`, run small: their figures are there and hold up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowpipe.bench import scale as bench_scale
from flowpipe.bench.scale import COMPACTION_FACTOR, SCALE_FACTORS
from flowpipe.cli import cli


def test_scale_and_compaction_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flows = 400
    monkeypatch.setattr(bench_scale, "COMPACTION_MIN_ROWS_PER_FILE", 100)  # 4,000 flows in 40 files
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--flows",
            str(flows),
            "--only",
            "scale,compaction",
            "--workdir",
            str(tmp_path),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = {f["name"]: f for f in json.loads(result.stdout)}
    sizes = [name for name in figures if name.startswith("bytes on disk at ")]
    assert len(sizes) == len(SCALE_FACTORS)
    assert [figures[name]["value"] for name in sizes] == sorted(figures[name]["value"] for name in sizes)
    assert figures["top_talkers at 20k"]["value"] > 0 and figures["top_talkers at 0.4k"]["unit"] == "s"
    assert figures["rows after"]["value"] == COMPACTION_FACTOR * flows
    assert figures["part files before"]["value"] >= 40 > figures["part files after"]["value"]
    compaction = figures[f"compact {COMPACTION_FACTOR * flows / 1e3:g}k flows"]
    assert compaction["target"] == 60.0 and compaction["value"] > 0

"""The code base stays as the next engineer expects it: ruff's lint rules and formatting (pyproject.toml).

ruff is pinned in the dev extra, so every machine that runs the tests judges the code with the same rules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ["flowpipe", "tests", "scripts"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", *CODE],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )


def test_ruff_finds_nothing_to_fix() -> None:
    done = ruff("check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_file_is_formatted() -> None:
    done = ruff("format", "--check")
    assert done.returncode == 0, done.stdout + done.stderr

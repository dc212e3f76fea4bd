"""Shared fixtures: the real Hubble captures in ../shared, external binaries, temporary datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_HUBBLE = ROOT.parent / "shared" / "data" / "hubble"
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas" / "cilium"

# CI sets this so that a test needing an external binary fails instead of skipping when it is missing.
REQUIRE_EXTERNAL = os.environ.get("FLOWPIPE_REQUIRE_EXTERNAL", "") not in ("", "0", "false")


def require_binary(name: str) -> str:
    """The path of an external program; skips the test without it (fails it in CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/install-system-deps installs it)"
        if REQUIRE_EXTERNAL:
            pytest.fail(message + "; FLOWPIPE_REQUIRE_EXTERNAL is set", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def hubble_captures() -> Path:
    """The folder of real Hubble captures; skips cleanly where ../shared is absent."""
    if not SHARED_HUBBLE.is_dir():
        pytest.skip("real Hubble captures (../shared/data/hubble) are not present")
    return SHARED_HUBBLE


@pytest.fixture(scope="session")
def capture_files(hubble_captures: Path) -> list[Path]:
    """Every capture file with flows in it (README files excluded)."""
    return sorted(p for p in hubble_captures.rglob("*") if p.is_file() and p.name != "README.md")


@pytest.fixture(scope="session")
def cilium_schemas() -> Path:
    """The CiliumNetworkPolicy schemas; skips cleanly where ../shared is absent."""
    if not SHARED_SCHEMAS.is_dir():
        pytest.skip("Cilium policy schemas (../shared/schemas/cilium) are not present")
    return SHARED_SCHEMAS

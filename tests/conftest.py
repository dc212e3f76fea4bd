"""Shared fixtures: the real Hubble captures in ../shared, external binaries, temporary datasets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_HUBBLE = ROOT.parent / "shared" / "data" / "hubble"
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas" / "cilium"
SHARED_ISTIO_SCHEMAS = ROOT.parent / "shared" / "schemas" / "istio"

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


@pytest.fixture(scope="session")
def istio_schemas() -> Path:
    """Istio's AuthorizationPolicy CRD schema; skips cleanly where ../shared is absent."""
    if not SHARED_ISTIO_SCHEMAS.is_dir():
        pytest.skip("Istio policy schemas (../shared/schemas/istio) are not present")
    return SHARED_ISTIO_SCHEMAS


@pytest.fixture(scope="session")
def sim_faults(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small simulated dataset (about 30,000 flows) with every fault on, and its ground truth."""
    from _sim_dataset import build_sim_dataset

    return build_sim_dataset(tmp_path_factory.mktemp("sim-faults"), faults=True)


@pytest.fixture(scope="session")
def sim_clean(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same simulated cluster and seed with every fault off."""
    from _sim_dataset import build_sim_dataset

    return build_sim_dataset(tmp_path_factory.mktemp("sim-clean"), faults=False)


@contextmanager
def small_tmpfs(parent: Path, size: str) -> Iterator[Path]:
    """A real size-limited tmpfs (e.g. size="1m") mounted under `parent` for a disk-full test; skips where
    mounting is not permitted (needs root and mount(8) on Linux)."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None or not sys.platform.startswith("linux"):
        pytest.skip("mounting a size-limited tmpfs needs root and mount(8) on Linux")
    target = parent / "small"
    target.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], check=False, capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run([umount, "-l", str(target)], check=False)

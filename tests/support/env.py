"""Where the tests find things (the repository, the real captures and schemas beside it) and what they need from
the machine (external programs, a size-limited tmpfs); each skips cleanly where something is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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

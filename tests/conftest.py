"""Shared fixtures: the real Hubble captures in ../shared, external binaries, temporary datasets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.env import SHARED_HUBBLE, SHARED_ISTIO_SCHEMAS, SHARED_SCHEMAS
from support.rollups import write_two_clusters
from support.s3 import s3_endpoint  # noqa: F401 - the local S3 server, a fixture of every test that asks for it


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
    from support.sim_dataset import build_sim_dataset

    return build_sim_dataset(tmp_path_factory.mktemp("sim-faults"), faults=True)


@pytest.fixture(scope="session")
def sim_clean(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same simulated cluster and seed with every fault off."""
    from support.sim_dataset import build_sim_dataset

    return build_sim_dataset(tmp_path_factory.mktemp("sim-clean"), faults=False)


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two clusters, two writers each, small part files (many per hour), over an hour boundary."""
    return write_two_clusters(tmp_path_factory.mktemp("rollups-sim"))


@pytest.fixture(autouse=True)
def s3_flags_of_one_test() -> Iterator[None]:
    """A command run in-process with `--s3-endpoint` sets the process's S3 flags (`set_s3_options`): put them
    back after each test, so a later module's server is reached through its own environment."""
    yield
    from flowpipe.dataset.storage import set_s3_options

    set_s3_options()


# The longest module (one SparkSession, every question on it), started first: with the suite on two workers
# (`make test`: `-n 2 --dist loadfile --no-loadscope-reorder`), one worker runs it while the other takes the rest.
LONGEST_FIRST = ("test_spark.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the longest modules to the front (a stable sort: the order within each module is kept)."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)

"""Which part files a reader sees: every visible file of a table, minus the inputs a compacted file already holds.

What a reader sees: between the publish and the last delete, a compacted file and (some of) its inputs are
both present. `visible_part_files` (what the DuckDB and Spark engines read) therefore leaves out every file
that a present compacted file lists as an input, so a query sees each row exactly once at every moment, and a
crash between the two steps leaves nothing visible twice (the next run deletes those inputs). A query whose
file list was taken before compaction and which then finds a file gone lists again and retries once (the
engines do that). Tools that read the folders directly (Trino, a plain `spark.read.parquet`) do not know the
marker and can count the rows of a compacted hour twice for the moment between publish and delete.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from flowpipe.dataset.layout import COMPACTED_PREFIX, Dataset
from flowpipe.errors import DatasetWriteError

log = logging.getLogger(__name__)

COMPACTED_FROM_KEY = b"flowpipe.compacted_from"
"""Parquet metadata key of a compacted file: JSON `[[input name, rows], ...]`, in the order of its rows."""


def is_compacted_name(name: str) -> bool:
    """True for the base name of a compacted file."""
    return name.startswith(COMPACTED_PREFIX) and name.endswith(".parquet")


def compacted_inputs(metadata: Mapping[bytes, bytes] | None) -> list[tuple[str, int]] | None:
    """The `(input name, rows)` list in a Parquet file's key-value metadata (`pq.FileMetaData.metadata`);
    None for a file that is not a compacted file."""
    if not metadata or COMPACTED_FROM_KEY not in metadata:
        return None
    try:
        value = json.loads(metadata[COMPACTED_FROM_KEY])
        return [(str(name), int(rows)) for name, rows in value]
    except (ValueError, TypeError) as exc:
        raise DatasetWriteError(f"unreadable {COMPACTED_FROM_KEY.decode()} metadata: {exc}", path="") from exc


def read_compacted_inputs(dataset: Dataset, path: str) -> list[tuple[str, int]] | None:
    """The inputs a compacted file lists (None when it lists none); FileNotFoundError if it is gone."""
    with dataset.filesystem.open_input_file(path) as handle:
        metadata = pq.read_metadata(handle).metadata
    return compacted_inputs(metadata)


def superseded_names(dataset: Dataset, folder: str, names: Iterable[str]) -> set[str]:
    """The names among `names` (the files of one partition folder) that a reader must leave out.

    These are the inputs listed by a compacted file in the folder (present after a compaction published its
    file but before it deleted them, or after a crash between the two), and a compacted file that vanished
    while being looked at. Only folders with a compacted file and at least one other file cost a footer read.
    """
    present = set(names)
    compacted = sorted(name for name in present if is_compacted_name(name))
    if not compacted or len(present) < 2:
        return set()
    claims: dict[str, set[str]] = {}
    dropped: set[str] = set()
    for name in compacted:
        try:
            inputs = read_compacted_inputs(dataset, f"{folder}/{name}")
        except FileNotFoundError:
            dropped.add(name)
            continue
        except (OSError, pa.ArrowException) as exc:
            raise DatasetWriteError(f"cannot read {folder}/{name}: {exc}", path=f"{folder}/{name}") from exc
        claims[name] = {input_name for input_name, _ in inputs or []}
    listed = set().union(*claims.values()) if claims else set()
    dropped |= listed & present
    # Two surviving compacted files that claim the same input can only come from two compactions that ran at
    # once (the lock prevents it): keep the first by name so that no row is counted twice.
    taken: set[str] = set()
    for name in compacted:
        if name in dropped or name not in claims:
            continue
        if claims[name] & taken:
            log.warning("%s/%s claims inputs of another compacted file; left out", folder, name)
            dropped.add(name)
            continue
        taken |= claims[name]
    return dropped


def drop_superseded(dataset: Dataset, paths: Iterable[str]) -> list[str]:
    """`paths` without the files a reader must leave out (see `superseded_names`), order kept."""
    paths = list(paths)
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].append(name)
    dropped: set[str] = set()
    for folder, names in by_folder.items():
        dropped |= {f"{folder}/{name}" for name in superseded_names(dataset, folder, names)}
    return [path for path in paths if path not in dropped]


def visible_part_files(dataset: Dataset, table: str) -> list[str]:
    """The part files of `table` a query reads: every visible file, minus inputs already compacted."""
    return drop_superseded(dataset, dataset.list_part_files(table))

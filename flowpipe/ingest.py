"""File ingest as a library call: Hubble JSON files → file source → pipeline → Parquet sink → dataset.

The file source's checkpoint lives in the dataset (`<root>/_state/files.json`), so ingesting the same file into
the same dataset twice adds nothing the second time, and an interrupted ingest resumes where it stopped.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset import Dataset, StateFile
from flowpipe.model import EventBatch
from flowpipe.pipeline import PipelineResult, run_pipeline
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import FileSource

MAX_SAMPLES = 5
"""How many skipped-line messages (file:line: why) an ingest keeps for its summary."""

CHECKPOINT_STATE = "files.json"
"""Name of the file source's checkpoint in the dataset's `_state/` folder."""


@dataclass(slots=True)
class IngestResult:
    """What an ingest did: the pipeline's counts, flows by verdict, and the file source's own summary."""

    pipeline: PipelineResult
    flows_by_verdict: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_samples: list[str] = field(default_factory=list)
    source_summary: Any = None


def ingest_files(
    paths: Sequence[str | Path],
    sink_config: ParquetSinkConfig,
    *,
    strict: bool = False,
    cluster_name: str | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable[[EventBatch], None] | None = None,
    pipeline_config: PipelineConfig | None = None,
) -> IngestResult:
    """Ingest Hubble JSON files (`-` is stdin) into the dataset at `sink_config.path`.

    >>> ingest_files(["flows.json"], ParquetSinkConfig(path="flowpipe-data")).pipeline.flows  # doctest: +SKIP
    """
    dataset = Dataset(sink_config.path)
    checkpoint = (
        dataset.local_path(dataset.state_path(CHECKPOINT_STATE))
        if dataset.is_local
        else StateFile(dataset, CHECKPOINT_STATE)  # an object store: read and written through pyarrow
    )
    source = FileSource(
        [str(p) for p in paths], strict=strict, checkpoint_path=checkpoint, cluster_name=cluster_name
    )
    sink = ParquetSink(sink_config, dataset=dataset)
    verdicts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    samples: list[str] = []

    def count(batch: EventBatch) -> None:
        if batch.flows.num_rows:
            for item in pc.value_counts(batch.flows.column("verdict")).to_pylist():
                verdicts[item["values"] or "VERDICT_UNKNOWN"] += item["counts"]
        for error in batch.decode_errors:
            skipped[getattr(error, "reason", type(error).__name__)] += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(str(error))
        if on_batch is not None:
            on_batch(batch)

    result = run_pipeline(source, [sink], config=pipeline_config, stop=stop, on_batch=count)
    summary = getattr(source, "summary", None)
    return IngestResult(result, dict(verdicts), dict(skipped), samples, summary)

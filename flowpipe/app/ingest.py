"""File ingest as a library call: Hubble JSON files → file source → pipeline → Parquet sink → dataset.

The file source's checkpoint lives in the dataset (`<root>/_state/files/`, one document per file content), so
ingesting the same file into the same dataset twice adds nothing the second time, and an interrupted ingest
resumes where it stopped. Several ingests may write into one dataset at once, each on its own files: each takes
a lease claiming its input files (by content) before it reads anything, and one whose file another running
ingest holds is refused, naming that process (`flowpipe.dataset.leases`).

`IngestResult` accounts for every line the run read: flows stored (by verdict), `lost_events` records (by
source), the events that are counted but not stored (`node_status`, agent, debug), lines skipped (by reason),
lines skipped because an earlier run already stored them, and flows left out because the dataset already held a
flow with the same uuid (`flowpipe.dataset.stored_flows`: overlapping captures store each flow once). Only batches that reached the dataset are counted, so
after a stop the counts say what was stored, and the next run counts the rest.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from flowpipe.config import ParquetSinkConfig, PipelineConfig
from flowpipe.dataset.layout import Dataset
from flowpipe.dataset.leases import Lease, take_lease
from flowpipe.dataset.stored_flows import StoredFlows
from flowpipe.errors import ConfigError, DatasetWriteError, FlowDecodeError, SourceError
from flowpipe.model import EventBatch
from flowpipe.pipeline import PipelineResult, run_pipeline
from flowpipe.sinks.parquet import ParquetSink
from flowpipe.sources.file import REASON_UNKNOWN_EVENT, FileIngestSummary, FileSource, input_claims
from flowpipe.sources.file._state import FilePosition, StateFolder

log = logging.getLogger(__name__)

MAX_SAMPLES = 5
"""How many skipped-line messages (file:line: why) an ingest keeps for its summary."""

CHECKPOINT_STATE = "files"
"""Name of the file source's checkpoint folder in the dataset's `_state/` (`files.json` of earlier versions is
read too)."""

# Counts of the file source's summary that its batches do not carry (taken per batch from the summary).
_AGENT = "agent_events"
_DEBUG = "debug_events"
_UNKNOWN = "unknown_events"
_ALREADY = "lines_already_ingested"


@dataclass(slots=True)
class IngestResult:
    """What an ingest stored and counted, for every line it read.

    `skipped_by_reason` includes `unknown_event` (valid JSON of no event kind flowpipe reads); `skipped_samples`
    holds the first few `file:line: why` messages of lines that could not be decoded.
    """

    pipeline: PipelineResult
    flows_by_verdict: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_samples: list[str] = field(default_factory=list)
    source_summary: FileIngestSummary | None = None
    """The file source's own summary: everything it read, including batches a stop left unstored."""
    lost_events_by_source: dict[str, int] = field(default_factory=dict)
    """`lost_events` records by source (HUBBLE_RING_BUFFER, ...); they are stored in the `lost_events` table."""
    events_lost_by_source: dict[str, int] = field(default_factory=dict)
    """Sum of `num_events_lost` of those records, by source."""
    node_status: int = 0
    agent_events: int = 0
    debug_events: int = 0
    lines_already_ingested: int = 0
    """Lines skipped because the checkpoint says an earlier run stored them."""
    flows_already_stored: int = 0
    """Flows read but not stored because the dataset already held a flow with their uuid (overlapping captures,
    or repeated earlier in this run's input)."""
    unreadable_files: list[str] = field(default_factory=list)
    """One message per input from which nothing could be read (every line skipped): the ingest failed for it."""
    stored_up_to: dict[str, int] = field(default_factory=dict)
    """Per input path, the line (or JSON array item) up to which this run's batches reached the dataset."""

    @property
    def lines_read(self) -> int:
        """Lines (or array items) this run read and accounted for, not counting those already ingested."""
        return (
            self.pipeline.flows
            + sum(self.lost_events_by_source.values())
            + self.node_status
            + self.agent_events
            + self.debug_events
            + sum(self.skipped_by_reason.values())
            + self.flows_already_stored
        )


class _AccountedSource:
    """Wraps the file source to tell which of its summary's counts came with which batch.

    The source updates its summary just before yielding a batch, in the thread that iterates `batches()`; the
    difference of the counts the batch itself does not carry is kept per batch until the consumer takes it.
    Flows the dataset already holds (same uuid) are left out of each batch here, in that thread too.
    """

    def __init__(self, source: FileSource, stored: StoredFlows) -> None:
        self.source = source
        self.stored = stored
        self.per_batch: dict[int, Counter[str]] = {}
        self.trailing: Counter[str] | None = None
        """Counts after the last batch (lines already ingested of a file with nothing new); None if not ended."""

    def _counts(self) -> Counter[str]:
        summary = self.source.summary
        return Counter(
            {
                _AGENT: summary.agent_events,
                _DEBUG: summary.debug_events,
                _UNKNOWN: summary.lines_skipped[REASON_UNKNOWN_EVENT],
                _ALREADY: summary.lines_already_ingested,
            }
        )

    def batches(self) -> Iterator[EventBatch]:
        last = self._counts()
        for batch in self.source.batches():
            now = self._counts()
            self.per_batch[id(batch)] = now - last
            last = now
            yield self.stored.skip_stored(batch)
        self.trailing = self._counts() - last

    def take(self, batch: EventBatch) -> Counter[str]:
        """The summary counts that came with `batch` (once)."""
        return self.per_batch.pop(id(batch), Counter())

    def commit(self, position: object) -> None:
        self.source.commit(position)

    def commit_many(self, positions: Sequence[object]) -> None:
        self.source.commit_many(positions)  # one checkpoint write per flush, not one per block

    def close(self) -> None:
        self.source.close()


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

    Raises ConfigError before reading anything when the dataset location cannot be a dataset folder. When the
    source fails (with `strict`, at the first bad line) the error names the file and line and says what this
    run had already stored: that stays in the dataset and is not added again by the next run.

    >>> ingest_files(["flows.json"], ParquetSinkConfig(path="flowpipe-data")).pipeline.flows  # doctest: +SKIP
    """
    dataset = Dataset(sink_config.path)
    check_dataset_location(dataset)
    lease = take_lease(
        dataset,
        "ingest",
        input_claims([str(p) for p in paths]),
        writer_id=sink_config.writer_id,
        advice="ingest each file once at a time (run this again once that ingest ended: what it stored is skipped)",
    )
    try:
        return _ingest(
            dataset, lease, paths, sink_config, strict, cluster_name, stop, on_batch, pipeline_config
        )
    finally:
        lease.release()


def _ingest(
    dataset: Dataset,
    lease: Lease,
    paths: Sequence[str | Path],
    sink_config: ParquetSinkConfig,
    strict: bool,
    cluster_name: str | None,
    stop: threading.Event | None,
    on_batch: Callable[[EventBatch], None] | None,
    pipeline_config: PipelineConfig | None,
) -> IngestResult:
    removed = dataset.clean_temp_files(writer_ids=lease.dead_writers)  # left by ingests that died
    if removed:
        log.warning(
            "removed %d temporary file(s) left by a writer that died: %s", len(removed), ", ".join(removed)
        )
    # the rollups of flow files published by writers that died before writing them
    if sink_config.edge_rollups:
        from flowpipe.dataset.rollups.build import repair_writers

        repair_writers(dataset, lease.dead_writers)
    checkpoint = StateFolder(dataset, CHECKPOINT_STATE)
    source = FileSource(
        [str(p) for p in paths], strict=strict, checkpoint_path=checkpoint, cluster_name=cluster_name
    )
    accounted = _AccountedSource(source, StoredFlows.for_writer(dataset, sink_config, pipeline_config))
    sink = ParquetSink(sink_config, dataset=dataset)
    verdicts: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    samples: list[str] = []
    lost_records: Counter[str] = Counter()
    events_lost: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    node_status = 0
    already_stored = 0
    stored_up_to: dict[str, int] = {}
    arrays: set[str] = set()

    def count(batch: EventBatch) -> None:
        nonlocal node_status, already_stored
        already_stored += batch.flows_already_stored
        if batch.flows.num_rows:
            for item in pc.value_counts(batch.flows.column("verdict")).to_pylist():
                verdicts[item["values"] or "VERDICT_UNKNOWN"] += item["counts"]
        for lost in batch.lost_events:
            lost_records[lost.source] += 1
            events_lost[lost.source] += lost.num_events_lost
        node_status += batch.node_status
        counted.update(accounted.take(batch))
        for error in batch.decode_errors:
            skipped[getattr(error, "reason", type(error).__name__)] += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(str(error))
        if isinstance(batch.position, FilePosition):
            where = batch.position.path
            stored_up_to[where] = max(stored_up_to.get(where, 0), batch.position.records)
            if not batch.position.offset:  # a JSON array: records are its items (no byte offsets)
                arrays.add(where)
        if on_batch is not None:
            on_batch(batch)

    def outcome(pipeline: PipelineResult) -> IngestResult:
        if accounted.trailing is not None:
            counted.update(accounted.trailing)
        if counted[_UNKNOWN]:
            skipped[REASON_UNKNOWN_EVENT] += counted[_UNKNOWN]
        return IngestResult(
            pipeline,
            flows_by_verdict=dict(verdicts),
            skipped_by_reason=dict(skipped),
            skipped_samples=samples,
            source_summary=source.summary,
            lost_events_by_source=dict(lost_records),
            events_lost_by_source=dict(events_lost),
            node_status=node_status,
            agent_events=counted[_AGENT],
            debug_events=counted[_DEBUG],
            lines_already_ingested=counted[_ALREADY],
            flows_already_stored=already_stored,
            unreadable_files=list(source.summary.unreadable),
            stored_up_to=stored_up_to,
        )

    try:
        result = run_pipeline(accounted, [sink], config=pipeline_config, stop=stop, on_batch=count)
    except SourceError as exc:
        # The pipeline stored and checkpointed every batch before the error; say so, with the error's place.
        stored = outcome(PipelineResult(flows=sum(verdicts.values())))
        raise _with_what_was_stored(exc, stored, strict=strict, arrays=arrays) from exc
    return outcome(result)


def check_dataset_location(dataset: Dataset) -> None:
    """Raise ConfigError when a local dataset root is a file, or cannot be created or written.

    Checked before any input is read, so a wrong `--dataset` fails at once instead of at the first flush.
    """
    if not dataset.is_local:
        return
    root = Path(dataset.root)
    try:
        os.stat(root)
    except (FileNotFoundError, NotADirectoryError):  # said below, with what to do
        pass
    except OSError as exc:  # a name too long, a loop of links: nothing can be stored there
        raise DatasetWriteError(
            f"dataset {root} cannot be used: {exc.strerror or exc}", path=str(root)
        ) from exc
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"dataset {root} is a file, not a dataset folder: point --dataset / FLOWPIPE_DATASET at a folder "
            "(it is created if missing)"
        )
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"dataset {root} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == root else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"dataset {root} {what}")


def _with_what_was_stored(
    exc: SourceError, stored: IngestResult, *, strict: bool, arrays: set[str]
) -> SourceError:
    """`exc` with a note saying what this run stored before it (kept, and not added twice by the next run)."""
    failed = exc.path if isinstance(exc, FlowDecodeError) else None
    if isinstance(exc, FlowDecodeError):
        where = f"{exc.path}:{exc.line_number}" if exc.line_number is not None else exc.path
        stopped = f"--strict stopped the ingest at {where}" if strict else f"the ingest stopped at {where}"
        again = "fix or remove that line" + (", or run without --strict to skip it" if strict else "")
    else:
        stopped, again = "the ingest stopped at this error", "fix its cause and run the same command again"
    parts = [
        f"{path} up to {'item' if path in arrays else 'line'} {upto:,}"
        for path, upto in stored.stored_up_to.items()
        if upto
    ]
    if parts and failed is not None and not stored.stored_up_to.get(failed):
        parts.append(f"nothing of {failed}")
    if parts:
        lost = sum(stored.lost_events_by_source.values())
        what = (
            f"stored before it and kept: {plural(stored.pipeline.flows, 'flow')}, "
            f"{plural(lost, 'lost event record')}, from {', '.join(parts)}"
        )
    else:
        what = "nothing was stored by this run"
    note = f"{stopped}; {what}. To go on, {again} (what is already stored is not added twice)."
    if isinstance(exc, FlowDecodeError):
        message = str(exc).removeprefix(f"{where}: ")
        return FlowDecodeError(
            f"{message}\n{note}", path=exc.path, line_number=exc.line_number, reason=exc.reason
        )
    return SourceError(f"{exc}\n{note}")


def plural(count: int, noun: str) -> str:
    """`1 record`, `2 records`, `1,000 records` (the noun's last word takes the `s`)."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")

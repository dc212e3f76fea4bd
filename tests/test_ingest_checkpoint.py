"""Ingest writes the file checkpoint once per flush of the sink, not once per block read."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowpipe.app.ingest
from flowpipe.app.ingest import ingest_files
from flowpipe.bench.data import write_synthetic_jsonpb
from flowpipe.config import ParquetSinkConfig
from flowpipe.sources.file._state import FileState


def test_one_checkpoint_write_per_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "flows.jsonpb"
    stats = write_synthetic_jsonpb(source, 3000)
    original_init = flowpipe.app.ingest.FileSource.__init__

    def small_blocks(self: flowpipe.app.ingest.FileSource, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **{**kwargs, "block_bytes": 64 * 1024})  # type: ignore[arg-type]

    saves: list[int] = []
    original_save = FileState._save

    def counted_save(self: FileState) -> None:
        saves.append(1)
        original_save(self)

    monkeypatch.setattr(flowpipe.app.ingest.FileSource, "__init__", small_blocks)
    monkeypatch.setattr(FileState, "_save", counted_save)
    result = ingest_files([source], ParquetSinkConfig(path=str(tmp_path / "data"), max_batch_rows=1000))
    assert result.pipeline.flows == stats.flows
    assert result.pipeline.batches > 40  # about 5 MB in blocks of 64 KiB
    assert 1 <= len(saves) <= 5  # one per flush of 1000 rows, not one per block
    again = ingest_files([source], ParquetSinkConfig(path=str(tmp_path / "data")))
    assert again.pipeline.flows == 0  # the single writes recorded every block

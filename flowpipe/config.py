"""Configuration of each component: frozen dataclasses with defaults, unit-suffixed fields and validation.

Every field carries its help text in `metadata["help"]`: the CLI options and the README use it, and a test
checks that no field lacks it. Library code takes these objects; only the CLI builds them from flags and
environment variables.
"""

from __future__ import annotations

import re
import secrets
import socket
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from flowpipe.errors import ConfigError

DEFAULT_DATASET = "flowpipe-data"

_WRITER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_writer_id(writer_id: str) -> str:
    """Return `writer_id` if it can be part of a file name, else raise `ConfigError`."""
    if not _WRITER_ID_RE.match(writer_id):
        raise ConfigError(
            f"writer id {writer_id!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return writer_id


def default_writer_id() -> str:
    """A writer id unique to this process: the host name (cleaned, shortened) and 8 random hex digits."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.")[:40] or "flowpipe"
    return f"{host}-{secrets.token_hex(4)}"


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not value > 0:
            raise ConfigError(f"{type(owner).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ParquetSinkConfig:
    """How the Parquet sink batches flows into part files."""

    path: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Dataset root: a local folder, or s3://bucket/prefix."},
    )
    writer_id: str = field(
        default_factory=default_writer_id,
        metadata={
            "help": "Id of this writer in part-file names; unique among writers running on one dataset "
            "(default: host name and a random suffix)."
        },
    )
    max_batch_rows: int = field(
        default=200_000,
        metadata={"help": "Flush the open batch into part files once it holds this many flows."},
    )
    max_batch_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "Flush the open batch once its flows amount to this many bytes (in Arrow form)."},
    )
    flush_interval_seconds: float = field(
        default=60.0,
        metadata={"help": "Flush the open batch at least this often, however small it is."},
    )
    row_group_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={
            "help": "Write a partition's buffered flows to its open part file as a row group once they take "
            "this many bytes in memory (bounds the sink's memory)."
        },
    )
    zstd_level: int = field(
        default=3,
        metadata={"help": "zstd compression level of part files (1 fastest .. 22 smallest)."},
    )
    edge_rollups: bool = field(
        default=False,
        metadata={
            "help": "Build each flow part file's edge rollup (`<dataset>/edges/`) once it is published, for "
            "edge questions over months (see `flowpipe rollup`), in a background thread at the lowest CPU "
            "priority: building a rollup costs more CPU than writing its flows, so it takes what the writer "
            "leaves and trails a writer that uses every core (hours are read from flows until their rollups "
            "exist). Off by default."
        },
    )

    def __post_init__(self) -> None:
        _positive(self, "max_batch_rows", "max_batch_bytes", "row_group_bytes", "flush_interval_seconds")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"ParquetSinkConfig.zstd_level must be 1..22, got {self.zstd_level}")
        if not self.path:
            raise ConfigError("ParquetSinkConfig.path must not be empty")
        check_writer_id(self.writer_id)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """How batches move from a source to the sinks."""

    buffer_batches: int = field(
        default=4,
        metadata={"help": "Batches the buffer between source and sinks holds; when full, the source waits."},
    )
    poll_interval_seconds: float = field(
        default=0.5,
        metadata={"help": "How often sinks are asked to flush batches that reached their age limit."},
    )
    stop_timeout_seconds: float = field(
        default=10.0,
        metadata={"help": "On stop, how long to wait for the source to hand over its current batch."},
    )

    def __post_init__(self) -> None:
        _positive(self, "buffer_batches", "poll_interval_seconds", "stop_timeout_seconds")


def field_defaults(config_class: type) -> dict[str, Any]:
    """Field name → default value of a config dataclass (fields without a default left out): the CLI's
    defaults, so that each is written once."""
    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


def field_help(config_class: type) -> dict[str, str]:
    """Field name → help text of a config dataclass (empty string where help is missing)."""
    return {f.name: str(f.metadata.get("help", "")) for f in fields(config_class)}

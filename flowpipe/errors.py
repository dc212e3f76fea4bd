"""The exception hierarchy of flowpipe, and the boundary translators that map foreign errors into it.

```
FlowpipeError                      base; the CLI catches exactly this and exits 1 with str(exc)
├── ConfigError                    bad flags or values; raised before anything starts
├── SourceError                    stage = receiving
│   ├── RelayError                 .address, .code (grpc.StatusCode name)
│   │   └── RelayUnavailableError  retryable (UNAVAILABLE, DEADLINE_EXCEEDED); the source backs off
│   └── FlowDecodeError            .path, .line_number, .reason; per record, normally counted
├── SinkError                      stage = sending
│   └── DatasetWriteError          .path; disk I/O on flush is fatal
├── QueryError                     .question, .sql; wraps duckdb.Error
│   ├── EmptyDatasetError          the dataset holds no flows yet
│   ├── UnknownQuestionError       .name, .available (close matches)
│   ├── QuestionParameterError     missing or unexpected parameters
│   └── QuestionDefinitionError    .path, .line_number; a question file breaks the header format
├── PolicyError
│   ├── PolicyParseError           .path, .document_index
│   └── DraftRefusedError          .edges; a draft's replay denies requests it was built from
└── ObserverServerError            the built-in Observer server cannot start or was given unusable flows
```

Library code raises these; only `flowpipe.cli` turns them into exit codes. Foreign exceptions (grpc, duckdb,
pyarrow, yaml) are translated where the dependency is used, always with `raise ... from exc`.
"""

from __future__ import annotations

from collections.abc import Sequence


class FlowpipeError(Exception):
    """Base of every error flowpipe raises on purpose."""


class ConfigError(FlowpipeError):
    """A flag, environment variable or config value is invalid."""


class SourceError(FlowpipeError):
    """Reading events failed (stage `receiving`)."""


class RelayError(SourceError):
    """hubble-relay answered with an error, or is not a Hubble server."""

    def __init__(self, message: str, *, address: str, code: str | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.code = code


class RelayUnavailableError(RelayError):
    """The relay cannot be reached right now; retrying may help."""


class FlowDecodeError(SourceError):
    """One record could not be decoded. Carries where it came from and why."""

    def __init__(self, message: str, *, path: str, line_number: int | None, reason: str) -> None:
        where = f"{path}:{line_number}" if line_number is not None else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line_number = line_number
        self.reason = reason


class SinkError(FlowpipeError):
    """Writing a batch failed (stage `sending`)."""


class DatasetWriteError(SinkError):
    """A part file could not be written; nothing of that batch was acknowledged."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class QueryError(FlowpipeError):
    """A question or SQL statement failed."""

    def __init__(self, message: str, *, question: str | None = None, sql: str | None = None) -> None:
        super().__init__(message)
        self.question = question
        self.sql = sql


class EmptyDatasetError(QueryError):
    """The dataset has no flows yet, so there is nothing to query."""


class UnknownQuestionError(QueryError):
    """No question of that name exists in the catalog."""

    def __init__(self, name: str, available: Sequence[str], close: Sequence[str]) -> None:
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        super().__init__(
            f"unknown question {name!r}.{hint} (`flowpipe query --list` shows all {len(available)})",
            question=name,
        )
        self.name = name
        self.available = list(available)
        self.close = list(close)


class QuestionParameterError(QueryError):
    """A question was given an unknown parameter, lacks a required one, or got an invalid value."""


class QuestionDefinitionError(QueryError):
    """A question file is malformed: bad header, or `$name` tokens that differ from its `params:` line."""

    def __init__(self, message: str, *, path: str, line_number: int | None = None) -> None:
        where = f"{path}:{line_number}" if line_number else path
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line_number = line_number


class PolicyError(FlowpipeError):
    """A policy could not be drafted, loaded or evaluated."""


class PolicyParseError(PolicyError):
    """A policy file is not valid YAML or not a policy flowpipe understands."""

    def __init__(self, message: str, *, path: str, document_index: int | None = None) -> None:
        where = path if document_index is None else f"{path} (document {document_index + 1})"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.document_index = document_index


class DraftRefusedError(PolicyError):
    """A drafted policy set does not allow every request it was learned from, so it is not offered."""

    def __init__(self, message: str, *, edges: Sequence[str]) -> None:
        super().__init__(message)
        self.edges = list(edges)


class ObserverServerError(FlowpipeError):
    """The built-in Observer server cannot start (address in use, bad TLS files) or got unusable flows."""

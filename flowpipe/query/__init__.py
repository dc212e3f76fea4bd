"""Questions over the dataset: the SQL catalog, the DuckDB engine, and running a question with its parameters.

The names are loaded on first use, so that importing `flowpipe.query.catalog` (as `flowpipe query --list` does)
does not import DuckDB or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Catalog": "catalog",
    "Parameter": "catalog",
    "Question": "catalog",
    "RelativeTo": "catalog",
    "default_sql_dir": "catalog",
    "load_questions": "catalog",
    "DuckDBEngine": "engine",
    "Engine": "engine",
    "open_engine": "engine",
    "table_columns": "engine",
    "QuestionResult": "run",
    "run_question": "run",
    "parse_time": "timeparse",
}

__all__ = [
    "Catalog",
    "DuckDBEngine",
    "Engine",
    "Parameter",
    "Question",
    "QuestionResult",
    "RelativeTo",
    "default_sql_dir",
    "load_questions",
    "open_engine",
    "parse_time",
    "run_question",
    "table_columns",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowpipe.query' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flowpipe.query.{module}"), name)
    globals()[name] = value
    return value

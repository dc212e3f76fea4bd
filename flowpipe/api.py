"""The Python API for notebooks and scripts: open a dataset, ask a question, get an Arrow table or a pandas frame.

```python
import flowpipe

with flowpipe.open_dataset("flowpipe-data") as data:       # a folder or s3://bucket/prefix
    data.questions()                                         # ['cross_namespace', 'dns_failures', ...]
    drops = data.question("unexpected_drops", since="6h")    # a pyarrow.Table
    dns = data.frame("dns_failures", since="1d", namespace="shop")  # a pandas.DataFrame
    verdicts = data.sql("SELECT verdict, count(*) AS n FROM flows GROUP BY ALL")
```

It is the same path as `flowpipe query` and `flowpipe sql`: the questions of `sql/` with their parameters
checked and bound (never formatted into the SQL), relative times (`6h`) counted back from the clock unless the
dataset is older than the window (then from its newest flow; `relative_to="now"` or `"data"` chooses), and the
views `flows` and `lost_events` over the part files. Each call lists the part files again, so a notebook sees
what a collector wrote since, and reads every row once while `flowpipe compact` runs (files already merged into
a compacted file are left out), which reading the folders with another tool does not promise.

Errors are `flowpipe.FlowpipeError`s: `EmptyDatasetError` when the dataset holds no flows, `UnknownQuestionError`
and `QuestionParameterError` for a wrong name or parameter, `QueryError` when the SQL fails. pandas is needed only
for `frame()` and `sql_frame()` (`pip install 'flowpipe[pandas]'`).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from flowpipe.config import DEFAULT_DATASET
from flowpipe.query.catalog import Catalog, RelativeTo, load_questions

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from flowpipe.query.engine import DuckDBEngine


class FlowDataset:
    """A dataset opened for questions; use `open_dataset()` to make one, and `close()` it (or use `with`)."""

    def __init__(
        self,
        dataset: str | os.PathLike[str],
        *,
        sql_dir: str | os.PathLike[str] | None = None,
        require_flows: bool = True,
        external_access: bool = False,
    ) -> None:
        from flowpipe.query.engine import open_engine

        self.catalog: Catalog = load_questions(Path(sql_dir) if sql_dir is not None else None)
        self._engine: DuckDBEngine = open_engine(
            dataset, require_flows=require_flows, external_access=external_access
        )

    @property
    def location(self) -> str:
        """The dataset as it was named."""
        return self._engine.location

    def questions(self) -> list[str]:
        """The names of the questions that `question()` answers."""
        return [q.name for q in self.catalog]

    def describe(self, name: str) -> str:
        """A question's description and parameters (name, type, default), as `flowpipe query --list` shows."""
        question = self.catalog.question(name)
        parameters = ", ".join(p.describe() for p in question.parameters) or "none"
        return f"{question.name}: {question.description}\nparameters: {parameters}"

    def question(
        self,
        name: str,
        *,
        relative_to: RelativeTo = "auto",
        now: datetime | None = None,
        **params: object,
    ) -> pa.Table:
        """The rows of question `name` as an Arrow table; `params` are its parameters (`since="6h"`,
        `namespace="shop"`, `limit=10`), as strings or Python values."""
        from flowpipe.query.run import run_question

        self._engine.refresh()
        result = run_question(
            self._engine, self.catalog.question(name), params, relative_to=relative_to, now=now
        )
        return result.table

    def frame(self, name: str, **kwargs: Any) -> pd.DataFrame:
        """`question()` as a pandas DataFrame (timestamps in UTC)."""
        return self.question(name, **kwargs).to_pandas()

    def sql(self, statement: str, **params: object) -> pa.Table:
        """Any DuckDB statement over the views `flows` and `lost_events`, `$name` parameters bound from
        `params`; the result as an Arrow table."""
        self._engine.refresh()
        return self._engine.run(statement, params or None)

    def sql_frame(self, statement: str, **params: object) -> pd.DataFrame:
        """`sql()` as a pandas DataFrame."""
        return self.sql(statement, **params).to_pandas()

    def close(self) -> None:
        """Release the DuckDB connection."""
        self._engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FlowDataset({self.location!r})"


def open_dataset(
    dataset: str | os.PathLike[str] = DEFAULT_DATASET,
    *,
    sql_dir: str | os.PathLike[str] | None = None,
    require_flows: bool = True,
    external_access: bool = False,
) -> FlowDataset:
    """Open `dataset` (a folder or an object-store URL) for questions.

    `sql_dir` replaces the shipped questions with a folder of your own; `require_flows=False` opens a dataset
    that holds no flows yet (its questions return no rows) instead of raising `EmptyDatasetError`. SQL reads
    the dataset and nothing else, as `flowpipe sql` does; `external_access=True` lets it read and write other
    files and reach the network (`flowpipe sql --allow-external-access`).
    """
    return FlowDataset(dataset, sql_dir=sql_dir, require_flows=require_flows, external_access=external_access)

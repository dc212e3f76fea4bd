"""Questions over the dataset: the SQL catalog, the DuckDB engine, and running a question with its parameters."""

from flowpipe.query.catalog import Catalog, Parameter, Question, default_sql_dir, load_questions
from flowpipe.query.engine import DuckDBEngine, Engine, open_engine, table_columns
from flowpipe.query.run import QuestionResult, RelativeTo, run_question
from flowpipe.query.timeparse import parse_time

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

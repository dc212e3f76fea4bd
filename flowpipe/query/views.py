"""Shared SQL views (`sql/_views/*.sql`) and the `drop_reasons` table, created once on every query connection.

Questions share definitions that must not drift apart: above all a workload's display name and stable
identity (`flows_enriched`), and the class of each drop reason (`drop_reasons`, from `flowpipe.drop_reasons`).
They live here, not copied into each question.

A shared view is one file `sql/_views/NAME.sql` holding a single `SELECT`; the view is named after the file.
Its header is SQL line comments, like a question's:

```sql
-- description: What the view adds.
-- requires: flows_enriched            (optional: other shared views this one reads)
SELECT ... FROM flows ...
```

Views are created in dependency order (`requires:`), after the engine's own views `flows` and `lost_events`.
The SELECT is plain SQL that sqlglot can translate, so another engine (Spark) can create the same views with
`createOrReplaceTempView`. Views take no parameters: filters belong to the questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from flowpipe.drop_reasons import drop_reason_table
from flowpipe.errors import QueryError, QuestionDefinitionError

VIEWS_DIR_NAME = "_views"
DROP_REASONS_TABLE = "drop_reasons"
_FIELD = re.compile(r"^--\s?(description|requires)\s*:(.*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class SharedView:
    """One shared view: its name (file stem), description, the shared views it reads, and its SELECT."""

    name: str
    description: str
    requires: tuple[str, ...]
    sql: str
    path: Path | None = None


def default_views_dir() -> Path:
    """`_views/` inside the shipped question directory."""
    from flowpipe.query.catalog import default_sql_dir

    return default_sql_dir() / VIEWS_DIR_NAME


def parse_view(text: str, *, name: str, path: Path | None = None) -> SharedView:
    """Parse one shared view file; `QuestionDefinitionError` (file and line) when its header is wrong."""
    where = str(path) if path is not None else f"<view {name}>"
    if not _NAME.match(name):
        raise QuestionDefinitionError(f"view name {name!r} is not an SQL identifier", path=where)
    fields: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("--"):
            break
        match = _FIELD.match(line)
        if match is not None:
            if match.group(1) in fields:
                raise QuestionDefinitionError(f"header field {match.group(1)!r} appears twice", path=where,
                                              line_number=number)
            fields[match.group(1)] = match.group(2).strip()
    description = fields.get("description", "")
    if not description:
        raise QuestionDefinitionError("missing `-- description: ...` header line", path=where, line_number=1)
    requires = tuple(r.strip() for r in fields.get("requires", "").split(",") if r.strip())
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("--")).strip()
    if not body.lower().startswith(("select", "with")):
        raise QuestionDefinitionError("a shared view holds one SELECT (or WITH ... SELECT)", path=where)
    return SharedView(name=name, description=description, requires=requires, sql=body, path=path)


def load_views(directory: Path | str | None = None) -> list[SharedView]:
    """Every `*.sql` in `directory` (default: the shipped `sql/_views/`), in dependency order."""
    root = Path(directory) if directory is not None else default_views_dir()
    if not root.is_dir():
        return []
    views = {}
    for path in sorted(root.glob("*.sql")):
        if path.name.startswith((".", "_")):
            continue
        views[path.stem] = parse_view(path.read_text(encoding="utf-8"), name=path.stem, path=path)
    ordered: list[SharedView] = []
    visiting: set[str] = set()

    def visit(view: SharedView) -> None:
        if view in ordered:
            return
        if view.name in visiting:
            raise QuestionDefinitionError(f"shared view {view.name} requires itself (a cycle)", path=str(view.path))
        visiting.add(view.name)
        for required in view.requires:
            if required not in views:
                raise QuestionDefinitionError(
                    f"shared view {view.name} requires {required!r}, which is not in {root}", path=str(view.path)
                )
            visit(views[required])
        visiting.discard(view.name)
        ordered.append(view)

    for view in views.values():
        visit(view)
    return ordered


def install_views(con: duckdb.DuckDBPyConnection, directory: Path | str | None = None) -> list[str]:
    """Create `drop_reasons` and every shared view on `con` (which already has `flows`); returns their names."""
    created = [DROP_REASONS_TABLE]
    try:
        con.register(f"_flowpipe_{DROP_REASONS_TABLE}", drop_reason_table())
        con.execute(
            f'CREATE OR REPLACE TABLE "{DROP_REASONS_TABLE}" AS SELECT * FROM "_flowpipe_{DROP_REASONS_TABLE}"'
        )
        con.unregister(f"_flowpipe_{DROP_REASONS_TABLE}")
    except duckdb.Error as exc:
        raise QueryError(f"cannot create the table {DROP_REASONS_TABLE}: {exc}") from exc
    for view in load_views(directory):
        statement = f'CREATE OR REPLACE VIEW "{view.name}" AS\n{view.sql}'
        try:
            con.execute(statement)
        except duckdb.Error as exc:
            raise QueryError(f"shared view {view.name} ({view.path}) failed: {exc}", sql=statement) from exc
        created.append(view.name)
    return created

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

Fallback regions. Reading the `*_labels` list columns (a dozen strings per endpoint and flow), and even pod
names and addresses, costs more than everything else a question does, and a column referenced anywhere in a
view is read for every row, even when only a rare CASE branch uses it. These columns are needed only to name
what Cilium did not describe: a pod without a reported workload (old Cilium, an exporter field mask), or an
endpoint that is neither a pod nor a reserved identity by its number. So lines between `-- fallback: begin`
and `-- fallback: end` in a shared view may read them; when a cheap probe (`FALLBACK_NEEDED_SQL`, four narrow
columns per side) finds no such flow in the dataset, the view is created without those lines. Both forms give
the same rows on such a dataset: the regions only ever decide flows that the probe looks for. The probe runs
whenever the engine defines its views (on open and on `refresh()`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from flowpipe.drop_reasons import drop_reason_table
from flowpipe.errors import QueryError, QuestionDefinitionError
from flowpipe.query.catalog import default_sql_dir, parse_header

VIEWS_DIR_NAME = "_views"
DROP_REASONS_TABLE = "drop_reasons"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FALLBACK_REGION = re.compile(
    r"^[ \t]*-- fallback: begin[^\n]*\n.*?^[ \t]*-- fallback: end[^\n]*\n", re.MULTILINE | re.DOTALL
)


def undescribed_sql(side: str) -> str:
    """True for a flow whose end `side` (source, destination) only the fallback regions can name."""
    # What the fallback regions of `flows_enriched` decide: a pod without a workload name, or an endpoint whose
    # identity number is not one of: reserved 1-10, node-local (CIDR/FQDN) >= 2^24, a pod's cluster identity.
    identity = f"coalesce({side}_identity, 0)"
    return (
        f"({side}_workload_name IS NULL AND {side}_namespace IS NOT NULL)"
        f" OR NOT ({identity} BETWEEN 1 AND 10 OR {identity} >= 16777216"
        f" OR ({identity} >= 256 AND {side}_namespace IS NOT NULL))"
    )


FALLBACK_NEEDED_SQL = (
    "SELECT count(*) AS undescribed FROM (SELECT 1 FROM flows"
    f" WHERE {undescribed_sql('source')} OR {undescribed_sql('destination')} LIMIT 1) AS probe"
)
"""One row, one count: 1 when some flow needs the fallback regions to name its endpoints, else 0."""


class ReadableFiles(tuple[str, ...]):
    """What an engine setup that defines views over more of the dataset's local files (edge rollups) returns:
    those files stay readable once the engine's connection is locked (`flowpipe.query.engine`); any other
    return value allows nothing more."""

    __slots__ = ()


NAMED_VIEW = "flows_named"
_NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace="


def flows_named_sql(*, fallbacks: bool) -> str:
    """The view `flows_named`: every column of `flows`, with each endpoint's namespace taken from its labels
    where the record has labels but no namespace (a remote pod the observing node knew only by identity).

    Portable SQL with an explicit column list (Spark has no `* REPLACE`); without `fallbacks` (no flow needs
    it, see `FALLBACK_NEEDED_SQL`) it is `flows` as it is, so that questions do not read the labels.
    """
    from flowpipe.model import FLOW_SCHEMA

    columns = []
    for name in FLOW_SCHEMA.names:
        side = name.removesuffix("_namespace")
        if fallbacks and name.endswith("_namespace") and side in ("source", "destination"):
            columns.append(f"{_named_namespace(side)} AS {name}")
        else:
            columns.append(name)
    return "SELECT\n    " + ",\n    ".join(columns) + "\nFROM flows"


def _named_namespace(side: str) -> str:
    """The namespace `flows_named` gives one end: the record's, else (for a pod) that of its labels."""
    label = (
        f"nullif(regexp_extract(array_to_string({side}_labels, ' '), "
        f"'(?:^| )k8s:io\\.kubernetes\\.pod\\.namespace=([^ ]+)', 1), '')"
    )
    # Only for a cluster identity (a pod); reserved identities keep no namespace they do not name.
    return (
        f"coalesce({side}_namespace, CASE WHEN coalesce({side}_identity, 0) >= 256"
        f" AND coalesce({side}_identity, 0) < 16777216 THEN {label} END)"
    )


ENRICHED_VIEW = "flows_enriched"
_ENRICHED_FROM = "FROM flows_named AS f"


def enriched_sql(source: str) -> str:
    """The SELECT of `flows_enriched` (fallbacks included) over the relation `source` instead of the flows.

    The one definition of how a flow names its ends, applied to other rows: `source` has the columns of `flows`
    that the view reads (rows grouped by them name their ends as each of their flows would), and the view
    passes its other columns through. DuckDB SQL (`* REPLACE`), for DuckDB-only users such as replay's grouping.
    """
    view = next(v for v in load_views() if v.name == ENRICHED_VIEW)
    if view.sql.count(_ENRICHED_FROM) != 1:
        raise QuestionDefinitionError(
            f"shared view {ENRICHED_VIEW} reads its flows in one `{_ENRICHED_FROM}`", path=str(view.path)
        )
    named = (
        f"(SELECT r.* REPLACE ({_named_namespace('source')} AS source_namespace, "
        f"{_named_namespace('destination')} AS destination_namespace) FROM {source} AS r) AS f"
    )
    return view.sql.replace(_ENRICHED_FROM, f"FROM {named}")


@dataclass(frozen=True, slots=True)
class SharedView:
    """One shared view: its name (file stem), description, the shared views it reads, and its SELECT."""

    name: str
    description: str
    requires: tuple[str, ...]
    sql: str
    path: Path | None = None

    @property
    def sql_without_fallbacks(self) -> str:
        """The SELECT without its `-- fallback: begin` ... `-- fallback: end` regions."""
        return _FALLBACK_REGION.sub("", self.sql)


def default_views_dir() -> Path:
    """`_views/` inside the shipped question directory."""
    return default_sql_dir() / VIEWS_DIR_NAME


def parse_view(text: str, *, name: str, path: Path | None = None) -> SharedView:
    """Parse one shared view file; `QuestionDefinitionError` (file and line) when its header is wrong."""
    where = str(path) if path is not None else f"<view {name}>"
    if not _NAME.match(name):
        raise QuestionDefinitionError(f"view name {name!r} is not an SQL identifier", path=where)
    header = parse_header(text, where=where, fields_known=("description", "requires"))
    fields = {key: value for key, (value, _) in header.items()}
    description = fields.get("description", "")
    if not description:
        raise QuestionDefinitionError("missing `-- description: ...` header line", path=where, line_number=1)
    requires = tuple(r.strip() for r in fields.get("requires", "").split(",") if r.strip())
    lines = text.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("--")), None
    )
    body = "\n".join(lines[first:]).strip() + "\n" if first is not None else ""
    if not body.lower().startswith(("select", "with")):
        raise QuestionDefinitionError("a shared view holds one SELECT (or WITH ... SELECT)", path=where)
    if body.count("-- fallback: begin") != body.count("-- fallback: end"):
        raise QuestionDefinitionError(
            "unbalanced `-- fallback: begin` / `-- fallback: end` lines", path=where
        )
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
            raise QuestionDefinitionError(
                f"shared view {view.name} requires itself (a cycle)", path=str(view.path)
            )
        visiting.add(view.name)
        for required in view.requires:
            if required not in views:
                raise QuestionDefinitionError(
                    f"shared view {view.name} requires {required!r}, which is not in {root}",
                    path=str(view.path),
                )
            visit(views[required])
        visiting.discard(view.name)
        ordered.append(view)

    for view in views.values():
        visit(view)
    return ordered


def install_views(con: duckdb.DuckDBPyConnection, directory: Path | str | None = None) -> bool:
    """Create `drop_reasons` and every shared view on `con` (which already has `flows`); returns whether the
    views carry their fallback regions (some flow needs them: then `flows_enriched` joins `identity_workloads`
    on every flow, see `hold_identity_workloads`)."""
    try:
        con.register(f"_flowpipe_{DROP_REASONS_TABLE}", drop_reason_table())
        con.execute(
            f'CREATE OR REPLACE TABLE "{DROP_REASONS_TABLE}" AS SELECT * FROM "_flowpipe_{DROP_REASONS_TABLE}"'
        )
        con.unregister(f"_flowpipe_{DROP_REASONS_TABLE}")
    except duckdb.Error as exc:
        raise QueryError(f"cannot create the table {DROP_REASONS_TABLE}: {exc}") from exc
    try:
        fallbacks_needed = bool(con.execute(FALLBACK_NEEDED_SQL).fetchone()[0])  # type: ignore[index]
    except duckdb.Error as exc:
        raise QueryError(
            f"cannot probe the flows for undescribed endpoints: {exc}", sql=FALLBACK_NEEDED_SQL
        ) from exc
    named = flows_named_sql(fallbacks=fallbacks_needed)
    try:
        con.execute(f'CREATE OR REPLACE VIEW "{NAMED_VIEW}" AS\n{named}')
    except duckdb.Error as exc:
        raise QueryError(f"cannot create the view {NAMED_VIEW}: {exc}", sql=named) from exc
    for view in load_views(directory):
        select = view.sql if fallbacks_needed else view.sql_without_fallbacks
        statement = f'CREATE OR REPLACE VIEW "{view.name}" AS\n{select}'
        try:
            con.execute(statement)
        except duckdb.Error as exc:
            raise QueryError(f"shared view {view.name} ({view.path}) failed: {exc}", sql=statement) from exc
    return fallbacks_needed


IDENTITY_WORKLOADS_VIEW = "identity_workloads"
HELD_IDENTITY_WORKLOADS = "_identity_workloads_held"
NO_IDENTITY_WORKLOADS = "_identity_workloads_none"


def hold_identity_workloads(con: duckdb.DuckDBPyConnection) -> None:
    """Compute the view `identity_workloads` once and make it read its rows from a table.

    Its rows are one per pod identity, but DuckDB estimates a GROUP BY at the rows it reads, so it takes the
    view for the larger side of `LEFT JOIN identity_workloads` and builds that join's hash table over the flows,
    every column included: over ten million flows, some 9 GB, and "out of memory" under 3 GB (the flows, the
    probe side, need only a few MB). A table's rows are known, so the join is built over the identities. One
    scan of four narrow columns, where some view joins it on every flow or rollup row (the engine decides)."""
    try:
        con.execute(
            f'CREATE OR REPLACE TABLE "{HELD_IDENTITY_WORKLOADS}" AS SELECT * FROM "{IDENTITY_WORKLOADS_VIEW}"'
        )
        con.execute(
            f'CREATE OR REPLACE VIEW "{IDENTITY_WORKLOADS_VIEW}" AS SELECT * FROM "{HELD_IDENTITY_WORKLOADS}"'
        )
    except duckdb.Error as exc:
        raise QueryError(f"cannot compute the view {IDENTITY_WORKLOADS_VIEW}: {exc}") from exc


def unname_identities(con: duckdb.DuckDBPyConnection) -> None:
    """Make the view `identity_workloads` empty (its columns, no rows): pods known only by their identity stay
    unnamed, as rollups store them (their names are looked up over every rollup when read). Raises
    `duckdb.Error`."""
    con.execute(
        f'CREATE OR REPLACE TABLE "{NO_IDENTITY_WORKLOADS}" AS SELECT * FROM "{IDENTITY_WORKLOADS_VIEW}" LIMIT 0'
    )
    con.execute(
        f'CREATE OR REPLACE VIEW "{IDENTITY_WORKLOADS_VIEW}" AS SELECT * FROM "{NO_IDENTITY_WORKLOADS}"'
    )

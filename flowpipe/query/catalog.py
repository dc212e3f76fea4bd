"""The question catalog: `sql/NAME.sql` files parsed into `Question` objects with checked, typed parameters.

A question is one SQL file. Its file name (without `.sql`) is its name; files whose names start with `_` or `.`
are not questions. The file opens with a header of SQL line comments, then holds exactly one DuckDB statement
over the view `flows` (and `lost_events`), with parameters written as `$name`:

```sql
-- description: Dropped flows by drop reason and namespace pair.
--   A continuation line (two or more spaces after `--`) adds to the field above.
-- params: since=1h, until=now, namespace=, limit=50
SELECT ... FROM flows WHERE time >= $since AND time <= $until ... LIMIT $limit
```

The header format, exactly:

- The header is the run of `--` comment lines (and blank lines) at the top of the file; it ends at the first
  line that is neither.
- `-- description: TEXT` (required) is the one-paragraph description shown by `flowpipe query --list`.
- `-- params: SPEC, SPEC, ...` (optional; no line means no parameters) declares every parameter. A `SPEC` is
  `name[:type][=default]`:
  - `name=value`: optional, with that default; `name=` (nothing after `=`): optional, default NULL (a filter
    that is off unless given); `name` alone: required.
  - A default containing a comma is written in double quotes: `sep=", "`.
  - `type` is one of `time`, `int`, `float`, `bool`, `str`. Without it the type is inferred: `since` and
    `until` are times, so is any parameter whose default looks like a time (`1h`, `now`, an ISO timestamp);
    otherwise a default that is an integer, a decimal number or `true`/`false` makes it `int`, `float`,
    `bool`; everything else is `str`.
- A field continues on following lines that start with `--` and at least two spaces. Any other comment line in
  the header is a free comment and is ignored. Each field appears at most once.

Checks done when the catalog loads (a failure names the file and line): the description is present; every
declared default converts to its type; the SQL holds one statement; and the set of `$name` tokens in the SQL
(after removing comments, string literals, quoted identifiers and dollar-quoted strings) equals the set declared
in `params:`. Positional parameters (`$1`) are rejected.

A question may include a shared part: a line `-- include: NAME` in its SQL is replaced by the CTEs of
`_parts/NAME.sql` (in the question's folder, else the shipped one), so that definitions that must not drift apart
(how an edge names its ends) are written once. A part has the header of a question (`description`, `params`:
the parameters its SQL uses, which the including question declares too) and a body of CTE definitions, each
followed by a comma, for a `WITH` list.

Values are always bound by DuckDB (`con.sql(sql, params={...})`), never formatted into the SQL. Time values
accept `1h`, `30m`, `7d`, `45s`, `now` and ISO timestamps (see `flowpipe.query.timeparse`); an empty value is
NULL.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, cast

from flowpipe.errors import (
    ConfigError,
    QueryError,
    QuestionDefinitionError,
    QuestionParameterError,
    UnknownQuestionError,
)
from flowpipe.query.timeparse import is_relative_time, looks_like_time, parse_duration, parse_time, to_utc

RelativeTo = Literal["auto", "now", "data"]
RELATIVE_TO: tuple[RelativeTo, ...] = ("auto", "now", "data")
"""What relative times count back from: the clock unless the dataset is older than the window, the clock, or
the newest flow (see `flowpipe.query.run.run_question`)."""

ParamType = Literal["time", "int", "float", "bool", "str"]
PARAM_TYPES: tuple[ParamType, ...] = ("time", "int", "float", "bool", "str")
TIME_PARAMETER_NAMES = frozenset({"since", "until"})
HEADER_FIELDS = ("description", "params")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELD_LINE = re.compile(rf"^--\s?({_NAME})\s*:(.*)$")
_CONTINUATION = re.compile(r"^--\s{2,}(\S.*)$")
_SPEC = re.compile(rf'\s*({_NAME})\s*(?::\s*({_NAME}))?\s*(?:=\s*("[^"]*"|[^,]*?))?\s*(?:,|$)')
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}

# What is not SQL code for the purpose of finding `$name` tokens: comments, string literals (plain and E''),
# quoted identifiers and dollar-quoted strings. Each alternative is matched as a whole and blanked out.
_NOT_CODE = re.compile(
    r"""
      --[^\n]*                          # line comment
    | /\*.*?\*/                         # block comment
    | [eE]'(?:[^'\\]|\\.|'')*'          # E'...' with backslash escapes
    | '(?:[^']|'')*'                    # '...' with '' escapes
    | "(?:[^"]|"")*"                    # "quoted identifier"
    | \$(?P<tag>[A-Za-z_]\w*|)\$.*?\$(?P=tag)\$   # $tag$ ... $tag$ and $$ ... $$
    """,
    re.DOTALL | re.VERBOSE,
)
_NAMED_PARAM = re.compile(rf"\$({_NAME})")
_POSITIONAL_PARAM = re.compile(r"\$\d+")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One declared parameter of a question: its name, type and default (None when the default is NULL)."""

    name: str
    type: ParamType = "str"
    default: str | None = None
    required: bool = False

    def convert(self, value: object, *, anchor: datetime | None = None) -> object:
        """The value to bind for `value` (a string from the command line, or a Python value).

        An empty string or None gives NULL. Time values count back from `anchor` when relative.
        Raises `QuestionParameterError` naming the parameter when the value does not fit the type.
        """
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        if self.type == "time":
            if isinstance(value, datetime):
                return to_utc(value)
            return parse_time(str(value), anchor=anchor, name=self.name, end=self.name == "until")
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise QuestionParameterError(f"parameter {self.name}: {value!r} is not true or false")
        if self.type == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                number = value
            else:
                try:
                    number = int(str(value).strip())
                except ValueError:
                    raise QuestionParameterError(
                        f"parameter {self.name}: {value!r} is not an integer"
                    ) from None
            if not _INT64_MIN <= number <= _INT64_MAX:  # DuckDB binds a Python int as BIGINT
                raise QuestionParameterError(
                    f"parameter {self.name}: {value!r} is out of range ({_INT64_MIN} to {_INT64_MAX})"
                )
            return number
        if self.type == "float":
            try:
                return float(str(value).strip()) if not isinstance(value, float) else value
            except ValueError:
                raise QuestionParameterError(f"parameter {self.name}: {value!r} is not a number") from None
        return str(value)

    def describe(self) -> str:
        """The parameter as written in a header: `name=default`, `name=` or `name`."""
        if self.required:
            return self.name
        return f"{self.name}={self.default if self.default is not None else ''}"


@dataclass(frozen=True, slots=True)
class Question:
    """A named SQL question: description, declared parameters, and the SQL text (header included)."""

    name: str
    description: str
    parameters: tuple[Parameter, ...]
    sql: str
    path: Path | None = None

    def parameter(self, name: str) -> Parameter | None:
        """The declared parameter called `name`, or None."""
        return next((p for p in self.parameters if p.name == name), None)

    def check_values(self, values: Mapping[str, object]) -> None:
        """Raise `QuestionParameterError` for an unknown parameter or a missing required one."""
        declared = [p.name for p in self.parameters]
        unknown = sorted(set(values) - set(declared))
        if unknown:
            known = ", ".join(declared) if declared else "none"
            raise QuestionParameterError(
                f"question {self.name} has no parameter {', '.join(unknown)} (its parameters: {known})",
                question=self.name,
            )
        missing = [p.name for p in self.parameters if p.required and values.get(p.name) in (None, "")]
        if missing:
            flags = " ".join(f"-p {name}=VALUE" for name in missing)
            raise QuestionParameterError(
                f"question {self.name} needs parameter {', '.join(missing)} ({flags})", question=self.name
            )

    def relative_span(self, values: Mapping[str, object]) -> timedelta | None:
        """The longest relative time among the time parameters (given or default); None if none is relative."""
        spans = []
        for p in self.parameters:
            raw = values.get(p.name, p.default)
            if p.type == "time" and isinstance(raw, str) and raw.strip() and is_relative_time(raw):
                spans.append(parse_duration(raw))
        return max(spans) if spans else None

    def bind(self, values: Mapping[str, object], *, anchor: datetime | None = None) -> dict[str, object]:
        """Check `values` and return the full parameter mapping for DuckDB: given values, else defaults.

        >>> q.bind({"namespace": "shop"}, anchor=now)   # doctest: +SKIP
        {'since': datetime(...), 'until': datetime(...), 'namespace': 'shop', 'limit': 20}
        """
        self.check_values(values)
        bound: dict[str, object] = {}
        for p in self.parameters:
            raw = values.get(p.name, p.default)
            try:
                bound[p.name] = p.convert(raw, anchor=anchor)
            except QuestionParameterError as exc:
                raise QuestionParameterError(f"question {self.name}: {exc}", question=self.name) from None
        return bound


class Catalog:
    """The questions of one directory, by name. `load_questions()` builds it; iteration is in name order."""

    def __init__(self, directory: Path, questions: Mapping[str, Question]) -> None:
        self.directory = directory
        self._questions = dict(sorted(questions.items()))

    def __iter__(self) -> Iterator[Question]:
        return iter(self._questions.values())

    def __len__(self) -> int:
        return len(self._questions)

    def __contains__(self, name: object) -> bool:
        return name in self._questions

    @property
    def names(self) -> list[str]:
        """Every question name, sorted."""
        return list(self._questions)

    def question(self, name: str) -> Question:
        """The question called `name`; `UnknownQuestionError` with close matches when there is none."""
        try:
            return self._questions[name]
        except KeyError:
            raise UnknownQuestionError(name, self.names, close_matches(name, self.names)) from None


def close_matches(name: str, names: list[str]) -> list[str]:
    """Names similar to `name` (difflib), plus those containing it; best first, at most five."""
    similar = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    containing = [n for n in names if name and name.lower() in n.lower() and n not in similar]
    return (similar + containing)[:5]


def default_sql_dir() -> Path:
    """Where the shipped questions are: `flowpipe/sql` in an installed wheel, else the checkout's `sql/`."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "sql"
    if packaged.is_dir():
        return packaged
    return package.parent / "sql"


def load_questions(directory: Path | str | None = None) -> Catalog:
    """Parse every `NAME.sql` in `directory` (default: `default_sql_dir()`) into a `Catalog`.

    Raises `ConfigError` when the directory does not exist and `QuestionDefinitionError` (file and line) for a
    question file that breaks the header format or whose `$name` tokens differ from its `params:` line.
    """
    root = Path(directory) if directory is not None else default_sql_dir()
    if not root.is_dir():
        raise ConfigError(f"question directory {root} does not exist")
    questions = {}
    for path in sorted(root.glob("*.sql")):
        if path.name.startswith((".", "_")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QuestionDefinitionError(f"cannot read question: {exc}", path=str(path)) from exc
        question = parse_question(text, name=path.stem, path=path)
        questions[question.name] = question
    return Catalog(root, questions)


def parse_question(text: str, *, name: str, path: Path | None = None) -> Question:
    """Parse one question file's text (header and SQL) and check it; see the module docstring for the format."""
    where = str(path) if path is not None else f"<question {name}>"
    fields = parse_header(text, where=where)
    description = " ".join(fields.get("description", ("", 0))[0].split())
    if not description:
        raise QuestionDefinitionError("missing `-- description: ...` header line", path=where, line_number=1)
    params_text, params_line = fields.get("params", ("", 0))
    parameters = parse_params(params_text, where=where, line_number=params_line)

    text = include_parts(text, where=where, directory=path.parent if path is not None else None)
    code = strip_non_code(text)
    if _POSITIONAL_PARAM.search(code):
        raise QuestionDefinitionError(
            "positional parameters ($1) are not supported; use named ones ($since)", path=where
        )
    if re.search(r";\s*\S", code):
        raise QuestionDefinitionError("a question holds exactly one SQL statement", path=where)
    if not code.strip():
        raise QuestionDefinitionError("the question has no SQL after its header", path=where)
    used = set(find_parameters(text))
    declared = {p.name for p in parameters}
    if used != declared:
        problems = []
        if used - declared:
            problems.append(f"used but not declared in params: {', '.join(sorted(used - declared))}")
        if declared - used:
            problems.append(f"declared in params but not used: {', '.join(sorted(declared - used))}")
        raise QuestionDefinitionError("; ".join(problems), path=where, line_number=params_line or None)
    return Question(name=name, description=description, parameters=parameters, sql=text, path=path)


PARTS_DIR_NAME = "_parts"
_INCLUDE = re.compile(r"^[ \t]*-- include:[ \t]*(\S*)[ \t]*$", re.MULTILINE)


def part_sql(name: str, directory: Path | str | None = None) -> str:
    """The CTEs of the shared part `name` (`_parts/NAME.sql` in `directory`, else in the shipped questions),
    without its header; `QuestionDefinitionError` when it is missing or its parameters are not declared."""
    if not re.fullmatch(_NAME, name):
        raise QuestionDefinitionError(
            f"shared part name {name!r} is not an SQL identifier", path=PARTS_DIR_NAME
        )
    roots = [Path(directory)] if directory is not None else []
    for root in [*roots, default_sql_dir()]:
        path = root / PARTS_DIR_NAME / f"{name}.sql"
        if path.is_file():
            break
    else:
        raise QuestionDefinitionError(f"no shared part {name}", path=f"{PARTS_DIR_NAME}/{name}.sql")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuestionDefinitionError(f"cannot read shared part: {exc}", path=str(path)) from exc
    fields = parse_header(text, where=str(path))
    params_text, params_line = fields.get("params", ("", 0))
    declared = {p.name for p in parse_params(params_text, where=str(path), line_number=params_line)}
    lines = text.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("--")), None
    )
    body = "\n".join(lines[first:]).strip() + "\n" if first is not None else ""
    used = set(find_parameters(body))
    if not body or used != declared:
        raise QuestionDefinitionError(
            f"shared part {name}: its SQL uses the parameters {sorted(used)}, its params line declares "
            f"{sorted(declared)}",
            path=str(path),
            line_number=params_line or None,
        )
    if _INCLUDE.search(body):
        raise QuestionDefinitionError(f"shared part {name} includes another part", path=str(path))
    return body


def include_parts(text: str, *, where: str, directory: Path | str | None = None) -> str:
    """`text` with each `-- include: NAME` line replaced by the shared part `NAME` (see `part_sql`)."""

    def part(match: re.Match[str]) -> str:
        try:
            return part_sql(match.group(1), directory)
        except QuestionDefinitionError as exc:
            line = text.count("\n", 0, match.start()) + 1
            raise QuestionDefinitionError(f"-- include: {exc}", path=where, line_number=line) from None

    return _INCLUDE.sub(part, text)


def parse_params(text: str, *, where: str = "<params>", line_number: int = 0) -> tuple[Parameter, ...]:
    """Parse a `params:` value such as `since=1h, until=now, namespace=, limit=20` into parameters."""
    parameters: list[Parameter] = []
    rest = text.strip()
    position = 0
    while position < len(rest):
        match = _SPEC.match(rest, position)
        if match is None or match.end() == position:
            raise QuestionDefinitionError(
                f"cannot read parameter spec at {rest[position:]!r} (expected name[:type][=default])",
                path=where,
                line_number=line_number or None,
            )
        position = match.end()
        name, declared_type, default = match.group(1), match.group(2), match.group(3)
        if any(p.name == name for p in parameters):
            raise QuestionDefinitionError(
                f"parameter {name} is declared twice", path=where, line_number=line_number
            )
        if default is not None:
            default = default.strip()
            if len(default) >= 2 and default.startswith('"') and default.endswith('"'):
                default = default[1:-1]
        if declared_type is not None and declared_type not in PARAM_TYPES:
            raise QuestionDefinitionError(
                f"parameter {name}: unknown type {declared_type!r} (one of {', '.join(PARAM_TYPES)})",
                path=where,
                line_number=line_number,
            )
        ptype = cast(ParamType, declared_type) if declared_type else _infer_type(name, default)
        parameter = Parameter(
            name=name, type=ptype, default=default if default else None, required=default is None
        )
        if parameter.default is not None:
            try:
                parameter.convert(parameter.default)
            except QueryError as exc:
                raise QuestionDefinitionError(
                    f"bad default: {exc}", path=where, line_number=line_number
                ) from None
        parameters.append(parameter)
    return tuple(parameters)


def find_parameters(sql: str) -> list[str]:
    """The `$name` parameters the SQL uses, in order of first use, ignoring comments and string literals."""
    seen: dict[str, None] = {}
    for match in _NAMED_PARAM.finditer(strip_non_code(sql)):
        seen.setdefault(match.group(1), None)
    return list(seen)


def strip_non_code(sql: str) -> str:
    """The SQL with comments, string literals, quoted identifiers and dollar-quoted strings blanked out."""
    return _NOT_CODE.sub(lambda m: " " * len(m.group(0)), sql)


def _infer_type(name: str, default: str | None) -> ParamType:
    if name in TIME_PARAMETER_NAMES:
        return "time"
    if default is None or default == "":
        return "str"
    if looks_like_time(default):
        return "time"
    if re.fullmatch(r"-?\d+", default):
        return "int"
    if re.fullmatch(r"-?\d+\.\d*|-?\.\d+", default):
        return "float"
    if default.lower() in ("true", "false"):
        return "bool"
    return "str"


def parse_header(
    text: str, *, where: str, fields_known: tuple[str, ...] = HEADER_FIELDS
) -> dict[str, tuple[str, int]]:
    """The header fields of an SQL file: field name → (value, line number where it starts).

    Only `fields_known` are fields (`-- name: value`, continued on `--` lines indented by two or more
    spaces); other comment lines are free comments. Shared by every SQL asset with this header style.
    """
    fields: dict[str, tuple[str, int]] = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            current = None
            continue
        if not line.startswith("--"):
            break
        field = _FIELD_LINE.match(line)
        if field is not None and field.group(1) in fields_known:
            key, value = field.group(1), field.group(2).strip()
            if key in fields:
                raise QuestionDefinitionError(
                    f"header field {key!r} appears twice", path=where, line_number=number
                )
            fields[key] = (value, number)
            current = key
            continue
        continuation = _CONTINUATION.match(raw.rstrip())
        if continuation is not None and current is not None:
            value, start = fields[current]
            fields[current] = (f"{value} {continuation.group(1).strip()}".strip(), start)
            continue
        current = None
    return fields

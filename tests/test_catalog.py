"""The question catalog: header parsing, parameter declarations and checks, binding, time values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from flowpipe.errors import (
    ConfigError,
    QuestionDefinitionError,
    QuestionParameterError,
    UnknownQuestionError,
)
from flowpipe.query.catalog import (
    Parameter,
    default_sql_dir,
    find_parameters,
    load_questions,
    parse_params,
    parse_question,
)
from flowpipe.query.timeparse import (
    EARLIEST_FLOW_TIME,
    LATEST_FLOW_TIME,
    is_relative_time,
    parse_duration,
    parse_time,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

GOOD = """\
-- description: Dropped flows by reason,
--   over a window.
-- A free comment that is not part of any field.
-- params: since=1h, until=now,
--   namespace=, limit=20, sep=", ", strict:bool=false, window:time=
SELECT drop_reason_desc, count(*) AS flows  -- $not_a_param in a comment
FROM flows
WHERE time >= $since AND time <= $until
  AND ($namespace IS NULL OR source_namespace = $namespace)
  AND drop_reason_desc <> '$also_not_a_param'
  AND $strict IS NOT NULL AND ($window IS NULL OR time >= $window) AND $sep IS NOT NULL
GROUP BY drop_reason_desc
LIMIT $limit;
"""


def make(text: str, name: str = "q") -> object:
    return parse_question(text, name=name, path=Path(f"sql/{name}.sql"))


# -- header ---------------------------------------------------------------------------------------------------


def test_header_fields_and_continuations() -> None:
    question = parse_question(GOOD, name="drops", path=Path("sql/drops.sql"))
    assert question.name == "drops"
    assert question.description == "Dropped flows by reason, over a window."
    assert [p.name for p in question.parameters] == [
        "since",
        "until",
        "namespace",
        "limit",
        "sep",
        "strict",
        "window",
    ]
    assert question.sql == GOOD


def test_parameter_types_defaults_and_required() -> None:
    params = {
        p.name: p
        for p in parse_params(
            "since=1h, until=now, namespace=, limit=20, ratio=0.5, "
            "flag=true, age=7d, at=2024-05-01T00:00:00Z, name, n:int, w:time="
        )
    }
    assert params["since"] == Parameter("since", "time", "1h", False)
    assert params["until"] == Parameter("until", "time", "now", False)
    assert params["namespace"] == Parameter("namespace", "str", None, False)
    assert params["limit"] == Parameter("limit", "int", "20", False)
    assert params["ratio"].type == "float" and params["flag"].type == "bool"
    assert params["age"].type == "time" and params["at"].type == "time"
    assert params["name"] == Parameter("name", "str", None, True)
    assert params["n"] == Parameter("n", "int", None, True)
    assert params["w"] == Parameter("w", "time", None, False)


def test_quoted_default_may_hold_a_comma() -> None:
    (sep, after) = parse_params('sep=", ", after=1')
    assert sep.default == ", " and after.default == "1"


def test_no_params_line_means_no_parameters() -> None:
    question = parse_question("-- description: Count.\nSELECT count(*) FROM flows", name="count")
    assert question.parameters == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- params: limit=1\nSELECT $limit", "missing `-- description"),
        ("-- description: a\n-- description: b\nSELECT 1", "appears twice"),
        ("-- description: a\n-- params: n:integer=1\nSELECT $n", "unknown type 'integer'"),
        ("-- description: a\n-- params: n:int=abc\nSELECT $n", "bad default"),
        ("-- description: a\n-- params: since=yesterday\nSELECT $since", "bad default"),
        ("-- description: a\n-- params: n=1, n=2\nSELECT $n", "declared twice"),
        ("-- description: a\n-- params: 1bad\nSELECT 1", "cannot read parameter spec"),
        ("-- description: a\nSELECT $1", "positional parameters"),
        ("-- description: a\nSELECT 1; SELECT 2", "exactly one SQL statement"),
        ("-- description: a\n", "no SQL"),
    ],
)
def test_malformed_question_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(QuestionDefinitionError, match=message) as info:
        parse_question(text, name="bad", path=Path("sql/bad.sql"))
    assert str(info.value).startswith("sql/bad.sql")


# -- $name tokens against params: ------------------------------------------------------------------------------


def test_find_parameters_ignores_comments_strings_and_quoted_identifiers() -> None:
    sql = """
        SELECT $a, '$b', 'it''s $c', E'\\'$d', "$e" AS x, $$ $f $$, $tag$ $g $tag$  -- $h
        /* $i
           $j */ FROM flows WHERE x = $k AND y = $a
    """
    assert find_parameters(sql) == ["a", "k"]


def test_parameter_used_but_not_declared_fails_with_file_and_line() -> None:
    text = (
        "-- description: a\n-- params: since=1h\nSELECT * FROM flows WHERE time >= $since AND x = $namespace"
    )
    with pytest.raises(QuestionDefinitionError, match="used but not declared in params: namespace") as info:
        parse_question(text, name="q", path=Path("sql/q.sql"))
    assert info.value.path == "sql/q.sql" and info.value.line_number == 2
    assert str(info.value).startswith("sql/q.sql:2: ")


def test_parameter_declared_but_not_used_fails() -> None:
    text = "-- description: a\n-- params: since=1h, limit=5\nSELECT * FROM flows WHERE time >= $since"
    with pytest.raises(QuestionDefinitionError, match="declared in params but not used: limit"):
        parse_question(text, name="q")


def test_catalog_load_fails_on_a_mismatched_file(tmp_path: Path) -> None:
    (tmp_path / "good.sql").write_text("-- description: fine\nSELECT 1 AS one\n")
    (tmp_path / "broken.sql").write_text("-- description: a\n-- params: limit=5\nSELECT 1\n")
    with pytest.raises(QuestionDefinitionError, match="broken.sql:2: declared in params but not used: limit"):
        load_questions(tmp_path)


def test_catalog_skips_private_files_and_other_extensions(tmp_path: Path) -> None:
    (tmp_path / "one.sql").write_text("-- description: fine\nSELECT 1 AS one\n")
    (tmp_path / "_shared.sql").write_text("not a question at all")
    (tmp_path / ".hidden.sql").write_text("not a question at all")
    (tmp_path / "README.md").write_text("# questions")
    assert load_questions(tmp_path).names == ["one"]


def test_missing_question_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_questions(tmp_path / "nope")


def test_every_shipped_question_loads_and_declares_what_it_uses() -> None:
    catalog = load_questions()
    assert catalog.directory == default_sql_dir()
    assert {"drops_by_reason", "top_talkers", "dns_queries"} <= set(catalog.names)
    for question in catalog:
        assert set(find_parameters(question.sql)) == {p.name for p in question.parameters}
    for name in ("drops_by_reason", "top_talkers", "dns_queries"):
        limit = catalog.question(name).parameter("limit")
        assert limit is not None and limit.type == "int"


# -- looking questions up -----------------------------------------------------------------------------------


def test_unknown_question_lists_close_matches() -> None:
    catalog = load_questions()
    with pytest.raises(UnknownQuestionError) as info:
        catalog.question("top_talker")
    assert info.value.close[0] == "top_talkers"
    assert "Did you mean: top_talkers" in str(info.value)
    with pytest.raises(UnknownQuestionError) as info:
        catalog.question("drops")
    assert "drops_by_reason" in info.value.close
    with pytest.raises(UnknownQuestionError) as info:
        catalog.question("zzzz")
    assert info.value.close == [] and "Did you mean" not in str(info.value)


# -- binding --------------------------------------------------------------------------------------------------


def test_bind_fills_defaults_and_converts_values() -> None:
    question = parse_question(GOOD, name="drops")
    bound = question.bind({"limit": "5", "namespace": "shop", "strict": "yes"}, anchor=NOW)
    assert bound == {
        "since": NOW - timedelta(hours=1),
        "until": NOW,
        "namespace": "shop",
        "limit": 5,
        "sep": ", ",
        "strict": True,
        "window": None,
    }


def test_empty_value_binds_null() -> None:
    question = parse_question(GOOD, name="drops")
    assert question.bind({"namespace": ""}, anchor=NOW)["namespace"] is None


def test_unknown_parameter_is_refused_with_the_known_ones() -> None:
    question = parse_question(GOOD, name="drops")
    with pytest.raises(QuestionParameterError, match="drops has no parameter nmespace .*namespace"):
        question.bind({"nmespace": "shop"}, anchor=NOW)


def test_missing_required_parameter_is_refused() -> None:
    question = parse_question(
        "-- description: a\n-- params: pod\nSELECT * FROM flows WHERE source_pod_name = $pod", name="by_pod"
    )
    with pytest.raises(QuestionParameterError, match="by_pod needs parameter pod .*-p pod=VALUE"):
        question.bind({}, anchor=NOW)
    with pytest.raises(QuestionParameterError, match="needs parameter pod"):
        question.bind({"pod": ""}, anchor=NOW)
    assert question.bind({"pod": "web-1"}) == {"pod": "web-1"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"limit": "ten"}, "limit: 'ten' is not an integer"),
        ({"strict": "maybe"}, "strict: 'maybe' is not true"),
        ({"since": "last tuesday"}, "since: 'last tuesday' is not a time"),
        ({"limit": "99999999999999999999"}, "limit: '99999999999999999999' is out of range"),
        ({"limit": str(-(1 << 63) - 1)}, "limit: '-9223372036854775809' is out of range"),
    ],
)
def test_malformed_values_name_the_parameter(values: dict[str, str], message: str) -> None:
    question = parse_question(GOOD, name="drops")
    with pytest.raises(QuestionParameterError, match=message):
        question.bind(values, anchor=NOW)


def test_relative_span_is_the_longest_relative_time() -> None:
    question = parse_question(GOOD, name="drops")
    assert question.relative_span({}) == timedelta(hours=1)
    assert question.relative_span({"since": "7d"}) == timedelta(days=7)
    assert question.relative_span({"since": "2024-01-01"}) == timedelta(0)  # until=now is still relative
    assert question.relative_span({"since": "2024-01-01", "until": "2024-01-02"}) is None


# -- time values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("30m", NOW - timedelta(minutes=30)),
        ("7d", NOW - timedelta(days=7)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("-1h", NOW - timedelta(hours=1)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("now", NOW),
        (" NOW ", NOW),
        ("2024-04-30T10:00:00Z", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30T10:00:00.250Z", datetime(2024, 4, 30, 10, 0, 0, 250000, tzinfo=UTC)),
        ("2024-04-30T12:00:00+02:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30 10:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30T10:00:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
    ],
)
def test_time_values(text: str, expected: datetime) -> None:
    parsed = parse_time(text, anchor=NOW)
    assert parsed == expected
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["1x", "h1", "yesterday", "2024-13-01", "", "1 h"])
def test_bad_time_values_are_refused(text: str) -> None:
    with pytest.raises(QuestionParameterError, match="is not a time"):
        parse_time(text, anchor=NOW, name="since")


def test_anchor_in_another_zone_and_default_clock() -> None:
    anchor = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parse_time("1h", anchor=anchor) == NOW - timedelta(hours=1)
    before = datetime.now(UTC)
    assert (
        before - timedelta(hours=1, seconds=5) <= parse_time("1h") <= datetime.now(UTC) - timedelta(hours=1)
    )


def test_relative_time_helpers() -> None:
    assert is_relative_time("now") and is_relative_time("90m") and not is_relative_time("2024-05-01")
    assert parse_duration("1h30m") == timedelta(minutes=90) and parse_duration("now") == timedelta(0)
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0001-01-01", EARLIEST_FLOW_TIME),
        ("1500-06-01T00:00:00Z", EARLIEST_FLOW_TIME),
        ("9999-12-31T23:59:59Z", LATEST_FLOW_TIME),
        ("10000000d", EARLIEST_FLOW_TIME),
        ("99999999999999999999d", EARLIEST_FLOW_TIME),
    ],
)
def test_times_beyond_what_a_flow_can_carry_are_clamped(text: str, expected: datetime) -> None:
    # Flow times are int64 nanoseconds: nothing lies outside these bounds, so "since year 1" means "everything".
    assert parse_time(text, anchor=NOW) == expected
    assert parse_duration("99999999999999999999d") <= LATEST_FLOW_TIME - EARLIEST_FLOW_TIME


def test_a_question_includes_a_shared_part_of_its_folder(tmp_path: Path) -> None:
    (tmp_path / "_parts").mkdir()
    (tmp_path / "_parts" / "recent.sql").write_text(
        "-- description: the flows of the window\n-- params: since\nrecent AS (SELECT * FROM flows WHERE time >= $since),\n"
    )
    (tmp_path / "count.sql").write_text(
        "-- description: flows\n-- params: since=1h, limit=5\n"
        "WITH\n-- include: recent\ncounted AS (SELECT count(*) AS n FROM recent)\nSELECT n FROM counted LIMIT $limit\n"
    )
    question = load_questions(tmp_path).question("count")
    assert "recent AS (SELECT * FROM flows WHERE time >= $since)," in question.sql
    assert {p.name for p in question.parameters} == {"since", "limit"}


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (None, r"count.sql:4: -- include: .*no shared part recent"),
        ("-- description: x\nrecent AS (SELECT $since AS s),\n", r"count.sql:4: -- include: .*declares \[\]"),
    ],
)
def test_a_missing_or_wrong_part_names_the_question_and_its_line(
    tmp_path: Path, part: str | None, message: str
) -> None:
    if part is not None:
        (tmp_path / "_parts").mkdir()
        (tmp_path / "_parts" / "recent.sql").write_text(part)
    (tmp_path / "count.sql").write_text(
        "-- description: flows\n-- params: since=1h\nWITH\n-- include: recent\nx AS (SELECT 1)\nSELECT * FROM x\n"
    )
    with pytest.raises(QuestionDefinitionError, match=message):
        load_questions(tmp_path)

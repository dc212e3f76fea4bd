"""Documentation drift is a test failure: every command, question and metric family appears in the README."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from flowpipe.cli import cli
from flowpipe.metrics.families import METRICS
from flowpipe.model import FLOW_SCHEMA
from flowpipe.query.catalog import load_questions

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
COMMAND_ROWS = set(re.findall(r"^\| `flowpipe ([a-z-]+)", README, flags=re.MULTILINE))


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help_and_a_readme_row(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"{name} has no help text"
    assert name in COMMAND_ROWS, f"README's command table has no row for `flowpipe {name}`"


def test_readme_lists_no_command_that_does_not_exist() -> None:
    assert COMMAND_ROWS <= set(cli.commands)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_has_help(name: str) -> None:
    command = cli.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"flowpipe {name} {param.opts[0]} has no help text"


def test_every_question_is_in_the_readme() -> None:
    missing = [q.name for q in load_questions() if f"`{q.name}`" not in README]
    assert not missing, f"questions missing from README: {missing}"


def test_every_metric_family_is_in_the_readme() -> None:
    missing = [spec.name for spec in METRICS if f"`{spec.name}`" not in README]
    assert not missing, f"metric families missing from README's metrics table: {missing}"


def test_every_flow_column_is_in_the_readme() -> None:
    table = README[README.index("## The flow table") :]
    table = table[: table.index("\n## ")]
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    sides = {f"{side}_{name}" for name in named for side in ("source", "destination")}
    missing = [name for name in FLOW_SCHEMA.names if name not in named | sides]
    assert not missing, f"flow columns missing from README's flow table: {missing}"

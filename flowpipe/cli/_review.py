"""What `audit` and `replay` share for CI: loading policy input (exit 2 when invalid) and the report files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from flowpipe.errors import PolicyError
from flowpipe.policy.load import load_policies
from flowpipe.policy.model import Policy

FINDINGS_EXIT_CODE = 1
"""audit: a finding at or above --fail-on; replay: a break with --fail-on-break, an allowance with --fail-on-allow."""
INVALID_INPUT_EXIT_CODE = 2
"""The policy input could not be read (missing path, invalid YAML, unknown kind or field, no policy at all)."""

F = TypeVar("F", bound=Callable[..., Any])


class InvalidPolicyInput(click.ClickException):
    """Policy files that cannot be read or understood: exit status 2, apart from findings (1)."""

    exit_code = INVALID_INPUT_EXIT_CODE


def report_file_options(func: F) -> F:
    """`--sarif FILE` and `--junit FILE`: the reports for code review tools, written beside the usual output."""
    func = click.option(
        "--junit",
        "junit_path",
        metavar="FILE",
        help="Also write JUnit XML (a test case per policy document) to FILE (`-`: standard output).",
    )(func)
    return click.option(
        "--sarif",
        "sarif_path",
        metavar="FILE",
        help="Also write SARIF 2.1.0 (each finding at its policy file and line) to FILE (`-`: standard output).",
    )(func)


def load_policy_input(paths: Sequence[str], *, what: str = "policies") -> list[Policy]:
    """The policies of `paths`; invalid input ends the command with exit status 2 and the loader's message."""
    try:
        policies = load_policies(paths)
        if not policies:
            raise PolicyError(f"no {what} found in {', '.join(paths)}")
    except PolicyError as exc:
        raise InvalidPolicyInput(str(exc)) from exc
    return policies


def write_report(path: str | None, text: str) -> None:
    """Write `text` to `path` (`-`: standard output) whole: a temporary file renamed over it."""
    if path is None:
        return
    if path == "-":
        click.echo(text, nl=not text.endswith("\n"))
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, target)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc}") from exc


def sarif_text(document: dict[str, Any]) -> str:
    """A SARIF document as JSON text."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

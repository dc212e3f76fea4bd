"""Click options shared by several commands, so each flag is spelled and documented once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DATASET = "flowpipe-data"


def dataset_option(func: F) -> F:
    """`--dataset DIR` (env `FLOWPIPE_DATASET`): the dataset root, a folder or an object-store URL."""
    return click.option(
        "--dataset",
        envvar="FLOWPIPE_DATASET",
        default=DEFAULT_DATASET,
        show_default=True,
        show_envvar=True,
        help="Dataset root: a local folder, or s3://bucket/prefix.",
    )(func)


def format_option(*choices: str, default: str = "table") -> Callable[[F], F]:
    """`--format` with the given choices."""

    def decorate(func: F) -> F:
        return click.option(
            "--format",
            "output_format",
            type=click.Choice(list(choices)),
            default=default,
            show_default=True,
            help="Output format.",
        )(func)

    return decorate


def as_path(value: str) -> Path:
    """A local dataset path from a `--dataset` value."""
    return Path(value)

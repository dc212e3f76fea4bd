"""Click options shared by several commands, so each flag is spelled and documented once."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DATASET = "flowpipe-data"


def dataset_option(func: F) -> F:
    """`--dataset DIR` (env `FLOWPIPE_DATASET`): the dataset root, a folder or an object-store URL.

    Also adds `--s3-endpoint` and `--s3-region` (see `flowpipe.storage`), which take effect for the command's
    whole run and are not passed to the command function.
    """
    func = click.option(
        "--s3-region",
        envvar="FLOWPIPE_S3_REGION",
        show_envvar=True,
        expose_value=False,
        callback=_set_s3_region,
        help="Region of an s3:// dataset (default: AWS_REGION, AWS_DEFAULT_REGION).",
    )(func)
    func = click.option(
        "--s3-endpoint",
        envvar="FLOWPIPE_S3_ENDPOINT",
        show_envvar=True,
        metavar="URL",
        expose_value=False,
        callback=_set_s3_endpoint,
        help="Endpoint of an S3-compatible store for an s3:// dataset, e.g. http://minio:9000 "
        "(default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS S3).",
    )(func)
    return click.option(
        "--dataset",
        envvar="FLOWPIPE_DATASET",
        default=DEFAULT_DATASET,
        show_default=True,
        show_envvar=True,
        help="Dataset root: a local folder, or s3://bucket/prefix.",
    )(func)


def _storage(value: str | None) -> ModuleType | None:
    """`flowpipe.storage`, or None when there is nothing to set: no value, and the storage layer (which imports
    pyarrow) not loaded yet, so its flags are still unset."""
    if value is None and "flowpipe.storage" not in sys.modules:
        return None
    return importlib.import_module("flowpipe.storage")


def _set_s3_endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    storage = _storage(value)
    if storage is not None:
        storage.set_s3_options(endpoint=value, region=storage.flag_options().region)


def _set_s3_region(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    storage = _storage(value)
    if storage is not None:
        storage.set_s3_options(endpoint=storage.flag_options().endpoint, region=value)


def format_option(*choices: str, default: str = "table") -> Callable[[F], F]:
    """`-o/--output` (hubble's spelling) and `--format` with the given choices."""
    offered = list(choices)

    def decorate(func: F) -> F:
        return click.option(
            "-o",
            "--output",
            "--format",
            "output_format",
            type=click.Choice(offered),
            default=default,
            show_default=True,
            help="Output format (jsonl: one JSON object a line, for jq).",
        )(func)

    return decorate


def one_value(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> str | None:
    """Callback of a filter option declared `multiple=True` that takes one value: a repeated flag is a usage
    error instead of silently keeping the last value (click's default)."""
    if len(values) > 1:
        flag = max(param.opts, key=len) if param.opts else str(param.name)
        raise click.BadParameter(
            f"given {len(values)} times ({', '.join(values)}); {flag} takes one value: run once per value",
            ctx=ctx,
            param=param,
        )
    return values[0] if values else None


def as_path(value: str) -> Path:
    """A local dataset path from a `--dataset` value."""
    return Path(value)


def source_option(func: F) -> F:
    """`--source auto|edges|flows`: where questions about edges read (see `flowpipe.rollups`)."""
    return click.option(
        "--source",
        type=click.Choice(["auto", "edges", "flows"]),
        default="auto",
        show_default=True,
        envvar="FLOWPIPE_SOURCE",
        help="Where edges are read: edge rollups for the hours they cover and flows for the rest (auto), "
        "rollups only (edges), or flows only.",
    )(func)

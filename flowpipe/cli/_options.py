"""Click options shared by several commands, so each flag is spelled and documented once."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

import click

from flowpipe.config import DEFAULT_DATASET

F = TypeVar("F", bound=Callable[..., Any])


def dataset_option(func: F) -> F:
    """`--dataset DIR` (env `FLOWPIPE_DATASET`): the dataset root, a folder or an object-store URL.

    Also adds `--s3-endpoint` and `--s3-region` (see `flowpipe.dataset.storage`), which take effect for the command's
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
    """`flowpipe.dataset.storage`, or None when there is nothing to set: no value, and the storage layer (which imports
    pyarrow) not loaded yet, so its flags are still unset."""
    if value is None and "flowpipe.dataset.storage" not in sys.modules:
        return None
    return importlib.import_module("flowpipe.dataset.storage")


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


class AliasedOption(click.Option):
    """An option whose older spellings (`aliases`) still work but are left out of `--help`."""

    def __init__(self, *args: Any, aliases: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = tuple(aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [name for name in shown if name not in self.aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def param_option(help: str, *, aliases: Sequence[str] = ()) -> Callable[[F], F]:
    """`-p/--param KEY=VALUE` (repeatable) as `param_options`; read them with `parse_param_options`."""
    return click.option(
        "-p",
        "--param",
        *aliases,
        "param_options",
        cls=AliasedOption,
        aliases=aliases,
        multiple=True,
        metavar="KEY=VALUE",
        help=help,
    )


def parse_param_options(values: Sequence[str]) -> dict[str, str]:
    """`-p key=value` options as a dict; a malformed one or a key given twice is a usage error."""
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.UsageError(f"parameter {item!r} is not KEY=VALUE (e.g. -p since=24h)")
        if key in params:
            raise click.UsageError(f"parameter {key} is given twice")
        params[key] = value
    return params


def cluster_name_option(help: str, **kwargs: Any) -> Callable[[F], F]:
    """`--cluster-name NAME`: the cluster name flows carry (written into them). `--cluster` still works for it
    here but is not shown: `--cluster` is the flag that picks one cluster of a dataset (`suggest`, `replay`)."""
    return click.option(
        "--cluster-name",
        "--cluster",
        "cluster_name",
        cls=AliasedOption,
        aliases=("--cluster",),
        metavar="NAME",
        help=help,
        **kwargs,
    )


def simulation_options(*, rate: float, rate_help: str, duration: str, duration_help: str) -> Callable[[F], F]:
    """What the built-in simulator is asked for, the same in every command that runs it: `--seed`, `--rate`,
    `--duration`, the faults (`--fault`, `--faults`, `--no-faults`; read them with `choose_faults`) and
    `--cluster-name`."""

    def decorate(func: F) -> F:
        for option in reversed([
            click.option("--seed", type=int, default=1, show_default=True,
                         help="Simulator seed: the same seed, the same flows."),
            click.option("--rate", type=float, default=rate, show_default=True, help=rate_help),
            click.option("--duration", default=duration, show_default=True, help=duration_help),
            click.option("--fault", multiple=True, metavar="NAME",
                         help="Inject only this fault (repeatable). Default: all faults (`simulate --list-faults`)."),
            click.option("--faults", default=None, metavar="LIST", help="Comma-separated faults, or `all` / `none`."),
            click.option("--no-faults", is_flag=True, help="Clean traffic: no injected faults."),
            cluster_name_option("Simulated cluster name.", default="sim", show_default=True),
        ]):  # fmt: skip
            func = option(func)
        return func

    return decorate


def choose_faults(fault: Sequence[str], faults: str | None, no_faults: bool) -> frozenset[str]:
    """The faults to inject from the three flags of `simulation_options`; all of them when none is given."""
    from flowpipe.errors import ConfigError
    from flowpipe.sim import FAULT_NAMES, parse_faults

    if no_faults and (fault or faults):
        raise ConfigError("--no-faults cannot be combined with --fault or --faults")
    if no_faults:
        return frozenset()
    if not fault and faults is None:
        return frozenset(FAULT_NAMES)
    return parse_faults([*fault, *([faults] if faults else [])])


def source_option(func: F) -> F:
    """`--source auto|edges|flows`: where questions about edges read (see `flowpipe.dataset.rollups`)."""
    return click.option(
        "--source",
        type=click.Choice(["auto", "edges", "flows"]),
        default="auto",
        show_default=True,
        envvar="FLOWPIPE_SOURCE",
        help="Where edges (and least_privilege's records) are read: rollups for the hours they cover and flows "
        "for the rest (auto), rollups only (edges), or flows only.",
    )(func)

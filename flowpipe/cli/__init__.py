"""The `flowpipe` command line: one click group; each command lives in `flowpipe/cli/` and stays thin.

Library code raises `FlowpipeError`; this module is the one place that turns it into a message and exit code 1
(a usage or configuration error exits 2, as click's own usage errors do). Commands are loaded when asked for
(see `flowpipe.cli._commands.COMMANDS`), so `flowpipe --help` imports none of the data libraries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import click

from flowpipe import __version__
from flowpipe.cli._commands import COMMANDS
from flowpipe.errors import ConfigError, FlowpipeError


class _LazyCommands(dict[str, click.Command]):
    """The group's command table: every name in `COMMANDS` is present; its module is imported on first lookup."""

    def __init__(self) -> None:
        super().__init__()

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS or super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(COMMANDS) | set(super().keys())))

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(super().keys()))

    def __getitem__(self, name: str) -> click.Command:
        if not super().__contains__(name) and name in COMMANDS:
            super().__setitem__(name, COMMANDS[name].load())
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name not in self:
            return default
        return self[name]

    def keys(self) -> Any:
        return list(self)

    def values(self) -> Any:
        return [self[name] for name in self]

    def items(self) -> Any:
        return [(name, self[name]) for name in self]


class FlowpipeGroup(click.Group):
    """A click group that reports `FlowpipeError` (and an `OSError` naming a file) as a one-line message
    instead of a traceback, and loads each command's module only when that command is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _LazyCommands()

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from `COMMANDS`' one-line helps, without importing any command."""
        rows = [(name, COMMANDS[name].short_help) for name in sorted(COMMANDS)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.params.get("log_level") != "debug":
            # gRPC's own log lines (a failed handshake from ssl_transport_security.cc, its handshaker factory)
            # would reach stderr before flowpipe's message that says what is wrong. gRPC reads this when it is
            # imported, which no command has done yet (they import it when they run); a user's value wins.
            os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.UsageError(str(exc), self._failed_command_context(ctx)) from exc
        except FlowpipeError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:
            # A file the command was pointed at that the system refuses (a name too long, a read-only file
            # system) and no code path turned into a FlowpipeError: still a message naming it, not a traceback.
            if exc.filename is None:
                raise
            raise click.ClickException(f"{exc.filename}: {exc.strerror or exc}") from exc

    def _failed_command_context(self, ctx: click.Context) -> click.Context:
        """A context of the command that failed, so the usage line and `--help` hint name that command."""
        name = ctx.invoked_subcommand
        command = self.get_command(ctx, name) if name else None
        if command is None:
            return ctx
        return click.Context(command, info_name=name, parent=ctx)


@click.group(cls=FlowpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowpipe")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    envvar="FLOWPIPE_LOG_LEVEL",
    help="Log verbosity (logs go to stderr).",
)
def cli(log_level: str) -> None:
    """flowpipe: Hubble flow analytics for Cilium clusters.

    Streams Hubble flows into a Parquet dataset, answers policy questions with SQL, exports Prometheus
    metrics and drafts least-privilege network policies from the observed traffic.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

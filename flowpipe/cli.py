"""The `flowpipe` command line: one click group; each command lives in `flowpipe/commands/` and stays thin.

Library code raises `FlowpipeError`; this module is the one place that turns it into a message and exit code 1.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from flowpipe import __version__
from flowpipe.errors import ConfigError, FlowpipeError


class FlowpipeGroup(click.Group):
    """A click group that reports `FlowpipeError` (and an `OSError` naming a file) as a one-line message
    instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
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


def _register() -> None:
    # Each command module defines one click command named like the module; new commands are added here.
    from flowpipe.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register()

"""The CLI commands, one module each: flags → config → one library call → output."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

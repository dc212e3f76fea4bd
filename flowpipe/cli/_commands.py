"""The CLI commands, one module each: flags → config → one library call → output.

`COMMANDS` names every command, the module and attribute that define it, and the one line `flowpipe --help`
shows for it. A command's module is imported only when that command is asked for (run, or its own `--help`), so
`flowpipe --help` and the light commands start without pyarrow, DuckDB or gRPC; each module imports its heavy
libraries where it needs them. New commands are added here.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click


class _NoPandas:
    """An import finder under which `import pandas` fails: pyarrow then takes pandas for not installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError("pandas is not loaded by this command", name=name)


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """Where a command lives and its one-line help (shown by `flowpipe --help` without importing it)."""

    module: str
    attribute: str
    short_help: str
    without_pandas: bool = False
    """The command never uses pandas: pyarrow is kept from importing it (pyarrow probes for pandas, ~40 MB,
    the first time an array is built from a Python list), for a long-running server's memory."""

    def load(self) -> click.Command:
        """Import the command's module and return the command, with this short help."""
        if self.without_pandas and "pandas" not in sys.modules:
            sys.meta_path.insert(0, _NoPandas())
        command = getattr(importlib.import_module(f"flowpipe.cli.{self.module}"), self.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"flowpipe.cli.{self.module}.{self.attribute} is not a click command")
        command.short_help = self.short_help
        return command


COMMANDS: dict[str, CommandSpec] = {
    "query": CommandSpec("query", "query", "Run a named question (`--list` shows them all)."),
    "sql": CommandSpec("sql", "sql", "Run a DuckDB SQL statement over the dataset."),
    "schema": CommandSpec("schema", "schema", "Print the columns of the flow table."),
    "ingest": CommandSpec("ingest", "ingest", "Ingest Hubble flow files into the dataset."),
    "bench": CommandSpec("bench", "bench", "Measure speed, memory and size against their targets."),
    "serve-metrics": CommandSpec("serve_metrics", "serve_metrics", "Serve Prometheus metrics of a dataset."),
    "simulate": CommandSpec("simulate", "simulate", "Write simulated cluster flows as Hubble JSON."),
    "replay": CommandSpec("replay", "replay", "Replay stored flows through network policies."),
    "audit": CommandSpec("audit", "audit", "Check policy files for known pitfalls."),
    "simulate-relay": CommandSpec(
        "simulate_relay", "simulate_relay", "Serve simulated traffic like hubble-relay."
    ),
    "compact": CommandSpec("compact", "compact", "Merge the small part files of closed hours."),
    "retention": CommandSpec("retention", "retention", "List or remove hour partitions past an age."),
    "rollup": CommandSpec("rollup", "rollup", "Write the edge rollups of stored flows (--rebuild: all)."),
    "collect": CommandSpec("collect", "collect_command", "Follow hubble-relay's flows into the dataset."),
    "demo": CommandSpec("demo", "demo", "Try flowpipe with no cluster (simulated relay)."),
    "suggest": CommandSpec("suggest", "suggest", "Draft policies that allow exactly the observed traffic."),
    "serve-hubble": CommandSpec(
        "serve_hubble", "serve_hubble", "Serve the stored flows over the Hubble API.", without_pandas=True
    ),
}

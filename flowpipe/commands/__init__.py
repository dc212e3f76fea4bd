"""The CLI commands, one module each: flags → config → one library call → output."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from flowpipe.commands.query import query  # noqa: E402
from flowpipe.commands.schema import schema  # noqa: E402
from flowpipe.commands.sql import sql  # noqa: E402

COMMANDS += [query, sql, schema]

from flowpipe.commands.bench import bench  # noqa: E402
from flowpipe.commands.ingest import ingest  # noqa: E402

COMMANDS += [ingest, bench]

from flowpipe.commands.serve_metrics import serve_metrics  # noqa: E402

COMMANDS.append(serve_metrics)

from flowpipe.commands.simulate import simulate  # noqa: E402

COMMANDS.append(simulate)

from flowpipe.commands.audit import audit  # noqa: E402
from flowpipe.commands.replay import replay  # noqa: E402

COMMANDS += [replay, audit]

from flowpipe.commands.simulate_relay import simulate_relay  # noqa: E402

COMMANDS.append(simulate_relay)

from flowpipe.commands.compact import compact  # noqa: E402
from flowpipe.commands.retention import retention  # noqa: E402

COMMANDS += [compact, retention]

from flowpipe.commands.collect import collect_command  # noqa: E402

COMMANDS.append(collect_command)

from flowpipe.commands.demo import demo  # noqa: E402

COMMANDS.append(demo)

from flowpipe.commands.suggest import suggest  # noqa: E402

COMMANDS.append(suggest)

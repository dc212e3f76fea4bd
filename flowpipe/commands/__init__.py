"""The CLI commands, one module each: flags → config → one library call → output."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from flowpipe.commands.query import query
from flowpipe.commands.schema import schema
from flowpipe.commands.sql import sql

COMMANDS += [query, sql, schema]

from flowpipe.commands.bench import bench
from flowpipe.commands.ingest import ingest

COMMANDS += [ingest, bench]

from flowpipe.commands.serve_metrics import serve_metrics

COMMANDS.append(serve_metrics)

from flowpipe.commands.simulate import simulate

COMMANDS.append(simulate)

from flowpipe.commands.audit import audit
from flowpipe.commands.replay import replay

COMMANDS += [replay, audit]

from flowpipe.commands.simulate_relay import simulate_relay

COMMANDS.append(simulate_relay)

from flowpipe.commands.compact import compact
from flowpipe.commands.retention import retention

COMMANDS += [compact, retention]

from flowpipe.commands.collect import collect_command

COMMANDS.append(collect_command)

from flowpipe.commands.demo import demo

COMMANDS.append(demo)

from flowpipe.commands.suggest import suggest

COMMANDS.append(suggest)

from flowpipe.commands.serve_hubble import serve_hubble

COMMANDS.append(serve_hubble)

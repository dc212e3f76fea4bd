"""The one cluster that drafting or replaying policies works on, chosen among the clusters of a window's flows.

A CiliumNetworkPolicy (or NetworkPolicy) applies to one cluster, so `suggest` and `replay` work on the flows of
one cluster: the one named with `--cluster`, or the only one the window holds. When the window holds flows of
several named clusters (`cluster_name`) and none was chosen, they refuse with the clusters found, instead of
drafting or judging one policy from two clusters' traffic. Flows without a cluster name (Hubble of a cluster
left at Cilium's default name, ingested without `--cluster`) name no cluster: beside one named cluster they are
kept with it, as before clusters had names; `--cluster` keeps the named flows only.
"""

from __future__ import annotations

from datetime import datetime

from flowpipe.errors import ConfigError
from flowpipe.query.engine import Engine

CLUSTERS_SQL = """
SELECT cluster_name, count(*) AS flows
FROM flows
WHERE ($since IS NULL OR time >= $since)
  AND ($until IS NULL OR time <= $until)
GROUP BY cluster_name
ORDER BY cluster_name NULLS LAST
"""
"""Flows per `cluster_name` (NULL: flows without one) in a window; `since`/`until` None: unbounded."""

UNNAMED = "flows without a cluster name"


def clusters_in_window(
    engine: Engine, since: datetime | None, until: datetime | None
) -> dict[str | None, int]:
    """Flows per cluster name (None for flows without one) between `since` and `until`, names sorted."""
    table = engine.run(CLUSTERS_SQL, {"since": since, "until": until}, question="clusters of the window")
    return {row["cluster_name"]: int(row["flows"]) for row in table.to_pylist()}


def choose_cluster(
    engine: Engine,
    cluster: str | None,
    since: datetime | None,
    until: datetime | None,
    *,
    command: str,
) -> str | None:
    """The cluster whose flows `command` works on (the value of `EDGES_SQL`'s and observed_edges' `cluster`).

    `cluster` when given; else the window's only named cluster, or None (every flow of the window) when some
    flows carry no cluster name. Raises `ConfigError` when `cluster` has no flows in the window, or when no
    cluster was given and the flows name several clusters (the message lists them with their flow counts and
    says how to choose).
    """
    found = clusters_in_window(engine, since, until)
    named = [name for name in found if name is not None]
    if cluster:
        if cluster not in named:
            raise ConfigError(
                f"cluster {cluster!r} has no flows {_window(since, until)}; "
                + (f"the flows come from {_listing(found)}" if found else "there are no flows")
            )
        return cluster
    if len(named) <= 1:
        return named[0] if named and None not in found else None
    hint = f"choose one with `flowpipe {command} --cluster NAME`"
    if None in found:
        hint += " (flows without a cluster name cannot be chosen: give them one with `ingest --cluster`)"
    raise ConfigError(
        f"the flows {_window(since, until)} come from {len(named)} clusters: {_listing(found)}. "
        f"A policy applies to one cluster, so {command} works on one at a time: {hint}"
    )


def _listing(found: dict[str | None, int]) -> str:
    return ", ".join(
        f"{name if name is not None else UNNAMED} ({flows:,} flows)" for name, flows in found.items()
    )


def _window(since: datetime | None, until: datetime | None) -> str:
    if since is None and until is None:
        return "in the dataset"
    start = since.strftime("%Y-%m-%dT%H:%M:%SZ") if since is not None else "the first flow"
    end = until.strftime("%Y-%m-%dT%H:%M:%SZ") if until is not None else "the newest flow"
    return f"between {start} and {end}"

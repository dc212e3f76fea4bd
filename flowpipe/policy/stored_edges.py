"""The SQL that groups stored flows into distinct replay edges (`EDGES_SQL`) and what a policy set needs of it.

Replay judges distinct edges, not flows, so the number of edges decides its speed. An edge keeps only what
the policies being replayed can tell apart: HTTP methods and URLs only when some rule has HTTP rules, Kafka
fields for Kafka rules, DNS query names for DNS rules narrower than `*`, DNS names of world addresses for
FQDN peers, and the addresses of world clients for CIDR peers (not needed for a whole-family block like
`0.0.0.0/0`). Without those, a busy cluster's millions of URLs, lookups and internet clients fold into a few
hundred edges.

Endpoints are named as every question names them, by the shared view `flows_enriched` (workload, reserved
entity, and the pods recorded with a reserved identity): the grouping reads that view, not `flows`.

How an edge names its ends is the one definition the observed_edges question uses too, the shared part
`sql/_parts/edge_endpoints.sql` (included below): labels are lists of a dozen strings on every flow, and reading
them costs more than the rest of the grouping, so edges are grouped by each end's identity number (plus its
address outside the pods), and the labels of each identity are read from the flows of the moment it was first
seen. A pod whose record carries a reserved identity (`*_unresolved_pod`: older agents report L7 records of the
egress proxy with the world identity) gets the workload and labels (and no identity) of the pod of that name
seen with its own identity in the window; when no such record exists, it keeps its reserved identity.

A policy set applies to one cluster: `cluster` keeps the flows of that cluster only, labels and pods included
(`flowpipe.policy.clusters.choose_cluster` picks it). Without it, every flow is grouped, whatever its cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import duckdb

from flowpipe.errors import QueryError
from flowpipe.policy.model import FQDNSelector, Policy
from flowpipe.query.catalog import part_sql

_IDENTITY_VIEW = "identity_workloads"
_IDENTITY_TABLE = "_flowpipe_identity_workloads"


def _side(side: str) -> str:
    # World clients (the internet) are many: their addresses only when a CIDR rule can tell them apart.
    world = f"{side}_entity = 'world'" if side == "source" else "false"
    return f"""
        {side}_namespace,
        {side}_workload,
        {side}_identity,
        {side}_entity,
        {side}_reserved_identity,
        {side}_unresolved_pod,
        -- Addresses only outside the pods: CIDR rules need them, pods are judged by labels.
        -- (and of pods recorded with a reserved identity: Cilium enforces on that identity, address included).
        CASE WHEN ({side}_namespace IS NULL OR {side}_reserved_identity IS NOT NULL)
            AND ($addresses OR NOT coalesce({world}, false)) THEN {side}_ip END AS {side}_ip,"""


def _ends(side: str) -> str:
    return f"""
    SELECT cluster_name, {side}_namespace AS namespace, {side}_unresolved_pod AS pod_name, {side}_identity AS identity,
           {side}_workload AS workload, {side}_entity AS entity, {side}_reserved_identity AS reserved_identity,
           {side}_ip AS ip, first_seen
    FROM edges"""


def _named(side: str, alias: str) -> tuple[str, str]:
    """The workload, labels and identity columns of one side, and the join that gives them."""
    columns = f"""
    {alias}.named_workload AS {side}_workload,
    coalesce({alias}.labels, []) AS {side}_labels,
    -- A pod found by its pod name is judged by its labels (as before: no identity number).
    CASE WHEN {alias}.named_reserved_identity IS NULL AND {alias}.reserved_identity IS NOT NULL THEN NULL
        ELSE {alias}.named_identity END AS {side}_identity,"""
    keys = ("namespace", "unresolved_pod", "identity", "workload", "entity", "reserved_identity", "ip")
    on = "\n    ".join(
        f"AND {alias}.{'pod_name' if key == 'unresolved_pod' else key} IS NOT DISTINCT FROM e.{side}_{key}"
        for key in keys
    )
    join = f"""
LEFT JOIN edge_endpoints AS {alias}
    ON {alias}.cluster_name IS NOT DISTINCT FROM e.cluster_name
    {on}"""
    return columns, join


_SOURCE_COLUMNS, _SOURCE_JOIN = _named("source", "s")
_DESTINATION_COLUMNS, _DESTINATION_JOIN = _named("destination", "d")
_KEYS = (
    "verdict, drop_reason_desc, traffic_direction, is_reply, source_namespace, source_ip, destination_namespace, "
    "destination_ip, destination_names, l4_protocol, destination_port, icmp_type, l7_protocol, http_method, "
    "http_url, kafka_api_key, kafka_topic, dns_query, source_workload, source_labels, source_identity, "
    "destination_workload, destination_labels, destination_identity"
)

EDGES_SQL = f"""
WITH denied AS (
    -- Connections the edge definition counts as denied (a policy drop at either end).
    SELECT cluster_name AS denied_cluster, source_ip AS denied_source_ip, source_port AS denied_source_port,
           destination_ip AS denied_destination_ip, destination_port AS denied_destination_port,
           l4_protocol AS denied_protocol
    FROM denied_connections
    WHERE ($since IS NULL OR last_seen >= $since)
      AND ($until IS NULL OR first_seen <= $until)
      AND ($cluster IS NULL OR cluster_name = $cluster)
),
judged AS (
    SELECT
        f.* REPLACE (
            -- A record of a connection denied at its other end (the source's FORWARDED egress record of a
            -- connection the destination dropped) did not get through: it is that denial.
            CASE WHEN d.denied_source_ip IS NOT NULL AND f.verdict <> 'DROPPED' THEN 'DROPPED'
                ELSE f.verdict END AS verdict,
            CASE WHEN d.denied_source_ip IS NOT NULL AND f.verdict <> 'DROPPED' THEN 'POLICY_DENIED'
                ELSE f.drop_reason_desc END AS drop_reason_desc
        ),
        (coalesce(f.is_reply, false)
            OR coalesce(f.l7_type = 'RESPONSE', false)
            OR NOT f.is_traffic
            -- Without is_reply, a TCP packet is known to be a request only when it opens the connection.
            OR (f.is_reply IS NULL AND f.l4_protocol = 'TCP' AND f.tcp_flags IS NOT NULL
                AND NOT (f.tcp_flags LIKE '%SYN%' AND f.tcp_flags NOT LIKE '%ACK%'))) AS reply
    FROM flows_enriched AS f
    LEFT JOIN denied AS d
        ON f.l7_type IS NULL AND NOT coalesce(f.is_reply, false) AND d.denied_source_ip = f.source_ip
        AND d.denied_source_port = f.source_port AND d.denied_destination_ip = f.destination_ip
        AND d.denied_destination_port = f.destination_port AND d.denied_protocol = f.l4_protocol
        AND coalesce(d.denied_cluster, '') = coalesce(f.cluster_name, '')
    WHERE f.verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT', 'DROPPED')
      AND f.is_traffic
      AND ($since IS NULL OR f.time >= $since)
      AND ($until IS NULL OR f.time <= $until)
      AND ($cluster IS NULL OR f.cluster_name = $cluster)
),
edges AS (
    SELECT
        cluster_name,
        verdict,
        coalesce(drop_reason_desc, CAST(nullif(drop_reason, 0) AS VARCHAR)) AS drop_reason_desc,
        traffic_direction,
        reply AS is_reply,{_side("source")}{_side("destination")}
        CASE WHEN destination_namespace IS NULL AND $names THEN destination_names END AS destination_names,
        l4_protocol,
        -- Replies are only counted: their ports (the client's ephemeral ones) would make an edge each.
        CASE WHEN NOT reply THEN destination_port END AS destination_port,
        icmp_type,
        -- An HTTP or Kafka record is judged at L3/L4 when no rule looks at its calls: the same outcome.
        CASE WHEN (flow_type = 'L7' OR l7_type IS NOT NULL) AND ($http OR l7_protocol <> 'http')
            AND ($kafka OR l7_protocol <> 'kafka') THEN l7_protocol END AS l7_protocol,
        CASE WHEN $http THEN http_method END AS http_method,
        CASE WHEN $http THEN http_url END AS http_url,
        CASE WHEN $kafka THEN kafka_api_key END AS kafka_api_key,
        CASE WHEN $kafka THEN kafka_topic END AS kafka_topic,
        CASE WHEN $dns THEN dns_query END AS dns_query,
        count(*) AS flows,
        min(time) AS first_seen
    FROM judged
    GROUP BY ALL
),
edge_ends AS ({_ends("source")}
    UNION ALL{_ends("destination")}
),
{part_sql("edge_endpoints")}
named AS (
    SELECT
        e.* EXCLUDE (cluster_name, source_workload, source_identity, source_entity, source_reserved_identity,
                     source_unresolved_pod, destination_workload, destination_identity, destination_entity,
                     destination_reserved_identity, destination_unresolved_pod, first_seen),{_SOURCE_COLUMNS}{_DESTINATION_COLUMNS}
    FROM edges AS e{_SOURCE_JOIN}{_DESTINATION_JOIN}
)
-- Edges of several clusters (no `cluster`) that name their ends alike are one edge.
SELECT {_KEYS}, CAST(sum(flows) AS BIGINT) AS flows
FROM named
GROUP BY {_KEYS}
"""
"""Distinct edges of the view `flows_enriched` with their flow counts: the input of `replay_edges`.

Parameters: `since`, `until` (None: unbounded), `cluster` (None: every cluster) and the flags of
`edge_parameters`. Run `prepare_edges` on the engine first (the answer is the same without it, slower)."""

_ANY_NAME = FQDNSelector(match_pattern="*")


def prepare_edges(target: Any) -> None:
    """Make a DuckDB engine (or connection) with the shared views ready for `EDGES_SQL`; other engines: nothing.

    `EDGES_SQL` reads `flows_enriched` three times, and where the dataset needs the view's fallbacks each read
    joins `identity_workloads` (one row per pod identity). Computed in place, that view is estimated as large as
    the flows it is computed from: DuckDB then hashes the flows, every column of them, to join the few rows,
    and computes the view again for each read. Here it is computed once into a temporary table, which the view
    then reads: the same rows, known to be few.
    """
    connection = getattr(target, "connection", target)
    if not isinstance(connection, duckdb.DuckDBPyConnection):
        return
    sql = "SELECT view_name, sql FROM duckdb_views() WHERE view_name IN ('flows_enriched', $identity)"
    try:
        views = dict(connection.execute(sql, {"identity": _IDENTITY_VIEW}).fetchall())
        if _IDENTITY_VIEW not in views.get("flows_enriched", "") or _IDENTITY_TABLE in views[_IDENTITY_VIEW]:
            return  # no fallbacks (no such join), or ready
        connection.execute(
            f'CREATE OR REPLACE TEMP TABLE "{_IDENTITY_TABLE}" AS SELECT * FROM "{_IDENTITY_VIEW}"'
        )
        connection.execute(f'CREATE OR REPLACE VIEW "{_IDENTITY_VIEW}" AS SELECT * FROM "{_IDENTITY_TABLE}"')
    except duckdb.Error as exc:
        raise QueryError(f"cannot prepare the grouping of flows into edges: {exc}") from exc


def edge_parameters(
    policies: Iterable[Policy],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    cluster: str | None = None,
) -> dict[str, object]:
    """The parameters of `EDGES_SQL` for replaying `policies`: the window and cluster, and what their rules can
    tell apart."""
    addresses = names = http = kafka = dns = False
    for policy in policies:
        for rule in policy.rules:
            for peer in rule.peers:
                if peer.kind == "cidr" and (peer.except_cidrs or not (peer.cidr or "").endswith("/0")):
                    addresses = True
                names = names or peer.kind == "fqdn"
            for port_rule in rule.ports:
                http = http or bool(port_rule.http)
                kafka = kafka or bool(port_rule.kafka)
                dns = dns or any(selector != _ANY_NAME for selector in port_rule.dns)
    return {
        "since": since,
        "until": until,
        "cluster": cluster,
        "addresses": addresses,
        "names": names,
        "http": http,
        "kafka": kafka,
        "dns": dns,
    }

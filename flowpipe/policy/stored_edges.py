"""The SQL that groups stored flows into distinct replay edges (`EDGES_SQL`) and what a policy set needs of it.

Replay judges distinct edges, not flows, so the number of edges decides its speed. An edge keeps only what
the policies being replayed can tell apart: HTTP methods and URLs only when some rule has HTTP rules, Kafka
fields for Kafka rules, DNS query names for DNS rules narrower than `*`, DNS names of world addresses for
FQDN peers, and the addresses of world clients for CIDR peers (not needed for a whole-family block like
`0.0.0.0/0`). Without those, a busy cluster's millions of URLs, lookups and internet clients fold into a few
hundred edges.

Endpoints are named as every question names them, by the shared view `flows_enriched` (workload, reserved
entity, and the pods recorded with a reserved identity): the grouping reads that view, not `flows`.

Labels are lists of a dozen strings on every flow, and reading them costs more than the rest of the grouping.
So edges are grouped by the endpoint's identity number (plus its address outside the pods), and the labels of
each (namespace, workload, identity, address) are read from the one flow where it was first seen, which
DuckDB finds without decoding the labels of the other flows. A pod whose record carries a reserved identity
(`*_unresolved_pod`: older agents report L7 records of the egress proxy with the world identity) gets the
workload and labels (and no identity) of the pod of that name seen with its own identity, as in the
observed_edges question; when no such record exists, it keeps its pod name.

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

_IDENTITY_VIEW = "identity_workloads"
_IDENTITY_TABLE = "_flowpipe_identity_workloads"

_CLUSTER = "($cluster IS NULL OR {alias}cluster_name = $cluster)"


def _side(side: str) -> str:
    # World clients (the internet) are many: their addresses only when a CIDR rule can tell them apart.
    world = f"{side}_entity = 'world'" if side == "source" else "false"
    return f"""
        {side}_namespace,
        {side}_workload,
        {side}_identity,
        {side}_unresolved_pod,
        -- Addresses only outside the pods: CIDR rules need them, pods are judged by labels.
        -- (and of pods recorded with a reserved identity: Cilium enforces on that identity, address included).
        CASE WHEN ({side}_namespace IS NULL OR {side}_reserved_identity IS NOT NULL)
            AND ($addresses OR NOT coalesce({world}, false)) THEN {side}_ip END AS {side}_ip,"""


def _after_join(alias: str, condition: str) -> str:
    """`condition` on the flows (and the cluster), checked only on the flows that met the join with `alias`.

    The endpoint columns it reads (entity, reserved identity) are worked out from the labels of every flow
    when they are checked below the join; the join keeps the few flows of the pods asked about first.
    """
    return f"CASE WHEN {alias}pod_name IS NOT NULL THEN {condition} AND {_CLUSTER.format(alias='f.')} END"


def _labels(side: str) -> str:
    return f"""
{side}_keys AS (
    SELECT {side}_namespace AS namespace, {side}_workload AS workload, {side}_identity AS identity,
           {side}_ip AS ip, min(first_seen) AS first_seen
    FROM edges
    GROUP BY ALL
),
{side}_labels AS (
    SELECT k.namespace, k.workload, k.identity, k.ip, min(f.{side}_labels) AS labels
    FROM flows_enriched AS f
    JOIN {side}_keys AS k
        ON f.time IS NOT DISTINCT FROM k.first_seen
        AND f.{side}_namespace IS NOT DISTINCT FROM k.namespace
        AND f.{side}_identity IS NOT DISTINCT FROM k.identity
        AND f.{side}_workload IS NOT DISTINCT FROM k.workload
        AND (k.ip IS NULL OR f.{side}_ip = k.ip)
        AND {_CLUSTER.format(alias="f.")}
    GROUP BY ALL
),"""


def _resolved(side: str, alias: str) -> tuple[str, str]:
    """The workload, labels and identity columns of one side, and the joins that give them."""
    columns = f"""
    CASE WHEN {alias}p.labels IS NOT NULL THEN {alias}p.workload
        ELSE coalesce(e.{side}_unresolved_pod, e.{side}_workload) END AS {side}_workload,
    CASE WHEN {alias}p.labels IS NOT NULL THEN {alias}p.labels ELSE {alias}l.labels END AS {side}_labels,
    CASE WHEN {alias}p.labels IS NULL THEN e.{side}_identity END AS {side}_identity,"""
    joins = f"""
LEFT JOIN {side}_labels AS {alias}l
    ON e.{side}_namespace IS NOT DISTINCT FROM {alias}l.namespace
    AND e.{side}_workload IS NOT DISTINCT FROM {alias}l.workload
    AND e.{side}_identity IS NOT DISTINCT FROM {alias}l.identity
    AND e.{side}_ip IS NOT DISTINCT FROM {alias}l.ip
LEFT JOIN pod_labels AS {alias}p
    ON {alias}p.namespace = e.{side}_namespace AND {alias}p.pod_name = e.{side}_unresolved_pod"""
    return columns, joins


_SOURCE_COLUMNS, _SOURCE_JOINS = _resolved("source", "s")
_DESTINATION_COLUMNS, _DESTINATION_JOINS = _resolved("destination", "d")

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
      AND {_CLUSTER.format(alias="f.")}
),
edges AS (
    SELECT
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
),{_labels("source")}{_labels("destination")}
unresolved AS (
    SELECT source_namespace AS namespace, source_unresolved_pod AS pod_name FROM edges
    WHERE source_unresolved_pod IS NOT NULL
    UNION
    SELECT destination_namespace, destination_unresolved_pod FROM edges WHERE destination_unresolved_pod IS NOT NULL
),
pod_times AS (
    -- When each pod named without its identity was first seen with it (as the client, else as the server).
    SELECT namespace, pod_name, bool_or(as_source) AS as_source,
           min(time) FILTER (WHERE as_source) AS source_time, min(time) FILTER (WHERE NOT as_source) AS destination_time
    FROM (
        SELECT f.source_namespace AS namespace, f.source_pod_name AS pod_name, f.time, true AS as_source
        FROM flows_enriched AS f
        JOIN unresolved AS u ON f.source_namespace = u.namespace AND f.source_pod_name = u.pod_name
        WHERE {_after_join("u.", "f.source_entity IS NULL AND f.source_reserved_identity IS NULL")}
        UNION ALL
        SELECT f.destination_namespace, f.destination_pod_name, f.time, false
        FROM flows_enriched AS f
        JOIN unresolved AS u ON f.destination_namespace = u.namespace AND f.destination_pod_name = u.pod_name
        WHERE {_after_join("u.", "f.destination_entity IS NULL AND f.destination_reserved_identity IS NULL")}
    ) AS seen
    GROUP BY namespace, pod_name
),
pod_labels AS (
    -- The workload and labels of each such pod, from that flow.
    SELECT namespace, pod_name, min(workload) AS workload, min(labels) AS labels
    FROM (
        SELECT p.namespace, p.pod_name, f.source_workload AS workload, f.source_labels AS labels
        FROM flows_enriched AS f
        JOIN pod_times AS p
            ON p.as_source AND f.time IS NOT DISTINCT FROM p.source_time AND f.source_namespace = p.namespace
            AND f.source_pod_name = p.pod_name
        WHERE {_after_join("p.", "f.source_entity IS NULL AND f.source_reserved_identity IS NULL")}
        UNION ALL
        SELECT p.namespace, p.pod_name, f.destination_workload, f.destination_labels
        FROM flows_enriched AS f
        JOIN pod_times AS p
            ON NOT p.as_source AND f.time IS NOT DISTINCT FROM p.destination_time
            AND f.destination_namespace = p.namespace AND f.destination_pod_name = p.pod_name
        WHERE {_after_join("p.", "f.destination_entity IS NULL AND f.destination_reserved_identity IS NULL")}
    ) AS seen
    GROUP BY namespace, pod_name
)
SELECT
    e.* EXCLUDE (source_workload, source_identity, source_unresolved_pod, destination_workload,
                 destination_identity, destination_unresolved_pod, first_seen),{_SOURCE_COLUMNS}{_DESTINATION_COLUMNS}
FROM edges AS e{_SOURCE_JOINS}{_DESTINATION_JOINS}
"""
"""Distinct edges of the view `flows_enriched` with their flow counts: the input of `replay_edges`.

Parameters: `since`, `until` (None: unbounded), `cluster` (None: every cluster) and the flags of
`edge_parameters`. Run `prepare_edges` on the engine first (the answer is the same without it, slower)."""

_ANY_NAME = FQDNSelector(match_pattern="*")


def prepare_edges(target: Any) -> None:
    """Make a DuckDB engine (or connection) with the shared views ready for `EDGES_SQL`; other engines: nothing.

    `EDGES_SQL` reads `flows_enriched` seven times, and where the dataset needs the view's fallbacks each read
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

"""The SQL that groups stored flows into distinct replay edges (`EDGES_SQL`) and what a policy set needs of it.

Replay judges distinct edges, not flows, so the number of edges decides its speed. An edge keeps only what
the policies being replayed can tell apart: HTTP methods and URLs only when some rule has HTTP rules, Kafka
fields for Kafka rules, DNS query names for DNS rules narrower than `*`, DNS names of world addresses for
FQDN peers, and the addresses of world clients for CIDR peers (not needed for a whole-family block like
`0.0.0.0/0`). Without those, a busy cluster's millions of URLs, lookups and internet clients fold into a few
hundred edges.

Endpoints are named as every question names them, by the definition of the shared view `flows_enriched`
(workload, reserved entity, and the pods recorded with a reserved identity), but not flow by flow: the flows
are first grouped by their edge and by their ends as `flows` records them (namespace, pod, workload, identity
number, and the address where it can name the end), ten million flows into some ten thousand groups, and the
view's definition (`flowpipe.query.views.enriched_sql`) then names each group's ends as it would name each
of its flows. Labels are lists of a dozen strings on every flow, and decoding them costs more than the rest of
the grouping: an end whose identity number a cluster allocated (one per label set) takes the labels of its
identity, read from the flows of the moment it was first seen; only ends whose identity number stands for no
one label set (none, or reserved with a pod named) are grouped by their own labels, read apart from the
others so that Parquet decodes the labels only near them. (So the flows of one pod identity are named alike,
by the labels its first flows carried: a flow that came without them too.)

How an edge names its ends is the one definition the observed_edges question uses too, the shared part
`sql/_parts/edge_endpoints.sql` (included below): edges are grouped by each end's identity number (plus its
address outside the pods), and the labels of each identity are read from the flows of the moment it was first
seen. A pod whose record carries a reserved identity (`*_unresolved_pod`: older agents report L7 records of the
egress proxy with the world identity) gets the workload and labels (and no identity) of the pod of that name
seen with its own identity in the window (the groups above, whose flows are not only those judged); when no
such record exists, it keeps its reserved identity.

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
from flowpipe.query.views import enriched_sql, undescribed_sql

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

_RAW_COLUMNS = (
    "time, cluster_name, verdict, drop_reason, drop_reason_desc, flow_type, event_type, traffic_direction, "
    "is_reply, l7_type, l4_protocol, tcp_flags, source_ip, source_port, destination_ip, destination_port, "
    "icmp_type, l7_protocol, http_method, http_url, kafka_api_key, kafka_topic, dns_query, destination_names, "
    "source_namespace, source_pod_name, source_workload_name, source_identity, "
    "destination_namespace, destination_pod_name, destination_workload_name, destination_identity"
)


def _cluster_identity(side: str) -> str:
    """True for an end whose identity number is one a cluster allocates to pods (one per label set)."""
    return f"coalesce({side}_identity, 0) >= 256 AND coalesce({side}_identity, 0) < 16777216"


def _flow_labels(side: str) -> tuple[str, str]:
    """The ends that only their own labels can name (`flows_enriched`'s fallbacks read them, and their identity
    number stands for no one label set), as two conditions that DuckDB gives the Parquet reader (each on
    columns it filters one by one), which then decodes the labels only near such ends: an identity number
    that is neither reserved nor a cluster's, and a pod recorded with a reserved identity and no workload."""
    identity = f"coalesce({side}_identity, 0)"
    unallocated = f"{identity} NOT BETWEEN 1 AND 10 AND {identity} < 256"
    reserved_pod = (
        f"({identity} BETWEEN 1 AND 10 OR {identity} >= 16777216)"
        f" AND {side}_workload_name IS NULL AND {side}_namespace IS NOT NULL"
    )
    return unallocated, reserved_pod


def _window_flows() -> str:
    """The flows of the window, with the labels of the ends that only their own labels name: one read of the
    flows without labels, and one with them per kind of such end (each decodes labels only near those ends)."""
    window = (
        "($since IS NULL OR time >= $since) AND ($until IS NULL OR time <= $until)"
        " AND ($cluster IS NULL OR cluster_name = $cluster)"
    )
    own = {side: _flow_labels(side) for side in ("source", "destination")}
    anywhere = {side: f"(({own[side][0]}) OR ({own[side][1]}))" for side in own}
    reads = [
        f"""
    SELECT {_RAW_COLUMNS}, CAST(NULL AS VARCHAR[]) AS source_flow_labels,
           CAST(NULL AS VARCHAR[]) AS destination_flow_labels
    FROM flows
    WHERE {window} AND NOT {anywhere["source"]} AND NOT {anywhere["destination"]}"""
    ]
    for side, other in (("source", None), ("destination", "source")):
        for condition in own[side]:  # (the two kinds of end are apart: each flow is in one read)
            before = f" AND NOT {anywhere[other]}" if other else ""
            labels = (
                f"source_labels, CASE WHEN {anywhere['destination']} THEN destination_labels END"
                if side == "source"
                else "CAST(NULL AS VARCHAR[]), destination_labels"
            )
            reads.append(f"""
    SELECT {_RAW_COLUMNS}, {labels}
    FROM flows
    WHERE {window} AND {condition}{before}""")
    return "\n    UNION ALL".join(reads)


def _raw_side(side: str) -> str:
    """One end of a flow as `flows` records it, reduced to what can name it (`flows_enriched`) or key its edge."""
    # A world client's address only when a CIDR rule can tell it apart (the entity by its identity number;
    # by its labels, the address is kept here and left out with the entity known, in `_side`).
    world = (
        f"(coalesce({side}_identity, 0) IN (2, 9, 10) OR coalesce({side}_identity, 0) >= 16777216)"
        f" AND NOT ({side}_namespace IS NOT NULL AND {side}_pod_name IS NOT NULL)"
        if side == "source"
        else "false"
    )
    return f"""
        {side}_namespace,
        {side}_pod_name,
        {side}_workload_name,
        {side}_identity,
        {side}_flow_labels,
        -- The address where it may name the end or key the edge: outside the pods' own identities, or
        -- where the workload is not recorded (the last name of an endpoint is its address).
        CASE WHEN ($addresses OR NOT ({world}))
            AND ({side}_namespace IS NULL OR {side}_workload_name IS NULL OR NOT ({_cluster_identity(side)}))
            THEN {side}_ip END AS {side}_ip,"""


def _identity_labels(side: str, alias: str) -> tuple[str, str]:
    """The labels `flows_enriched` reads for one end of a group (its own, else its identity's), and the join."""
    column = f"""
        CASE WHEN {undescribed_sql(f"r.{side}")} THEN coalesce(r.{side}_flow_labels, {alias}.labels) END
            AS {side}_labels,"""
    join = f"""
    LEFT JOIN edge_group_labels AS {alias}
        ON {alias}.identity = r.{side}_identity AND coalesce({alias}.cluster_name, '') = coalesce(r.cluster_name, '')"""
    return column, join


_SOURCE_LABELS, _SOURCE_LABELS_JOIN = _identity_labels("source", "sl")
_DESTINATION_LABELS, _DESTINATION_LABELS_JOIN = _identity_labels("destination", "dl")


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
window_flows AS ({_window_flows()}
),
records AS (
    SELECT
        f.*,
        -- The flows replay judges: traffic (no socket-LB event) with a verdict. The others only name pods.
        f.verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT', 'DROPPED')
            AND coalesce(f.flow_type, '') <> 'SOCK' AND coalesce(f.event_type, 0) <> 7 AS judged,
        -- A record of a connection denied at its other end (the source's FORWARDED egress record of a
        -- connection the destination dropped) did not get through: it is that denial.
        d.denied_source_ip IS NOT NULL AND f.verdict <> 'DROPPED' AS denied_elsewhere,
        (coalesce(f.is_reply, false)
            OR coalesce(f.l7_type = 'RESPONSE', false)
            -- Without is_reply, a TCP packet is known to be a request only when it opens the connection.
            OR (f.is_reply IS NULL AND f.l4_protocol = 'TCP' AND f.tcp_flags IS NOT NULL
                AND NOT (f.tcp_flags LIKE '%SYN%' AND f.tcp_flags NOT LIKE '%ACK%'))) AS reply
    FROM window_flows AS f
    LEFT JOIN denied AS d
        ON f.l7_type IS NULL AND NOT coalesce(f.is_reply, false) AND d.denied_source_ip = f.source_ip
        AND d.denied_source_port = f.source_port AND d.denied_destination_ip = f.destination_ip
        AND d.denied_destination_port = f.destination_port AND d.denied_protocol = f.l4_protocol
        AND coalesce(d.denied_cluster, '') = coalesce(f.cluster_name, '')
),
edge_records AS (
    -- The flows grouped by their edge and by their ends as recorded: each group is named below as each of
    -- its flows would be, so only distinct ends are named. (The flows not judged only name pods: their
    -- other columns are grouped as they are, which costs fewer groups than setting them aside costs time.)
    SELECT
        cluster_name,
        judged,
        CASE WHEN denied_elsewhere THEN 'DROPPED' ELSE verdict END AS verdict,
        coalesce(CASE WHEN denied_elsewhere THEN 'POLICY_DENIED' ELSE drop_reason_desc END,
            CAST(nullif(drop_reason, 0) AS VARCHAR)) AS drop_reason_desc,
        traffic_direction,
        reply,{_raw_side("source")}{_raw_side("destination")}
        -- (the namespace named by the labels is not known yet: kept where the record has none)
        CASE WHEN destination_namespace IS NULL AND $names THEN destination_names END
            AS destination_names,
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
        min(time) AS time
    FROM records
    WHERE judged OR source_pod_name IS NOT NULL OR destination_pod_name IS NOT NULL
    GROUP BY ALL
),
edge_identity_first AS (
    -- Pods named by their labels (no namespace or workload recorded) whose identity number stands for one
    -- label set: when each identity was first seen so.
    SELECT cluster_name, identity, min(time) AS first_seen
    FROM (
        SELECT cluster_name, source_identity AS identity, time
        FROM edge_records
        WHERE ({undescribed_sql("source")}) AND {_cluster_identity("source")}
        UNION ALL
        SELECT cluster_name, destination_identity, time
        FROM edge_records
        WHERE ({undescribed_sql("destination")}) AND {_cluster_identity("destination")}
    ) AS ends
    GROUP BY cluster_name, identity
),
edge_group_labels AS (
    -- The labels of those identities, read from the flows of that moment (DuckDB decodes no others').
    SELECT i.cluster_name, i.identity, min(f.labels) AS labels
    FROM (
        SELECT cluster_name, time, source_identity AS identity, source_labels AS labels FROM flows
        UNION ALL
        SELECT cluster_name, time, destination_identity, destination_labels FROM flows
    ) AS f
    JOIN edge_identity_first AS i
        ON f.time = i.first_seen AND f.identity = i.identity
        AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '')
    WHERE cardinality(f.labels) > 0
    GROUP BY i.cluster_name, i.identity
),
edge_labelled AS (
    SELECT
        r.* EXCLUDE (source_flow_labels, destination_flow_labels),{_SOURCE_LABELS}{_DESTINATION_LABELS}
        -- (what `flows_enriched` reads besides the ends, of no use to an edge)
        CAST(NULL AS VARCHAR) AS flow_type,
        CAST(NULL AS INTEGER) AS event_type,
        CAST(NULL AS BOOLEAN) AS is_reply,
        CAST(NULL AS VARCHAR) AS l7_type,
        CAST(NULL AS INTEGER) AS dns_rcode
    FROM edge_records AS r{_SOURCE_LABELS_JOIN}{_DESTINATION_LABELS_JOIN}
),
edge_flows AS (
    -- Each group's ends named by the one definition (the shared view `flows_enriched`).
{enriched_sql("edge_labelled")}),
edges AS (
    SELECT
        cluster_name,
        verdict,
        drop_reason_desc,
        traffic_direction,
        reply AS is_reply,{_side("source")}{_side("destination")}
        CASE WHEN destination_namespace IS NULL AND $names THEN destination_names END AS destination_names,
        l4_protocol,
        destination_port,
        icmp_type,
        l7_protocol,
        http_method,
        http_url,
        kafka_api_key,
        kafka_topic,
        dns_query,
        sum(flows) AS flows,
        min(time) AS first_seen
    FROM edge_flows
    WHERE judged
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

    `EDGES_SQL` names the ends of its grouped flows by the definition of `flows_enriched`, which joins
    `identity_workloads` (one row per pod identity, computed from the flows) once per end. Computed in place,
    that view is estimated as large as the flows it is computed from, and computed again for each join. Here
    it is computed once into a temporary table, which the view then reads: the same rows, known to be few.
    """
    connection = getattr(target, "connection", target)
    if not isinstance(connection, duckdb.DuckDBPyConnection):
        return
    sql = "SELECT sql FROM duckdb_views() WHERE view_name = $identity"
    try:
        views = connection.execute(sql, {"identity": _IDENTITY_VIEW}).fetchall()
        if not views or _IDENTITY_TABLE in views[0][0]:
            return  # no such view, or ready
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

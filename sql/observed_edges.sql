-- description: The observed request graph that `flowpipe suggest` drafts policies from: one row per distinct
--   edge (source workload or entity → destination workload, entity or address, protocol and port, and for L7
--   records the HTTP method and path, Kafka role and topic) and `status`, with the number of connections or
--   requests behind it. Edges follow the one edge definition (the shared view `connections`): requests only
--   (no replies, L7 responses or socket-LB events); each connection once whatever end or ends reported it
--   (TCP, UDP and SCTP by 5-tuple; ICMP and L7 calls per observing side, the larger side counts).
--   `status` is `delivered` when no end reported the connection denied, `denied` when an end reported a
--   policy drop (an ingress denial is FORWARDED at the source's egress and DROPPED at the destination: denied,
--   never delivered); drops for other reasons make no edge. `learn_from_drops=true` counts denied edges as
--   delivered (for clusters already in default-deny). Pods carry their labels (read from the first records
--   of their identity, so a pod known at one end only by identity and labels is the same pod); a pod recorded
--   with a reserved identity while the record names it keeps that identity in `*_reserved_identity` (a label
--   selector does not match it while it has that identity). Other endpoints carry their reserved entity
--   (`world`, `host`, `kube-apiserver`, ...), the address (except world sources) and, for world destinations,
--   the DNS names Cilium knows. A namespace filter matches either side. The columns are the contract of
--   `flowpipe.policy.edges.OBSERVED_EDGE_SCHEMA`. `l7=false` leaves out the HTTP and Kafka fields (the L7 rows
--   then fold into one per edge and protocol), for drafts without L7 rules. Edges are per cluster
--   (`cluster_name`); `cluster=NAME` keeps the flows of that cluster only (a policy applies to one cluster).
-- params: since=7d, until=now, namespace=, learn_from_drops=false, l7=true, cluster=
--
-- How it stays fast: labels are lists of a dozen strings on every flow, and reading them costs more than the
-- rest of the question. So the flows are first grouped without them (`connections`), and each end's labels
-- are then read from the flows of the moment it was first seen (the shared `edge_endpoints`, which replay's
-- grouping of stored flows names its ends with too), which DuckDB finds without decoding the other flows'.
WITH calls AS (
    -- The requests of the window as the edge definition counts them (the shared view `connections`): one row
    -- per connection, whatever end or ends reported it, or per ICMP / L7 call and observing side.
    SELECT
        cluster_name,
        source_namespace,
        source_pod_name,
        source_entity,
        source_workload,
        source_reserved_identity,
        source_identity,
        -- World clients are many and only the entity matters for them; other entities keep their address.
        CASE WHEN source_entity IS NOT NULL AND source_entity <> 'world' THEN source_ip END AS source_ip,
        destination_namespace,
        destination_pod_name,
        destination_entity,
        destination_workload,
        destination_reserved_identity,
        destination_identity,
        CASE WHEN destination_entity IS NOT NULL THEN destination_ip END AS destination_ip,
        CASE WHEN destination_entity IS NOT NULL THEN coalesce(destination_names, []) ELSE [] END
            AS destination_names,
        l4_protocol,
        CASE WHEN l4_protocol IN ('TCP', 'UDP', 'SCTP') THEN destination_port END AS destination_port,
        CASE WHEN l4_protocol IN ('ICMPv4', 'ICMPv6') THEN icmp_type END AS icmp_type,
        l7_protocol,
        CASE WHEN $l7 THEN http_method END AS http_method,
        -- The request target as the proxy matches it: path and query string, without scheme and host.
        CASE WHEN $l7 AND http_url IS NOT NULL THEN coalesce(nullif(
            regexp_extract(http_url, '^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?([^#]*)', 1), ''), '/') END AS http_path,
        CASE
            WHEN NOT $l7 OR kafka_api_key IS NULL THEN NULL
            WHEN lower(replace(kafka_api_key, '_', '')) IN ('produce', '0') THEN 'produce'
            WHEN lower(replace(kafka_api_key, '_', '')) IN (
                'fetch', '1', 'offsets', 'listoffsets', '2', 'offsetcommit', '8', 'offsetfetch', '9',
                'findcoordinator', 'groupcoordinator', '10', 'joingroup', '11', 'heartbeat', '12',
                'leavegroup', '13', 'syncgroup', '14') THEN 'consume'
        END AS kafka_role,
        CASE WHEN $l7 THEN kafka_topic END AS kafka_topic,
        is_connection,
        folded,
        -- Learned from: delivered requests; with learn_from_drops also those the current policy denies.
        outcome = 'denied' AND NOT $learn_from_drops AS denied,
        at_hour_edge AND outcome = 'delivered' AND NOT $learn_from_drops AS hour_edge,
        CASE WHEN is_connection THEN 0 ELSE packets END AS packets,
        side,
        first_seen,
        last_seen
    FROM connections
    WHERE first_seen >= $since
      AND first_seen <= $until
      AND outcome IN ('delivered', 'denied')
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
      AND ($cluster IS NULL OR cluster_name = $cluster)
),
pairs AS (
    -- The calls folded per pod pair and outcome: a connection counts once, an ICMP or L7 call per observing
    -- side (the larger side wins below).
    SELECT
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload,
        source_reserved_identity, source_identity, source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_reserved_identity, destination_identity, destination_ip, destination_names, l4_protocol,
        destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic, denied, hour_edge,
        sum(folded) FILTER (WHERE is_connection) AS connections,
        sum(packets) FILTER (WHERE side = 'EGRESS') AS egress_flows,
        sum(packets) FILTER (WHERE side = 'INGRESS') AS ingress_flows,
        sum(packets) FILTER (WHERE side IS NULL OR side NOT IN ('EGRESS', 'INGRESS')) AS other_flows,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen
    FROM calls
    GROUP BY
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload,
        source_reserved_identity, source_identity, source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_reserved_identity, destination_identity, destination_ip, destination_names, l4_protocol,
        destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic, denied,
        hour_edge
),
denied_pairs AS (
    -- The pod pairs and ports denied in the window.
    SELECT DISTINCT
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_identity,
        source_ip, destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_identity, destination_ip, l4_protocol, destination_port,
        TRUE AS edge_denied
    FROM pairs
    WHERE denied
),
judged AS (
    -- A connection the source's node alone reported delivered within two seconds of an hour boundary is the
    -- source's half of a denied attempt when its edge was denied in the window: the destination's drop fell in
    -- the other hour (the edge definition counts a connection per hour). Such connections count as denied.
    SELECT
        p.cluster_name, p.source_namespace, p.source_pod_name, p.source_entity, p.source_workload,
        p.source_reserved_identity, p.source_identity, p.source_ip, p.destination_namespace,
        p.destination_pod_name, p.destination_entity, p.destination_workload, p.destination_reserved_identity,
        p.destination_identity, p.destination_ip, p.destination_names, p.l4_protocol, p.destination_port,
        p.icmp_type, p.l7_protocol, p.http_method, p.http_path, p.kafka_role, p.kafka_topic,
        p.denied OR (p.hour_edge AND coalesce(d.edge_denied, FALSE)) AS denied,
        p.connections, p.egress_flows, p.ingress_flows, p.other_flows, p.first_seen, p.last_seen
    FROM pairs AS p
    LEFT JOIN denied_pairs AS d
        ON d.cluster_name IS NOT DISTINCT FROM p.cluster_name
        AND d.source_namespace IS NOT DISTINCT FROM p.source_namespace
        AND d.source_pod_name IS NOT DISTINCT FROM p.source_pod_name
        AND d.source_entity IS NOT DISTINCT FROM p.source_entity
        AND d.source_workload IS NOT DISTINCT FROM p.source_workload
        AND d.source_identity IS NOT DISTINCT FROM p.source_identity
        AND d.source_ip IS NOT DISTINCT FROM p.source_ip
        AND d.destination_namespace IS NOT DISTINCT FROM p.destination_namespace
        AND d.destination_pod_name IS NOT DISTINCT FROM p.destination_pod_name
        AND d.destination_entity IS NOT DISTINCT FROM p.destination_entity
        AND d.destination_workload IS NOT DISTINCT FROM p.destination_workload
        AND d.destination_identity IS NOT DISTINCT FROM p.destination_identity
        AND d.destination_ip IS NOT DISTINCT FROM p.destination_ip
        AND d.l4_protocol IS NOT DISTINCT FROM p.l4_protocol
        AND d.destination_port IS NOT DISTINCT FROM p.destination_port
),
edge_ends AS (
    -- Both ends of every pair, named by the one definition of an edge's ends (sql/_parts/edge_endpoints.sql).
    SELECT cluster_name, source_namespace AS namespace, source_pod_name AS pod_name, source_identity AS identity,
           source_workload AS workload, source_entity AS entity, source_reserved_identity AS reserved_identity,
           source_ip AS ip, first_seen
    FROM judged
    UNION ALL
    SELECT cluster_name, destination_namespace, destination_pod_name, destination_identity, destination_workload,
           destination_entity, destination_reserved_identity, destination_ip, first_seen
    FROM judged
),
edge_flows AS NOT MATERIALIZED (
    -- The flows whose pods name the pods recorded with a reserved identity (the shared part below).
    SELECT * FROM flows_enriched
),
-- include: edge_endpoints
labelled AS (
    SELECT
        c.cluster_name,
        CASE WHEN c.source_entity IS NULL THEN c.source_namespace END AS source_namespace,
        CASE WHEN c.source_entity IS NULL THEN s.named_workload END AS source_workload,
        CASE
            WHEN c.source_entity IS NOT NULL THEN ['reserved:' || c.source_entity]
            WHEN s.named_reserved_identity IS NOT NULL THEN ['reserved:' || s.named_reserved_identity]
            ELSE coalesce(s.labels, [])
        END AS source_labels,
        c.source_entity,
        s.named_reserved_identity AS source_reserved_identity,
        CASE WHEN c.source_entity IS NOT NULL AND c.source_entity <> 'world' THEN c.source_ip END AS source_ip,
        CASE WHEN c.destination_entity IS NULL THEN c.destination_namespace END AS destination_namespace,
        CASE WHEN c.destination_entity IS NULL THEN d.named_workload END AS destination_workload,
        CASE
            WHEN c.destination_entity IS NOT NULL THEN ['reserved:' || c.destination_entity]
            WHEN d.named_reserved_identity IS NOT NULL THEN ['reserved:' || d.named_reserved_identity]
            ELSE coalesce(d.labels, [])
        END AS destination_labels,
        c.destination_entity,
        d.named_reserved_identity AS destination_reserved_identity,
        CASE WHEN c.destination_entity IS NOT NULL OR d.named_reserved_identity IS NOT NULL
            THEN c.destination_ip END AS destination_ip,
        CASE WHEN c.destination_entity IS NOT NULL THEN c.destination_names ELSE [] END AS destination_names,
        c.l4_protocol, c.destination_port, c.icmp_type, c.l7_protocol, c.http_method, c.http_path, c.kafka_role,
        c.kafka_topic, c.denied, c.connections, c.egress_flows, c.ingress_flows, c.other_flows, c.first_seen,
        c.last_seen
    FROM judged AS c
    LEFT JOIN edge_endpoints AS s
        ON s.cluster_name IS NOT DISTINCT FROM c.cluster_name AND s.namespace IS NOT DISTINCT FROM c.source_namespace
        AND s.pod_name IS NOT DISTINCT FROM c.source_pod_name AND s.identity IS NOT DISTINCT FROM c.source_identity
        AND s.workload IS NOT DISTINCT FROM c.source_workload AND s.entity IS NOT DISTINCT FROM c.source_entity
        AND s.reserved_identity IS NOT DISTINCT FROM c.source_reserved_identity
        AND s.ip IS NOT DISTINCT FROM c.source_ip
    LEFT JOIN edge_endpoints AS d
        ON d.cluster_name IS NOT DISTINCT FROM c.cluster_name
        AND d.namespace IS NOT DISTINCT FROM c.destination_namespace
        AND d.pod_name IS NOT DISTINCT FROM c.destination_pod_name
        AND d.identity IS NOT DISTINCT FROM c.destination_identity
        AND d.workload IS NOT DISTINCT FROM c.destination_workload
        AND d.entity IS NOT DISTINCT FROM c.destination_entity
        AND d.reserved_identity IS NOT DISTINCT FROM c.destination_reserved_identity
        AND d.ip IS NOT DISTINCT FROM c.destination_ip
)
SELECT
    source_namespace,
    source_workload,
    -- Pods of one workload differ only in per-rollout labels, which drafts never use.
    min(source_labels) AS source_labels,
    source_entity,
    source_reserved_identity,
    source_ip,
    destination_namespace,
    destination_workload,
    min(destination_labels) AS destination_labels,
    destination_entity,
    destination_reserved_identity,
    destination_ip,
    destination_names,
    l4_protocol,
    CAST(destination_port AS INTEGER) AS destination_port,
    CAST(icmp_type AS INTEGER) AS icmp_type,
    l7_protocol,
    http_method,
    http_path,
    kafka_role,
    kafka_topic,
    CAST(CASE
        WHEN sum(connections) > 0 THEN sum(connections)
        ELSE greatest(sum(egress_flows), sum(ingress_flows), sum(other_flows))
    END AS BIGINT) AS flows,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    cluster_name,
    CASE WHEN denied THEN 'denied' ELSE 'delivered' END AS status
FROM labelled
GROUP BY
    cluster_name, source_namespace, source_workload, source_entity, source_reserved_identity, source_ip,
    destination_namespace, destination_workload, destination_entity, destination_reserved_identity,
    destination_ip, destination_names, l4_protocol, destination_port, icmp_type, l7_protocol, http_method,
    http_path, kafka_role, kafka_topic, denied
ORDER BY
    cluster_name NULLS LAST, source_namespace NULLS LAST, source_workload NULLS LAST, source_entity NULLS LAST,
    source_ip NULLS LAST,
    destination_namespace NULLS LAST, destination_workload NULLS LAST, destination_entity NULLS LAST,
    destination_ip NULLS LAST, l4_protocol, destination_port NULLS LAST, icmp_type NULLS LAST,
    l7_protocol NULLS FIRST, http_method NULLS FIRST, http_path NULLS FIRST, kafka_role NULLS FIRST,
    kafka_topic NULLS FIRST, status

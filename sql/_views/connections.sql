-- description: The edge definition, once for every question and command that speaks of edges (observed_edges,
--   suggest, replay, least_privilege, new_connections, top_talkers): one row per request, however many
--   records Hubble wrote for it. Requests only (`is_request`: no replies, no L7 responses, no socket-LB events).
--   A TCP, UDP or SCTP connection is its 5-tuple (cluster, addresses, ports, protocol) within one hour
--   (`hour`), whatever end or ends reported it: the source node's FORWARDED egress record and the destination
--   node's delivery, drop notification and policy-verdict event are one connection. An ICMP echo pair and an L7 request have no
--   connection: they are one row per endpoint pair and call, per observing side (`side`: EGRESS records are
--   the source's view, INGRESS the destination's), and edges take the larger side.
--   `packets`: the request packets of the row counted once: the most records any one observer (node, event
--   type, observation point, direction, verdict) wrote for it, so a packet traced at several points, a drop
--   reported as a drop notification and a policy-verdict event, and a SYN seen at both ends count once; SYN
--   retransmits of a denied connection count as the packets they are.
--   `outcome`: `denied` when any end reported a policy-decision drop (an ingress denial is FORWARDED at the
--   source and DROPPED at the destination: denied, never delivered), else `delivered` when some end forwarded,
--   redirected or audited it, else `dropped` (only other drops: conntrack, routing...).
--   `denied_packets` / `dropped_packets`: packets dropped by policy / by anything, counted once as `packets`.
--   `source_observed` / `destination_observed`: whether the source's node (EGRESS) or the destination's node
--   (INGRESS) reported it. Endpoints are named as `flows_enriched` names them, taking the description from the
--   records that have one (a remote pod known only by identity at one end is the same pod as at the other).
--   The rows of `edge_observations` (each observer's records), however they were split (part files, edge
--   rollups and flows), are merged here first: a pod known only by identity takes its identity's workload.
-- requires: edge_observations, identity_workloads
WITH named AS (
    SELECT
        o.*,
        -- fallback: begin
        siw.workload AS source_identity_workload,
        diw.workload AS destination_identity_workload,
        -- fallback: end
        1 AS one
    FROM edge_observations AS o
    -- fallback: begin
    LEFT JOIN identity_workloads AS siw
        ON siw.identity = o.source_identity_key AND coalesce(siw.cluster_name, '') = coalesce(o.cluster_name, '')
    LEFT JOIN identity_workloads AS diw
        ON diw.identity = o.destination_identity_key
        AND coalesce(diw.cluster_name, '') = coalesce(o.cluster_name, '')
    -- fallback: end
),
observers AS (
    -- Each observer's records of each request (all its rows of `edge_observations` added up).
    SELECT
        cluster_name, hour, is_connection, source_ip, source_port, destination_ip, destination_port, l4_protocol,
        icmp_type, l7_protocol, http_method, http_url, kafka_api_key, kafka_topic, dns_query, side, node_name,
        event_type, trace_observation_point, traffic_direction, verdict, policy_drop,
        CAST(sum(records) AS BIGINT) AS records,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen,
        min(source_namespace) AS source_namespace,
        min(source_pod_name) AS source_pod_name,
        min(coalesce(
            -- fallback: begin
            source_identity_workload,
            -- fallback: end
            source_workload)) AS source_workload,
        min(coalesce(
            -- fallback: begin
            CASE WHEN source_namespace IS NOT NULL THEN source_namespace || '/' || source_identity_workload
                ELSE source_identity_workload END,
            -- fallback: end
            source_workload_id)) AS source_workload_id,
        min(source_entity) AS source_entity,
        min(source_reserved_identity) AS source_reserved_identity,
        min(source_unresolved_pod) AS source_unresolved_pod,
        min(source_identity) AS source_identity,
        min(source_identity_key) AS source_identity_key,
        min(destination_namespace) AS destination_namespace,
        min(destination_pod_name) AS destination_pod_name,
        min(coalesce(
            -- fallback: begin
            destination_identity_workload,
            -- fallback: end
            destination_workload)) AS destination_workload,
        min(coalesce(
            -- fallback: begin
            CASE WHEN destination_namespace IS NOT NULL
                THEN destination_namespace || '/' || destination_identity_workload
                ELSE destination_identity_workload END,
            -- fallback: end
            destination_workload_id)) AS destination_workload_id,
        min(destination_entity) AS destination_entity,
        min(destination_reserved_identity) AS destination_reserved_identity,
        min(destination_unresolved_pod) AS destination_unresolved_pod,
        min(destination_identity) AS destination_identity,
        min(destination_identity_key) AS destination_identity_key,
        min(destination_names) AS destination_names
    FROM named
    GROUP BY
        cluster_name, hour, is_connection, source_ip, source_port, destination_ip, destination_port, l4_protocol,
        icmp_type, l7_protocol, http_method, http_url, kafka_api_key, kafka_topic, dns_query, side, node_name,
        event_type, trace_observation_point, traffic_direction, verdict, policy_drop
)
SELECT
    cluster_name,
    hour,
    is_connection,
    source_ip,
    source_port,
    destination_ip,
    destination_port,
    l4_protocol,
    icmp_type,
    l7_protocol,
    http_method,
    http_url,
    kafka_api_key,
    kafka_topic,
    dns_query,
    nullif(side, '') AS side,
    CASE
        WHEN bool_or(policy_drop) THEN 'denied'
        WHEN bool_or(verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT')) THEN 'delivered'
        ELSE 'dropped'
    END AS outcome,
    max(records) AS packets,
    coalesce(max(CASE WHEN policy_drop THEN records END), 0) AS denied_packets,
    coalesce(max(CASE WHEN verdict = 'DROPPED' THEN records END), 0) AS dropped_packets,
    bool_or(traffic_direction = 'EGRESS') AS source_observed,
    bool_or(traffic_direction = 'INGRESS') AS destination_observed,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    -- A pod seen by name at one end and only by identity at the other is that pod: the named description wins.
    min(source_namespace) AS source_namespace,
    min(source_pod_name) AS source_pod_name,
    coalesce(min(CASE WHEN source_namespace IS NOT NULL THEN source_workload END), min(source_workload))
        AS source_workload,
    coalesce(min(CASE WHEN source_namespace IS NOT NULL THEN source_workload_id END), min(source_workload_id))
        AS source_workload_id,
    CASE WHEN min(source_namespace) IS NULL THEN min(source_entity) END AS source_entity,
    min(source_reserved_identity) AS source_reserved_identity,
    min(source_unresolved_pod) AS source_unresolved_pod,
    min(source_identity) AS source_identity,
    min(destination_namespace) AS destination_namespace,
    min(destination_pod_name) AS destination_pod_name,
    coalesce(min(CASE WHEN destination_namespace IS NOT NULL THEN destination_workload END),
        min(destination_workload)) AS destination_workload,
    coalesce(min(CASE WHEN destination_namespace IS NOT NULL THEN destination_workload_id END),
        min(destination_workload_id)) AS destination_workload_id,
    CASE WHEN min(destination_namespace) IS NULL THEN min(destination_entity) END AS destination_entity,
    min(destination_reserved_identity) AS destination_reserved_identity,
    min(destination_unresolved_pod) AS destination_unresolved_pod,
    min(destination_identity) AS destination_identity,
    min(destination_names) AS destination_names,
    -- How many rows of this definition the row stands for (1; more in an hour of folded edge rollups).
    CAST(1 AS BIGINT) AS folded,
    -- Delivered as far as the source's node saw it, with no report from the destination's, within two seconds
    -- of an hour boundary: possibly the source's half of an attempt the destination denied in the other hour
    -- (nodes' clocks differ by milliseconds), which observed_edges counts as denied when its edge was denied.
    coalesce(
        is_connection AND NOT bool_or(policy_drop) AND bool_or(traffic_direction = 'EGRESS')
        AND NOT bool_or(traffic_direction = 'INGRESS')
        AND (min(first_seen) < hour + INTERVAL 2 SECOND OR max(last_seen) >= hour + INTERVAL 3598 SECOND),
        FALSE) AS at_hour_edge,
    -- A pod known only by its identity at every end that reported it: that identity (its name is looked up).
    min(source_identity_key) AS source_identity_key,
    min(destination_identity_key) AS destination_identity_key
FROM observers
GROUP BY
    cluster_name, hour, is_connection, source_ip, source_port, destination_ip, destination_port, l4_protocol,
    icmp_type, l7_protocol, http_method, http_url, kafka_api_key, kafka_topic, dns_query, side

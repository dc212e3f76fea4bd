-- description: The first step of the edge definition (`connections`): each observer's records of each request,
--   one row per connection key (a TCP, UDP or SCTP 5-tuple; an ICMP or L7 call per observing side), observer
--   (node, event type, observation point, direction, verdict, policy drop) and, for a pod known only by its
--   identity, that identity (`*_identity_key`, so that its name can be taken again from `identity_workloads`).
--   A connection is its key within one hour (`hour`, of each record's time): a connection whose records span an
--   hour boundary is a connection in each hour, so that an hour's rows can be merged for good (edge rollups).
--   `records` counts the records, `first_seen` / `last_seen` bound them. Every column but `records`,
--   `first_seen`, `last_seen` and the endpoint descriptions is the key, and rows of the same key add up (sum,
--   min, max), so the rows of any split of the flows (part files, hours) merge into the rows of all of them:
--   edge rollups (`<dataset>/edges/`) store exactly these rows per part file.
-- requires: flows_enriched
WITH records AS (
    SELECT
        cluster_name,
        time,
        date_trunc('hour', time) AS hour,
        node_name,
        event_type,
        trace_observation_point,
        traffic_direction,
        verdict,
        is_reply,
        tcp_flags,
        l4_protocol,
        source_ip,
        destination_ip,
        source_port,
        destination_port,
        icmp_type,
        l7_type,
        l7_protocol,
        http_method,
        http_url,
        kafka_api_key,
        kafka_topic,
        dns_query,
        source_namespace,
        source_pod_name,
        source_workload,
        source_workload_id,
        source_entity,
        source_reserved_identity,
        source_unresolved_pod,
        source_identity,
        destination_namespace,
        destination_pod_name,
        destination_workload,
        destination_workload_id,
        destination_entity,
        destination_reserved_identity,
        destination_unresolved_pod,
        destination_identity,
        destination_names,
        -- A pod known only by identity (no pod or workload name) is named by its identity's workload where the
        -- pod is named elsewhere (identity_workloads): kept apart so that the name can be taken again later.
        CASE WHEN source_pod_name IS NULL AND source_workload_name IS NULL AND source_entity IS NULL
            AND source_identity >= 256 AND source_identity < 16777216 THEN source_identity END
            AS source_identity_key,
        CASE WHEN destination_pod_name IS NULL AND destination_workload_name IS NULL
            AND destination_entity IS NULL AND destination_identity >= 256 AND destination_identity < 16777216
            THEN destination_identity END AS destination_identity_key,
        l7_type IS NULL AND l4_protocol IN ('TCP', 'UDP', 'SCTP') AND source_port IS NOT NULL AS is_connection,
        verdict = 'DROPPED' AND coalesce(
            drop_reason_desc IN (SELECT drop_reason_desc FROM drop_reasons WHERE policy_decision), FALSE)
            AS policy_drop
    FROM flows_enriched
    WHERE is_request
      -- Without is_reply, a TCP packet with flags is a request only when it opens the connection.
      AND NOT (is_reply IS NULL AND l4_protocol = 'TCP' AND tcp_flags IS NOT NULL
               AND NOT (tcp_flags LIKE '%SYN%' AND tcp_flags NOT LIKE '%ACK%'))
),
observations AS (
    -- Each observer's records of each request: one node, event type, observation point, direction, verdict.
    SELECT
        cluster_name,
        hour,
        is_connection,
        -- The key of a connection (5-tuple) or of an ICMP / L7 call (endpoint pair, call, observing side); the
        -- ICMP and L7 fields are NULL on L4 records.
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
        CASE WHEN is_connection THEN NULL ELSE coalesce(traffic_direction, '') END AS side,
        node_name,
        event_type,
        trace_observation_point,
        traffic_direction,
        verdict,
        policy_drop,
        source_identity_key,
        destination_identity_key,
        count(*) AS records,
        min(time) AS first_seen,
        max(time) AS last_seen,
        min(source_namespace) AS source_namespace,
        min(source_pod_name) AS source_pod_name,
        min(source_workload) AS source_workload,
        min(source_workload_id) AS source_workload_id,
        min(source_entity) AS source_entity,
        min(source_reserved_identity) AS source_reserved_identity,
        min(source_unresolved_pod) AS source_unresolved_pod,
        min(source_identity) AS source_identity,
        min(destination_namespace) AS destination_namespace,
        min(destination_pod_name) AS destination_pod_name,
        min(destination_workload) AS destination_workload,
        min(destination_workload_id) AS destination_workload_id,
        min(destination_entity) AS destination_entity,
        min(destination_reserved_identity) AS destination_reserved_identity,
        min(destination_unresolved_pod) AS destination_unresolved_pod,
        min(destination_identity) AS destination_identity,
        min(list_sort(destination_names)) AS destination_names
    FROM records
    GROUP BY
        cluster_name, hour, is_connection, source_ip, source_port, destination_ip, destination_port, l4_protocol,
        icmp_type, l7_protocol, http_method, http_url, kafka_api_key, kafka_topic, dns_query,
        CASE WHEN is_connection THEN NULL ELSE coalesce(traffic_direction, '') END, node_name, event_type,
        trace_observation_point, traffic_direction, verdict, policy_drop, source_identity_key,
        destination_identity_key
)
SELECT * FROM observations

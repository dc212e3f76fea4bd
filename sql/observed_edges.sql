-- description: The observed request graph that `flowpipe suggest` drafts policies from: one row per distinct
--   edge (source workload or entity → destination workload, entity or address, protocol and port, and for L7
--   records the HTTP method and path, Kafka role and topic), with the number of connections or requests behind
--   it. Replies never count (`is_reply`, L7 responses, and for TCP without `is_reply` only SYN without ACK is a
--   request). Each connection counts once although Hubble reports it at both ends: TCP, UDP and SCTP rows count
--   distinct (source address and port, destination address and port); ICMP and L7 rows count per observation
--   side and take the larger side. Learns from FORWARDED, REDIRECTED and AUDIT flows; `learn_from_drops=true`
--   adds policy-denied drops (for clusters already in default-deny). Pods carry their labels; other endpoints
--   their reserved entity (`world`, `host`, `kube-apiserver`, ...), the address (except world sources) and, for
--   world destinations, the DNS names Cilium knows. A namespace filter matches either side. The columns are
--   the contract of `flowpipe.policy.edges.OBSERVED_EDGE_SCHEMA`.
-- params: since=7d, until=now, namespace=, learn_from_drops=false
WITH windowed AS (
    SELECT
        *,
        -- A pod whose record lacks its identity (older agents report L7 records of the egress proxy with the
        -- world identity and no labels): it is looked up by pod name among the pods seen in the window.
        (source_namespace IS NOT NULL AND source_pod_name IS NOT NULL
            AND position('k8s:' IN coalesce(array_to_string(source_labels, ' '), '')) = 0) AS source_unresolved,
        (destination_namespace IS NOT NULL AND destination_pod_name IS NOT NULL
            AND position('k8s:' IN coalesce(array_to_string(destination_labels, ' '), '')) = 0)
            AS destination_unresolved
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
),
pods AS (
    SELECT namespace, pod_name, min(workload) AS workload, min(labels) AS labels
    FROM (
        SELECT source_namespace AS namespace, source_pod_name AS pod_name, source_workload AS workload,
               source_labels AS labels
        FROM windowed
        WHERE source_entity IS NULL AND source_pod_name IS NOT NULL AND NOT source_unresolved
        UNION ALL
        SELECT destination_namespace, destination_pod_name, destination_workload, destination_labels
        FROM windowed
        WHERE destination_entity IS NULL AND destination_pod_name IS NOT NULL AND NOT destination_unresolved
    ) AS seen
    GROUP BY namespace, pod_name
),
resolved AS (
    -- The columns `requests` reads, with the identity of unresolved pods looked up (columns listed one by one:
    -- DuckDB's `* REPLACE` does not translate to Spark).
    SELECT
        w.time,
        w.traffic_direction,
        w.is_request,
        w.is_reply,
        w.verdict,
        w.drop_reason_desc,
        w.source_namespace,
        CASE WHEN sp.pod_name IS NULL THEN w.source_entity END AS source_entity,
        coalesce(sp.workload, w.source_workload) AS source_workload,
        coalesce(sp.labels, w.source_labels) AS source_labels,
        w.source_ip,
        w.source_port,
        w.destination_namespace,
        CASE WHEN dp.pod_name IS NULL THEN w.destination_entity END AS destination_entity,
        coalesce(dp.workload, w.destination_workload) AS destination_workload,
        coalesce(dp.labels, w.destination_labels) AS destination_labels,
        w.destination_ip,
        w.destination_port,
        w.destination_names,
        w.l4_protocol,
        w.icmp_type,
        w.tcp_flags,
        w.l7_type,
        w.l7_protocol,
        w.http_method,
        w.http_url,
        w.kafka_api_key,
        w.kafka_topic
    FROM windowed AS w
    LEFT JOIN pods AS sp
        ON w.source_unresolved AND sp.namespace = w.source_namespace AND sp.pod_name = w.source_pod_name
    LEFT JOIN pods AS dp
        ON w.destination_unresolved AND dp.namespace = w.destination_namespace
        AND dp.pod_name = w.destination_pod_name
),
requests AS (
    SELECT
        time,
        traffic_direction,
        CASE WHEN source_entity IS NULL THEN source_namespace END AS source_namespace,
        CASE WHEN source_entity IS NULL THEN source_workload END AS source_workload,
        source_labels,
        source_entity,
        -- World clients are many and only the entity matters for them; other entities keep their address.
        CASE WHEN source_entity IS NOT NULL AND source_entity <> 'world' THEN source_ip END AS source_ip,
        CASE WHEN destination_entity IS NULL THEN destination_namespace END AS destination_namespace,
        CASE WHEN destination_entity IS NULL THEN destination_workload END AS destination_workload,
        destination_labels,
        destination_entity,
        CASE WHEN destination_entity IS NOT NULL THEN destination_ip END AS destination_ip,
        CASE WHEN destination_entity IS NOT NULL THEN list_sort(destination_names) ELSE [] END AS destination_names,
        l4_protocol,
        CASE WHEN l4_protocol IN ('TCP', 'UDP', 'SCTP') THEN destination_port END AS destination_port,
        CASE WHEN l4_protocol IN ('ICMPv4', 'ICMPv6') THEN icmp_type END AS icmp_type,
        CASE WHEN l7_type = 'REQUEST' THEN l7_protocol END AS l7_protocol,
        CASE WHEN l7_type = 'REQUEST' THEN http_method END AS http_method,
        -- The request target as the proxy matches it: path and query string, without scheme and host.
        CASE WHEN l7_type = 'REQUEST' AND http_url IS NOT NULL THEN coalesce(nullif(
            regexp_extract(http_url, '^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?([^#]*)', 1), ''), '/') END AS http_path,
        CASE
            WHEN l7_type <> 'REQUEST' OR kafka_api_key IS NULL THEN NULL
            WHEN lower(replace(kafka_api_key, '_', '')) IN ('produce', '0') THEN 'produce'
            WHEN lower(replace(kafka_api_key, '_', '')) IN (
                'fetch', '1', 'offsets', 'listoffsets', '2', 'offsetcommit', '8', 'offsetfetch', '9',
                'findcoordinator', 'groupcoordinator', '10', 'joingroup', '11', 'heartbeat', '12',
                'leavegroup', '13', 'syncgroup', '14') THEN 'consume'
        END AS kafka_role,
        CASE WHEN l7_type = 'REQUEST' THEN kafka_topic END AS kafka_topic,
        -- One connection: the same 5-tuple seen at both ends (and in every packet's flow) is counted once.
        CASE WHEN l7_type IS NULL AND l4_protocol IN ('TCP', 'UDP', 'SCTP') AND source_port IS NOT NULL
            THEN source_ip || '|' || CAST(source_port AS VARCHAR) || '|' || coalesce(destination_ip, '')
                || '|' || CAST(destination_port AS VARCHAR) END AS connection
    FROM resolved
    WHERE is_request
      AND (l7_type IS NULL OR l7_type = 'REQUEST')
      -- Without is_reply, a TCP packet with flags is a request only when it opens the connection.
      AND NOT (is_reply IS NULL AND l4_protocol = 'TCP' AND tcp_flags IS NOT NULL
               AND NOT (tcp_flags LIKE '%SYN%' AND tcp_flags NOT LIKE '%ACK%'))
      AND (
          verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT')
          OR ($learn_from_drops AND verdict = 'DROPPED'
              AND drop_reason_desc IN (SELECT drop_reason_desc FROM drop_reasons WHERE policy_decision))
      )
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
)
SELECT
    source_namespace,
    source_workload,
    -- Pods of one workload differ only in per-rollout labels, which drafts never use.
    min(source_labels) AS source_labels,
    source_entity,
    source_ip,
    destination_namespace,
    destination_workload,
    min(destination_labels) AS destination_labels,
    destination_entity,
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
        WHEN count(connection) > 0 THEN count(DISTINCT connection)
        ELSE greatest(
            count(*) FILTER (WHERE traffic_direction = 'EGRESS'),
            count(*) FILTER (WHERE traffic_direction = 'INGRESS'),
            count(*) FILTER (WHERE traffic_direction IS NULL OR traffic_direction NOT IN ('EGRESS', 'INGRESS')))
    END AS BIGINT) AS flows,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM requests
GROUP BY
    source_namespace, source_workload, source_entity, source_ip,
    destination_namespace, destination_workload, destination_entity, destination_ip, destination_names,
    l4_protocol, destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic
ORDER BY
    source_namespace NULLS LAST, source_workload NULLS LAST, source_entity NULLS LAST, source_ip NULLS LAST,
    destination_namespace NULLS LAST, destination_workload NULLS LAST, destination_entity NULLS LAST,
    destination_ip NULLS LAST, l4_protocol, destination_port NULLS LAST, icmp_type NULLS LAST,
    l7_protocol NULLS FIRST, http_method NULLS FIRST, http_path NULLS FIRST, kafka_role NULLS FIRST,
    kafka_topic NULLS FIRST

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
--   the contract of `flowpipe.policy.edges.OBSERVED_EDGE_SCHEMA`. `l7=false` leaves out the HTTP and Kafka
--   fields (the L7 rows then fold into one per edge and protocol), for drafts without L7 rules. Edges are
--   per cluster (`cluster_name`): a pod is looked up, and its labels read, only within its own cluster;
--   `cluster=NAME` keeps the flows of that cluster only (a policy applies to one cluster).
-- params: since=7d, until=now, namespace=, learn_from_drops=false, l7=true, cluster=
--
-- How it stays fast: labels are lists of a dozen strings on every flow, and reading them costs more than the
-- rest of the question. So the flows are first grouped without them (`calls`: one row per connection, or per
-- pod pair and L7 call), and each pod's labels are then read from the one flow where the pod was first seen
-- (`pod_labels`), which DuckDB finds without decoding the labels of the other flows.
WITH requests AS (
    SELECT
        cluster_name,
        time,
        traffic_direction,
        source_namespace,
        source_pod_name,
        source_entity,
        source_workload,
        destination_namespace,
        destination_pod_name,
        destination_entity,
        destination_workload,
        -- A pod recorded with a reserved identity (flows_enriched): it is looked up by pod name among the pods
        -- of its cluster seen in the window.
        source_unresolved_pod IS NOT NULL AS source_unresolved,
        destination_unresolved_pod IS NOT NULL AS destination_unresolved,
        -- World clients are many and only the entity matters for them; other entities keep their address.
        CASE WHEN source_entity IS NOT NULL AND source_entity <> 'world' THEN source_ip END AS source_ip,
        CASE WHEN destination_entity IS NOT NULL THEN destination_ip END AS destination_ip,
        CASE WHEN l7_type IS NULL AND l4_protocol IN ('TCP', 'UDP', 'SCTP') AND source_port IS NOT NULL
            THEN source_ip END AS connection_source_ip,
        CASE WHEN l7_type IS NULL AND l4_protocol IN ('TCP', 'UDP', 'SCTP') THEN source_port END
            AS connection_source_port,
        CASE WHEN l7_type IS NULL AND l4_protocol IN ('TCP', 'UDP', 'SCTP') AND source_port IS NOT NULL
            THEN destination_ip END AS connection_destination_ip,
        CASE WHEN destination_entity IS NOT NULL THEN list_sort(destination_names) ELSE [] END AS destination_names,
        l4_protocol,
        CASE WHEN l4_protocol IN ('TCP', 'UDP', 'SCTP') THEN destination_port END AS destination_port,
        CASE WHEN l4_protocol IN ('ICMPv4', 'ICMPv6') THEN icmp_type END AS icmp_type,
        CASE WHEN l7_type = 'REQUEST' THEN l7_protocol END AS l7_protocol,
        CASE WHEN l7_type = 'REQUEST' AND $l7 THEN http_method END AS http_method,
        -- The request target as the proxy matches it: path and query string, without scheme and host.
        CASE WHEN l7_type = 'REQUEST' AND $l7 AND http_url IS NOT NULL THEN coalesce(nullif(
            regexp_extract(http_url, '^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)?([^#]*)', 1), ''), '/') END AS http_path,
        CASE
            WHEN l7_type <> 'REQUEST' OR NOT $l7 OR kafka_api_key IS NULL THEN NULL
            WHEN lower(replace(kafka_api_key, '_', '')) IN ('produce', '0') THEN 'produce'
            WHEN lower(replace(kafka_api_key, '_', '')) IN (
                'fetch', '1', 'offsets', 'listoffsets', '2', 'offsetcommit', '8', 'offsetfetch', '9',
                'findcoordinator', 'groupcoordinator', '10', 'joingroup', '11', 'heartbeat', '12',
                'leavegroup', '13', 'syncgroup', '14') THEN 'consume'
        END AS kafka_role,
        CASE WHEN l7_type = 'REQUEST' AND $l7 THEN kafka_topic END AS kafka_topic
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND is_request
      -- Without is_reply, a TCP packet with flags is a request only when it opens the connection.
      AND NOT (is_reply IS NULL AND l4_protocol = 'TCP' AND tcp_flags IS NOT NULL
               AND NOT (tcp_flags LIKE '%SYN%' AND tcp_flags NOT LIKE '%ACK%'))
      AND (
          verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT')
          OR ($learn_from_drops AND verdict = 'DROPPED'
              AND drop_reason_desc IN (SELECT drop_reason_desc FROM drop_reasons WHERE policy_decision))
      )
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
      AND ($cluster IS NULL OR cluster_name = $cluster)
),
calls AS (
    -- One row per connection (TCP, UDP, SCTP: the same 5-tuple seen at both ends and in every packet's flow)
    -- or per pod pair and call (ICMP, L7), with its flows per observation point.
    SELECT
        cluster_name,
        source_namespace,
        source_pod_name,
        source_entity,
        source_workload,
        source_unresolved,
        source_ip,
        destination_namespace,
        destination_pod_name,
        destination_entity,
        destination_workload,
        destination_unresolved,
        destination_ip,
        destination_names,
        l4_protocol,
        destination_port,
        icmp_type,
        l7_protocol,
        http_method,
        http_path,
        kafka_role,
        kafka_topic,
        connection_source_ip,
        connection_source_port,
        connection_destination_ip,
        count(*) FILTER (WHERE traffic_direction = 'EGRESS') AS egress_flows,
        count(*) FILTER (WHERE traffic_direction = 'INGRESS') AS ingress_flows,
        count(*) FILTER (WHERE traffic_direction IS NULL OR traffic_direction NOT IN ('EGRESS', 'INGRESS'))
            AS other_flows,
        min(time) AS first_seen,
        max(time) AS last_seen
    FROM requests
    GROUP BY
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_unresolved,
        source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_unresolved, destination_ip, destination_names, l4_protocol, destination_port, icmp_type,
        l7_protocol, http_method, http_path, kafka_role, kafka_topic, connection_source_ip,
        connection_source_port, connection_destination_ip
),
pairs AS (
    -- The connections folded per pod pair: a connection is one `calls` row, so its rows count connections.
    SELECT
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_unresolved,
        source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_unresolved, destination_ip, destination_names, l4_protocol, destination_port, icmp_type,
        l7_protocol, http_method, http_path, kafka_role, kafka_topic,
        count(connection_source_port) AS connections,
        sum(egress_flows) AS egress_flows,
        sum(ingress_flows) AS ingress_flows,
        sum(other_flows) AS other_flows,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen
    FROM calls
    GROUP BY
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_unresolved,
        source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_unresolved, destination_ip, destination_names, l4_protocol, destination_port, icmp_type,
        l7_protocol, http_method, http_path, kafka_role, kafka_topic
),
pods AS (
    -- Every pod of the requests (per cluster), with its workload and the first flow that names it as a pod.
    SELECT cluster_name, namespace, pod_name, min(workload) AS workload, min(source_time) AS source_time,
           min(destination_time) AS destination_time
    FROM (
        SELECT cluster_name, source_namespace AS namespace, source_pod_name AS pod_name,
               source_workload AS workload, first_seen AS source_time,
               CAST(NULL AS TIMESTAMP WITH TIME ZONE) AS destination_time
        FROM pairs
        WHERE source_entity IS NULL AND source_pod_name IS NOT NULL
        UNION ALL
        SELECT cluster_name, destination_namespace, destination_pod_name, destination_workload,
               CAST(NULL AS TIMESTAMP WITH TIME ZONE), first_seen
        FROM pairs
        WHERE destination_entity IS NULL AND destination_pod_name IS NOT NULL
    ) AS seen
    GROUP BY cluster_name, namespace, pod_name
),
pod_labels AS (
    -- A pod's labels, read from the first flow naming it (as the client, else as the server).
    SELECT cluster_name, namespace, pod_name, min(labels) AS labels
    FROM (
        SELECT p.cluster_name, p.namespace, p.pod_name, f.source_labels AS labels
        FROM flows AS f
        JOIN pods AS p
            ON f.time = p.source_time AND f.source_namespace = p.namespace AND f.source_pod_name = p.pod_name
            AND coalesce(f.cluster_name, '') = coalesce(p.cluster_name, '')
        UNION ALL
        SELECT p.cluster_name, p.namespace, p.pod_name, f.destination_labels
        FROM flows AS f
        JOIN pods AS p
            ON f.time = p.destination_time AND f.destination_namespace = p.namespace
            AND f.destination_pod_name = p.pod_name AND coalesce(f.cluster_name, '') = coalesce(p.cluster_name, '')
        WHERE p.source_time IS NULL
    ) AS seen
    GROUP BY cluster_name, namespace, pod_name
),
edges AS (
    -- Pods named without their identity take the workload their pod name has elsewhere in their cluster.
    SELECT
        c.cluster_name,
        CASE WHEN c.source_unresolved AND sp.pod_name IS NOT NULL THEN NULL ELSE c.source_entity END
            AS source_entity,
        CASE WHEN c.source_unresolved AND sp.pod_name IS NOT NULL THEN sp.workload ELSE c.source_workload END
            AS source_workload,
        c.source_namespace, c.source_pod_name, c.source_ip,
        CASE WHEN c.destination_unresolved AND dp.pod_name IS NOT NULL THEN NULL ELSE c.destination_entity END
            AS destination_entity,
        CASE WHEN c.destination_unresolved AND dp.pod_name IS NOT NULL THEN dp.workload
            ELSE c.destination_workload END AS destination_workload,
        c.destination_namespace, c.destination_pod_name, c.destination_ip, c.destination_names,
        c.l4_protocol, c.destination_port, c.icmp_type, c.l7_protocol, c.http_method, c.http_path, c.kafka_role,
        c.kafka_topic, c.connections, c.egress_flows, c.ingress_flows, c.other_flows, c.first_seen, c.last_seen
    FROM pairs AS c
    LEFT JOIN pods AS sp
        ON c.source_unresolved AND sp.namespace = c.source_namespace AND sp.pod_name = c.source_pod_name
        AND coalesce(sp.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN pods AS dp
        ON c.destination_unresolved AND dp.namespace = c.destination_namespace
        AND dp.pod_name = c.destination_pod_name AND coalesce(dp.cluster_name, '') = coalesce(c.cluster_name, '')
),
labelled AS (
    SELECT
        e.cluster_name,
        CASE WHEN e.source_entity IS NULL THEN e.source_namespace END AS source_namespace,
        CASE WHEN e.source_entity IS NULL THEN e.source_workload END AS source_workload,
        CASE WHEN e.source_entity IS NULL THEN coalesce(sl.labels, [])
            ELSE ['reserved:' || e.source_entity] END AS source_labels,
        e.source_entity,
        CASE WHEN e.source_entity IS NOT NULL AND e.source_entity <> 'world' THEN e.source_ip END AS source_ip,
        CASE WHEN e.destination_entity IS NULL THEN e.destination_namespace END AS destination_namespace,
        CASE WHEN e.destination_entity IS NULL THEN e.destination_workload END AS destination_workload,
        CASE WHEN e.destination_entity IS NULL THEN coalesce(dl.labels, [])
            ELSE ['reserved:' || e.destination_entity] END AS destination_labels,
        e.destination_entity,
        CASE WHEN e.destination_entity IS NOT NULL THEN e.destination_ip END AS destination_ip,
        CASE WHEN e.destination_entity IS NOT NULL THEN e.destination_names ELSE [] END AS destination_names,
        e.l4_protocol, e.destination_port, e.icmp_type, e.l7_protocol, e.http_method, e.http_path, e.kafka_role,
        e.kafka_topic, e.connections, e.egress_flows, e.ingress_flows, e.other_flows, e.first_seen, e.last_seen
    FROM edges AS e
    LEFT JOIN pod_labels AS sl
        ON sl.namespace = e.source_namespace AND sl.pod_name = e.source_pod_name
        AND coalesce(sl.cluster_name, '') = coalesce(e.cluster_name, '')
    LEFT JOIN pod_labels AS dl
        ON dl.namespace = e.destination_namespace AND dl.pod_name = e.destination_pod_name
        AND coalesce(dl.cluster_name, '') = coalesce(e.cluster_name, '')
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
        WHEN sum(connections) > 0 THEN sum(connections)
        ELSE greatest(sum(egress_flows), sum(ingress_flows), sum(other_flows))
    END AS BIGINT) AS flows,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    cluster_name
FROM labelled
GROUP BY
    cluster_name, source_namespace, source_workload, source_entity, source_ip,
    destination_namespace, destination_workload, destination_entity, destination_ip, destination_names,
    l4_protocol, destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic
ORDER BY
    cluster_name NULLS LAST, source_namespace NULLS LAST, source_workload NULLS LAST, source_entity NULLS LAST,
    source_ip NULLS LAST,
    destination_namespace NULLS LAST, destination_workload NULLS LAST, destination_entity NULLS LAST,
    destination_ip NULLS LAST, l4_protocol, destination_port NULLS LAST, icmp_type NULLS LAST,
    l7_protocol NULLS FIRST, http_method NULLS FIRST, http_path NULLS FIRST, kafka_role NULLS FIRST,
    kafka_topic NULLS FIRST

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
-- rest of the question. So the flows are first grouped without them (`connections`), and each pod identity's
-- labels are then read from the flows of the first second it was seen (`identity_labels`), which DuckDB
-- finds without decoding the labels of the other flows.
WITH calls AS (
    -- The requests of the window as the edge definition counts them (the shared view `connections`): one row
    -- per connection, whatever end or ends reported it, or per ICMP / L7 call and observing side.
    SELECT
        cluster_name,
        source_namespace,
        source_pod_name,
        source_entity,
        source_workload,
        -- A pod recorded with a reserved identity (flows_enriched): it is looked up by pod name among the pods
        -- of its cluster seen in the window.
        source_unresolved_pod IS NOT NULL AS source_unresolved,
        source_reserved_identity,
        source_identity,
        -- World clients are many and only the entity matters for them; other entities keep their address.
        CASE WHEN source_entity IS NOT NULL AND source_entity <> 'world' THEN source_ip END AS source_ip,
        destination_namespace,
        destination_pod_name,
        destination_entity,
        destination_workload,
        destination_unresolved_pod IS NOT NULL AS destination_unresolved,
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
        -- Learned from: delivered requests; with learn_from_drops also those the current policy denies.
        outcome = 'denied' AND NOT $learn_from_drops AS denied,
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
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_unresolved,
        source_reserved_identity, source_identity, source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_unresolved, destination_reserved_identity, destination_identity, destination_ip, destination_names, l4_protocol,
        destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic, denied,
        count(*) FILTER (WHERE is_connection) AS connections,
        sum(packets) FILTER (WHERE side = 'EGRESS') AS egress_flows,
        sum(packets) FILTER (WHERE side = 'INGRESS') AS ingress_flows,
        sum(packets) FILTER (WHERE side IS NULL OR side NOT IN ('EGRESS', 'INGRESS')) AS other_flows,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen
    FROM calls
    GROUP BY
        cluster_name, source_namespace, source_pod_name, source_entity, source_workload, source_unresolved,
        source_reserved_identity, source_identity, source_ip,
        destination_namespace, destination_pod_name, destination_entity, destination_workload,
        destination_unresolved, destination_reserved_identity, destination_identity, destination_ip, destination_names, l4_protocol,
        destination_port, icmp_type, l7_protocol, http_method, http_path, kafka_role, kafka_topic, denied
),
pods AS (
    -- Every pod of the requests named with its own identity (per cluster), for the pods recorded with a
    -- reserved identity: they take the workload and identity their pod name has elsewhere in their cluster.
    SELECT cluster_name, namespace, pod_name, min(workload) AS workload, min(identity) AS identity
    FROM (
        SELECT cluster_name, source_namespace AS namespace, source_pod_name AS pod_name,
               source_workload AS workload, source_identity AS identity
        FROM pairs
        WHERE source_entity IS NULL AND source_pod_name IS NOT NULL AND NOT source_unresolved
        UNION ALL
        SELECT cluster_name, destination_namespace, destination_pod_name, destination_workload,
               destination_identity
        FROM pairs
        WHERE destination_entity IS NULL AND destination_pod_name IS NOT NULL AND NOT destination_unresolved
    ) AS seen
    GROUP BY cluster_name, namespace, pod_name
),
edges AS (
    SELECT
        c.cluster_name,
        c.source_entity,
        CASE WHEN sp.pod_name IS NOT NULL THEN sp.workload ELSE c.source_workload END AS source_workload,
        CASE WHEN sp.pod_name IS NOT NULL THEN sp.identity ELSE c.source_identity END AS source_identity,
        CASE WHEN sp.pod_name IS NULL THEN c.source_reserved_identity END AS source_reserved_identity,
        c.source_namespace, c.source_ip,
        c.destination_entity,
        CASE WHEN dp.pod_name IS NOT NULL THEN dp.workload ELSE c.destination_workload END
            AS destination_workload,
        CASE WHEN dp.pod_name IS NOT NULL THEN dp.identity ELSE c.destination_identity END
            AS destination_identity,
        CASE WHEN dp.pod_name IS NULL THEN c.destination_reserved_identity END AS destination_reserved_identity,
        c.destination_namespace, c.destination_ip, c.destination_names,
        c.l4_protocol, c.destination_port, c.icmp_type, c.l7_protocol, c.http_method, c.http_path, c.kafka_role,
        c.kafka_topic, c.denied, c.connections, c.egress_flows, c.ingress_flows, c.other_flows, c.first_seen,
        c.last_seen
    FROM pairs AS c
    LEFT JOIN pods AS sp
        ON c.source_unresolved AND sp.namespace = c.source_namespace AND sp.pod_name = c.source_pod_name
        AND coalesce(sp.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN pods AS dp
        ON c.destination_unresolved AND dp.namespace = c.destination_namespace
        AND dp.pod_name = c.destination_pod_name AND coalesce(dp.cluster_name, '') = coalesce(c.cluster_name, '')
),
identities AS (
    -- Each pod identity of the edges (per cluster and namespace) with the first time it was seen.
    SELECT cluster_name, namespace, identity, min(first_seen) AS first_seen
    FROM (
        SELECT cluster_name, source_namespace AS namespace, source_identity AS identity, first_seen
        FROM edges
        WHERE source_entity IS NULL AND source_reserved_identity IS NULL
        UNION ALL
        SELECT cluster_name, destination_namespace, destination_identity, first_seen
        FROM edges
        WHERE destination_entity IS NULL AND destination_reserved_identity IS NULL
    ) AS seen
    GROUP BY cluster_name, namespace, identity
),
first_labels AS (
    -- The labels of a pod identity, read from the flows carrying it in the first second it was seen: every pod
    -- of an identity has the same identity labels, whether the record named the pod or knew only its identity.
    SELECT cluster_name, namespace, identity, min(labels) AS labels
    FROM (
        SELECT i.cluster_name, i.namespace, i.identity, f.source_labels AS labels
        FROM flows_named AS f
        JOIN identities AS i
            ON f.time >= i.first_seen AND f.time <= i.first_seen + INTERVAL 1 SECOND
            AND f.source_identity = i.identity AND f.source_namespace = i.namespace
            AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '')
        UNION ALL
        SELECT i.cluster_name, i.namespace, i.identity, f.destination_labels
        FROM flows_named AS f
        JOIN identities AS i
            ON f.time >= i.first_seen AND f.time <= i.first_seen + INTERVAL 1 SECOND
            AND f.destination_identity = i.identity AND f.destination_namespace = i.namespace
            AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '')
    ) AS seen
    WHERE cardinality(labels) > 0
    GROUP BY cluster_name, namespace, identity
),
unlabelled AS (
    -- Identities whose first records carried no labels (an exporter field mask): every record is searched.
    SELECT i.*
    FROM identities AS i
    LEFT JOIN first_labels AS l
        ON l.identity = i.identity AND l.namespace = i.namespace
        AND coalesce(l.cluster_name, '') = coalesce(i.cluster_name, '')
    WHERE l.identity IS NULL
),
identity_labels AS (
    SELECT cluster_name, namespace, identity, labels FROM first_labels
    UNION ALL
    SELECT cluster_name, namespace, identity, min(labels)
    FROM (
        SELECT i.cluster_name, i.namespace, i.identity, f.source_labels AS labels
        FROM flows_named AS f
        JOIN unlabelled AS i
            ON f.source_identity = i.identity AND f.source_namespace = i.namespace
            AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '')
        UNION ALL
        SELECT i.cluster_name, i.namespace, i.identity, f.destination_labels
        FROM flows_named AS f
        JOIN unlabelled AS i
            ON f.destination_identity = i.identity AND f.destination_namespace = i.namespace
            AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '')
    ) AS seen
    WHERE cardinality(labels) > 0
    GROUP BY cluster_name, namespace, identity
),
labelled AS (
    SELECT
        e.cluster_name,
        CASE WHEN e.source_entity IS NULL THEN e.source_namespace END AS source_namespace,
        CASE WHEN e.source_entity IS NULL THEN e.source_workload END AS source_workload,
        CASE
            WHEN e.source_entity IS NOT NULL THEN ['reserved:' || e.source_entity]
            WHEN e.source_reserved_identity IS NOT NULL THEN ['reserved:' || e.source_reserved_identity]
            ELSE coalesce(sl.labels, [])
        END AS source_labels,
        e.source_entity,
        e.source_reserved_identity,
        CASE WHEN e.source_entity IS NOT NULL AND e.source_entity <> 'world' THEN e.source_ip END AS source_ip,
        CASE WHEN e.destination_entity IS NULL THEN e.destination_namespace END AS destination_namespace,
        CASE WHEN e.destination_entity IS NULL THEN e.destination_workload END AS destination_workload,
        CASE
            WHEN e.destination_entity IS NOT NULL THEN ['reserved:' || e.destination_entity]
            WHEN e.destination_reserved_identity IS NOT NULL THEN ['reserved:' || e.destination_reserved_identity]
            ELSE coalesce(dl.labels, [])
        END AS destination_labels,
        e.destination_entity,
        e.destination_reserved_identity,
        CASE WHEN e.destination_entity IS NOT NULL OR e.destination_reserved_identity IS NOT NULL
            THEN e.destination_ip END AS destination_ip,
        CASE WHEN e.destination_entity IS NOT NULL THEN e.destination_names ELSE [] END AS destination_names,
        e.l4_protocol, e.destination_port, e.icmp_type, e.l7_protocol, e.http_method, e.http_path, e.kafka_role,
        e.kafka_topic, e.denied, e.connections, e.egress_flows, e.ingress_flows, e.other_flows, e.first_seen,
        e.last_seen
    FROM edges AS e
    LEFT JOIN identity_labels AS sl
        ON e.source_entity IS NULL AND sl.namespace = e.source_namespace AND sl.identity = e.source_identity
        AND coalesce(sl.cluster_name, '') = coalesce(e.cluster_name, '')
    LEFT JOIN identity_labels AS dl
        ON e.destination_entity IS NULL AND dl.namespace = e.destination_namespace
        AND dl.identity = e.destination_identity AND coalesce(dl.cluster_name, '') = coalesce(e.cluster_name, '')
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

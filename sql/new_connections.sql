-- description: Edges first seen in the window: pairs of workloads (with destination port and protocol) that
--   exchanged requests between `since` and `until` but not in the baseline before it (from `baseline_since` up
--   to `since`; with `baseline_since` at or after `since` there is no baseline and every edge of the window is
--   new). Requests as the edge definition counts them (the shared view `connections`): `flows` counts request
--   packets once however many records Hubble wrote for each, `dropped` those dropped, `forwarded` the rest;
--   replies and socket-LB events are not counted. Useful after a deployment or to spot a compromised pod reaching out. A
--   namespace filter matches either side.
-- params: since=1h, until=now, baseline_since=7d, namespace=, limit=500
WITH pods AS (
    -- The connections of each edge folded per source pod first seen in the window (NULL: the baseline's), so
    -- that the pods are counted by a second grouping rather than a DISTINCT (which would hold every connection).
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        l4_protocol,
        CASE WHEN first_seen >= $since THEN source_pod_name END AS source_pod_name,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen,
        sum(CASE WHEN first_seen >= $since THEN packets ELSE 0 END) AS flows,
        sum(CASE WHEN first_seen >= $since THEN packets - dropped_packets ELSE 0 END) AS forwarded,
        sum(CASE WHEN first_seen >= $since THEN dropped_packets ELSE 0 END) AS dropped
    FROM connections
    WHERE first_seen >= least($baseline_since, $since)
      AND first_seen <= $until
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
    GROUP BY
        cluster_name, source_namespace, source_workload, destination_namespace, destination_workload,
        destination_port, l4_protocol, CASE WHEN first_seen >= $since THEN source_pod_name END
),
edges AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        l4_protocol,
        min(first_seen) AS first_seen,
        max(last_seen) AS last_seen,
        sum(flows) AS flows,
        sum(forwarded) AS forwarded,
        sum(dropped) AS dropped,
        count(source_pod_name) AS source_pods
    FROM pods
    GROUP BY
        cluster_name, source_namespace, source_workload, destination_namespace, destination_workload,
        destination_port, l4_protocol
)
SELECT
    source_namespace,
    source_workload,
    destination_namespace,
    destination_workload,
    destination_port,
    l4_protocol,
    first_seen,
    last_seen,
    CAST(flows AS BIGINT) AS flows,
    CAST(forwarded AS BIGINT) AS forwarded,
    CAST(dropped AS BIGINT) AS dropped,
    source_pods,
    cluster_name
FROM edges
WHERE first_seen >= $since
ORDER BY
    first_seen DESC,
    source_namespace NULLS LAST,
    source_workload NULLS LAST,
    destination_namespace NULLS LAST,
    destination_workload NULLS LAST,
    destination_port NULLS LAST
LIMIT $limit

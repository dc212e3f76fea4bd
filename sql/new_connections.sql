-- description: Edges first seen in the window: pairs of workloads (with destination port and protocol) that
--   exchanged requests between `since` and `until` but not in the baseline before it (from `baseline_since` up
--   to `since`; with `baseline_since` at or after `since` there is no baseline and every edge of the window is
--   new). Replies are not counted. Useful after a deployment or to spot a compromised pod reaching out. A
--   namespace filter matches either side.
-- params: since=1h, until=now, baseline_since=7d, namespace=, limit=500
WITH edges AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        l4_protocol,
        min(time) AS first_seen,
        max(time) AS last_seen,
        count(CASE WHEN time >= $since THEN 1 END) AS flows,
        count(CASE WHEN time >= $since AND verdict = 'FORWARDED' THEN 1 END) AS forwarded,
        count(CASE WHEN time >= $since AND verdict = 'DROPPED' THEN 1 END) AS dropped,
        count(DISTINCT CASE WHEN time >= $since THEN source_pod_name END) AS source_pods
    FROM flows_enriched
    WHERE time >= least($baseline_since, $since)
      AND time <= $until
      AND is_request
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
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
    flows,
    forwarded,
    dropped,
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

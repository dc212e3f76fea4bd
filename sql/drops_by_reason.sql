-- description: Dropped flows by drop reason and namespace pair, busiest first: how many flows, how many
--   distinct source and destination pods, and when the drops were first and last seen. A namespace filter
--   matches either side.
-- params: since=1h, until=now, namespace=, limit=50
WITH dropped AS (
    SELECT
        -- normalize keeps an unknown reason number as its decimal string; drop_reason_desc is NULL only for
        -- reason 0, or in captures from Cilium versions that filled in the number alone.
        coalesce(drop_reason_desc, nullif(CAST(drop_reason AS VARCHAR), '0'), 'DROP_REASON_UNKNOWN') AS reason,
        source_namespace,
        destination_namespace,
        source_pod_name,
        destination_pod_name,
        time
    FROM flows
    WHERE verdict = 'DROPPED'
      AND time >= $since
      AND time <= $until
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
)
SELECT
    reason AS drop_reason_desc,
    source_namespace,
    destination_namespace,
    count(*) AS flows,
    count(DISTINCT source_pod_name) AS source_pods,
    count(DISTINCT destination_pod_name) AS destination_pods,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM dropped
GROUP BY reason, source_namespace, destination_namespace
ORDER BY flows DESC, drop_reason_desc, source_namespace NULLS LAST, destination_namespace NULLS LAST
LIMIT $limit

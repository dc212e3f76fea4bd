-- description: Traffic that crosses namespaces: requests from a pod in one namespace to a pod in another, by
--   workload pair, destination port and protocol, with how many were forwarded and dropped. Replies are not
--   counted. A namespace filter matches either side.
-- params: since=1h, until=now, namespace=, limit=500
SELECT
    source_namespace,
    source_workload,
    destination_namespace,
    destination_workload,
    destination_port,
    l4_protocol,
    count(*) AS flows,
    count(CASE WHEN verdict = 'FORWARDED' THEN 1 END) AS forwarded,
    count(CASE WHEN verdict = 'DROPPED' THEN 1 END) AS dropped,
    min(time) AS first_seen,
    max(time) AS last_seen,
    cluster_name
FROM flows_enriched
WHERE time >= $since
  AND time <= $until
  AND is_request
  AND source_namespace IS NOT NULL
  AND destination_namespace IS NOT NULL
  AND source_namespace <> destination_namespace
  AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
GROUP BY
    cluster_name, source_namespace, source_workload, destination_namespace, destination_workload,
    destination_port, l4_protocol
ORDER BY
    flows DESC,
    source_namespace,
    source_workload NULLS LAST,
    destination_namespace,
    destination_workload NULLS LAST,
    destination_port NULLS LAST
LIMIT $limit

-- description: The busiest pairs of workloads by number of flows, with how many were forwarded and dropped,
--   how many destination ports were used, and when the pair was first and last seen. Replies and L7 responses
--   are not counted, so each pair reads from the side that opened the connection. Endpoints are named as in
--   every question (`flows_enriched`): the workload Cilium reports, else a stable label or the pod name
--   without its controller's suffix, else the reserved identity (`world`, `host`, ...), else the IP;
--   `world_egress` breaks traffic to the world down by DNS name. A namespace filter matches either side. Pairs are counted
--   per cluster (`cluster_name`).
-- params: since=1h, until=now, namespace=, limit=20
WITH requests AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        verdict,
        time
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND is_request
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
)
SELECT
    source_namespace,
    source_workload,
    destination_namespace,
    destination_workload,
    count(*) AS flows,
    count(*) FILTER (WHERE verdict = 'FORWARDED') AS forwarded,
    count(*) FILTER (WHERE verdict = 'DROPPED') AS dropped,
    count(DISTINCT destination_port) AS destination_ports,
    min(time) AS first_seen,
    max(time) AS last_seen,
    cluster_name
FROM requests
GROUP BY cluster_name, source_namespace, source_workload, destination_namespace, destination_workload
ORDER BY
    flows DESC,
    source_namespace NULLS LAST,
    source_workload NULLS LAST,
    destination_namespace NULLS LAST,
    destination_workload NULLS LAST,
    cluster_name NULLS LAST
LIMIT $limit

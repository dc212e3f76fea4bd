-- description: The busiest pairs of workloads by number of flows, with how many were forwarded and dropped,
--   how many destination ports were used, and when the pair was first and last seen. Replies are not counted,
--   so each pair reads from the side that opened the connection. An endpoint is named by its workload, else
--   its pod, else a DNS name Cilium knows for its IP, else the IP. A namespace filter matches either side.
--   Pairs are counted per cluster (`cluster_name`).
-- params: since=1h, until=now, namespace=, limit=20
WITH requests AS (
    SELECT
        cluster_name,
        source_namespace,
        coalesce(source_workload_name, source_pod_name, source_names[1], source_ip) AS source_workload,
        destination_namespace,
        coalesce(destination_workload_name, destination_pod_name, destination_names[1], destination_ip)
            AS destination_workload,
        destination_port,
        verdict,
        time
    FROM flows
    WHERE time >= $since
      AND time <= $until
      AND is_reply IS NOT TRUE
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

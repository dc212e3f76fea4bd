-- description: The busiest pairs of workloads by request packets, with how many got through and how many were
--   dropped, how many connections they opened, how many destination ports were used, and when the pair was
--   first and last seen. Counts follow the one edge definition (the shared view `connections`): requests only
--   (no replies, L7 responses or socket-LB events), and each request packet once however many records Hubble
--   wrote for it (a packet traced at several points, seen at both ends, or reported as a drop notification and
--   a policy-verdict event): `flows` counts request packets, `dropped` those dropped (by policy or otherwise,
--   the count `unexpected_drops` and `drops_by_reason` give per drop notification), `forwarded` the rest,
--   `connections` the TCP, UDP and SCTP connections (ICMP and L7 requests have none). Endpoints are named as in
--   every question (`flows_enriched`): the workload Cilium reports, else a stable label or the pod name
--   without its controller's suffix, else the reserved identity (`world`, `host`, ...), else the IP; a pod
--   known at one end only by identity and labels is the same pod. `world_egress` breaks traffic to the world
--   down by DNS name. A namespace filter matches either side. Pairs are counted per cluster (`cluster_name`).
-- params: since=1h, until=now, namespace=, limit=20
WITH requests AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        is_connection,
        folded,
        packets,
        dropped_packets,
        first_seen,
        last_seen
    FROM connections
    WHERE first_seen >= $since
      AND first_seen <= $until
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
)
SELECT
    source_namespace,
    source_workload,
    destination_namespace,
    destination_workload,
    CAST(sum(packets) AS BIGINT) AS flows,
    CAST(sum(packets) - sum(dropped_packets) AS BIGINT) AS forwarded,
    CAST(sum(dropped_packets) AS BIGINT) AS dropped,
    CAST(coalesce(sum(folded) FILTER (WHERE is_connection), 0) AS BIGINT) AS connections,
    count(DISTINCT destination_port) AS destination_ports,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
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

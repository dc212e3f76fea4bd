-- description: Which Services each workload connects to, read from socket-LB events (`flow_type` SOCK, the
--   translation Cilium makes at `connect()`): the Service by name where Hubble names it, its ClusterIP and port,
--   how many connects, and the backends socket-LB chose (workloads, from the translation that follows on the
--   same socket within a millisecond). These events are not traffic and no other question counts them; the
--   ClusterIP before translation is an address of the cluster, never the world. Counted per cluster
--   (`cluster_name`); a namespace filter matches the client.
-- params: since=1h, until=now, namespace=, limit=500
WITH pre AS (
    SELECT
        cluster_name, node_name, time, socket_cookie, source_namespace, source_workload, destination_ip,
        destination_port, l4_protocol, destination_service_name
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND sock_xlate_point = 'SOCK_XLATE_POINT_PRE_DIRECTION_FWD'
      AND ($namespace IS NULL OR source_namespace = $namespace)
),
post AS (
    SELECT cluster_name, node_name, time, socket_cookie, destination_workload_id
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND sock_xlate_point = 'SOCK_XLATE_POINT_POST_DIRECTION_FWD'
),
paired AS (
    SELECT
        p.cluster_name, p.source_namespace, p.source_workload, p.destination_service_name, p.destination_ip,
        p.destination_port, p.l4_protocol, p.time, p.socket_cookie, p.node_name,
        min(b.destination_workload_id) AS backend
    FROM pre AS p
    LEFT JOIN post AS b
        ON b.node_name = p.node_name AND b.socket_cookie = p.socket_cookie
        AND b.time >= p.time AND b.time <= p.time + INTERVAL 1 MILLISECOND
        AND coalesce(b.cluster_name, '') = coalesce(p.cluster_name, '')
    GROUP BY
        p.cluster_name, p.source_namespace, p.source_workload, p.destination_service_name, p.destination_ip,
        p.destination_port, p.l4_protocol, p.time, p.socket_cookie, p.node_name
)
SELECT
    source_namespace,
    source_workload,
    destination_service_name AS service,
    destination_ip AS service_ip,
    destination_port AS service_port,
    l4_protocol,
    count(*) AS connects,
    list_sort(array_agg(DISTINCT backend)) AS backends,
    min(time) AS first_seen,
    max(time) AS last_seen,
    cluster_name
FROM paired
GROUP BY
    cluster_name, source_namespace, source_workload, destination_service_name, destination_ip, destination_port,
    l4_protocol
ORDER BY
    connects DESC, source_namespace NULLS LAST, source_workload NULLS LAST, service NULLS LAST, service_ip
LIMIT $limit

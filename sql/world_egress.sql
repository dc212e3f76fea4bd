-- description: Traffic from the cluster to the world (outside addresses), by source workload and destination
--   name: the DNS names Cilium attached to the address (the names `toFQDNs` policies match), or the IP where no
--   name is known. `destination_ips` lists up to five of the addresses behind a name, `ips` counts them.
--   Requests only; `dropped` counts the ones the datapath dropped. A namespace filter matches the source.
-- params: since=1h, until=now, namespace=, limit=500
WITH egress AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_ip,
        destination_port,
        l4_protocol,
        verdict,
        time,
        unnest(CASE WHEN cardinality(destination_names) = 0 THEN [NULL] ELSE destination_names END)
            AS destination_name
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND destination_entity = 'world'
      AND is_request
      AND ($namespace IS NULL OR source_namespace = $namespace)
)
SELECT
    source_namespace,
    source_workload,
    coalesce(destination_name, destination_ip) AS destination,
    destination_name,
    destination_port,
    l4_protocol,
    count(*) AS flows,
    count(CASE WHEN verdict = 'FORWARDED' THEN 1 END) AS forwarded,
    count(CASE WHEN verdict = 'DROPPED' THEN 1 END) AS dropped,
    count(DISTINCT destination_ip) AS ips,
    array_slice(list_sort(array_agg(DISTINCT destination_ip)), 1, 5) AS destination_ips,
    min(time) AS first_seen,
    max(time) AS last_seen,
    cluster_name
FROM egress
GROUP BY
    cluster_name, source_namespace, source_workload, coalesce(destination_name, destination_ip),
    destination_name, destination_port, l4_protocol
ORDER BY
    flows DESC,
    source_namespace NULLS LAST,
    source_workload NULLS LAST,
    destination,
    destination_port NULLS LAST
LIMIT $limit

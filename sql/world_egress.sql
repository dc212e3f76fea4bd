-- description: Traffic from the cluster to the world (outside addresses), by source workload and destination
--   name: the DNS names Cilium attached to the address (the names `toFQDNs` policies match), or the IP where no
--   name is known. `destination_ips` lists up to five of the addresses behind a name, `ips` counts them.
--   Requests only (socket-LB events are no traffic); `dropped` counts the ones the datapath dropped. Addresses
--   inside the cluster's ranges (inferred from the pods and Services seen, see below) are never the world,
--   whatever identity a record gave them. A namespace filter matches the source.
-- params: since=1h, until=now, namespace=, limit=500
WITH cluster_ranges AS (
    -- The cluster's own address ranges, inferred from the addresses of known pods and Services in the window
    -- (an IPv4 address's /16, an IPv6 address's first four groups): an address in them is a pod or a Service
    -- whose identity the record did not carry (a ClusterIP before translation, a pod of another node), never
    -- the world.
    SELECT DISTINCT cluster_name, prefix
    FROM (
        SELECT cluster_name, CASE
            WHEN source_ip LIKE '%.%' THEN regexp_extract(source_ip, '^([0-9]+\.[0-9]+)\.', 1)
            ELSE regexp_extract(source_ip, '^([0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*):', 1)
        END AS prefix
        FROM flows_enriched
        WHERE time >= $since AND time <= $until AND source_namespace IS NOT NULL AND source_entity IS NULL
        UNION ALL
        SELECT cluster_name, CASE
            WHEN destination_ip LIKE '%.%' THEN regexp_extract(destination_ip, '^([0-9]+\.[0-9]+)\.', 1)
            ELSE regexp_extract(destination_ip, '^([0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*):', 1)
        END
        FROM flows_enriched
        WHERE time >= $since AND time <= $until
          AND ((destination_namespace IS NOT NULL AND destination_entity IS NULL)
               OR destination_service_name IS NOT NULL
               OR sock_xlate_point IN ('SOCK_XLATE_POINT_PRE_DIRECTION_FWD'))
    ) AS known
    WHERE prefix IS NOT NULL AND prefix <> ''
),
requests AS (
    SELECT
        cluster_name,
        source_namespace,
        source_workload,
        destination_ip,
        destination_port,
        l4_protocol,
        verdict,
        time,
        destination_names,
        CASE
            WHEN destination_ip LIKE '%.%' THEN regexp_extract(destination_ip, '^([0-9]+\.[0-9]+)\.', 1)
            ELSE regexp_extract(destination_ip, '^([0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*):', 1)
        END AS destination_prefix
    FROM flows_enriched
    WHERE time >= $since
      AND time <= $until
      AND destination_entity = 'world'
      AND is_request
      AND ($namespace IS NULL OR source_namespace = $namespace)
),
egress AS (
    SELECT
        q.cluster_name,
        q.source_namespace,
        q.source_workload,
        q.destination_ip,
        q.destination_port,
        q.l4_protocol,
        q.verdict,
        q.time,
        unnest(CASE WHEN cardinality(q.destination_names) = 0 THEN [NULL] ELSE q.destination_names END)
            AS destination_name
    FROM requests AS q
    LEFT JOIN cluster_ranges AS r
        ON coalesce(r.cluster_name, '') = coalesce(q.cluster_name, '') AND r.prefix = q.destination_prefix
    WHERE r.prefix IS NULL
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

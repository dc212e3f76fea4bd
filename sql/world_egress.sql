-- description: Traffic from the cluster to the world (outside addresses), by source workload and destination
--   name: the DNS names Cilium attached to the address (the names `toFQDNs` policies match), or the IP where no
--   name is known. `destination_ips` lists up to five of the addresses behind a name, `ips` counts them.
--   Requests as the edge definition counts them (the shared view `connections`): `flows` counts request packets
--   once however many records Hubble wrote for each, `dropped` those dropped, `forwarded` the rest; socket-LB
--   events are no traffic. Addresses
--   inside the cluster's ranges (inferred from the pods and Services seen, see below) are never the world,
--   whatever identity a record gave them. A namespace filter matches the source.
-- params: since=1h, until=now, namespace=, limit=500
WITH cluster_ranges AS (
    -- The cluster's own address ranges, inferred from its addresses in the window (shared view cluster_addresses)
    -- (an IPv4 address's /16, an IPv6 address's first four groups): an address in them is a pod or a Service
    -- whose identity the record did not carry (a ClusterIP before translation, a pod of another node), never
    -- the world.
    SELECT DISTINCT cluster_name, prefix
    FROM (
        SELECT cluster_name, CASE
            WHEN ip LIKE '%.%' THEN regexp_extract(ip, '^([0-9]+\.[0-9]+)\.', 1)
            ELSE regexp_extract(ip, '^([0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*):', 1)
        END AS prefix
        FROM cluster_addresses
        WHERE time >= $since AND time <= $until
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
        packets,
        dropped_packets,
        first_seen,
        last_seen,
        coalesce(destination_names, []) AS destination_names,
        CASE
            WHEN destination_ip LIKE '%.%' THEN regexp_extract(destination_ip, '^([0-9]+\.[0-9]+)\.', 1)
            ELSE regexp_extract(destination_ip, '^([0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*):', 1)
        END AS destination_prefix
    FROM connections
    WHERE first_seen >= $since
      AND first_seen <= $until
      AND destination_entity = 'world'
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
        q.packets,
        q.dropped_packets,
        q.first_seen,
        q.last_seen,
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
    CAST(sum(packets) AS BIGINT) AS flows,
    CAST(sum(packets - dropped_packets) AS BIGINT) AS forwarded,
    CAST(sum(dropped_packets) AS BIGINT) AS dropped,
    count(DISTINCT destination_ip) AS ips,
    array_slice(list_sort(array_agg(DISTINCT destination_ip)), 1, 5) AS destination_ips,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
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

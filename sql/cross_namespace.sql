-- description: Traffic that crosses namespaces: requests from a pod in one namespace to a pod in another, by
--   workload pair, destination port and protocol, with how many got through and how many were dropped. Requests
--   as the edge definition counts them (the shared view `connections`): `flows` counts request packets once
--   however many records Hubble wrote for each (both ends, several observation points, a drop and its
--   policy-verdict event), `dropped` those dropped, `forwarded` the rest; replies and socket-LB events are not
--   counted. A pod known at one end only by identity and labels is in its labels' namespace. A namespace filter
--   matches either side.
-- params: since=1h, until=now, namespace=, limit=500
SELECT
    source_namespace,
    source_workload,
    destination_namespace,
    destination_workload,
    destination_port,
    l4_protocol,
    CAST(sum(packets) AS BIGINT) AS flows,
    CAST(sum(packets - dropped_packets) AS BIGINT) AS forwarded,
    CAST(sum(dropped_packets) AS BIGINT) AS dropped,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    cluster_name
FROM connections
WHERE first_seen >= $since
  AND first_seen <= $until
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

-- description: DNS lookups seen with L7 DNS visibility (Cilium's DNS proxy), per client workload and query
--   name: lookups (requests), responses, failed responses (any rcode but NOERROR), the rcodes, query types and
--   answer IPs seen, and when the name was first and last asked. `query` is a LIKE pattern on the name (names
--   end with a dot: `%.example.com.`), case-insensitive. A namespace filter matches the client. Clients are
--   named as in every question (`flows_enriched`). Counted per cluster (`cluster_name`). Names are listed as
--   asked, search-path expansions included: `failures` of a name such as `api.example.com.<ns>.svc.cluster.local.`
--   are the resolver's normal NXDOMAIN answers before it asks the next name, not failed lookups (`dns_failures`
--   groups a lookup's names and reports the lookups that failed).
-- params: since=1h, until=now, namespace=, query=, limit=50
WITH dns AS (
    SELECT
        cluster_name,
        -- A response travels from the DNS server back to the client, so the client is its destination.
        CASE WHEN l7_type = 'RESPONSE' THEN destination_namespace ELSE source_namespace END AS client_namespace,
        CASE WHEN l7_type = 'RESPONSE' THEN destination_workload ELSE source_workload END AS client_workload,
        dns_query,
        l7_type,
        CASE WHEN l7_type = 'RESPONSE' THEN
            CASE dns_rcode
                WHEN 0 THEN 'NOERROR'
                WHEN 1 THEN 'FORMERR'
                WHEN 2 THEN 'SERVFAIL'
                WHEN 3 THEN 'NXDOMAIN'
                WHEN 4 THEN 'NOTIMP'
                WHEN 5 THEN 'REFUSED'
                ELSE 'RCODE' || CAST(dns_rcode AS VARCHAR)
            END
        END AS rcode_name,
        dns_qtypes,
        dns_ips,
        time
    FROM flows_enriched
    WHERE l7_protocol = 'dns'
      AND dns_query IS NOT NULL
      AND time >= $since
      AND time <= $until
      AND ($query IS NULL OR lower(dns_query) LIKE lower($query))
)
SELECT
    client_namespace AS source_namespace,
    client_workload AS source_workload,
    dns_query AS query,
    count(*) FILTER (WHERE l7_type = 'REQUEST') AS lookups,
    count(*) FILTER (WHERE l7_type = 'RESPONSE') AS responses,
    count(*) FILTER (WHERE rcode_name <> 'NOERROR') AS failures,
    list_sort(list_distinct(array_agg(rcode_name))) AS rcodes,
    list_sort(list_distinct(flatten(array_agg(dns_qtypes)))) AS qtypes,
    list_sort(list_distinct(flatten(array_agg(dns_ips)))) AS answers,
    min(time) AS first_seen,
    max(time) AS last_seen,
    cluster_name
FROM dns
WHERE $namespace IS NULL OR client_namespace = $namespace
GROUP BY cluster_name, client_namespace, client_workload, dns_query
ORDER BY
    lookups DESC, failures DESC, source_namespace NULLS LAST, source_workload NULLS LAST, query,
    cluster_name NULLS LAST
LIMIT $limit

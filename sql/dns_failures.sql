-- description: Failed DNS lookups by client workload and query name. `kind` says how they failed: `rcode` (the
--   server answered NXDOMAIN, SERVFAIL, REFUSED, ...: `rcode_name`), `no_answer` (a request that got no response
--   within `timeout_seconds`; requests and responses are paired by client address, client port, query name and
--   query types, since flows carry no DNS id; requests too close to the end of the data to tell are left out),
--   `dropped` (DNS requests the datapath or the DNS proxy dropped). `failures` counts them; `lookups` is every
--   lookup of that workload in the window (requests seen by the DNS proxy plus dropped DNS packets), and
--   `failure_share` = failures / lookups. `example_pods` lists up to three client pods. A workload whose DNS
--   traffic (port 53) is visible only at L3/L4 (no L7 DNS records, so rcodes cannot be seen) gets one row of
--   kind `no_l7_visibility` instead of an empty answer; `note` says what to do. NXDOMAIN answers to search-path
--   expansions (a name with the search domain appended, when the same client also asked the name itself) are
--   left out unless `include_search_expansions` is true. A namespace filter matches the client.
-- params: since=1h, until=now, namespace=, timeout_seconds=5.0, include_search_expansions=false, limit=500
WITH dns AS (
    -- Every DNS record of the window in one scan: L7 records from Cilium's DNS proxy (`layer` l7; the client
    -- is the source of a request and the destination of a response) and requests to port 53 seen at L3/L4
    -- (`layer` l3). Folded by all its columns (`n` counts identical rows) so that it is computed once.
    SELECT
        layer, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip, client_port,
        l7_type, verdict, dns_query, dns_qtypes, dns_rcode_name, time,
        count(*) AS n
    FROM (
        SELECT
            CASE WHEN l7_protocol = 'dns' THEN 'l7' ELSE 'l3' END AS layer,
            cluster_name,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_namespace ELSE source_namespace END AS client_namespace,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_workload ELSE source_workload END AS client_workload,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_workload_id ELSE source_workload_id END AS client_id,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_pod_name ELSE source_pod_name END AS client_pod,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_ip ELSE source_ip END AS client_ip,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_port ELSE source_port END AS client_port,
            l7_type,
            verdict,
            dns_query,
            dns_qtypes,
            dns_rcode_name,
            time
        FROM flows_enriched
        WHERE time >= $since
          AND time <= $until
          AND (
              (l7_protocol = 'dns' AND l7_type IN ('REQUEST', 'RESPONSE'))
              OR (
                  destination_port = 53
                  AND is_request
                  AND l4_protocol IN ('UDP', 'TCP')
                  AND (l7_protocol IS NULL OR l7_protocol <> 'dns')
                  -- A denied packet is reported twice, as a policy-verdict event and as a drop: count the drop.
                  AND (event_type IS NULL OR event_type <> 5)
              )
          )
    ) AS d
    GROUP BY
        layer, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip, client_port,
        l7_type, verdict, dns_query, dns_qtypes, dns_rcode_name, time
),
dns_l7 AS (
    SELECT * FROM dns WHERE layer = 'l7'
),
dns_l3 AS (
    SELECT * FROM dns WHERE layer = 'l3'
),
clients AS (
    SELECT cluster_name, client_namespace, client_workload, client_id, client_pod FROM dns_l7
    UNION
    SELECT cluster_name, client_namespace, client_workload, client_id, client_pod FROM dns_l3
),
lookups AS (
    -- Every lookup of a workload: L7 requests (or responses, where a capture holds no requests), plus DNS
    -- packets dropped before the proxy saw them.
    SELECT
        c.cluster_name,
        c.client_id,
        coalesce(l7.lookups, 0) + coalesce(l3.dropped, 0) AS lookups,
        coalesce(l7.records, 0) AS l7_records,
        coalesce(l3.packets, 0) AS l3_packets
    FROM (SELECT DISTINCT cluster_name, client_id FROM clients) AS c
    LEFT JOIN (
        SELECT
            cluster_name,
            client_id,
            CAST(CASE
                WHEN sum(CASE WHEN l7_type = 'REQUEST' THEN n ELSE 0 END) > 0
                    THEN sum(CASE WHEN l7_type = 'REQUEST' THEN n ELSE 0 END)
                ELSE sum(CASE WHEN l7_type = 'RESPONSE' THEN n ELSE 0 END)
            END AS BIGINT) AS lookups,
            CAST(sum(n) AS BIGINT) AS records
        FROM dns_l7
        GROUP BY cluster_name, client_id
    ) AS l7 ON l7.client_id = c.client_id AND coalesce(l7.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN (
        SELECT
            cluster_name,
            client_id,
            CAST(sum(CASE WHEN verdict = 'DROPPED' THEN n ELSE 0 END) AS BIGINT) AS dropped,
            CAST(sum(n) AS BIGINT) AS packets
        FROM dns_l3
        GROUP BY cluster_name, client_id
    ) AS l3 ON l3.client_id = c.client_id AND coalesce(l3.cluster_name, '') = coalesce(c.cluster_name, '')
),
asked AS (
    SELECT DISTINCT cluster_name, client_id, client_pod, dns_query FROM dns_l7 WHERE dns_query IS NOT NULL
),
rcode_failures AS (
    SELECT r.*
    FROM dns_l7 AS r
    WHERE r.l7_type = 'RESPONSE'
      AND r.dns_rcode_name IS NOT NULL
      AND r.dns_rcode_name <> 'NOERROR'
      AND (
          $include_search_expansions
          OR r.dns_rcode_name <> 'NXDOMAIN'
          -- A search-path expansion: the same client also asked the name without the suffix.
          OR NOT EXISTS (
              SELECT 1
              FROM asked AS a
              WHERE a.client_id = r.client_id
                AND coalesce(a.cluster_name, '') = coalesce(r.cluster_name, '')
                AND a.client_pod = r.client_pod
                AND a.dns_query <> r.dns_query
                AND starts_with(r.dns_query, rtrim(a.dns_query, '.') || '.')
          )
      )
),
horizon AS (
    -- A request can only be judged unanswered once the data reaches `timeout_seconds` past it.
    SELECT max(time) AS newest FROM dns_l7
),
unanswered AS (
    SELECT q.*
    FROM dns_l7 AS q
    CROSS JOIN horizon AS h
    WHERE q.l7_type = 'REQUEST'
      AND q.verdict = 'FORWARDED'
      AND date_diff('microsecond', q.time, h.newest) >= $timeout_seconds * 1000000
      AND NOT EXISTS (
          SELECT 1
          FROM dns_l7 AS r
          WHERE r.l7_type = 'RESPONSE'
            -- pod addresses repeat across clusters: an answer counts in the cluster of its request
            AND coalesce(r.cluster_name, '') = coalesce(q.cluster_name, '')
            AND r.client_ip = q.client_ip
            AND r.client_port = q.client_port
            AND r.dns_query = q.dns_query
            AND (cardinality(r.dns_qtypes) = 0 OR cardinality(q.dns_qtypes) = 0 OR r.dns_qtypes = q.dns_qtypes)
            AND r.time >= q.time
            AND date_diff('microsecond', q.time, r.time) <= $timeout_seconds * 1000000
      )
),
failures AS (
    SELECT 'rcode' AS kind, cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        dns_rcode_name AS rcode_name, time, n
    FROM rcode_failures
    UNION ALL
    SELECT 'no_answer', cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        CAST(NULL AS VARCHAR), time, n
    FROM unanswered
    UNION ALL
    SELECT 'dropped', cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        CAST(NULL AS VARCHAR), time, n
    FROM dns_l7
    WHERE l7_type = 'REQUEST' AND verdict = 'DROPPED'
    UNION ALL
    SELECT 'dropped', cluster_name, client_namespace, client_workload, client_id, client_pod,
        CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR), time, n
    FROM dns_l3
    WHERE verdict = 'DROPPED'
),
grouped AS (
    SELECT
        f.kind,
        f.cluster_name,
        f.client_namespace,
        f.client_workload,
        f.client_id,
        f.dns_query,
        f.rcode_name,
        CAST(sum(f.n) AS BIGINT) AS failures,
        min(f.time) AS first_seen,
        max(f.time) AS last_seen,
        array_slice(list_sort(array_agg(DISTINCT f.client_pod)), 1, 3) AS example_pods
    FROM failures AS f
    GROUP BY f.kind, f.cluster_name, f.client_namespace, f.client_workload, f.client_id, f.dns_query, f.rcode_name
),
invisible AS (
    -- Port 53 traffic but no L7 DNS record at all: rcodes and unanswered lookups cannot be seen.
    SELECT
        'no_l7_visibility' AS kind,
        d.cluster_name,
        d.client_namespace,
        d.client_workload,
        d.client_id,
        CAST(NULL AS VARCHAR) AS dns_query,
        CAST(NULL AS VARCHAR) AS rcode_name,
        CAST(NULL AS BIGINT) AS failures,
        min(d.time) AS first_seen,
        max(d.time) AS last_seen,
        array_slice(list_sort(array_agg(DISTINCT d.client_pod)), 1, 3) AS example_pods
    FROM dns_l3 AS d
    JOIN lookups AS c ON c.client_id = d.client_id AND coalesce(c.cluster_name, '') = coalesce(d.cluster_name, '')
    WHERE c.l7_records = 0
      AND d.verdict <> 'DROPPED'
    GROUP BY d.cluster_name, d.client_namespace, d.client_workload, d.client_id
)
SELECT
    g.kind,
    g.client_namespace AS source_namespace,
    g.client_workload AS source_workload,
    g.dns_query AS query,
    g.rcode_name,
    g.failures,
    CASE WHEN g.kind = 'no_l7_visibility' THEN l.l3_packets ELSE l.lookups END AS lookups,
    round(CAST(g.failures AS DOUBLE) / nullif(l.lookups, 0), 4) AS failure_share,
    g.first_seen,
    g.last_seen,
    g.example_pods,
    CASE
        WHEN g.kind = 'no_l7_visibility' THEN
            'DNS of this workload is visible only at L3/L4 (port 53 packets, no DNS records): failed lookups '
            || 'cannot be seen. Add a DNS rule (toPorts rules dns matchPattern "*") to its egress policy to '
            || 'get L7 DNS visibility.'
        WHEN g.kind = 'no_answer' THEN 'no response within the timeout'
        WHEN g.kind = 'dropped' AND g.dns_query IS NULL THEN 'DNS packets dropped before the DNS proxy'
        WHEN g.kind = 'dropped' THEN 'lookup dropped by the DNS proxy'
    END AS note,
    g.cluster_name
FROM (
    SELECT * FROM grouped
    UNION ALL
    SELECT * FROM invisible
) AS g
LEFT JOIN lookups AS l ON l.client_id = g.client_id AND coalesce(l.cluster_name, '') = coalesce(g.cluster_name, '')
WHERE $namespace IS NULL OR g.client_namespace = $namespace
ORDER BY
    CASE g.kind WHEN 'rcode' THEN 1 WHEN 'no_answer' THEN 2 WHEN 'dropped' THEN 3 ELSE 4 END,
    g.failures DESC NULLS LAST,
    g.client_namespace NULLS LAST,
    g.client_workload NULLS LAST,
    g.dns_query NULLS LAST,
    g.rcode_name NULLS LAST
LIMIT $limit

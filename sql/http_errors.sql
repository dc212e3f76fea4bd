-- description: HTTP responses with an error status (`min_code` and above, 400 by default), by client workload,
--   server workload, method, path and status code, from L7 HTTP records. The path is `http_path` of the shared
--   view `flows_enriched`: no query string, and numeric, UUID and long hex segments as `{id}`, so one endpoint
--   is one row. `requests` counts every response of that client, server, method and path, and `error_share`
--   = errors / requests. A namespace filter matches either side.
-- params: since=1h, until=now, namespace=, min_code=400, limit=500
WITH responses AS (
    SELECT
        -- A response travels from the server back to the client.
        cluster_name,
        destination_namespace AS client_namespace,
        destination_workload AS client_workload,
        source_namespace AS server_namespace,
        source_workload AS server_workload,
        http_method,
        http_code,
        http_url,
        http_path AS path,
        time
    FROM flows_enriched
    WHERE l7_protocol = 'http'
      AND l7_type = 'RESPONSE'
      AND time >= $since
      AND time <= $until
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
),
totals AS (
    SELECT cluster_name, client_namespace, client_workload, server_namespace, server_workload, http_method, path,
        count(*) AS requests
    FROM responses
    GROUP BY cluster_name, client_namespace, client_workload, server_namespace, server_workload, http_method, path
),
errors AS (
    SELECT
        cluster_name, client_namespace, client_workload, server_namespace, server_workload, http_method, path,
        http_code,
        count(*) AS errors,
        min(time) AS first_seen,
        max(time) AS last_seen,
        min(http_url) AS example_url
    FROM responses
    WHERE http_code >= $min_code
    GROUP BY
        cluster_name, client_namespace, client_workload, server_namespace, server_workload, http_method, path,
        http_code
)
SELECT
    e.client_namespace AS source_namespace,
    e.client_workload AS source_workload,
    e.server_namespace AS destination_namespace,
    e.server_workload AS destination_workload,
    e.http_method,
    e.path,
    e.http_code,
    e.errors,
    t.requests,
    round(CAST(e.errors AS DOUBLE) / t.requests, 4) AS error_share,
    e.first_seen,
    e.last_seen,
    e.example_url,
    e.cluster_name
FROM errors AS e
JOIN totals AS t
    ON coalesce(t.cluster_name, '') = coalesce(e.cluster_name, '')
    AND coalesce(t.client_namespace, '') = coalesce(e.client_namespace, '')
    AND coalesce(t.client_workload, '') = coalesce(e.client_workload, '')
    AND coalesce(t.server_namespace, '') = coalesce(e.server_namespace, '')
    AND coalesce(t.server_workload, '') = coalesce(e.server_workload, '')
    AND coalesce(t.http_method, '') = coalesce(e.http_method, '')
    AND t.path = e.path
ORDER BY
    e.errors DESC,
    e.client_namespace NULLS LAST,
    e.client_workload NULLS LAST,
    e.server_namespace NULLS LAST,
    e.server_workload NULLS LAST,
    e.path,
    e.http_code
LIMIT $limit

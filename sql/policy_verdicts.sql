-- description: Policy verdict events (Cilium's policy-verdict notifications, the first packet of a connection
--   checked against policy) by the endpoint the policy applies to (the destination for ingress, the source
--   for egress), direction, verdict, match kind and policy. `match` is how the allowing rule matched: `l3-only`,
--   `l3-l4`, `l4-only` (any peer on that port), `all` (any peer, any port), `l3-proto`, `proto-only`, or `none`.
--   `policy` is one of the attributed policies (`<namespace>/<name>`; a flow allowed by two policies counts
--   for both), NULL where the flow carries no attribution. `peers` counts distinct peer workloads. A
--   namespace filter matches the endpoint the policy applies to; a verdict filter (`verdict=DROPPED`) keeps
--   that verdict.
-- params: since=1h, until=now, namespace=, verdict=, limit=500
WITH verdicts AS (
    -- Folded by peer first, so that the policy lists are unnested on a few rows rather than on every event.
    SELECT
        cluster_name, namespace, workload, traffic_direction, verdict, match, policies, peer,
        count(*) AS flows,
        min(time) AS first_seen,
        max(time) AS last_seen
    FROM (
        SELECT
            cluster_name,
            CASE WHEN traffic_direction = 'INGRESS' THEN destination_namespace ELSE source_namespace END AS namespace,
            CASE WHEN traffic_direction = 'INGRESS' THEN destination_workload ELSE source_workload END AS workload,
            CASE WHEN traffic_direction = 'INGRESS' THEN source_workload_id ELSE destination_workload_id END AS peer,
            traffic_direction,
            verdict,
            CASE policy_match_type
                WHEN 0 THEN 'none'
                WHEN 1 THEN 'l3-only'
                WHEN 2 THEN 'l3-l4'
                WHEN 3 THEN 'l4-only'
                WHEN 4 THEN 'all'
                WHEN 5 THEN 'l3-proto'
                WHEN 6 THEN 'proto-only'
                ELSE CAST(policy_match_type AS VARCHAR)
            END AS match,
            CASE
                WHEN traffic_direction = 'INGRESS' THEN list_concat(ingress_allowed_by, ingress_denied_by)
                ELSE list_concat(egress_allowed_by, egress_denied_by)
            END AS policies,
            time
        FROM flows_enriched
        WHERE event_type = 5
          AND time >= $since
          AND time <= $until
          AND ($verdict IS NULL OR verdict = upper($verdict))
          AND (
              $namespace IS NULL
              OR (traffic_direction = 'INGRESS' AND destination_namespace = $namespace)
              OR ((traffic_direction IS NULL OR traffic_direction <> 'INGRESS') AND source_namespace = $namespace)
          )
    ) AS v
    GROUP BY cluster_name, namespace, workload, traffic_direction, verdict, match, policies, peer
),
attributed AS (
    SELECT
        v.*,
        unnest(CASE WHEN cardinality(v.policies) = 0 THEN [NULL] ELSE v.policies END) AS policy
    FROM verdicts AS v
)
SELECT
    namespace,
    workload,
    traffic_direction AS direction,
    verdict,
    match,
    policy,
    CAST(sum(flows) AS BIGINT) AS flows,
    count(DISTINCT peer) AS peers,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen,
    cluster_name
FROM attributed
GROUP BY cluster_name, namespace, workload, traffic_direction, verdict, match, policy
ORDER BY
    namespace NULLS LAST,
    workload NULLS LAST,
    direction NULLS LAST,
    verdict,
    flows DESC,
    match,
    policy NULLS LAST
LIMIT $limit

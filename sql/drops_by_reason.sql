-- description: Dropped flows by drop reason and namespace pair, busiest first: the reason's class (policy,
--   conntrack, routing, invalid packet, ...), how many dropped packets (`flows`: drop notifications; a denied
--   packet is also reported as a policy-verdict event, counted only where no drop notification was recorded, as
--   in `unexpected_drops`), how many distinct source and destination pods, and when the drops were first and
--   last seen. A pod known only by identity and labels is in its labels' namespace. A namespace filter matches
--   either side. Counted per cluster (`cluster_name`).
-- params: since=1h, until=now, namespace=, limit=50
WITH dropped AS (
    SELECT
        cluster_name,
        drop_reason_desc,
        -- The reason's number, for flows that carry no name: the deprecated drop_reason field, else the
        -- sub-type of a drop event (event type 1), which is the same DropReason number in older captures.
        coalesce(nullif(drop_reason, 0), CASE WHEN event_type = 1 THEN nullif(event_sub_type, 0) END)
            AS reason_number,
        source_namespace,
        destination_namespace,
        source_pod_name,
        destination_pod_name,
        time,
        coalesce(event_type = 5, FALSE) AS verdict_event
    FROM flows_named
    WHERE verdict = 'DROPPED'
      AND time >= $since
      AND time <= $until
      AND ($namespace IS NULL OR source_namespace = $namespace OR destination_namespace = $namespace)
),
named AS (
    SELECT
        -- normalize keeps a reason number it does not know as its decimal string; so does this
        coalesce(d.drop_reason_desc, r.drop_reason_desc, CAST(d.reason_number AS VARCHAR), 'DROP_REASON_UNKNOWN')
            AS reason,
        d.cluster_name,
        d.source_namespace,
        d.destination_namespace,
        d.source_pod_name,
        d.destination_pod_name,
        d.time,
        d.verdict_event
    FROM dropped AS d
    LEFT JOIN drop_reasons AS r ON r.drop_reason = d.reason_number
)
SELECT
    n.reason AS drop_reason_desc,
    coalesce(c.reason_class, 'unknown') AS reason_class,
    n.source_namespace,
    n.destination_namespace,
    CASE
        WHEN count(CASE WHEN NOT n.verdict_event THEN 1 END) > 0 THEN count(CASE WHEN NOT n.verdict_event THEN 1 END)
        ELSE count(*)
    END AS flows,
    count(DISTINCT n.source_pod_name) AS source_pods,
    count(DISTINCT n.destination_pod_name) AS destination_pods,
    min(n.time) AS first_seen,
    max(n.time) AS last_seen,
    n.cluster_name
FROM named AS n
LEFT JOIN drop_reasons AS c ON c.drop_reason_desc = n.reason
GROUP BY n.cluster_name, n.reason, c.reason_class, n.source_namespace, n.destination_namespace
ORDER BY
    flows DESC, drop_reason_desc, source_namespace NULLS LAST, destination_namespace NULLS LAST,
    cluster_name NULLS LAST
LIMIT $limit

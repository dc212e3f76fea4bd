-- description: Events Hubble itself lost before flowpipe could read them (`lost_events` records: the perf ring
--   buffer, the observer queue or Hubble's ring buffer overflowed), by node and source, beside the flows
--   flowpipe did receive from that node in the same window: `lost_share` = lost / (lost + flows). Not drops:
--   lost events are packets nobody saw, so every question undercounts by that much.
-- params: since=1h, until=now, limit=500
WITH lost AS (
    SELECT
        cluster_name,
        node_name,
        source,
        CAST(sum(num_events_lost) AS BIGINT) AS events_lost,
        count(*) AS records,
        min(time) AS first_seen,
        max(time) AS last_seen
    FROM lost_events
    WHERE time >= $since
      AND time <= $until
    GROUP BY cluster_name, node_name, source
),
received AS (
    SELECT node_name, count(*) AS flows
    FROM flows
    WHERE time >= $since
      AND time <= $until
    GROUP BY node_name
)
SELECT
    l.node_name,
    l.source,
    l.events_lost,
    l.records,
    coalesce(r.flows, 0) AS flows,
    round(CAST(l.events_lost AS DOUBLE) / nullif(l.events_lost + coalesce(r.flows, 0), 0), 4) AS lost_share,
    l.first_seen,
    l.last_seen,
    l.cluster_name
FROM lost AS l
LEFT JOIN received AS r ON r.node_name = l.node_name
ORDER BY l.events_lost DESC, l.node_name NULLS LAST, l.source NULLS LAST
LIMIT $limit

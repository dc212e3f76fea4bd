-- description: The connections that a policy denied at either end, per hour: one row per 5-tuple (cluster,
--   addresses, ports, protocol) and hour (`hour`, of the denial's records), as the edge definition
--   (`connections`) counts a connection within its hour, with when the denial was first and last reported in
--   it. An hour's rows are final once the hour is closed, so what is judged against them (`privilege_records`)
--   can be folded by hour. A connection's FORWARDED record at the source's node belongs to the denial its
--   destination's node reported.
SELECT
    cluster_name,
    date_trunc('hour', time) AS hour,
    source_ip,
    source_port,
    destination_ip,
    destination_port,
    l4_protocol,
    min(time) AS first_seen,
    max(time) AS last_seen
FROM flows
WHERE verdict = 'DROPPED'
  AND drop_reason_desc IN (SELECT drop_reason_desc FROM drop_reasons WHERE policy_decision)
  AND l7_type IS NULL
  AND l4_protocol IN ('TCP', 'UDP', 'SCTP')
  AND source_port IS NOT NULL
  AND NOT coalesce(is_reply, FALSE)
GROUP BY cluster_name, date_trunc('hour', time), source_ip, source_port, destination_ip, destination_port, l4_protocol

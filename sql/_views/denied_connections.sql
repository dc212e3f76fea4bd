-- description: The connections that a policy denied at either end, by 5-tuple (cluster, addresses, ports,
--   protocol), with when the denial was first and last reported: the `denied` outcome of the edge definition
--   (`connections`), small enough to join every record against. A connection's FORWARDED record at the source's
--   node belongs to the denial its destination's node reported.
SELECT
    cluster_name,
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
GROUP BY cluster_name, source_ip, source_port, destination_ip, destination_port, l4_protocol

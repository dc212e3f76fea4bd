-- description: The connections that a policy denied at either end, by 5-tuple (cluster, addresses, ports,
--   protocol), with when the denial was first and last reported: the `denied` outcome of the edge definition
--   (`connections`), small enough to join every record against; the hours of `denied_connection_hours` merged.
-- requires: denied_connection_hours
SELECT
    cluster_name,
    source_ip,
    source_port,
    destination_ip,
    destination_port,
    l4_protocol,
    min(first_seen) AS first_seen,
    max(last_seen) AS last_seen
FROM denied_connection_hours
GROUP BY cluster_name, source_ip, source_port, destination_ip, destination_port, l4_protocol

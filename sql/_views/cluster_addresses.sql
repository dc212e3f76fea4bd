-- description: Addresses that belong to the cluster, one row per record that shows one: the address of an
--   endpoint the record names as a pod (its namespace, from the record or its labels, whatever identity it
--   carries) and of a Service (a destination Hubble names as a Service, or a socket-LB event's ClusterIP before
--   translation). The cluster's pod and Service ranges are inferred from them (`world_egress`, `suggest`): an
--   address inside them is never the world, whatever identity a record gives it. Filter by `time`.
SELECT cluster_name, time, source_ip AS ip
FROM flows_named
WHERE source_namespace IS NOT NULL AND source_ip IS NOT NULL
UNION ALL
SELECT cluster_name, time, destination_ip
FROM flows_named
WHERE destination_ip IS NOT NULL
  AND (destination_namespace IS NOT NULL OR destination_service_name IS NOT NULL
       OR sock_xlate_point = 'SOCK_XLATE_POINT_PRE_DIRECTION_FWD')

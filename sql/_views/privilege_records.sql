-- description: What `least_privilege` judges, one row per request record, seen from the side whose policy
--   decides it (the destination for ingress, the source for egress): the workload (`namespace`, `workload`),
--   `direction`, the peer (`peer_namespace`, `peer_workload`, `peer_name`: the first DNS name Cilium knows for
--   an outside address, `peer_entity`, `world_client`: the address of a world client), `port`, `l4_protocol`,
--   `allowed`, whether it is a policy-verdict event (`verdict_event`, with `policy_match_type` and
--   `allowed_by` only then), and the L7 `call`. `allowed`: let through, and not a connection the edge
--   definition counts as denied (a policy drop at either end within the same hour, `denied_connection_hours`):
--   the source's FORWARDED egress record of a connection denied at the destination is no use of the source's
--   egress allowance. `hour`, `first_seen` / `last_seen` (the record's time) and `flows` (1) make the rows
--   additive: the rows of a closed hour are folded by every other column (`flows` summed, times bounded) into
--   privilege rollups, which answer for hours whose flows are gone. A pod known only by its identity at this
--   end (`workload_identity_key`, `peer_identity_key`) is named by `identity_workloads` over the whole dataset,
--   so folded rows keep its identity and take its name when read.
-- requires: flows_enriched, denied_connection_hours
SELECT
    r.cluster_name,
    r.hour,
    r.namespace,
    r.workload,
    r.direction,
    r.peer_namespace,
    r.peer_workload,
    r.peer_name,
    r.peer_entity,
    r.world_client,
    r.port,
    r.l4_protocol,
    r.allowed,
    r.verdict_event,
    r.policy_match_type,
    r.allowed_by,
    r.call,
    r.workload_identity_key,
    r.peer_identity_key,
    r.time AS first_seen,
    r.time AS last_seen,
    CAST(1 AS BIGINT) AS flows
FROM (
    SELECT
        f.cluster_name,
        f.time,
        date_trunc('hour', f.time) AS hour,
        CASE WHEN f.traffic_direction = 'INGRESS' THEN f.destination_namespace ELSE f.source_namespace END
            AS namespace,
        CASE WHEN f.traffic_direction = 'INGRESS' THEN f.destination_workload ELSE f.source_workload END
            AS workload,
        lower(f.traffic_direction) AS direction,
        CASE WHEN f.traffic_direction = 'INGRESS' THEN f.source_namespace ELSE f.destination_namespace END
            AS peer_namespace,
        CASE WHEN f.traffic_direction = 'INGRESS' THEN f.source_workload ELSE f.destination_workload END
            AS peer_workload,
        -- An outside address is named by the first DNS name Cilium knows for it (what toFQDNs matches).
        CASE
            WHEN f.traffic_direction = 'EGRESS' AND f.destination_entity = 'world'
                AND cardinality(f.destination_names) > 0
                THEN f.destination_names[1]
        END AS peer_name,
        CASE WHEN f.traffic_direction = 'INGRESS' THEN f.source_entity ELSE f.destination_entity END AS peer_entity,
        -- World clients by address (for ingress from the world); other peers are counted by name.
        CASE WHEN f.traffic_direction = 'INGRESS' AND f.source_entity = 'world' THEN f.source_ip END
            AS world_client,
        f.destination_port AS port,
        f.l4_protocol,
        f.verdict IN ('FORWARDED', 'REDIRECTED', 'AUDIT') AND d.source_ip IS NULL AS allowed,
        coalesce(f.event_type = 5, FALSE) AS verdict_event,
        -- Policy details only on policy-verdict events, so the other records fold into fewer rows.
        CASE WHEN f.event_type = 5 THEN f.policy_match_type END AS policy_match_type,
        CASE
            WHEN f.event_type <> 5 THEN NULL
            WHEN f.traffic_direction = 'INGRESS' THEN f.ingress_allowed_by
            ELSE f.egress_allowed_by
        END AS allowed_by,
        CASE
            WHEN f.l7_type IS NULL OR f.l7_type <> 'REQUEST' THEN NULL
            WHEN f.l7_protocol = 'http' THEN coalesce(f.http_method, '?') || ' ' || coalesce(f.http_path, '/')
            WHEN f.l7_protocol = 'dns' THEN 'dns ' || f.dns_query
            WHEN f.l7_protocol = 'kafka'
                THEN 'kafka ' || coalesce(f.kafka_api_key, '?') || ' ' || coalesce(f.kafka_topic, '?')
        END AS call,
        -- A pod known only by its identity (as `edge_observations` keeps it): named again when read.
        CASE
            WHEN f.traffic_direction = 'INGRESS' AND f.destination_pod_name IS NULL
                AND f.destination_workload_name IS NULL AND f.destination_entity IS NULL
                AND f.destination_identity >= 256 AND f.destination_identity < 16777216
                THEN f.destination_identity
            WHEN f.traffic_direction <> 'INGRESS' AND f.source_pod_name IS NULL AND f.source_workload_name IS NULL
                AND f.source_entity IS NULL AND f.source_identity >= 256 AND f.source_identity < 16777216
                THEN f.source_identity
        END AS workload_identity_key,
        CASE
            WHEN f.traffic_direction = 'INGRESS' AND f.source_pod_name IS NULL AND f.source_workload_name IS NULL
                AND f.source_entity IS NULL AND f.source_identity >= 256 AND f.source_identity < 16777216
                THEN f.source_identity
            WHEN f.traffic_direction <> 'INGRESS' AND f.destination_pod_name IS NULL
                AND f.destination_workload_name IS NULL AND f.destination_entity IS NULL
                AND f.destination_identity >= 256 AND f.destination_identity < 16777216
                THEN f.destination_identity
        END AS peer_identity_key
    FROM flows_enriched AS f
    LEFT JOIN denied_connection_hours AS d
        ON f.l7_type IS NULL AND d.source_ip = f.source_ip AND d.source_port = f.source_port
        AND d.destination_ip = f.destination_ip AND d.destination_port = f.destination_port
        AND d.l4_protocol = f.l4_protocol AND coalesce(d.cluster_name, '') = coalesce(f.cluster_name, '')
        AND d.hour = date_trunc('hour', f.time)
    WHERE f.is_request
      AND (
          (f.traffic_direction = 'INGRESS' AND f.destination_namespace IS NOT NULL)
          OR (f.traffic_direction = 'EGRESS' AND f.source_namespace IS NOT NULL)
      )
) AS r

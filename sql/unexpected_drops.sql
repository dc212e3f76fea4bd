-- description: Dropped flows that are not deliberate enforcement, grouped by edge and drop reason, each with a
--   `why`: `non_policy` (the drop reason is trouble, not a policy decision: conntrack, routing, invalid packets,
--   datapath errors...), `dns_blocked` (a policy dropped DNS: requests to port 53, DNS requests, or requests
--   to the DNS service whatever port its pods listen on: an endpoint seen answering DNS on that port in the
--   window, or the Service `kube-dns` or `dns-default` on a port its pods served; e.g. default-deny egress
--   without a DNS allowance), `regression` (a policy drop of an edge whose traffic was delivered earlier in
--   the window: forwarded at the destination or answered; `changed_at` is the first such drop, `first_delivered`
--   and `last_delivered` bound the edge's deliveries in the window: a `last_delivered` after `changed_at`
--   means some of its traffic still gets through, such as connections opened before a policy change),
--   `infrastructure` (a policy drop from kube-system, to or from
--   the host, the API server, health or remote-node identities, or to a port a kube-system workload serves).
--   Policy drops of traffic never seen delivered (a probe, an attacker) are expected and shown only with
--   `-p show_expected=true`, as why `expected` (with drops the datapath handled on purpose, such as IGMP). A
--   connection forwarded at the source's egress and dropped at the destination's ingress was never delivered:
--   one denied connection, not a regression. An edge is (cluster, source workload, destination workload,
--   destination port, protocol). `flows` counts drop notifications: a denied first packet is also reported as
--   a policy-verdict event, which dates the drop but is not counted again. A namespace filter matches either
--   side.
-- params: since=1h, until=now, namespace=, show_expected=false, limit=500
WITH reason_keys AS (
    -- The flow table keeps the reason's name, the number as text for a reason newer than this table, and
    -- only the number in `drop_reason` in some old captures (or only in a drop event's sub-type, which Cilium
    -- sets to the reason number): key the classification by name and by number.
    SELECT drop_reason_desc AS reason_key, drop_reason_desc AS reason_name, policy_decision, expected
    FROM drop_reasons
    UNION ALL
    SELECT CAST(drop_reason AS VARCHAR), drop_reason_desc, policy_decision, expected
    FROM drop_reasons
),
drops AS (
    -- Few rows: the time and verdict filters are cheap, so each use of this CTE scans again rather than
    -- holding every column of every drop.
    SELECT
        d.cluster_name,
        d.source_namespace,
        d.source_workload,
        d.source_entity,
        d.source_pod_name,
        d.destination_namespace,
        d.destination_workload,
        d.destination_entity,
        d.destination_port,
        d.destination_service_name,
        d.l4_protocol,
        d.traffic_direction,
        d.is_request,
        d.l7_protocol,
        d.l7_type,
        d.time,
        coalesce(k.reason_name, d.reason_key) AS reason,
        coalesce(k.policy_decision, FALSE) AS policy_decision,
        coalesce(k.expected, FALSE) AS expected_reason,
        -- A denied first packet shows twice: as a policy-verdict event and as the drop notification.
        coalesce(d.event_type = 5, FALSE) AS verdict_event
    FROM (
        SELECT
            *,
            coalesce(
                drop_reason_desc,
                CAST(nullif(drop_reason, 0) AS VARCHAR),
                CASE WHEN event_type = 1 THEN CAST(nullif(event_sub_type, 0) AS VARCHAR) END,
                '0'
            ) AS reason_key
        FROM flows_enriched
        WHERE verdict = 'DROPPED'
          AND time >= $since
          AND time <= $until
    ) AS d
    LEFT JOIN reason_keys AS k ON k.reason_key = d.reason_key
),
denied_targets AS (
    -- Destinations and ports that policy dropped traffic to: only deliveries to these matter below. Endpoints
    -- are keyed by (namespace, workload), the parts of their workload id, which is cheaper than the id itself.
    SELECT DISTINCT cluster_name, destination_namespace, destination_workload, destination_port, l4_protocol
    FROM drops
    WHERE policy_decision
),
delivered AS (
    -- Evidence that traffic got through, per edge: a request passed the destination's ingress (forwarded, or
    -- redirected to the proxy there), or the destination answered (a forwarded reply or L7 response, whose
    -- source is the destination of the edge). One scan of the window, kept to the denied destinations.
    SELECT
        v.cluster_name,
        v.client_namespace,
        v.client_workload,
        v.server_namespace,
        v.server_workload,
        v.port,
        v.l4_protocol,
        min(v.time) AS first_delivered,
        max(v.time) AS last_delivered
    FROM (
        SELECT
            cluster_name,
            CASE WHEN is_request THEN source_namespace ELSE destination_namespace END AS client_namespace,
            CASE WHEN is_request THEN source_workload ELSE destination_workload END AS client_workload,
            CASE WHEN is_request THEN destination_namespace ELSE source_namespace END AS server_namespace,
            CASE WHEN is_request THEN destination_workload ELSE source_workload END AS server_workload,
            CASE WHEN is_request THEN destination_port ELSE source_port END AS port,
            l4_protocol,
            time
        FROM flows_enriched
        WHERE time >= $since
          AND time <= $until
          AND (
              (is_request AND verdict IN ('FORWARDED', 'REDIRECTED')
                  AND (traffic_direction = 'INGRESS' OR trace_observation_point = 'TO_ENDPOINT'))
              OR (NOT is_request AND verdict = 'FORWARDED')
          )
    ) AS v
    JOIN denied_targets AS t
        ON coalesce(t.cluster_name, '') = coalesce(v.cluster_name, '')
        AND coalesce(t.destination_namespace, '') = coalesce(v.server_namespace, '')
        AND t.destination_workload = v.server_workload
        AND t.destination_port = v.port
        AND t.l4_protocol = v.l4_protocol
    GROUP BY
        v.cluster_name, v.client_namespace, v.client_workload, v.server_namespace, v.server_workload, v.port,
        v.l4_protocol
),
dns_servers AS (
    -- Endpoints seen answering DNS in the window (the source of an L7 DNS response) and the port they answered
    -- on: the DNS service behind whatever port its pods listen on (5353 behind OpenShift's dns-default).
    SELECT DISTINCT
        cluster_name,
        source_namespace AS server_namespace,
        source_workload AS server_workload,
        source_port AS port,
        l4_protocol
    FROM flows_enriched
    WHERE l7_protocol = 'dns'
      AND l7_type = 'RESPONSE'
      AND time >= $since
      AND time <= $until
),
served AS (
    -- Ports on which a destination delivered traffic to anyone: what a kube-system workload or the DNS service
    -- really serves. A policy drop to one of them hurts a client; a drop to any other port of theirs is a probe.
    SELECT DISTINCT cluster_name, server_namespace, server_workload, port, l4_protocol
    FROM delivered
),
classified AS (
    SELECT
        d.*,
        f.first_delivered,
        f.last_delivered,
        CASE
            WHEN NOT d.expected_reason THEN 'non_policy'
            WHEN NOT d.policy_decision THEN 'expected'
            WHEN d.destination_port = 53 AND d.is_request THEN 'dns_blocked'
            WHEN d.l7_protocol = 'dns' AND d.l7_type = 'REQUEST' THEN 'dns_blocked'
            WHEN d.is_request AND n.server_workload IS NOT NULL THEN 'dns_blocked'
            WHEN d.is_request AND d.destination_service_name IN ('kube-dns', 'dns-default')
                AND s.server_workload IS NOT NULL THEN 'dns_blocked'
            WHEN f.first_delivered IS NOT NULL AND d.time > f.first_delivered THEN 'regression'
            WHEN d.source_namespace = 'kube-system' THEN 'infrastructure'
            WHEN d.source_entity IN ('host', 'kube-apiserver', 'health', 'remote-node') THEN 'infrastructure'
            WHEN d.destination_entity IN ('host', 'kube-apiserver', 'health', 'remote-node') THEN 'infrastructure'
            WHEN d.destination_namespace = 'kube-system' AND s.server_workload IS NOT NULL THEN 'infrastructure'
            ELSE 'expected'
        END AS why
    FROM drops AS d
    LEFT JOIN delivered AS f
        ON coalesce(f.cluster_name, '') = coalesce(d.cluster_name, '')
        AND coalesce(f.client_namespace, '') = coalesce(d.source_namespace, '')
        AND f.client_workload = d.source_workload
        AND coalesce(f.server_namespace, '') = coalesce(d.destination_namespace, '')
        AND f.server_workload = d.destination_workload
        AND f.port = d.destination_port
        AND f.l4_protocol = d.l4_protocol
    LEFT JOIN dns_servers AS n
        ON coalesce(n.cluster_name, '') = coalesce(d.cluster_name, '')
        AND coalesce(n.server_namespace, '') = coalesce(d.destination_namespace, '')
        AND n.server_workload = d.destination_workload
        AND n.port = d.destination_port
        AND n.l4_protocol = d.l4_protocol
    LEFT JOIN served AS s
        ON coalesce(s.cluster_name, '') = coalesce(d.cluster_name, '')
        AND s.server_namespace = d.destination_namespace
        AND s.server_workload = d.destination_workload
        AND s.port = d.destination_port
        AND s.l4_protocol = d.l4_protocol
    WHERE $namespace IS NULL OR d.source_namespace = $namespace OR d.destination_namespace = $namespace
),
grouped AS (
    SELECT
        why,
        cluster_name,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_workload,
        destination_port,
        l4_protocol,
        reason AS drop_reason_desc,
        CASE
            WHEN count(CASE WHEN NOT verdict_event THEN 1 END) > 0 THEN count(CASE WHEN NOT verdict_event THEN 1 END)
            ELSE count(*)
        END AS flows,
        min(time) AS first_seen,
        max(time) AS last_seen,
        -- The moment an edge that used to be delivered started to be dropped by policy.
        min(CASE WHEN policy_decision AND time > first_delivered THEN time END) AS changed_at,
        min(first_delivered) AS first_delivered,
        max(last_delivered) AS last_delivered,
        string_agg(DISTINCT traffic_direction, ',') AS directions,
        count(DISTINCT source_pod_name) AS source_pods
    FROM classified
    WHERE why <> 'expected' OR $show_expected
    GROUP BY
        why, cluster_name, source_namespace, source_workload, destination_namespace, destination_workload,
        destination_port, l4_protocol, reason
)
SELECT
    g.why,
    g.source_namespace,
    g.source_workload,
    g.destination_namespace,
    g.destination_workload,
    g.destination_port,
    g.l4_protocol,
    g.drop_reason_desc,
    g.flows,
    g.first_seen,
    g.last_seen,
    g.changed_at,
    CASE WHEN g.changed_at IS NOT NULL THEN g.first_delivered END AS first_delivered,
    CASE WHEN g.changed_at IS NOT NULL THEN g.last_delivered END AS last_delivered,
    g.directions,
    g.source_pods,
    g.cluster_name
FROM grouped AS g
ORDER BY
    CASE g.why
        WHEN 'regression' THEN 1
        WHEN 'dns_blocked' THEN 2
        WHEN 'non_policy' THEN 3
        WHEN 'infrastructure' THEN 4
        ELSE 5
    END,
    g.flows DESC,
    g.source_namespace NULLS LAST,
    g.source_workload NULLS LAST,
    g.destination_namespace NULLS LAST,
    g.destination_workload NULLS LAST,
    g.destination_port NULLS LAST,
    g.drop_reason_desc
LIMIT $limit

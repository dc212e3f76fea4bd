-- description: Least-privilege candidates per workload, each row a `finding` with a `detail` and a
--   `suggestion`, as far as flows can tell. `no_policy`: no policy selects the workload (none of its requests
--   got a policy-verdict event, which Cilium emits only for endpoints under policy, while other workloads' of
--   its cluster did; traffic from the node itself is not counted); `no_ingress_policy` / `no_egress_policy`: the same for
--   one direction of a workload that policies select in the other. `ingress_from_world`: requests from outside the cluster were let in.
--   `ingress_from_all_namespaces`: requests came in from pods of every other namespace seen (three or more).
--   `broad_policy`: a policy matched with a wildcard peer (Cilium's match kinds l4-only, all, proto-only: it
--   allows any peer) while only a few peers used it. `observed_ingress` / `observed_egress`: the minimal
--   allow-set actually observed: peers (`<namespace>/<workload>`, or an entity such as `world:<name>`, `host`,
--   `kube-apiserver`), port/protocol, and in brackets the L7 calls seen (HTTP method and path pattern, DNS
--   names, Kafka api key and topic); at most `max_listed` entries; `policies` lists the policies that allowed
--   them (Cilium 1.15+ attribution), i.e. what is allowed today against what is used. Requests only, each
--   observed where the policy of that direction applies; a connection denied at either end (the edge
--   definition, shared views `connections` and `privilege_records`: within one hour) is no use of an allowance
--   at the other. A namespace filter matches the workload. Every
--   finding is per cluster (`cluster_name`), the evidence of policies included: a cluster without any
--   policy-verdict event gets no `no_*policy` finding, whatever the other clusters show.
-- params: since=24h, until=now, namespace=, max_listed=25, limit=2000
WITH base AS (
    -- The window's requests (shared view `privilege_records`: each from the side whose policy decides it,
    -- judged against the connections denied at either end), folded into one row per workload, direction, peer,
    -- port, protocol, L7 call and policy outcome. Everything below reads this small table. A row stands for
    -- `flows` records between `first_seen` and `last_seen`: one record, or a closed hour or day of them read
    -- from privilege rollups where the window holds it whole.
    SELECT
        cluster_name, namespace, workload, direction, peer_namespace, peer_workload, peer_name, peer_entity,
        world_client, port, l4_protocol, allowed, verdict_event, policy_match_type, allowed_by, call,
        CAST(sum(flows) AS BIGINT) AS flows
    FROM privilege_records
    WHERE first_seen >= $since
      AND last_seen <= $until
      AND ($namespace IS NULL OR namespace = $namespace)
    GROUP BY
        cluster_name, namespace, workload, direction, peer_namespace, peer_workload, peer_name, peer_entity,
        world_client, port, l4_protocol, allowed, verdict_event, policy_match_type, allowed_by, call
),
scoped AS (
    SELECT
        b.*,
        CASE WHEN b.namespace IS NOT NULL THEN b.namespace || '/' || b.workload ELSE b.workload END AS subject_id,
        CASE
            WHEN b.peer_name IS NOT NULL THEN 'world:' || b.peer_name
            WHEN b.peer_namespace IS NOT NULL AND b.peer_workload IS NOT NULL
                THEN b.peer_namespace || '/' || b.peer_workload
            ELSE b.peer_workload
        END AS peer,
        -- Cilium lets the node reach its pods whatever the policy (kubelet probes): that says nothing about
        -- whether a policy selects the pod.
        NOT (b.direction = 'ingress' AND coalesce(b.peer_entity IN ('host', 'remote-node', 'health'), FALSE))
            AS counts_for_selection,
        -- Cilium reports a policy decision (and, since 1.15, the policies behind it) as a policy-verdict
        -- event, only for endpoints that some policy selects in that direction.
        b.verdict_event AS policy_evidence
    FROM base AS b
),
policy_data AS (
    -- Whether a cluster's data can tell selected from unselected workloads at all: policy-verdict events.
    -- Judged per cluster: one cluster may run policies (or export their verdicts) and another not.
    SELECT cluster_name, count(*) AS flows FROM scoped WHERE policy_evidence GROUP BY cluster_name
),
directions AS (
    SELECT
        cluster_name,
        namespace,
        workload,
        subject_id,
        direction,
        CAST(sum(flows) AS BIGINT) AS flows,
        CAST(sum(CASE WHEN policy_evidence THEN flows ELSE 0 END) AS BIGINT) AS with_policy,
        count(DISTINCT peer) AS peers
    FROM scoped
    WHERE counts_for_selection
    GROUP BY cluster_name, namespace, workload, subject_id, direction
),
selection AS (
    SELECT
        cluster_name,
        namespace,
        workload,
        subject_id,
        CAST(sum(flows) AS BIGINT) AS flows,
        CAST(sum(with_policy) AS BIGINT) AS with_policy,
        string_agg(direction, ' and ' ORDER BY direction) AS traffic_directions
    FROM directions
    GROUP BY cluster_name, namespace, workload, subject_id
),
findings_unselected AS (
    SELECT
        s.cluster_name,
        s.namespace,
        s.workload,
        'no_policy' AS finding,
        s.traffic_directions AS direction,
        'no policy selects it: none of its ' || CAST(s.flows AS VARCHAR) || ' requests (' || s.traffic_directions
            || ') got a policy verdict, while other workloads'' requests did' AS detail,
        'put ' || s.namespace || ' under a default-deny policy and allow only the observed allow-set of '
            || s.workload || ' (flowpipe suggest' || coalesce(' --cluster ' || s.cluster_name, '')
            || ' --namespace ' || s.namespace || ' drafts both)' AS suggestion,
        s.flows,
        CAST(NULL AS BIGINT) AS peers,
        CAST(NULL AS VARCHAR) AS policies
    FROM selection AS s
    JOIN policy_data AS p ON coalesce(p.cluster_name, '') = coalesce(s.cluster_name, '')
    WHERE p.flows > 0
      AND s.with_policy = 0
    UNION ALL
    SELECT
        d.cluster_name,
        d.namespace,
        d.workload,
        'no_' || d.direction || '_policy',
        d.direction,
        'no policy selects it for ' || d.direction || ': ' || CAST(d.flows AS VARCHAR) || ' ' || d.direction
            || ' requests with ' || CAST(d.peers AS VARCHAR)
            || ' peers got no policy verdict, although policies select it for the other direction',
        'add ' || d.direction || ' rules for ' || d.workload || ' that allow only the observed '
            || d.direction || ' allow-set (flowpipe suggest' || coalesce(' --cluster ' || d.cluster_name, '')
            || ' --namespace ' || d.namespace || ')',
        d.flows,
        d.peers,
        CAST(NULL AS VARCHAR)
    FROM directions AS d
    JOIN selection AS s
        ON s.subject_id = d.subject_id AND coalesce(s.cluster_name, '') = coalesce(d.cluster_name, '')
    JOIN policy_data AS p ON coalesce(p.cluster_name, '') = coalesce(d.cluster_name, '')
    WHERE p.flows > 0
      AND s.with_policy > 0
      AND d.with_policy = 0
),
world_ingress AS (
    SELECT
        cluster_name,
        namespace,
        workload,
        CAST(sum(flows) AS BIGINT) AS flows,
        count(DISTINCT world_client) AS addresses,
        array_to_string(list_sort(array_agg(DISTINCT CAST(port AS VARCHAR) || '/' || l4_protocol)), ', ') AS ports,
        array_to_string(list_sort(list_distinct(flatten(array_agg(allowed_by)))), ', ') AS policies
    FROM scoped
    WHERE direction = 'ingress'
      AND peer_entity = 'world'
      AND allowed
    GROUP BY cluster_name, namespace, workload
),
namespaces_seen AS (
    SELECT cluster_name, count(DISTINCT namespace) AS namespaces
    FROM (
        SELECT cluster_name, namespace FROM base
        UNION
        SELECT cluster_name, peer_namespace FROM base WHERE peer_namespace IS NOT NULL
    ) AS n
    GROUP BY cluster_name
),
wide_ingress AS (
    SELECT
        s.cluster_name,
        s.namespace,
        s.workload,
        CAST(sum(s.flows) AS BIGINT) AS flows,
        count(DISTINCT s.peer_namespace) AS peer_namespaces,
        array_to_string(list_sort(array_agg(DISTINCT s.peer_namespace)), ', ') AS namespace_list
    FROM scoped AS s
    WHERE s.direction = 'ingress'
      AND s.allowed
      AND s.peer_namespace IS NOT NULL
      AND s.peer_namespace <> s.namespace
    GROUP BY s.cluster_name, s.namespace, s.workload
),
broad AS (
    SELECT
        b.cluster_name,
        b.namespace,
        b.workload,
        b.direction,
        b.policy,
        b.match,
        CAST(sum(b.flows) AS BIGINT) AS flows,
        count(DISTINCT b.peer) AS peers,
        array_to_string(array_slice(list_sort(array_agg(DISTINCT b.peer)), 1, $max_listed), ', ') AS peer_list
    FROM (
        SELECT
            s.*,
            CASE s.policy_match_type WHEN 3 THEN 'l4-only' WHEN 4 THEN 'all' ELSE 'proto-only' END AS match,
            unnest(s.allowed_by) AS policy
        FROM scoped AS s
        WHERE s.verdict_event
          AND s.allowed
          AND s.policy_match_type IN (3, 4, 6)
    ) AS b
    GROUP BY b.cluster_name, b.namespace, b.workload, b.direction, b.policy, b.match
),
calls AS (
    -- One entry per peer, port and protocol, with the L7 calls seen on it.
    SELECT
        cluster_name,
        namespace,
        workload,
        subject_id,
        direction,
        peer,
        port,
        l4_protocol,
        CAST(sum(flows) AS BIGINT) AS flows,
        list_sort(list_distinct(array_agg(call))) AS l7,
        -- The policies that allowed this traffic today (Cilium 1.15+ attribution on policy-verdict events).
        list_distinct(flatten(array_agg(allowed_by))) AS policies
    FROM scoped
    WHERE allowed
    GROUP BY cluster_name, namespace, workload, subject_id, direction, peer, port, l4_protocol
),
allow_sets AS (
    SELECT
        cluster_name,
        namespace,
        workload,
        direction,
        CAST(sum(flows) AS BIGINT) AS flows,
        count(DISTINCT peer) AS peers,
        count(*) AS entries,
        array_to_string(array_slice(list_sort(array_agg(
            coalesce(peer, '?') || ' ' || coalesce(CAST(port AS VARCHAR) || '/', '') || coalesce(l4_protocol, '?')
            || CASE
                WHEN cardinality(l7) = 0 THEN ''
                ELSE ' [' || array_to_string(array_slice(l7, 1, $max_listed), ', ')
                    || CASE WHEN cardinality(l7) > $max_listed THEN ', ...' ELSE '' END || ']'
            END
        )), 1, $max_listed), '; ') AS entry_list,
        array_to_string(list_sort(list_distinct(flatten(array_agg(policies)))), ', ') AS policies
    FROM calls
    GROUP BY cluster_name, namespace, workload, direction
),
findings AS (
    SELECT * FROM findings_unselected
    UNION ALL
    SELECT
        w.cluster_name,
        w.namespace,
        w.workload,
        'ingress_from_world',
        'ingress',
        CAST(w.flows AS VARCHAR) || ' requests from ' || CAST(w.addresses AS VARCHAR)
            || ' addresses outside the cluster on ' || w.ports || '; allowed by '
            || coalesce(nullif(w.policies, ''), 'no policy (nothing selects it for ingress)'),
        'only edge components (ingress controllers, load balancers) should take traffic from the world: '
            || 'route it through one and allow only that, or narrow fromEntities world / fromCIDR to the '
            || 'addresses that need it',
        w.flows,
        w.addresses,
        nullif(w.policies, '')
    FROM world_ingress AS w
    UNION ALL
    SELECT
        i.cluster_name,
        i.namespace,
        i.workload,
        'ingress_from_all_namespaces',
        'ingress',
        CAST(i.flows AS VARCHAR) || ' requests from pods of every other namespace seen: ' || i.namespace_list,
        'allow the namespaces (and workloads) that need it by name instead of any namespace; expected only '
            || 'for shared services such as DNS',
        i.flows,
        i.peer_namespaces,
        CAST(NULL AS VARCHAR)
    FROM wide_ingress AS i
    JOIN namespaces_seen AS n ON coalesce(n.cluster_name, '') = coalesce(i.cluster_name, '')
    WHERE i.peer_namespaces >= 3
      AND i.peer_namespaces = n.namespaces - 1
    UNION ALL
    SELECT
        b.cluster_name,
        b.namespace,
        b.workload,
        'broad_policy',
        b.direction,
        'policy ' || b.policy || ' matched ' || b.direction || ' with a wildcard peer (' || b.match
            || ': any peer) but only ' || CAST(b.peers AS VARCHAR) || ' peers used it: ' || b.peer_list,
        'restrict the ' || CASE WHEN b.direction = 'ingress' THEN 'fromEndpoints' ELSE 'toEndpoints' END
            || ' of ' || b.policy || ' to the peers observed',
        b.flows,
        b.peers,
        b.policy
    FROM broad AS b
    UNION ALL
    SELECT
        a.cluster_name,
        a.namespace,
        a.workload,
        'observed_' || a.direction,
        a.direction,
        CASE WHEN a.direction = 'ingress' THEN 'from ' ELSE 'to ' END || a.entry_list
            || CASE WHEN a.entries > $max_listed THEN '; ... (' || CAST(a.entries AS VARCHAR) || ' entries)' ELSE '' END,
        'allow exactly these ' || a.direction || ' peers, ports and calls and nothing else (flowpipe suggest'
            || coalesce(' --cluster ' || a.cluster_name, '') || ' --namespace ' || a.namespace
            || ' drafts the policy)',
        a.flows,
        a.peers,
        nullif(a.policies, '')
    FROM allow_sets AS a
)
SELECT
    namespace,
    workload,
    finding,
    detail,
    suggestion,
    direction,
    flows,
    peers,
    policies,
    cluster_name
FROM findings
ORDER BY
    namespace,
    workload,
    CASE
        WHEN finding = 'no_policy' THEN 1
        WHEN finding LIKE 'no_%_policy' THEN 2
        WHEN finding = 'ingress_from_world' THEN 3
        WHEN finding = 'ingress_from_all_namespaces' THEN 4
        WHEN finding = 'broad_policy' THEN 5
        ELSE 6
    END,
    finding,
    detail,
    cluster_name NULLS LAST
LIMIT $limit

-- description: How an edge names its two ends, once for every user of the edge definition: the observed_edges
--   question and the grouping of stored flows that suggest, replay, its proof and its delta judge. The user
--   groups the flows of its window into edges, lists their ends in a CTE `edge_ends`, includes these CTEs
--   after it, and joins `edge_endpoints` back to its edges, once per end.
--   It also reads a CTE `edge_flows` (not materialized where it is a view's rows) with the columns `flows_enriched`
--   names a flow's ends by (cluster_name, time, and source_ / destination_ namespace, pod_name, workload,
--   identity, entity, reserved_identity): the flows, or flows grouped by those columns with their first time,
--   whose pods recorded with their own identity name the pods recorded with a reserved one.
--   `edge_ends`: one row per end of each edge (duplicates welcome), with the columns cluster_name, namespace,
--   pod_name, identity, workload, entity, reserved_identity, ip (as `flows_enriched` names the end; ip and
--   pod_name only where the user keeps them) and first_seen (when the edge was first seen).
--   `edge_endpoints`: one row per distinct end (those columns but first_seen, matched with IS NOT DISTINCT
--   FROM), and how the edge names it: `named_workload`, `named_identity`, `named_reserved_identity`, `labels`.
--   A pod recorded with a reserved identity (`reserved_identity`: hostNetwork pods, older agents' L7 records)
--   is the pod of that name (namespace, cluster) seen with its own identity in the window: its workload and
--   identity, and no reserved identity; without such a record it keeps its reserved identity. The labels of
--   an end are those of its identity (per cluster and namespace; for an end that is not a pod, per address
--   too), read from the flows of the moment the edges first saw it (every pod of an identity has the same
--   identity labels, whether a record named the pod or knew only its identity), else, for a pod, from any
--   flow that carries them (an exporter field mask emptied the first ones), else, for a pod whose flows are
--   gone (edges read from rollups past the raw retention), from the labels its edge rollups kept
--   (`edge_identity_labels`). A pod found by its pod name is looked up at the moment it was first seen with its
--   own identity (among the flows kept: with its flows gone, it keeps its reserved identity).
-- params: since, until
--
-- How it stays fast: labels are lists of a dozen strings on every flow, and reading them costs more than the
-- rest of the grouping; they are read only from the flows of those first moments (a join on the time, which
-- DuckDB pushes into the scan). `edge_end_labels` is not materialized, so that each join reads only the flows
-- it needs; `edge_unlabelled` is (usually empty, and computed before the flows are joined to it, not after).
-- The pod-naming checks of the reserved-identity lookup are made after its join (`CASE WHEN u.pod_name IS NOT
-- NULL ...`), so they are computed for the few flows of those pods only. Spark ignores the MATERIALIZED hints.
edge_unresolved AS (
    SELECT DISTINCT cluster_name, namespace, pod_name
    FROM edge_ends
    WHERE reserved_identity IS NOT NULL AND namespace IS NOT NULL AND pod_name IS NOT NULL
),
edge_pods AS (
    -- Each pod recorded with a reserved identity as seen with its own identity in the window, in its cluster.
    SELECT cluster_name, namespace, pod_name, min(workload) AS workload, min(identity) AS identity,
           min(time) AS first_seen
    FROM (
        SELECT u.cluster_name, u.namespace, u.pod_name, f.source_workload AS workload,
               f.source_identity AS identity, f.time
        FROM edge_flows AS f
        JOIN edge_unresolved AS u
            ON f.source_namespace = u.namespace AND f.source_pod_name = u.pod_name
            AND coalesce(f.cluster_name, '') = coalesce(u.cluster_name, '')
        WHERE ($since IS NULL OR f.time >= $since) AND ($until IS NULL OR f.time <= $until)
          AND CASE WHEN u.pod_name IS NOT NULL
              THEN f.source_entity IS NULL AND f.source_reserved_identity IS NULL END
        UNION ALL
        SELECT u.cluster_name, u.namespace, u.pod_name, f.destination_workload, f.destination_identity, f.time
        FROM edge_flows AS f
        JOIN edge_unresolved AS u
            ON f.destination_namespace = u.namespace AND f.destination_pod_name = u.pod_name
            AND coalesce(f.cluster_name, '') = coalesce(u.cluster_name, '')
        WHERE ($since IS NULL OR f.time >= $since) AND ($until IS NULL OR f.time <= $until)
          AND CASE WHEN u.pod_name IS NOT NULL
              THEN f.destination_entity IS NULL AND f.destination_reserved_identity IS NULL END
    ) AS seen
    GROUP BY cluster_name, namespace, pod_name
),
edge_named AS (
    -- Every distinct end, named: a pod found by its pod name takes that pod's workload and identity.
    SELECT
        e.cluster_name, e.namespace, e.pod_name, e.identity, e.workload, e.entity, e.reserved_identity, e.ip,
        CASE WHEN p.pod_name IS NOT NULL THEN p.workload ELSE e.workload END AS named_workload,
        CASE WHEN p.pod_name IS NOT NULL THEN p.identity ELSE e.identity END AS named_identity,
        CASE WHEN p.pod_name IS NULL THEN e.reserved_identity END AS named_reserved_identity,
        -- The key of its labels: a pod's identity in its namespace; other ends by their address too.
        CASE WHEN e.entity IS NOT NULL OR (e.reserved_identity IS NOT NULL AND p.pod_name IS NULL)
            THEN e.ip END AS label_ip,
        -- (a pod found by its pod name: when it was first seen with its identity, whose labels are wanted)
        min(CASE WHEN p.pod_name IS NOT NULL THEN p.first_seen ELSE e.first_seen END) AS first_seen
    FROM edge_ends AS e
    LEFT JOIN edge_pods AS p
        ON e.reserved_identity IS NOT NULL AND p.namespace = e.namespace AND p.pod_name = e.pod_name
        AND coalesce(p.cluster_name, '') = coalesce(e.cluster_name, '')
    GROUP BY
        e.cluster_name, e.namespace, e.pod_name, e.identity, e.workload, e.entity, e.reserved_identity, e.ip,
        CASE WHEN p.pod_name IS NOT NULL THEN p.workload ELSE e.workload END,
        CASE WHEN p.pod_name IS NOT NULL THEN p.identity ELSE e.identity END,
        CASE WHEN p.pod_name IS NULL THEN e.reserved_identity END,
        CASE WHEN e.entity IS NOT NULL OR (e.reserved_identity IS NOT NULL AND p.pod_name IS NULL)
            THEN e.ip END
),
edge_identities AS (
    -- Each identity the ends are named by, with the first time an edge saw it.
    SELECT cluster_name, namespace, named_identity AS identity, label_ip AS ip, min(first_seen) AS first_seen
    FROM edge_named
    WHERE named_identity IS NOT NULL
    GROUP BY cluster_name, namespace, named_identity, label_ip
),
edge_end_labels AS NOT MATERIALIZED (
    -- The labels each flow gives each of its ends (not materialized: each join below reads only its flows).
    SELECT cluster_name, time, source_namespace AS namespace, source_identity AS identity, source_ip AS ip,
           source_labels AS labels
    FROM flows_named
    UNION ALL
    SELECT cluster_name, time, destination_namespace, destination_identity, destination_ip, destination_labels
    FROM flows_named
),
edge_first_labels AS (
    SELECT i.cluster_name, i.namespace, i.identity, i.ip, min(f.labels) AS labels
    FROM edge_end_labels AS f
    JOIN edge_identities AS i
        ON f.time IS NOT DISTINCT FROM i.first_seen AND f.identity = i.identity AND coalesce(f.namespace, '') = coalesce(i.namespace, '')
        AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '') AND (i.ip IS NULL OR f.ip = i.ip)
    WHERE cardinality(f.labels) > 0
    GROUP BY i.cluster_name, i.namespace, i.identity, i.ip
),
edge_unlabelled AS MATERIALIZED (
    -- Pod identities whose first flows carried no labels (an exporter field mask): every flow is searched.
    SELECT i.cluster_name, i.namespace, i.identity, i.ip
    FROM edge_identities AS i
    LEFT JOIN edge_first_labels AS l
        ON l.identity = i.identity AND coalesce(l.namespace, '') = coalesce(i.namespace, '')
        AND coalesce(l.cluster_name, '') = coalesce(i.cluster_name, '') AND coalesce(l.ip, '') = coalesce(i.ip, '')
    WHERE l.identity IS NULL AND i.namespace IS NOT NULL AND i.ip IS NULL
),
edge_labels AS (
    SELECT cluster_name, namespace, identity, ip, labels FROM edge_first_labels
    UNION ALL
    SELECT i.cluster_name, i.namespace, i.identity, i.ip, min(f.labels)
    FROM edge_end_labels AS f
    JOIN edge_unlabelled AS i
        ON f.identity = i.identity AND coalesce(f.namespace, '') = coalesce(i.namespace, '')
        AND coalesce(f.cluster_name, '') = coalesce(i.cluster_name, '') AND (i.ip IS NULL OR f.ip = i.ip)
    WHERE cardinality(f.labels) > 0
    GROUP BY i.cluster_name, i.namespace, i.identity, i.ip
),
edge_kept_labels AS (
    -- The labels edge rollups kept per pod identity (empty when the flows are read alone), for a pod whose
    -- flows are gone (past their raw retention).
    SELECT cluster_name, namespace, identity, min(labels) AS labels
    FROM edge_identity_labels
    GROUP BY cluster_name, namespace, identity
),
edge_endpoints AS (
    SELECT
        n.cluster_name, n.namespace, n.pod_name, n.identity, n.workload, n.entity, n.reserved_identity, n.ip,
        n.named_workload, n.named_identity, n.named_reserved_identity, coalesce(l.labels, k.labels) AS labels
    FROM edge_named AS n
    LEFT JOIN edge_labels AS l
        ON l.identity = n.named_identity AND coalesce(l.namespace, '') = coalesce(n.namespace, '')
        AND coalesce(l.cluster_name, '') = coalesce(n.cluster_name, '') AND coalesce(l.ip, '') = coalesce(n.label_ip, '')
    LEFT JOIN edge_kept_labels AS k
        ON n.label_ip IS NULL AND k.identity = n.named_identity AND k.namespace = n.namespace
        AND coalesce(k.cluster_name, '') = coalesce(n.cluster_name, '')
),

-- description: The flow table plus each endpoint's identity, defined once for every question (and `suggest`).
--   `source_entity` / `destination_entity`: the reserved identity of an endpoint that is not a pod (`world`,
--   `host`, `kube-apiserver`, `remote-node`, `health`, `init`, `unmanaged`, `ingress`), else NULL.
--   `source_workload` / `destination_workload`: the display name of the endpoint: the workload Cilium reports;
--   else the first stable label of the pod (`app.kubernetes.io/name`, `app`, `k8s-app`, `name`); else the pod
--   name without the ReplicaSet, DaemonSet, CronJob or StatefulSet suffix; else the reserved entity; else the IP.
--   `source_workload_id` / `destination_workload_id`: the stable identity, `<namespace>/<workload>` for pods
--   (the namespace label where a record has labels but no namespace), the entity or IP otherwise.
--   It reads `flows_named`: the flow table with each endpoint's namespace taken from its
--   `k8s:io.kubernetes.pod.namespace` label where the record has a pod identity and labels but no namespace
--   (a remote pod the observing node knew only by identity), so such a pod is the same pod everywhere.
--   A record that names a pod (namespace and pod name) is about that pod even when it carries a reserved
--   identity (`reserved:world` for hostNetwork pods, pods the agent does not manage, Istio set-ups;
--   `reserved:unmanaged`): it is named by its workload or pod, never `world`, and
--   `source_reserved_identity` / `destination_reserved_identity` keep that identity (`world`, `unmanaged`,
--   `host`, ...; NULL for pods with their own identity and for endpoints that are not pods), since policies
--   enforce on the identity. `source_unresolved_pod` / `destination_unresolved_pod`: the pod name of such a
--   pod, else NULL; whoever needs its labels (observed_edges, replay's edges) takes those of the pod of that
--   name seen with its own identity in the same cluster.
--   `is_traffic`: not a socket-LB event (`flow_type` SOCK, event type 7: a Service translation recorded at
--   `connect()`, not a packet). `is_request`: traffic that is not a reply (unknown counts as a request) and
--   not an L7 response. `dns_rcode_name`: the DNS
--   response code by name (NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ...).
--   `http_path`: the path of `http_url` without query string, numeric, UUID and long hex segments as `{id}`.
--   Written in portable SQL (no DuckDB-only syntax where a standard form exists) so that sqlglot can
--   translate it for Spark. The `-- fallback: begin` / `-- fallback: end` regions name endpoints that Cilium
--   did not describe (labels, pod names, addresses); they are left out when no flow of the dataset needs them
--   (see flowpipe/query/views.py), so that questions do not read those columns of every flow.
-- requires: identity_workloads
SELECT
    w.*,
    CASE
        WHEN w.source_namespace IS NOT NULL AND w.source_workload IS NOT NULL
            THEN w.source_namespace || '/' || w.source_workload
        -- fallback: begin
        -- A pod described only by its labels (no namespace field): the namespace label.
        WHEN w.source_entity IS NULL AND w.source_workload IS NOT NULL AND regexp_extract(array_to_string(
            w.source_labels, ' '), '(?:^| )k8s:io\.kubernetes\.pod\.namespace=([^ ]+)', 1) <> ''
            THEN regexp_extract(array_to_string(w.source_labels, ' '),
                '(?:^| )k8s:io\.kubernetes\.pod\.namespace=([^ ]+)', 1) || '/' || w.source_workload
        -- fallback: end
        ELSE w.source_workload
    END AS source_workload_id,
    CASE
        WHEN w.destination_namespace IS NOT NULL AND w.destination_workload IS NOT NULL
            THEN w.destination_namespace || '/' || w.destination_workload
        -- fallback: begin
        -- A pod described only by its labels (no namespace field): the namespace label.
        WHEN w.destination_entity IS NULL AND w.destination_workload IS NOT NULL AND regexp_extract(array_to_string(
            w.destination_labels, ' '), '(?:^| )k8s:io\.kubernetes\.pod\.namespace=([^ ]+)', 1) <> ''
            THEN regexp_extract(array_to_string(w.destination_labels, ' '),
                '(?:^| )k8s:io\.kubernetes\.pod\.namespace=([^ ]+)', 1) || '/' || w.destination_workload
        -- fallback: end
        ELSE w.destination_workload
    END AS destination_workload_id,
    CASE WHEN w.source_reserved_identity IS NOT NULL THEN w.source_pod_name END AS source_unresolved_pod,
    CASE WHEN w.destination_reserved_identity IS NOT NULL THEN w.destination_pod_name END
        AS destination_unresolved_pod,
    coalesce(w.flow_type, '') <> 'SOCK' AND coalesce(w.event_type, 0) <> 7 AS is_traffic,
    coalesce(w.flow_type, '') <> 'SOCK' AND coalesce(w.event_type, 0) <> 7
        AND (w.is_reply IS NULL OR NOT w.is_reply) AND (w.l7_type IS NULL OR w.l7_type <> 'RESPONSE') AS is_request,
    CASE
        WHEN w.dns_rcode IS NULL OR w.l7_type <> 'RESPONSE' THEN NULL
        WHEN w.dns_rcode = 0 THEN 'NOERROR'
        WHEN w.dns_rcode = 1 THEN 'FORMERR'
        WHEN w.dns_rcode = 2 THEN 'SERVFAIL'
        WHEN w.dns_rcode = 3 THEN 'NXDOMAIN'
        WHEN w.dns_rcode = 4 THEN 'NOTIMP'
        WHEN w.dns_rcode = 5 THEN 'REFUSED'
        WHEN w.dns_rcode = 6 THEN 'YXDOMAIN'
        WHEN w.dns_rcode = 7 THEN 'YXRRSET'
        WHEN w.dns_rcode = 8 THEN 'NXRRSET'
        WHEN w.dns_rcode = 9 THEN 'NOTAUTH'
        WHEN w.dns_rcode = 10 THEN 'NOTZONE'
        ELSE 'RCODE' || CAST(w.dns_rcode AS VARCHAR)
    END AS dns_rcode_name,
    -- The path of an HTTP URL without scheme, host, query and fragment; numeric, UUID and long hex segments
    -- become {id}, so that one endpoint of an API is one value.
    CASE WHEN w.http_url IS NOT NULL THEN coalesce(nullif(rtrim(
        regexp_replace(
            regexp_replace(
                regexp_replace(
                    regexp_extract(w.http_url, '^(?:[A-Za-z][A-Za-z0-9+.-]*://[^/]*)?([^?#]*)', 1) || '/',
                    '/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{16,})/',
                    '/{id}/', 'g'),
                '/[0-9]+/', '/{id}/', 'g'),
            -- twice: adjacent numeric segments share a slash, so one pass replaces every other one
            '/[0-9]+/', '/{id}/', 'g'),
        '/'), ''), '/') END AS http_path
FROM (
    SELECT
        e.*,
        coalesce(
            e.source_workload_name,
            e.source_entity
            -- Only for what Cilium did not describe (old Cilium, an exporter field mask): an endpoint without a
            -- workload name that is no reserved identity gets its first stable label, else its pod name
            -- without the controller's suffix, else its address.
            -- fallback: begin
            , e.source_identity_workload
            , CASE WHEN e.source_workload_name IS NULL AND e.source_entity IS NULL THEN coalesce(
                nullif(regexp_extract(array_to_string(e.source_labels, ' '),
                    '(?:^| )k8s:app\.kubernetes\.io/name=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '), '(?:^| )k8s:app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '), '(?:^| )k8s:k8s-app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '), '(?:^| )k8s:name=([^ ]+)', 1), '')
            ) END
            , CASE WHEN e.source_workload_name IS NULL AND e.source_namespace IS NOT NULL THEN coalesce(
                -- Deployment: <name>-<pod-template-hash>-<5>; CronJob: <name>-<schedule time>-<5>;
                -- DaemonSet or Job: <name>-<5>; StatefulSet: <name>-<ordinal>. Kubernetes draws the random
                -- parts from an alphabet without vowels, so ordinary words are not cut off.
                nullif(regexp_extract(e.source_pod_name,
                    '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name,
                    '^(.+)-[0-9]{8,}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name, '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name, '^(.+)-[0-9]+$', 1), ''),
                e.source_pod_name
            ) END
            , e.source_ip
            -- fallback: end
        ) AS source_workload,
        coalesce(
            e.destination_workload_name,
            e.destination_entity
            -- fallback: begin
            , e.destination_identity_workload
            , CASE WHEN e.destination_workload_name IS NULL AND e.destination_entity IS NULL THEN coalesce(
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '),
                    '(?:^| )k8s:app\.kubernetes\.io/name=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '), '(?:^| )k8s:app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '), '(?:^| )k8s:k8s-app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '), '(?:^| )k8s:name=([^ ]+)', 1), '')
            ) END
            , CASE WHEN e.destination_workload_name IS NULL AND e.destination_namespace IS NOT NULL THEN coalesce(
                nullif(regexp_extract(e.destination_pod_name,
                    '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name,
                    '^(.+)-[0-9]{8,}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name, '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name, '^(.+)-[0-9]+$', 1), ''),
                e.destination_pod_name
            ) END
            , e.destination_ip
            -- fallback: end
        ) AS destination_workload
    FROM (
    SELECT
        r.*,
        -- A record that names its pod (namespace and pod name) is about that pod, whatever identity it carries.
        CASE WHEN r.source_namespace IS NOT NULL AND r.source_pod_name IS NOT NULL THEN NULL
            ELSE r.source_reserved END AS source_entity,
        CASE WHEN r.destination_namespace IS NOT NULL AND r.destination_pod_name IS NOT NULL THEN NULL
            ELSE r.destination_reserved END AS destination_entity,
        CASE WHEN r.source_namespace IS NOT NULL AND r.source_pod_name IS NOT NULL THEN r.source_reserved END
            AS source_reserved_identity,
        CASE WHEN r.destination_namespace IS NOT NULL AND r.destination_pod_name IS NOT NULL
            THEN r.destination_reserved END AS destination_reserved_identity
    FROM (
        SELECT
            f.*,
            CASE
                -- Decided by the identity number alone, for nearly every flow: a pod (cluster-allocated
                -- identity, in a namespace) is no entity; reserved identities 1-10; node-local identities
                -- (CIDR and FQDN selectors) stand for addresses outside the cluster. Where the API server
                -- runs on a node, Hubble shows that node's identity (host, remote-node), and so does this.
                WHEN f.source_identity >= 256 AND f.source_identity < 16777216 AND f.source_namespace IS NOT NULL
                    THEN NULL
                WHEN f.source_identity = 1 THEN 'host'
                WHEN f.source_identity IN (2, 9, 10) THEN 'world'
                WHEN f.source_identity = 3 THEN 'unmanaged'
                WHEN f.source_identity = 4 THEN 'health'
                WHEN f.source_identity = 5 THEN 'init'
                WHEN f.source_identity = 6 THEN 'remote-node'
                WHEN f.source_identity = 7 THEN 'kube-apiserver'
                WHEN f.source_identity = 8 THEN 'ingress'
                WHEN f.source_identity >= 16777216 THEN 'world'
                -- fallback: begin
                -- No usable identity (an exporter field mask, a very old agent): the reserved label says it.
                WHEN array_contains(f.source_labels, 'reserved:kube-apiserver') THEN 'kube-apiserver'
                WHEN array_contains(f.source_labels, 'reserved:host') THEN 'host'
                WHEN array_contains(f.source_labels, 'reserved:remote-node') THEN 'remote-node'
                WHEN array_contains(f.source_labels, 'reserved:health') THEN 'health'
                WHEN array_contains(f.source_labels, 'reserved:world')
                    OR array_contains(f.source_labels, 'reserved:world-ipv4')
                    OR array_contains(f.source_labels, 'reserved:world-ipv6') THEN 'world'
                WHEN array_contains(f.source_labels, 'reserved:init') THEN 'init'
                WHEN array_contains(f.source_labels, 'reserved:unmanaged') THEN 'unmanaged'
                WHEN array_contains(f.source_labels, 'reserved:ingress') THEN 'ingress'
                -- fallback: end
            END AS source_reserved,
            CASE
                -- Decided by the identity number alone, for nearly every flow: a pod (cluster-allocated
                -- identity, in a namespace) is no entity; reserved identities 1-10; node-local identities
                -- (CIDR and FQDN selectors) stand for addresses outside the cluster. Where the API server
                -- runs on a node, Hubble shows that node's identity (host, remote-node), and so does this.
                WHEN f.destination_identity >= 256 AND f.destination_identity < 16777216 AND f.destination_namespace IS NOT NULL
                    THEN NULL
                WHEN f.destination_identity = 1 THEN 'host'
                WHEN f.destination_identity IN (2, 9, 10) THEN 'world'
                WHEN f.destination_identity = 3 THEN 'unmanaged'
                WHEN f.destination_identity = 4 THEN 'health'
                WHEN f.destination_identity = 5 THEN 'init'
                WHEN f.destination_identity = 6 THEN 'remote-node'
                WHEN f.destination_identity = 7 THEN 'kube-apiserver'
                WHEN f.destination_identity = 8 THEN 'ingress'
                WHEN f.destination_identity >= 16777216 THEN 'world'
                -- fallback: begin
                -- No usable identity (an exporter field mask, a very old agent): the reserved label says it.
                WHEN array_contains(f.destination_labels, 'reserved:kube-apiserver') THEN 'kube-apiserver'
                WHEN array_contains(f.destination_labels, 'reserved:host') THEN 'host'
                WHEN array_contains(f.destination_labels, 'reserved:remote-node') THEN 'remote-node'
                WHEN array_contains(f.destination_labels, 'reserved:health') THEN 'health'
                WHEN array_contains(f.destination_labels, 'reserved:world')
                    OR array_contains(f.destination_labels, 'reserved:world-ipv4')
                    OR array_contains(f.destination_labels, 'reserved:world-ipv6') THEN 'world'
                WHEN array_contains(f.destination_labels, 'reserved:init') THEN 'init'
                WHEN array_contains(f.destination_labels, 'reserved:unmanaged') THEN 'unmanaged'
                WHEN array_contains(f.destination_labels, 'reserved:ingress') THEN 'ingress'
                -- fallback: end
            END AS destination_reserved
            -- fallback: begin
            -- A pod known only by identity and labels: the workload its identity has where it is named.
            , siw.workload AS source_identity_workload, diw.workload AS destination_identity_workload
            -- fallback: end
        FROM flows_named AS f
        -- fallback: begin
        LEFT JOIN identity_workloads AS siw
            ON f.source_pod_name IS NULL AND f.source_workload_name IS NULL AND siw.identity = f.source_identity
            AND coalesce(siw.cluster_name, '') = coalesce(f.cluster_name, '')
        LEFT JOIN identity_workloads AS diw
            ON f.destination_pod_name IS NULL AND f.destination_workload_name IS NULL
            AND diw.identity = f.destination_identity
            AND coalesce(diw.cluster_name, '') = coalesce(f.cluster_name, '')
        -- fallback: end
    ) AS r
    ) AS e
) AS w

-- description: The flow table plus each endpoint's identity, defined once for every question (and `suggest`).
--   `source_entity` / `destination_entity`: the reserved identity of an endpoint that is not a pod (`world`,
--   `host`, `kube-apiserver`, `remote-node`, `health`, `init`, `unmanaged`, `ingress`), else NULL.
--   `source_workload` / `destination_workload`: the display name of the endpoint: the workload Cilium reports;
--   else the first stable label of the pod (`app.kubernetes.io/name`, `app`, `k8s-app`, `name`); else the pod
--   name without the ReplicaSet, DaemonSet, CronJob or StatefulSet suffix; else the reserved entity; else the IP.
--   `source_workload_id` / `destination_workload_id`: the stable identity, `<namespace>/<workload>` for pods,
--   the entity or IP otherwise. `is_request`: not a reply (unknown counts as a request) and not an L7
--   response. `dns_rcode_name`: the DNS response code by name (NOERROR, NXDOMAIN, SERVFAIL, REFUSED, ...).
--   Written in portable SQL (no DuckDB-only syntax where a standard form exists) so that sqlglot can
--   translate it for Spark.
SELECT
    w.*,
    CASE
        WHEN w.source_namespace IS NOT NULL AND w.source_workload IS NOT NULL
            THEN w.source_namespace || '/' || w.source_workload
        ELSE w.source_workload
    END AS source_workload_id,
    CASE
        WHEN w.destination_namespace IS NOT NULL AND w.destination_workload IS NOT NULL
            THEN w.destination_namespace || '/' || w.destination_workload
        ELSE w.destination_workload
    END AS destination_workload_id,
    (w.is_reply IS NULL OR NOT w.is_reply) AND (w.l7_type IS NULL OR w.l7_type <> 'RESPONSE') AS is_request,
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
    END AS dns_rcode_name
FROM (
    SELECT
        e.*,
        coalesce(
            e.source_workload_name,
            -- Labels and pod names are only looked at for pods without a reported workload (old Cilium, or an
            -- exporter field mask); the CASE keeps the common case cheap.
            CASE WHEN e.source_workload_name IS NULL AND e.source_namespace IS NOT NULL THEN coalesce(
                nullif(regexp_extract(array_to_string(e.source_labels, ' '),
                    '(?:^| )k8s:app\.kubernetes\.io/name=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '),
                    '(?:^| )k8s:app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '),
                    '(?:^| )k8s:k8s-app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.source_labels, ' '),
                    '(?:^| )k8s:name=([^ ]+)', 1), ''),
                -- Deployment: <name>-<pod-template-hash>-<5>; CronJob: <name>-<schedule time>-<5>;
                -- DaemonSet or Job: <name>-<5>; StatefulSet: <name>-<ordinal>. Kubernetes draws the random
                -- parts from an alphabet without vowels, so ordinary words are not cut off.
                nullif(regexp_extract(e.source_pod_name,
                    '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name, '^(.+)-[0-9]{8,}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name, '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.source_pod_name, '^(.+)-[0-9]+$', 1), ''),
                e.source_pod_name
            ) END,
            e.source_entity,
            e.source_ip
        ) AS source_workload,
        coalesce(
            e.destination_workload_name,
            CASE WHEN e.destination_workload_name IS NULL AND e.destination_namespace IS NOT NULL THEN coalesce(
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '),
                    '(?:^| )k8s:app\.kubernetes\.io/name=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '),
                    '(?:^| )k8s:app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '),
                    '(?:^| )k8s:k8s-app=([^ ]+)', 1), ''),
                nullif(regexp_extract(array_to_string(e.destination_labels, ' '),
                    '(?:^| )k8s:name=([^ ]+)', 1), ''),
                nullif(regexp_extract(e.destination_pod_name,
                    '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name,
                    '^(.+)-[0-9]{8,}-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name, '^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5}$', 1), ''),
                nullif(regexp_extract(e.destination_pod_name, '^(.+)-[0-9]+$', 1), ''),
                e.destination_pod_name
            ) END,
            e.destination_entity,
            e.destination_ip
        ) AS destination_workload
    FROM (
        SELECT
            f.*,
            CASE
                -- A pod (cluster-allocated identity in a namespace): no reserved entity. First, so that the
                -- common case skips the label scans below.
                WHEN f.source_identity >= 256 AND f.source_identity < 16777216 AND f.source_namespace IS NOT NULL
                    THEN NULL
                -- The API server on a node carries reserved:kube-apiserver beside reserved:host/remote-node.
                WHEN f.source_identity = 7 OR array_contains(f.source_labels, 'reserved:kube-apiserver')
                    THEN 'kube-apiserver'
                WHEN f.source_identity = 1 THEN 'host'
                WHEN f.source_identity IN (2, 9, 10) THEN 'world'
                WHEN f.source_identity = 3 THEN 'unmanaged'
                WHEN f.source_identity = 4 THEN 'health'
                WHEN f.source_identity = 5 THEN 'init'
                WHEN f.source_identity = 6 THEN 'remote-node'
                WHEN f.source_identity = 8 THEN 'ingress'
                WHEN array_contains(f.source_labels, 'reserved:host') THEN 'host'
                WHEN array_contains(f.source_labels, 'reserved:remote-node') THEN 'remote-node'
                WHEN array_contains(f.source_labels, 'reserved:health') THEN 'health'
                WHEN array_contains(f.source_labels, 'reserved:world')
                    OR array_contains(f.source_labels, 'reserved:world-ipv4')
                    OR array_contains(f.source_labels, 'reserved:world-ipv6') THEN 'world'
                -- Node-local identities (CIDR and FQDN selectors) stand for addresses outside the cluster.
                WHEN f.source_identity >= 16777216 THEN 'world'
                WHEN array_contains(f.source_labels, 'reserved:init') THEN 'init'
                WHEN array_contains(f.source_labels, 'reserved:unmanaged') THEN 'unmanaged'
                WHEN array_contains(f.source_labels, 'reserved:ingress') THEN 'ingress'
            END AS source_entity,
            CASE
                WHEN f.destination_identity >= 256 AND f.destination_identity < 16777216
                    AND f.destination_namespace IS NOT NULL THEN NULL
                WHEN f.destination_identity = 7 OR array_contains(f.destination_labels, 'reserved:kube-apiserver')
                    THEN 'kube-apiserver'
                WHEN f.destination_identity = 1 THEN 'host'
                WHEN f.destination_identity IN (2, 9, 10) THEN 'world'
                WHEN f.destination_identity = 3 THEN 'unmanaged'
                WHEN f.destination_identity = 4 THEN 'health'
                WHEN f.destination_identity = 5 THEN 'init'
                WHEN f.destination_identity = 6 THEN 'remote-node'
                WHEN f.destination_identity = 8 THEN 'ingress'
                WHEN array_contains(f.destination_labels, 'reserved:host') THEN 'host'
                WHEN array_contains(f.destination_labels, 'reserved:remote-node') THEN 'remote-node'
                WHEN array_contains(f.destination_labels, 'reserved:health') THEN 'health'
                WHEN array_contains(f.destination_labels, 'reserved:world')
                    OR array_contains(f.destination_labels, 'reserved:world-ipv4')
                    OR array_contains(f.destination_labels, 'reserved:world-ipv6') THEN 'world'
                WHEN f.destination_identity >= 16777216 THEN 'world'
                WHEN array_contains(f.destination_labels, 'reserved:init') THEN 'init'
                WHEN array_contains(f.destination_labels, 'reserved:unmanaged') THEN 'unmanaged'
                WHEN array_contains(f.destination_labels, 'reserved:ingress') THEN 'ingress'
            END AS destination_entity
        FROM flows AS f
    ) AS e
) AS w

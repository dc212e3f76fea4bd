-- description: What edge rollups keep of each pod identity besides the edges (one file per flow part file,
--   `<dataset>/edge_identities/`): the workload Cilium reported for it where the pod is named (the rows of
--   `identity_workloads`, `namespace` and `labels` NULL), and its labels per namespace (`workload` NULL), so
--   that edges read from rollups name and label their pods after the flows are gone. Rows of any split of the
--   flows merge by taking the minimum, as over all of them.
-- requires: identity_workloads
SELECT
    cluster_name,
    identity,
    workload,
    CAST(NULL AS VARCHAR) AS namespace,
    CAST(NULL AS VARCHAR[]) AS labels
FROM identity_workloads
UNION ALL
SELECT cluster_name, identity, CAST(NULL AS VARCHAR), namespace, min(labels)
FROM (
    SELECT cluster_name, source_identity AS identity, source_namespace AS namespace, source_labels AS labels
    FROM flows_named
    WHERE source_namespace IS NOT NULL AND cardinality(source_labels) > 0
    UNION ALL
    SELECT cluster_name, destination_identity, destination_namespace, destination_labels
    FROM flows_named
    WHERE destination_namespace IS NOT NULL AND cardinality(destination_labels) > 0
) AS labelled
GROUP BY cluster_name, identity, namespace

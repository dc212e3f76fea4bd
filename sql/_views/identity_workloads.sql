-- description: The workload Cilium reported for each pod identity (per cluster), from the records that name the
--   pod: a remote pod that another node knew only by its identity and labels is named by it, so that it is the
--   same workload at both ends (its labels alone may give another name, e.g. `app.kubernetes.io/name`).
SELECT cluster_name, identity, min(workload) AS workload
FROM (
    SELECT cluster_name, source_identity AS identity, source_workload_name AS workload
    FROM flows
    WHERE source_workload_name IS NOT NULL AND source_pod_name IS NOT NULL
      AND source_identity >= 256 AND source_identity < 16777216
    UNION ALL
    SELECT cluster_name, destination_identity, destination_workload_name
    FROM flows
    WHERE destination_workload_name IS NOT NULL AND destination_pod_name IS NOT NULL
      AND destination_identity >= 256 AND destination_identity < 16777216
) AS named
GROUP BY cluster_name, identity

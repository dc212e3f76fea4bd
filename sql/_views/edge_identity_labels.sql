-- description: The labels edge rollups keep per pod identity (cluster, namespace, identity), for an identity
--   whose flows are gone (past their raw retention): empty when questions read flows only; reading edge
--   rollups (`--source auto` or `edges`) fills it from their `edge_identities`.
SELECT
    cluster_name,
    source_namespace AS namespace,
    source_identity AS identity,
    source_labels AS labels
FROM flows
WHERE FALSE

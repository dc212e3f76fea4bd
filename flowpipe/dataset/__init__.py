"""The stored dataset: its layout (hour partitions, part files, state), storage (local or S3), compaction,
retention, the leases and writer state that let several processes share it, and the stored flow uuids."""

"""Use cases, one module each: what a command does once its flags became a config (collect, ingest, suggest, review)."""

"""Helpers the tests share: synthetic flows and datasets, collector and Prometheus processes, policy documents,
one `wait_until`. Tests import them as `support.<module>`; no test imports `conftest`."""

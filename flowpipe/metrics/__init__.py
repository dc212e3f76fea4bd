"""Prometheus metrics: the metric families of a running pipeline and the questions refreshed periodically."""

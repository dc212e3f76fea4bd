"""A dataset's metrics as serve-metrics keeps them, read in-process."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from flowpipe.dataset.layout import Dataset
from flowpipe.metrics.families import PipelineMetrics
from flowpipe.metrics.server import DatasetFollower
from flowpipe.sinks.prometheus import PrometheusSink


def follower_for(root: Path) -> tuple[DatasetFollower, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = PipelineMetrics.create(registry, role="dataset")
    return DatasetFollower(Dataset(root), metrics, PrometheusSink(metrics)), registry


def received(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for m in registry.collect()
        if m.name == "flowpipe_flows_received"
        for s in m.samples
        if s.name.endswith("_total")
    )

"""The runner's monotonic engine counters become Prometheus counter increments."""

from __future__ import annotations

from prometheus_client import REGISTRY

from service.metrics import EngineStatsExporter


def sample(event: str) -> float:
    return REGISTRY.get_sample_value("realcustom_engine_events_total", {"event": event}) or 0.0


def test_snapshots_are_exported_as_increments() -> None:
    exporter = EngineStatsExporter()
    before_misses, before_replays = sample("graph_misses"), sample("graph_replays")
    exporter.record({"graph_misses": 2, "graph_replays": 10})
    exporter.record({"graph_misses": 5, "graph_replays": 10})
    exporter.record({})  # the eager backend has no counters
    assert sample("graph_misses") - before_misses == 5
    assert sample("graph_replays") - before_replays == 10

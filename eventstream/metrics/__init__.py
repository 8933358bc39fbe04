"""Metrics: registry (counters, vectorized latency histograms, scrape-time callbacks) and the HTTP exporter."""

from eventstream.metrics.exporter import MetricsServer, MetricsServerError
from eventstream.metrics.histogram import DEFAULT_LATENCY_BUCKETS_NS, VectorHistogram
from eventstream.metrics.registry import Metrics, MetricsRegistry

__all__ = [
    "DEFAULT_LATENCY_BUCKETS_NS",
    "Metrics",
    "MetricsRegistry",
    "MetricsServer",
    "MetricsServerError",
    "VectorHistogram",
]

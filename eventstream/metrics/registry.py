"""Metrics: one private prometheus-client registry per engine, updated per batch, never per event.

Names (Prometheus text format):

    events_received_total, events_processed_total, events_dropped_total{reason},
    dedup_hits_total, backpressure_drops_total, pipeline_transitions_total{from,to},
    queue_depth{queue}, latency_ns{queue} (histogram), latency_recent_ns{queue,quantile},
    pipeline_state{name}, process_cpu_percent, process_rss_bytes, process_threads,
    + whatever components register with register_callback() (read at scrape time).

A private CollectorRegistry (not prometheus-client's global one) so several engines, and tests, live
in one process without name collisions. Counters are prometheus-client Counters: one inc(n) per batch
is cheap. Latency uses VectorHistogram (see histogram.py). Queue depths and component statistics are
callbacks read at scrape time, so the hot paths do nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest

from eventstream.metrics.collectors import (CallbackMetric, LatencyCollector, ProcessCollector, StateCollector,
                                            ValueFn)
from eventstream.metrics.histogram import DEFAULT_LATENCY_BUCKETS_NS, VectorHistogram

QUEUES = ("realtime", "transactional", "batch")


def reason_label(reason: str) -> str:
    """The label value for a drop reason: its category, the text before the first colon."""
    return reason.split(":", 1)[0].strip() or "unknown"


class Metrics:
    def __init__(self, queues: Iterable[str] = QUEUES, *, latency_buckets_ns=DEFAULT_LATENCY_BUCKETS_NS,
                 reservoir: int = 4096, process: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._received = Counter("events_received", "events accepted by ingest", registry=r)
        self._processed = Counter("events_processed", "events handled by a processor", registry=r)
        self._dropped = Counter("events_dropped", "events dropped or failed (to the DLQ), by reason category",
                                ["reason"], registry=r)
        self._dedup = Counter("dedup_hits", "transactional events skipped as duplicates", registry=r)
        self._bp_drops = Counter("backpressure_drops", "events shed by the control plane", registry=r)
        self._transitions = Counter("pipeline_transitions", "backpressure level changes", ["from", "to"],
                                    registry=r)
        self.latency = {q: VectorHistogram(latency_buckets_ns, reservoir) for q in queues}
        r.register(LatencyCollector(self.latency))
        self._state = StateCollector()
        r.register(self._state)
        self._depth_sources: dict[str, Callable[[], int]] = {}
        r.register(CallbackMetric("queue_depth", "events waiting in each queue", self._depths, labels=["queue"]))
        if process:
            r.register(ProcessCollector())

    # ------------------------------------------------------------------------------ hot-path updates
    def received(self, n: int) -> None:
        if n:
            self._received.inc(n)

    def processed(self, queue: str, records: np.ndarray | None = None, *, count: int | None = None,
                  latencies_ns: np.ndarray | None = None, now_ns: int | None = None) -> None:
        """Count a handled batch and record its latencies: given, or now - records["ingest_ts"]
        (time.monotonic_ns clock, as ingest stamps it)."""
        n = count if count is not None else (len(records) if records is not None else len(latencies_ns))
        if n:
            self._processed.inc(n)
        if latencies_ns is None and records is not None and len(records):
            now = time.monotonic_ns() if now_ns is None else now_ns
            latencies_ns = np.int64(now) - records["ingest_ts"].astype(np.int64)
        if latencies_ns is not None and len(latencies_ns):
            self.observe_latency(queue, latencies_ns)

    def observe_latency(self, queue: str, latencies_ns: np.ndarray) -> None:
        h = self.latency.get(queue)
        if h is None:
            raise ValueError(f"queue {queue!r} has no latency histogram; allowed: {', '.join(self.latency)}")
        h.observe_many(latencies_ns)

    def dropped(self, reason: str, n: int) -> None:
        if n:
            self._dropped.labels(reason_label(reason)).inc(n)

    def dedup_hits(self, n: int) -> None:
        if n:
            self._dedup.inc(n)

    def backpressure_dropped(self, n: int) -> None:
        if n:
            self._bp_drops.inc(n)

    def set_state(self, level: int, name: str) -> None:
        self._state.level, self._state.name = int(level), str(name)

    def transition(self, previous: str, level: str) -> None:
        """Count a level change (names such as "HEALTHY"); set_state() sets the current level."""
        self._transitions.labels(previous, level).inc()

    def on_transition(self, t) -> None:
        """ControlThread(on_transition=...) hook: takes an engine.control.Transition."""
        self.transition(t.previous.name, t.level.name)
        self.set_state(int(t.level), t.level.name)

    # ------------------------------------------------------------------------------ scrape-time sources
    def watch_queue(self, queue: str, depth_fn: Callable[[], int]) -> None:
        """queue_depth{queue} is read from depth_fn at each scrape."""
        self._depth_sources[queue] = depth_fn

    def _depths(self) -> dict[str, float]:
        out = {}
        for q, fn in list(self._depth_sources.items()):
            try:
                out[q] = float(fn())
            except Exception:  # noqa: BLE001 - a dead queue reports nothing rather than failing the scrape
                continue
        return out

    def register_callback(self, name: str, doc: str, fn: ValueFn, *, kind: str = "gauge",
                          labels: Iterable[str] = ()) -> CallbackMetric:
        """Add a gauge/counter read from `fn` at scrape time (number, or dict label(s) -> number).
        For counters give the name without `_total` (it is added). Raises ValueError on a duplicate name."""
        metric = CallbackMetric(name, doc, fn, kind, labels)
        self.registry.register(metric)
        return metric

    def unregister(self, metric: CallbackMetric) -> None:
        self.registry.unregister(metric)

    # ------------------------------------------------------------------------------ reading
    def counts(self) -> dict:
        """Current totals (for summaries, the control plane and tests)."""
        dropped = {}
        for fam in self._dropped.collect():
            for s in fam.samples:
                if s.name.endswith("_total"):
                    dropped[s.labels["reason"]] = int(s.value)
        return {
            "received": self._value("events_received_total"),
            "processed": self._value("events_processed_total"),
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
            "dedup_hits": self._value("dedup_hits_total"),
            "backpressure_drops": self._value("backpressure_drops_total"),
            "state": self._state.name,
        }

    def _value(self, sample: str) -> int:
        return int(self.registry.get_sample_value(sample) or 0)

    def percentiles(self, queue: str) -> dict[str, float]:
        return self.latency[queue].percentiles()

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)

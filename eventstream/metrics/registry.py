"""Metrics: one private prometheus-client registry per engine, updated per batch, never per event.

Names (Prometheus text format):

    events_received_total, events_processed_total, events_dropped_total{reason},
    dedup_hits_total, backpressure_drops_total, pipeline_transitions_total{from,to},
    queue_depth{queue}, latency_seconds{queue} (histogram), latency_recent_seconds{queue,quantile} (summary),
    stage_latency_seconds{stage} (histogram), stage_latency_recent_seconds{stage,quantile} (summary): time
    from decode to each stage of an event's way (STAGES: queued = taken by its processor, handled,
    stored = in events.bin or the DLQ, acked = its ACK sent), so an operator sees where a tail comes from,
    pipeline_state{name}, process_cpu_percent, process_rss_bytes, process_threads,
    + whatever components register with register_callback() (read at scrape time).

`reason` label values come from the fixed set metrics.reasons.REASONS only (anything else is counted
as "other"): reason texts can carry client input, and each label value is a series kept forever. Every
reason and every possible pipeline transition is exported at 0 from the start.

A private CollectorRegistry (not prometheus-client's global one) so several engines, and tests, live
in one process without name collisions. Unlabelled counters are SummedCounters: one locked add per
batch, plus optional sources (counter_fn) read at scrape time; labelled ones are prometheus-client
Counters (one inc(n) per batch and label). Latency uses VectorHistogram (see histogram.py). Queue depths and
component statistics are callbacks read at scrape time, so the hot paths do nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest

from eventstream.metrics.collectors import (
    CallbackMetric,
    LabelledCallbacks,
    LatencyCollector,
    ProcessCollector,
    StateCollector,
    SummedCounter,
    ValueFn,
)
from eventstream.metrics.exporter import MetricsServer
from eventstream.metrics.histogram import DEFAULT_LATENCY_BUCKETS_NS, VectorHistogram
from eventstream.metrics.reasons import REASONS, category

QUEUES = ("realtime", "transactional", "batch")
STAGES = ("queued", "handled", "stored", "acked")


# pipeline level names (engine/control.py Level) and the transitions the control plane can make: one
# level at a time, up or down
LEVELS = ("HEALTHY", "ELEVATED", "DEGRADED", "CRITICAL", "EMERGENCY")
TRANSITIONS = tuple((LEVELS[a], LEVELS[b]) for a in range(len(LEVELS)) for b in range(len(LEVELS)) if abs(b - a) == 1)


def reason_label(reason: str) -> str:
    """The label value for a drop reason: its category from the FIXED set reasons.REASONS ("other" for
    anything unrecognised), never text chosen by a client (see metrics/reasons.py)."""
    return category(reason)


class MetricsRegistry:
    def __init__(
        self,
        queues: Iterable[str] = QUEUES,
        *,
        latency_buckets_ns=DEFAULT_LATENCY_BUCKETS_NS,
        reservoir: int = 4096,
        process: bool = True,
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._counters: dict[str, SummedCounter] = {}
        for name, doc in (
            ("events_received", "events accepted by ingest"),
            ("events_processed", "events handled by a processor"),
            ("dedup_hits", "events skipped as duplicates of one stored within dedup.window_s (every tier)"),
            ("backpressure_drops", "events shed by the control plane or refused by admission"),
        ):
            self._counters[name] = SummedCounter(name, doc)
            r.register(self._counters[name])
        self._dropped = Counter(
            "events_dropped", "events dropped or failed (to the DLQ), by reason category", ["reason"], registry=r
        )
        self._transitions = Counter("pipeline_transitions", "backpressure level changes", ["from", "to"], registry=r)
        # every series with a known label value exists (at 0) from the first scrape: rate() and alerts
        # see a 0 -> n increase instead of a series appearing out of nowhere
        for reason in REASONS:
            self._dropped.labels(reason)
        for frm, to in TRANSITIONS:
            self._transitions.labels(frm, to)
        self.latency = {q: VectorHistogram(latency_buckets_ns, reservoir) for q in queues}
        r.register(LatencyCollector(self.latency))
        self.stages = {st: VectorHistogram(latency_buckets_ns, reservoir) for st in STAGES}
        r.register(
            LatencyCollector(
                self.stages, "stage_latency_seconds", label="stage", doc="decode-to-stage latency per stage"
            )
        )
        self._state = StateCollector()
        r.register(self._state)
        self._labelled: dict[str, LabelledCallbacks] = {}
        self.gauge_fn("queue_depth", {}, None, doc="events waiting in each queue", label_names=["queue"])
        if process:
            r.register(ProcessCollector())

    # ------------------------------------------------------------------------------ hot-path updates
    def received(self, n: int) -> None:
        if n:
            self._counters["events_received"].inc(n)

    def processed(
        self,
        queue: str,
        records: np.ndarray | int | None = None,
        latencies_ns: np.ndarray | None = None,
        *,
        now_ns: int | None = None,
    ) -> None:
        """Count a handled batch and record its latencies. `records` is the batch or just its length;
        latencies are given, or computed as now - records["ingest_ts"] (time.monotonic_ns, as ingest
        stamps it)."""
        if isinstance(records, (int, np.integer)):
            n, records = int(records), None
        else:
            n = len(records) if records is not None else (len(latencies_ns) if latencies_ns is not None else 0)
        if n:
            self._counters["events_processed"].inc(n)
        if latencies_ns is None and records is not None and len(records):
            now = time.monotonic_ns() if now_ns is None else now_ns
            latencies_ns = np.int64(now) - records["ingest_ts"].astype(np.int64)
        if latencies_ns is not None and len(latencies_ns):
            h = self.latency.get(queue)
            if h is None:
                raise ValueError(f"queue {queue!r} has no latency histogram; allowed: {', '.join(self.latency)}")
            h.observe_many(latencies_ns, also=self.stages["handled"])  # the same values: bucketed once

    def observe_stage(self, stage: str, latencies_ns: np.ndarray) -> None:
        """Decode-to-`stage` latencies (ns) of a batch (STAGES)."""
        if len(latencies_ns):
            self.stages[stage].observe_many(latencies_ns)

    def stage_percentiles(self, stage: str) -> dict[str, float]:
        return self.stages[stage].percentiles()

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
            self._counters["dedup_hits"].inc(n)

    def backpressure_dropped(self, n: int) -> None:
        if n:
            self._counters["backpressure_drops"].inc(n)

    def set_state(
        self, level: int, name: str, previous_level: int | None = None, previous_name: str | None = None
    ) -> None:
        """Make `level` the current pipeline_state; with a different previous level, also count the
        transition in pipeline_transitions_total{from,to}."""
        self._state.level, self._state.name = int(level), str(name)
        if previous_name is not None and previous_level != level:
            self.transition(previous_name, name)

    def transition(self, previous: str, level: str) -> None:
        """Count a level change (names such as "HEALTHY"); set_state() sets the current level."""
        self._transitions.labels(previous, level).inc()

    def on_transition(self, t) -> None:
        """ControlThread(on_transition=...) hook: takes an engine.control.Transition."""
        self.set_state(int(t.level), t.level.name, int(t.previous), t.previous.name)

    # ------------------------------------------------------------------------------ scrape-time sources
    def watch_queue(self, queue: str, depth_fn: Callable[[], int]) -> None:
        """queue_depth{queue} is read from depth_fn at each scrape."""
        self.gauge_fn("queue_depth", {"queue": queue}, depth_fn)

    def gauge_fn(
        self,
        name: str,
        labels: dict[str, str],
        fn: Callable[[], float] | None,
        *,
        doc: str = "",
        label_names: list[str] | None = None,
    ) -> None:
        """A labelled gauge series read from `fn` at scrape time; series of one name share a family
        (its label names are fixed by the first registration)."""
        self._labelled_fn(name, labels, fn, "gauge", doc, label_names)

    def counter_fn(
        self, name: str, fn: Callable[[], float], labels: dict[str, str] | None = None, *, doc: str = ""
    ) -> None:
        """A counter read at scrape time (name without `_total`). For a built-in unlabelled counter
        (events_received, events_processed, dedup_hits, backpressure_drops) `fn` is a source added to
        it, so its totals and the *_total() readers include it."""
        if name in self._counters and not labels:
            self._counters[name].add_source(fn)
            return
        self._labelled_fn(name, labels or {}, fn, "counter", doc, None)

    def _labelled_fn(self, name, labels, fn, kind, doc, label_names) -> None:
        fam = self._labelled.get(name)
        if fam is None:
            fam = LabelledCallbacks(name, doc or name.replace("_", " "), kind, label_names or sorted(labels))
            self.registry.register(fam)  # ValueError if the name is taken
            self._labelled[name] = fam
        elif fam.kind != kind:
            raise ValueError(f"metric {name!r} is already a {fam.kind}; allowed: another name")
        if fn is not None:
            fam.add(labels, fn)

    def register_callback(
        self, name: str, doc: str, fn: ValueFn, *, kind: str = "gauge", labels: Iterable[str] = ()
    ) -> CallbackMetric:
        """Add a gauge/counter read from `fn` at scrape time (number, or dict label(s) -> number).
        For counters give the name without `_total` (it is added). Raises ValueError on a duplicate name."""
        metric = CallbackMetric(name, doc, fn, kind, labels)
        self.registry.register(metric)
        return metric

    def unregister(self, metric: CallbackMetric) -> None:
        self.registry.unregister(metric)

    # ------------------------------------------------------------------------------ reading
    def received_total(self) -> int:
        return self._counters["events_received"].value()

    def processed_total(self) -> int:
        return self._counters["events_processed"].value()

    def dedup_hits_total(self) -> int:
        return self._counters["dedup_hits"].value()

    def backpressure_drops_total(self) -> int:
        return self._counters["backpressure_drops"].value()

    def dropped_by_reason(self) -> dict[str, int]:
        """Dropped events per reason category, for the categories that dropped any (every category's
        series is exported from the start at 0, see __init__)."""
        out = {}
        for fam in self._dropped.collect():
            for s in fam.samples:
                if s.name.endswith("_total") and s.value:
                    out[s.labels["reason"]] = int(s.value)
        return out

    def dropped_total(self) -> int:
        return sum(self.dropped_by_reason().values())

    def counts(self) -> dict:
        """Current totals (for summaries, the control plane and tests)."""
        dropped = self.dropped_by_reason()
        return {
            "received": self.received_total(),
            "processed": self.processed_total(),
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
            "dedup_hits": self.dedup_hits_total(),
            "backpressure_drops": self.backpressure_drops_total(),
            "state": self._state.name,
        }

    def percentiles(self, queue: str) -> dict[str, float]:
        """p50/p99/p999 from the buckets, and *_recent exact over the reservoir."""
        return self.latency[queue].percentiles()

    def p99_ns(self, queue: str) -> float:
        """p99 latency of `queue` from the buckets (0.0 before any event)."""
        return self.latency[queue].percentile(99)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything in the registry."""
        return generate_latest(self.registry)

    def serve(
        self, host: str = "127.0.0.1", port: int = 9100, path: str = "/metrics", *, health=None, ready=None, **limits
    ) -> MetricsServer:
        """Start the HTTP endpoint for this registry (MetricsServerError, an OSError, if it cannot bind).
        `health`/`ready`: callables () -> (ok, detail) behind /healthz and /readyz (see exporter.py);
        `limits`: MetricsServer's timeout_s, max_connections, max_request_bytes, tls, tokens."""
        return MetricsServer(self.registry, host, port, path, health=health, ready=ready, **limits).start()


Metrics = MetricsRegistry  # shorter alias

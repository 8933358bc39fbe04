"""Custom prometheus-client collectors: everything here is computed at scrape time, not on hot paths."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

import psutil
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from eventstream.metrics.histogram import VectorHistogram

log = structlog.get_logger("eventstream.metrics")


class LatencyCollector(Collector):
    """`latency_seconds{queue}` histograms plus `latency_recent_seconds{queue,quantile}`: a summary whose
    quantiles are exact over the most recent events (the reservoir) and whose _count/_sum are the
    cumulative totals, as a Prometheus client summary has them.

    Latencies are recorded in ns (VectorHistogram); the exposition uses base units (seconds), so the
    exposition passes `promtool check metrics` (no abbreviated units in names, "quantile" only on a
    summary).
    """

    QUANTILES = (("0.5", 50), ("0.99", 99), ("0.999", 99.9))

    def __init__(
        self,
        histograms: dict[str, VectorHistogram],
        name: str = "latency_seconds",
        *,
        label: str = "queue",
        doc: str = "ingest-to-handled latency per queue",
    ):
        self.histograms = histograms
        self.name = name
        self.label = label
        self.doc = doc
        self.recent_name = f"{name.removesuffix('_seconds')}_recent_seconds"

    def _families(self):
        hist = HistogramMetricFamily(self.name, f"{self.doc} (seconds)", labels=[self.label])
        recent = Metric(
            self.recent_name,
            f"{self.doc}: quantiles over the most recent events (seconds, "
            "exact over a reservoir); _count/_sum over all events",
            "summary",
        )
        return hist, recent

    def describe(self):
        yield from self._families()

    def collect(self):
        hist, recent = self._families()
        for queue, h in list(self.histograms.items()):
            counts, total, _ = h.snapshot()
            cum = counts.cumsum().tolist()
            # cum has one more entry than bounds: the +Inf bucket
            buckets = [(floatToGoString(b / 1e9), c) for b, c in zip(h.bounds.tolist(), cum, strict=False)]
            buckets.append(("+Inf", cum[-1]))
            hist.add_metric([queue], buckets, total / 1e9)
            for q, v in self.QUANTILES:
                recent.add_sample(self.recent_name, {self.label: queue, "quantile": q}, h.recent_percentile(v) / 1e9)
            recent.add_sample(f"{self.recent_name}_count", {self.label: queue}, cum[-1])
            recent.add_sample(f"{self.recent_name}_sum", {self.label: queue}, total / 1e9)
        yield hist
        yield recent


class StateCollector(Collector):
    """`pipeline_state{name}`: the backpressure level as a number, its name as a label (one series)."""

    def __init__(self):
        self.level = 0
        self.name = "HEALTHY"

    def describe(self):
        yield GaugeMetricFamily("pipeline_state", "backpressure level 0..4 (label: its name)", labels=["name"])

    def collect(self):
        g = GaugeMetricFamily("pipeline_state", "backpressure level 0..4 (label: its name)", labels=["name"])
        g.add_metric([self.name], self.level)
        yield g


class ProcessCollector(Collector):
    """process_cpu_percent (since the previous scrape), process_rss_bytes, process_threads via psutil."""

    def __init__(self, pid: int | None = None):
        self.proc = psutil.Process(pid or os.getpid())
        self.proc.cpu_percent(None)  # prime: the first reading is relative to this call
        self._lock = threading.Lock()  # psutil's cpu_percent keeps state between calls

    def describe(self):
        yield GaugeMetricFamily(
            "process_cpu_percent", "CPU use of the process since the previous scrape (100 = one core)"
        )
        yield GaugeMetricFamily("process_rss_bytes", "resident memory of the process")
        yield GaugeMetricFamily("process_threads", "threads of the process")

    def collect(self):
        with self._lock, self.proc.oneshot():
            cpu = self.proc.cpu_percent(None)
            rss = self.proc.memory_info().rss
            threads = self.proc.num_threads()
        yield GaugeMetricFamily(
            "process_cpu_percent", "CPU use of the process since the previous scrape (100 = one core)", value=cpu
        )
        yield GaugeMetricFamily("process_rss_bytes", "resident memory of the process", value=rss)
        yield GaugeMetricFamily("process_threads", "threads of the process", value=threads)


ValueFn = Callable[[], float | int | dict]


class CallbackMetric(Collector):
    """One gauge or counter whose value is read from `fn` at scrape time.

    `fn` returns a number (no labels) or a dict {label value or tuple of label values: number}. A
    failing `fn` is logged and the metric is left out of that scrape (the rest still answers).
    """

    def __init__(self, name: str, doc: str, fn: ValueFn, kind: str = "gauge", labels: Iterable[str] = ()):
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric kind {kind!r} is not allowed; allowed: gauge, counter")
        self.name, self.doc, self.fn, self.kind, self.labels = name, doc, fn, kind, list(labels)

    def _family(self):
        cls = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        return cls(self.name, self.doc, labels=self.labels)

    def describe(self):
        yield self._family()

    def collect(self):
        try:
            value = self.fn()
        except Exception as exc:  # noqa: BLE001 - one bad source must not break the scrape
            log.warning("metric_callback_failed", metric=self.name, error=f"{type(exc).__name__}: {exc}")
            return
        fam = self._family()
        if isinstance(value, dict):
            for key, v in value.items():
                key = key if isinstance(key, tuple) else (key,)
                fam.add_metric([str(k) for k in key], float(v))
        else:
            fam.add_metric([], float(value))
        yield fam


class SummedCounter(Collector):
    """An unlabelled counter = what hot paths add with inc(n) + what registered sources report.

    Sources let a component that already counts (ingest statistics, the bus) feed a standard
    counter at scrape time instead of paying a metrics update per batch.
    """

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self._value = 0
        self._lock = threading.Lock()
        self.sources: list[Callable[[], float]] = []

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    def add_source(self, fn: Callable[[], float]) -> None:
        self.sources.append(fn)

    def value(self) -> int:
        total = self._value
        for fn in list(self.sources):
            try:
                total += int(fn())
            except Exception as exc:  # noqa: BLE001 - one bad source must not break the total
                log.warning("metric_source_failed", metric=self.name, error=f"{type(exc).__name__}: {exc}")
        return total

    def describe(self):
        yield CounterMetricFamily(self.name, self.doc)

    def collect(self):
        yield CounterMetricFamily(self.name, self.doc, value=self.value())


class LabelledCallbacks(Collector):
    """One gauge/counter family whose labelled series each come from their own callback."""

    def __init__(self, name: str, doc: str, kind: str, label_names: list[str]):
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric kind {kind!r} is not allowed; allowed: gauge, counter")
        self.name, self.doc, self.kind, self.label_names = name, doc, kind, label_names
        self.series: dict[tuple[str, ...], Callable[[], float]] = {}

    def add(self, labels: dict[str, str], fn: Callable[[], float]) -> None:
        if sorted(labels) != sorted(self.label_names):
            raise ValueError(
                f"metric {self.name}: labels {sorted(labels)} are not allowed; allowed: "
                f"{sorted(self.label_names)} (as first registered)"
            )
        self.series[tuple(str(labels[k]) for k in self.label_names)] = fn

    def _family(self):
        cls = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        return cls(self.name, self.doc, labels=self.label_names)

    def describe(self):
        yield self._family()

    def collect(self):
        fam = self._family()
        for key, fn in list(self.series.items()):
            try:
                fam.add_metric(list(key), float(fn()))
            except Exception as exc:  # noqa: BLE001 - leave the series out of this scrape
                log.warning(
                    "metric_callback_failed", metric=self.name, labels=key, error=f"{type(exc).__name__}: {exc}"
                )
        yield fam

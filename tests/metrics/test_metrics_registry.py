"""Metrics registry and exporter, scraped over real HTTP and parsed with prometheus_client.parser."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventstream.core import records as rec
from eventstream.metrics import Metrics, MetricsServer, MetricsServerError, VectorHistogram
from eventstream.metrics.histogram import DEFAULT_LATENCY_BUCKETS_NS


def scrape(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    fams = {}
    for fam in text_string_to_metric_families(text):
        fams[fam.name] = fam.samples
    return fams


def value(fams, family, sample_name=None, **labels):
    for s in fams[family]:
        if (sample_name is None or s.name == sample_name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, sample_name, labels))


@pytest.fixture
def served():
    m = Metrics()
    server = MetricsServer(m.registry, port=0).start()
    yield m, server
    server.stop()


def test_counters_gauges_state_and_process_over_http(served):
    m, server = served
    m.received(1000)
    m.processed("transactional", 900)
    m.dropped("overflow:batch", 60)
    m.dropped("handler_error: ValueError: x", 40)
    m.dedup_hits(7)
    m.backpressure_dropped(5)
    m.set_state(1, "ELEVATED", 0, "HEALTHY")  # also counts the transition
    m.watch_queue("realtime", lambda: 12)
    m.watch_queue("batch", lambda: 1 / 0)  # a failing source is left out, the scrape still works
    fams = scrape(server.url)
    assert value(fams, "events_received", "events_received_total") == 1000
    assert value(fams, "events_processed", "events_processed_total") == 900
    assert value(fams, "events_dropped", "events_dropped_total", reason="overflow") == 60
    assert value(fams, "events_dropped", "events_dropped_total", reason="handler_error") == 40
    assert value(fams, "dedup_hits", "dedup_hits_total") == 7
    assert value(fams, "backpressure_drops", "backpressure_drops_total") == 5
    assert value(fams, "pipeline_transitions", "pipeline_transitions_total", **{"from": "HEALTHY", "to": "ELEVATED"}) == 1
    assert value(fams, "pipeline_state", name="ELEVATED") == 1
    assert value(fams, "queue_depth", queue="realtime") == 12
    assert [s.labels["queue"] for s in fams["queue_depth"]] == ["realtime"]
    assert value(fams, "process_rss_bytes") > 1 << 20
    assert value(fams, "process_threads") >= 2
    assert value(fams, "process_cpu_percent") >= 0
    assert m.counts() == {"received": 1000, "processed": 900, "dropped": {"overflow": 60, "handler_error": 40},
                          "dropped_total": 100, "dedup_hits": 7, "backpressure_drops": 5, "state": "ELEVATED"}


def test_latency_histogram_from_records_and_arrays(served):
    m, server = served
    b = rec.empty(100)
    now = time.monotonic_ns()
    b["ingest_ts"] = now - np.arange(1, 101) * 1000  # 1 µs .. 100 µs old
    m.processed("realtime", b, now_ns=now)
    m.processed("batch", latencies_ns=np.array([5e6, 2e10]))  # 5 ms and beyond the top bucket
    fams = scrape(server.url)
    # recorded in ns, exported in seconds (base units)
    bucket = lambda q, le: value(fams, "latency_seconds", "latency_seconds_bucket", queue=q, le=le)  # noqa: E731
    assert bucket("realtime", "1e-06") == 1  # le: exactly 1 µs counts in the 1 µs bucket
    assert bucket("realtime", "1e-05") == 10
    assert bucket("realtime", "0.0001") == 100
    assert bucket("realtime", "+Inf") == 100
    assert value(fams, "latency_seconds", "latency_seconds_count", queue="realtime") == 100
    assert value(fams, "latency_seconds", "latency_seconds_sum", queue="realtime") == pytest.approx(sum(range(1, 101)) * 1e-6)
    assert bucket("batch", "10.0") == 1 and bucket("batch", "+Inf") == 2
    assert value(fams, "latency_recent_seconds", queue="realtime", quantile="0.5") == pytest.approx(50.5e-6)
    assert value(fams, "latency_recent_seconds", "latency_recent_seconds_count", queue="realtime") == 100
    assert value(fams, "events_processed", "events_processed_total") == 102
    # the "handled" stage holds the same latencies (bucketed once for both)
    handled = m.stages["handled"].snapshot()
    assert handled[2] == 102 and handled[1] == pytest.approx(sum(range(1, 101)) * 1e3 + 5e6 + 2e10)
    with pytest.raises(ValueError, match="allowed: realtime, transactional, batch"):
        m.observe_latency("nope", np.array([1]))


def test_callback_metrics_and_duplicates(served):
    m, server = served
    stats = {"claims": 5}
    m.register_callback("ring_claims", "claims per ring", lambda: {("ingest", "0"): stats["claims"]},
                        kind="counter", labels=["ring", "shard"])
    cb = m.register_callback("ingest_connections", "open connections", lambda: 3)
    m.register_callback("broken", "raises", lambda: 1 / 0)
    stats["claims"] = 9  # read at scrape time, not at registration
    fams = scrape(server.url)
    assert value(fams, "ring_claims", "ring_claims_total", ring="ingest", shard="0") == 9
    assert value(fams, "ingest_connections") == 3
    assert "broken" not in fams
    with pytest.raises(ValueError):
        m.register_callback("ingest_connections", "again", lambda: 1)
    m.unregister(cb)
    assert "ingest_connections" not in scrape(server.url)
    with pytest.raises(ValueError, match="allowed: gauge, counter"):
        m.register_callback("x", "x", lambda: 1, kind="summary")


def test_two_engines_do_not_collide():
    a, b = Metrics(process=False), Metrics(process=False)
    a.received(3)
    assert a.counts()["received"] == 3 and b.counts()["received"] == 0
    assert b"events_received_total 0.0" in b.render()


def test_server_404_port_in_use_and_stop(served):
    m, server = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
    assert err.value.code == 404
    with pytest.raises(MetricsServerError, match=f"127.0.0.1:{server.port} is in use"):
        MetricsServer(m.registry, port=server.port).start()
    port = server.port
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_vector_histogram_percentiles_and_concurrent_updates():
    h = VectorHistogram((10, 20, 30, 40), reservoir=1000)
    assert h.percentile(50) == 0.0 and h.recent_percentile(99) == 0.0
    threads = [threading.Thread(target=lambda: [h.observe_many(np.arange(1, 41)) for _ in range(250)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    counts, total, n = h.snapshot()
    assert n == 40_000 and counts.tolist() == [10_000] * 4 + [0]
    assert total == 4 * 250 * sum(range(1, 41))
    assert h.percentile(50) == pytest.approx(20.0)
    assert h.percentile(99) == pytest.approx(39.6)
    assert h.recent().size == 1000 and h.recent_percentile(100) == 40.0
    with pytest.raises(ValueError, match="increasing"):
        VectorHistogram((3, 2))


def test_engine_facing_api_sources_and_totals():
    m = Metrics(process=False)
    ingest = {"accepted": 40, "shed": 3}
    m.counter_fn("events_received", lambda: ingest["accepted"])  # a source added to the built-in counter
    m.counter_fn("backpressure_drops", lambda: ingest["shed"])
    m.counter_fn("ring_claims", lambda: 11, {"ring": "ingest"})
    m.gauge_fn("queue_depth", {"queue": "ingest"}, lambda: 9)
    with pytest.raises(ValueError, match="allowed: \\['queue'\\]"):
        m.gauge_fn("queue_depth", {"ring": "x"}, lambda: 1)
    m.received(2)
    m.processed("realtime", 3, np.array([1000, 2000, 3000]))
    m.dropped("overflow", 4)
    m.set_state(3, "CRITICAL", 3, "CRITICAL")  # same level: no transition counted
    assert (m.received_total(), m.processed_total(), m.dropped_total(), m.backpressure_drops_total()) == (42, 3, 4, 3)
    assert m.dropped_by_reason() == {"overflow": 4} and m.dedup_hits_total() == 0
    assert 1000 <= m.p99_ns("realtime") <= 5000
    with m.serve("127.0.0.1", 0) as server:
        assert server.address == ("127.0.0.1", server.port) and server.port > 0
        fams = scrape(server.url)
    assert value(fams, "events_received", "events_received_total") == 42
    assert value(fams, "backpressure_drops", "backpressure_drops_total") == 3
    assert value(fams, "ring_claims", "ring_claims_total", ring="ingest") == 11
    assert value(fams, "queue_depth", queue="ingest") == 9
    assert value(fams, "pipeline_state", name="CRITICAL") == 3
    assert fams["pipeline_transitions"] and all(s.value == 0 for s in fams["pipeline_transitions"])


def test_small_batches_are_bucketed_exactly_like_large_ones():
    import random

    from eventstream.metrics.histogram import VectorHistogram

    rng = random.Random(3)
    values = [rng.choice([0, 1000, 2500, 2501, 1e10, 2e10, -5]) if rng.random() < 0.3 else rng.uniform(0, 2e9)
              for _ in range(5000)]
    few, many = VectorHistogram(reservoir=64), VectorHistogram(reservoir=64)
    i = 0
    while i < len(values):  # batches of 1..8 take the Python path
        k = rng.randint(1, 8)
        few.observe_many(np.array(values[i:i + k]))
        i += k
    many.observe_many(np.array(values))  # one numpy pass
    c1, s1, n1 = few.snapshot()
    c2, s2, n2 = many.snapshot()
    assert c1.tolist() == c2.tolist() and n1 == n2 == len(values)
    assert abs(s1 - s2) <= 1e-6 * abs(s2)
    assert sorted(few.recent().tolist()) == sorted(values[-64:]) == sorted(many.recent().tolist())


@pytest.mark.parametrize("bounds", [DEFAULT_LATENCY_BUCKETS_NS, (1.0, 1.5, 1.9, 2.0, 3.0, 100.0), (0.001, 0.5, 1e12), (5.0,)])
def test_vector_histogram_buckets_values_as_searchsorted_does(bounds):
    """The octave table (a value's float exponent, then a step per bound its octave holds) puts
    every value in the bucket np.searchsorted(bounds, v, "left") names: on and next to every bound,
    <= 0, tiny and huge values, bounds sharing an octave."""
    b = np.asarray(bounds, dtype=np.float64)
    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.integers(-10, 10**11, 50_000).astype(np.float64), b, np.nextafter(b, 0), np.nextafter(b, np.inf),
        [0.0, -1.0, -1e300, 1e300, np.inf, 5e-324, 1e-310],
    ])
    h = VectorHistogram(bounds, reservoir=16)
    h.observe_many(values)
    want = np.bincount(np.searchsorted(b, values, side="left"), minlength=len(b) + 1)
    assert h.snapshot()[0].tolist() == want.tolist()

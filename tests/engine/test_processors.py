"""Processors: handlers, errors, retries, dedup, windows, shared partitions."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from eventstream.config import load_config
from eventstream.core.dedup import Deduplicator
from eventstream.engine import idempotency
from eventstream.engine.bus import EventBusMulti
from eventstream.engine.handlers import Batch, HandlerError, TopicFilter, resolve
from eventstream.engine.manager import ProcessManager
from eventstream.engine.processors import (BatchProcessor, RealtimeProcessor, TransactionalProcessor,
                                           WindowTable)
from eventstream.engine.processors.batch import flush_windows

from engine_fixtures import DTYPE, make_records, offer_all, run_until_drained


@pytest.fixture
def bus(small_cfg):
    b = EventBusMulti(small_cfg, DTYPE)
    yield b
    b.close()


def test_realtime_calls_handler_per_batch_and_stores(bus, collected, topics):
    seen = []
    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), lambda b: seen.append(b.ids.tolist()))
    offer_all(bus, make_records(topics, 300, priority=4))
    run_until_drained([proc], bus)
    assert sorted(i for batch in seen for i in batch) == list(range(1, 301))
    assert collected.processed_n["realtime"] == 300
    assert sorted(collected.stored_records()["seq"].tolist()) == list(range(1, 301))


def test_realtime_handler_exception_sends_events_to_dlq_and_thread_survives(bus, collected, topics):
    calls = []

    def handler(b: Batch):
        calls.append(len(b))
        if len(calls) == 1:
            raise RuntimeError("pager down")

    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), handler, max_batch=10)
    offer_all(bus, make_records(topics, 30, priority=3))
    run_until_drained([proc], bus)
    dropped, reasons = collected.dropped_records()
    assert len(dropped) == 10 and set(reasons) == {"handler_error: RuntimeError: pager down"}
    assert len(collected.stored_records()) == 20
    assert len(calls) == 3


def test_topic_subscription_only_passes_matching_topics(bus, collected, topics):
    got = []
    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), lambda b: got.extend(b.topic_names()),
                             topics=["orders.*"])
    offer_all(bus, make_records(topics, 6, priority=4, topic=["orders.eu", "users.x", "orders.us"] * 2))
    run_until_drained([proc], bus)
    assert sorted(got) == ["orders.eu", "orders.eu", "orders.us", "orders.us"]
    assert len(collected.stored_records()) == 6  # unsubscribed events are still processed and stored


def test_topic_filter_learns_new_topics(topics):
    f = TopicFilter(["a.*"], topics)
    ids = np.array([topics.intern("a.1"), topics.intern("b.1")], dtype=np.uint32)
    assert f.mask(ids).tolist() == [True, False]
    more = np.array([topics.intern("a.2"), topics.intern("c")], dtype=np.uint32)
    assert f.mask(more).tolist() == [True, False]


def make_tx(bus, collected, handler, **kw):
    """A transactional processor with a dedup table per partition; returns it and the table of the
    partition that topic "t" (used by these tests) lands in."""
    q = bus["transactional"]
    dedups = [Deduplicator(256, 3600.0) for _ in range(q.partitions)]
    mine = dedups[collected.topics.intern("t") % q.partitions]
    for name in ("u",):
        collected.topics.intern(name)
    return TransactionalProcessor(q, collected.sinks(), handler, dedups=dedups,
                                  max_retries=kw.pop("max_retries", 3), retry_backoff_ms=1.0, **kw), mine


def test_transactional_dedup_skips_committed_and_repeated_ids(bus, collected, topics):
    proc, dedup = make_tx(bus, collected, None)
    five = make_records(topics, 1, ids=np.array([5], dtype=np.uint64))
    dedup.commit(*idempotency.key_columns(five))  # (t, 5) is already stored
    ids = np.array([1, 2, 2, 3, 5, 0, 0, 1], dtype=np.uint64)
    offer_all(bus, make_records(topics, len(ids), ids=ids))
    run_until_drained([proc], bus)
    stored = collected.stored_records()
    assert sorted(stored["event_id"].tolist()) == [0, 0, 1, 2, 3]  # id 0 is never deduplicated
    assert collected.dedup_hits == 3
    assert dedup.seen(*idempotency.key_columns(stored[stored["event_id"] != 0])).all()


def test_the_same_id_on_another_topic_is_another_event(bus, collected, topics):
    proc, dedup = make_tx(bus, collected, None)
    recs = make_records(topics, 4, topic=["t", "t", "u", "u"], ids=np.array([7, 7, 7, 8], dtype=np.uint64))
    offer_all(bus, recs)
    run_until_drained([proc], bus)
    got = sorted(zip(collected.topics.names(collected.stored_records()["topic_id"]),
                     collected.stored_records()["event_id"].tolist()))
    assert got == [("t", 7), ("u", 7), ("u", 8)]  # keyed by (topic, id): one client cannot mask another
    assert collected.dedup_hits == 1


def test_transactional_retries_then_succeeds(bus, collected, topics):
    failures = {"left": 2}
    attempts = []

    def flaky(b: Batch):
        attempts.append(b.ids.tolist())
        if 7 in b.ids.tolist() and failures["left"]:
            failures["left"] -= 1
            raise ValueError("db busy")

    proc, dedup = make_tx(bus, collected, flaky)
    offer_all(bus, make_records(topics, 10, ids=np.arange(1, 11, dtype=np.uint64)))
    run_until_drained([proc], bus)
    assert sorted(collected.stored_records()["event_id"].tolist()) == list(range(1, 11))
    assert collected.dropped == []
    assert dedup.seen(*idempotency.key_columns(make_records(topics, 1, ids=np.array([7], dtype=np.uint64)))).all()


def test_transactional_exhausted_retries_go_to_dlq_with_last_error(bus, collected, topics):
    calls = {"n": 0}

    def broken(b: Batch):
        if 3 in b.ids.tolist():
            calls["n"] += 1
            raise KeyError(f"attempt {calls['n']}")

    proc, dedup = make_tx(bus, collected, broken, max_retries=2)
    offer_all(bus, make_records(topics, 5, ids=np.arange(1, 6, dtype=np.uint64)))
    run_until_drained([proc], bus)
    dropped, reasons = collected.dropped_records()
    assert dropped["event_id"].tolist() == [3]
    assert reasons == ["retries_exhausted: KeyError: 'attempt 3'"]  # batch try + 2 retries
    assert sorted(collected.stored_records()["event_id"].tolist()) == [1, 2, 4, 5]
    three = make_records(topics, 1, ids=np.array([3], dtype=np.uint64))
    assert not dedup.seen(*idempotency.key_columns(three))[0]  # never committed
    assert dedup.seen(*idempotency.key_columns(make_records(topics, 1, ids=np.array([4], dtype=np.uint64))))[0]


def test_batch_windows_per_topic_with_aggregate(bus, collected, topics):
    closed = []
    window_ns = 1_000_000_000
    now = {"t": 0}
    proc = BatchProcessor(bus["batch"], collected.sinks(), closed.append, tables=[WindowTable() for _ in
                          range(bus["batch"].partitions)], window_s=1.0,
                          aggregate=lambda s, b: (s or 0) + b.total_payload_bytes(),
                          clock=lambda: now["t"], offset_ns=0)
    r1 = make_records(topics, 4, priority=1, topic=["a", "b", "a", "a"], payload=b"12345")
    r1["ingest_ts"] = [10 * window_ns + 1, 10 * window_ns + 2, 10 * window_ns + 3, 11 * window_ns + 5]
    offer_all(bus, r1)
    now["t"] = 10 * window_ns  # nothing has ended yet
    run_until_drained([proc], bus)
    assert closed == []
    now["t"] = 11 * window_ns  # window 10 ended
    flushed = flush_windows(proc)
    assert flushed == 3
    by = {(w.topic, w.start_ns): w for w in closed}
    wa = by[("a", 10 * window_ns)]
    assert (wa.count, wa.bytes, wa.aggregate, wa.partial) == (2, 10, 10, False)
    assert (wa.first_ns, wa.last_ns) == (10 * window_ns + 1, 10 * window_ns + 3)
    assert by[("b", 10 * window_ns)].count == 1
    assert by[("a", 11 * window_ns)].partial is True  # flushed open at shutdown
    assert collected.processed_n["batch"] == 4


def test_workers_share_partitions_exactly_once_in_topic_order(small_cfg, collected, topics):
    bus = EventBusMulti(small_cfg, DTYPE)
    order: dict[str, list[int]] = {}
    lock = threading.Lock()

    def record(b: Batch):
        with lock:
            for name, seq in zip(b.topic_names(), b.records["seq"].tolist()):
                order.setdefault(name, []).append(seq)

    mgr = ProcessManager(small_cfg, bus, collected.sinks(), handlers={"transactional": record})
    try:
        mgr.start()
        assert mgr.add_worker("transactional") is True
        assert mgr.add_worker("transactional") is False  # max_workers = 2
        total, seq = 0, 1
        for _ in range(40):
            names = [f"t{(seq + i) % 5}" for i in range(200)]
            recs = make_records(topics, 200, topic=names, start_seq=seq)
            refused = offer_all(bus, recs)
            assert refused == []
            seq += 200
            total += 200
        assert mgr.stop(30)
        seqs = sorted(s for v in order.values() for s in v)
        assert seqs == list(range(1, total + 1))  # each exactly once
        for v in order.values():
            assert v == sorted(v)  # per-topic order kept
        assert mgr.errors() == []
    finally:
        bus.close()


def test_handler_resolution_errors_are_clear():
    assert resolve("") is None
    assert resolve("eventstream.engine.handlers:noop") is not None
    with pytest.raises(HandlerError, match="module:function"):
        resolve("nocolon")
    with pytest.raises(HandlerError, match="cannot import module 'no_such_mod'"):
        resolve("no_such_mod:f")
    with pytest.raises(HandlerError, match="has no attribute 'nope'"):
        resolve("eventstream.engine.handlers:nope")


def test_manager_refuses_unknown_tier(small_cfg, collected):
    bus = EventBusMulti(load_config(environ={}, overrides={"records.payload_bytes": 32,
                                                           "queues.transactional.capacity": 64,
                                                           "queues.batch.capacity": 64,
                                                           "queues.realtime.capacity": 64}), DTYPE)
    try:
        mgr = ProcessManager(small_cfg, bus, collected.sinks())
        with pytest.raises(ValueError, match="allowed: 'transactional', 'batch'"):
            mgr.add_worker("realtime")
    finally:
        bus.close()


def test_caller_runs_realtime_after_what_is_queued_and_never_inside_a_worker(bus, collected, topics):
    calls = []
    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), lambda b: calls.append(b.records["seq"].tolist()))
    first = make_records(topics, 2, priority=4, start_seq=1)
    assert proc.run_inline(first)  # idle: handled and stored on this thread, nothing queued
    assert calls == [[1, 2]] and collected.stored_records()["seq"].tolist() == [1, 2]
    assert proc.inline == 2 and bus["realtime"].depth == 0
    queued = make_records(topics, 1, priority=4, start_seq=3)
    offer_all(bus, queued)  # something is queued: the caller handles it first, so 4 does not overtake 3
    assert proc.run_inline(make_records(topics, 1, priority=4, start_seq=4))
    assert calls == [[1, 2], [3], [4]] and bus["realtime"].depth == 0
    assert collected.stored_records()["seq"].tolist() == [1, 2, 3, 4]
    assert proc.inline == 3 and proc.handled == 4  # 3 was drained from the ring, 4 ran inline
    with bus["realtime"].tokens[0]:  # a worker is inside the partition: the caller queues
        assert not proc.run_inline(make_records(topics, 1, priority=4, start_seq=5))
    assert calls == [[1, 2], [3], [4]]


def test_a_bulk_lane_queues_behind_what_is_queued(bus, collected, topics):
    """Only the realtime tier's lanes drain a backlog on the caller's thread; a bulk lane queues."""
    calls = []
    proc = TransactionalProcessor(bus["transactional"], collected.sinks(), lambda b: calls.append(1))
    recs = make_records(topics, 1, priority=2, start_seq=1)
    part = int(recs["topic_id"][0]) % bus["transactional"].partitions
    offer_all(bus, recs)
    assert not proc.run_inline(make_records(topics, 1, priority=2, start_seq=2), part)
    assert calls == [] and bus["transactional"].depth == 1


def test_bus_offer_runs_realtime_inline_and_queues_the_rest(bus, collected, topics):
    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), None)
    bus["realtime"].lanes = [proc]
    recs = make_records(topics, 10, priority=2)
    recs["priority"][::2] = 4
    off = bus.offer(recs)
    assert off.placed == 10 and off.held is None
    assert [r.name for r, _ in off.marks] and all(r.name.startswith("transactional") for r, _ in off.marks)
    assert sorted(collected.stored_records()["seq"].tolist()) == recs["seq"][::2].tolist()  # stored already
    assert bus["realtime"].depth == 0 and bus["transactional"].depth == 5


def test_inline_handler_error_goes_to_the_dlq_and_the_caller_survives(bus, collected, topics):
    def boom(b):
        raise RuntimeError("pager down")

    proc = RealtimeProcessor(bus["realtime"], collected.sinks(), boom)
    assert proc.run_inline(make_records(topics, 3, priority=4))
    dropped, reasons = collected.dropped_records()
    assert len(dropped) == 3 and reasons == ["handler_error: RuntimeError: pager down"] * 3

"""Caller-runs lanes for the bulk tiers (processors.<tier>.inline): an ingest thread handles a
partition's events itself when the partition is idle; otherwise they are queued, in order."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from eventstream.config import load_config
from eventstream.core.dedup import Deduplicator
from eventstream.engine import idempotency
from eventstream.engine.bus import EventBusMulti
from eventstream.engine.processors import BatchProcessor, Sinks, TransactionalProcessor, WindowTable
from eventstream.engine.processors.batch import flush_windows
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2, split_control_frames
from eventstream.service import Service
from eventstream.storage import EventLogReader

from engine_fixtures import DTYPE, make_records, run_until_drained


@pytest.fixture
def bus(small_cfg):
    b = EventBusMulti(small_cfg, DTYPE)
    yield b
    b.close()


def test_transactional_lane_handles_an_idle_partition_on_the_callers_thread(bus, collected, topics):
    where = []
    lane = TransactionalProcessor(bus["transactional"], collected.sinks(),
                                  lambda b: where.append(threading.current_thread().name),
                                  dedups=[Deduplicator(64, 60.0) for _ in bus["transactional"].rings])
    recs = make_records(topics, 3, priority=2, ids=[1, 2, 3])
    assert lane.run_inline(recs, 0)
    assert where == [threading.current_thread().name]
    assert collected.stored_records()["event_id"].tolist() == [1, 2, 3]
    assert lane.run_inline(make_records(topics, 3, priority=2, ids=[1, 2, 3]), 0)  # a resend: stored once
    assert len(collected.stored_records()) == 3 and collected.dedup_hits == 3
    bus["transactional"].rings[0].try_put(make_records(topics, 1, priority=2, ids=[9]))
    assert not lane.run_inline(make_records(topics, 1, priority=2, ids=[10]), 0)  # queued ahead: not now


def _raising_once():
    fail = {"left": 1}

    def handler(b):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("database busy")

    return handler


def _refused_then_worked(bus, collected, recs, check_refused):
    """A lane whose handler raises once refuses `recs` (check_refused(dedups) runs then); the bus
    queues them as it does a refused lane batch, and a worker retries them."""
    handler = _raising_once()
    dedups = [Deduplicator(64, 60.0) for _ in bus["transactional"].rings]
    lane = TransactionalProcessor(bus["transactional"], collected.sinks(), handler, dedups=dedups)
    assert not lane.run_inline(recs, 0)  # raised
    check_refused(dedups)
    bus["transactional"].rings[0].try_put(recs)  # what the bus does with a refused lane batch
    worker = TransactionalProcessor(bus["transactional"], collected.sinks(), handler, dedups=dedups,
                                    retry_backoff_ms=1.0)
    run_until_drained([worker], bus)


def test_a_raising_transactional_handler_on_a_lane_queues_the_batch_for_the_workers(bus, collected, topics):
    recs = make_records(topics, 4, priority=2, ids=[5, 6, 7, 8])

    def nothing_stored_nothing_remembered(dedups):
        assert len(collected.stored_records()) == 0
        assert not dedups[0].seen(*idempotency.key_columns(recs)).any()

    _refused_then_worked(bus, collected, recs, nothing_stored_nothing_remembered)
    assert collected.stored_records()["event_id"].tolist() == [5, 6, 7, 8]
    assert collected.dropped == []


def test_a_requeued_lane_batch_counts_its_duplicates_once(bus, collected, topics):
    def no_hits_yet(dedups):  # handed back: the workers will look at these records again
        assert collected.dedup_hits == 0

    _refused_then_worked(bus, collected, make_records(topics, 4, priority=2, ids=[5, 5, 6, 6]), no_hits_yet)
    assert collected.stored_records()["event_id"].tolist() == [5, 6]
    assert collected.dedup_hits == 2


def test_batch_lane_and_workers_share_the_windows(bus, collected, topics):
    tables = [WindowTable() for _ in bus["batch"].rings]
    closed = []
    kw = dict(tables=tables, window_s=3600.0)
    lane = BatchProcessor(bus["batch"], collected.sinks(), closed.append, **kw)
    worker = BatchProcessor(bus["batch"], collected.sinks(), closed.append, **kw)
    assert lane.run_inline(make_records(topics, 5, topic="w", priority=0), 0)
    bus["batch"].rings[0].try_put(make_records(topics, 7, topic="w", priority=0, start_seq=6))
    run_until_drained([worker], bus)
    assert flush_windows(worker) == 1
    assert len(closed) == 1 and closed[0].count == 12  # one window, fed by both
    assert len(collected.stored_records()) == 12


def _cfg(data, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "storage.fsync": "none",
            "processors.transactional.inline": True, "processors.batch.inline": True}
    over.update(extra)
    return load_config(environ={}, overrides=over)


def test_a_service_with_bulk_lanes_stores_every_event_once_in_order(tmp_path):
    svc = Service(_cfg(tmp_path / "data")).start()
    try:
        s = socket.create_connection(svc.tcp.address, timeout=30)
        n = 3000
        frames = [encode_v2(f"t{i % 5}", b"p%d" % i, i % 5, i + 1) for i in range(n)]
        for k in range(0, n, 100):  # many reads: some run on the lanes, some go to the workers
            s.sendall(b"".join(frames[k:k + 100]))
        s.sendall(b"".join(frames[:50]))  # resends: ACKed, not stored again
        s.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while data := s.recv(65536):
            buf += data
        got = split_control_frames(buf)
        assert [f for f in got if f[0] == KIND_NACK] == []
        assert max(v for k, v, _ in got if k == KIND_ACK) == n + 50
        lanes = [lane for tier in ("transactional", "batch") for lane in svc.engine.bus[tier].lanes]
        assert sum(lane.handled for lane in lanes) > 0
    finally:
        svc.stop()
    recs = EventLogReader(tmp_path / "data" / "events.bin").read().records
    ids = recs["event_id"].tolist()
    assert sorted(ids) == list(range(1, n + 1))
    for p in range(5):  # per topic (one priority each), the order of the connection
        mine = recs["event_id"][recs["priority"] == p]
        assert (np.diff(mine.astype(np.int64)) > 0).all()


def test_a_lane_with_inline_max_leaves_larger_batches_to_the_queue(bus, collected, topics):
    lane = TransactionalProcessor(bus["transactional"], collected.sinks(), None)
    lane.inline_max = 8
    assert not lane.run_inline(make_records(topics, 9, priority=2), 0)  # too many: the caller queues them
    assert lane.handled == 0 and len(collected.stored_records()) == 0
    assert lane.run_inline(make_records(topics, 8, priority=2, start_seq=10), 0)
    assert lane.handled == 8


@pytest.mark.parametrize("handler", ["", "eventstream.engine.handlers:log_alert"])
def test_bulk_tiers_with_the_stock_handler_store_a_few_events_on_the_reader(tmp_path, handler):
    """processors.<tier>.inline off (the default): with the stock noop handler the bulk tiers still
    get lanes for reads of at most SMALL_BATCH events (no user code on the reader); with a handler
    of the user's, none."""
    extra = {"processors.transactional.inline": False, "processors.batch.inline": False}
    if handler:
        extra["processors.transactional.handler"] = handler
    svc = Service(_cfg(tmp_path / "data", **extra)).start()
    try:
        lanes = {t: svc.engine.bus[t].lanes for t in ("transactional", "batch")}
        if handler:
            assert lanes["transactional"] == [None] * len(lanes["transactional"])
            assert all(lane is not None and lane.inline_max == 8 for lane in lanes["batch"])
            return
        assert all(lane is not None and lane.inline_max == 8 for ls in lanes.values() for lane in ls)
        s = socket.create_connection(svc.tcp.address, timeout=30)
        s.sendall(encode_v2("one", b"x", 2, 1))  # one event: on the reader
        buf = bytearray()
        while not any(k == KIND_ACK and v == 1 for k, v, _ in split_control_frames(buf)):
            buf += s.recv(65536)
        assert sum(lane.handled for lane in lanes["transactional"]) == 1
        s.sendall(b"".join(encode_v2("many", b"y", 2, i) for i in range(2, 202)))  # one read, or a few
        while not any(k == KIND_ACK and v == 201 for k, v, _ in split_control_frames(buf)):
            buf += s.recv(65536)
        s.close()
        # the lanes' count moves before the ACK (the workers' after it): not every read of the 200 was a
        # small one, so the lanes did not take them all
        assert sum(lane.handled for lane in lanes["transactional"]) < 201
    finally:
        svc.stop()


def test_deferred_metrics_of_many_batches_are_recorded_in_one_call_each_with_every_records_latency(bus, topics):
    """A lane leaves one metrics entry per batch it ran (up to 257 between flushes): the flush makes one
    processed() and one stages() call of them all, each record keeping its own latencies."""
    calls = {"processed": [], "stages": []}
    sinks = Sinks(topics, store=lambda r: None, drop=lambda r, why: None,
                  processed=lambda q, recs, h: calls["processed"].append((q, h - recs["ingest_ts"].astype(np.int64))),
                  stages=lambda ing, taken, stored: calls["stages"].append(
                      ((np.int64(taken) - ing).tolist(), (np.int64(stored) - ing).tolist())))
    lane = TransactionalProcessor(bus["transactional"], sinks, None)
    lane._done = [("transactional", [100, 200], 1000), ("transactional", np.array([300, 400], dtype=np.int64), 1500),
                  ("transactional", [1400], 1450)]
    lane._stages = [([100, 200], 150, 250), (np.array([300], dtype=np.int64), 320, 330)]
    lane._flush_metrics()
    assert len(calls["processed"]) == 1
    queue, lat = calls["processed"][0]
    assert queue == "transactional" and lat.tolist() == [900, 800, 1200, 1100, 50]
    assert calls["stages"] == [([50, -50, 20], [150, 50, 30])]
    assert lane._done == [] and lane._stages == []
    lane._done = [("transactional", [10], 40)]  # one entry: as it is
    lane._flush_metrics()
    assert calls["processed"][1][1].tolist() == [30]

"""EventBusMulti routing and offers."""

from __future__ import annotations

import numpy as np

from eventstream.config import load_config
from eventstream.core.ring import MpscRing
from eventstream.engine.bus import EventBusMulti
from eventstream.ingest.admission import Admission

from engine_fixtures import DTYPE, make_records, offer_all


def drain(queue):
    out = []
    for ring in queue.rings:
        got = ring.take(1 << 20)
        if len(got):
            out.append(got)
    return np.concatenate(out) if out else np.zeros(0, DTYPE)


def test_routes_by_priority(small_cfg, topics):
    bus = EventBusMulti(small_cfg, DTYPE)
    try:
        recs = make_records(topics, 50, priority=0)
        recs["priority"] = np.arange(50) % 5
        assert offer_all(bus, recs) == []
        rt, tx, bt = drain(bus["realtime"]), drain(bus["transactional"]), drain(bus["batch"])
        assert sorted(set(rt["priority"].tolist())) == [3, 4]
        assert set(tx["priority"].tolist()) == {2}
        assert sorted(set(bt["priority"].tolist())) == [0, 1]
        assert len(rt) + len(tx) + len(bt) == 50
        # order inside a queue is kept
        assert np.all(np.diff(rt["seq"].astype(np.int64)) > 0)
    finally:
        bus.close()


def test_partitions_keep_a_topic_in_one_ring(small_cfg, topics):
    bus = EventBusMulti(small_cfg, DTYPE)
    try:
        names = [f"topic.{i % 7}" for i in range(140)]
        offer_all(bus, make_records(topics, 140, topic=names, priority=2))
        q = bus["transactional"]
        assert q.partitions == small_cfg.processors.transactional.max_workers
        seen = {}
        for p, ring in enumerate(q.rings):
            for tid in ring.take(1 << 20)["topic_id"].tolist():
                assert seen.setdefault(tid, p) == p
        assert len(seen) == 7
    finally:
        bus.close()


def test_overflow_is_returned_with_a_reason(small_cfg, topics):
    cfg = load_config(environ={}, overrides={"records.payload_bytes": 32, "queues.batch.capacity": 16,
                                             "queues.batch.overflow": "DROP_NEW", "processors.batch.max_workers": 1})
    bus = EventBusMulti(cfg, DTYPE)
    try:
        refused = offer_all(bus, make_records(topics, 20, priority=1))
        assert len(refused) == 1
        recs, reason = refused[0]
        assert reason == "overflow:batch" and len(recs) == 4
        assert recs["seq"].tolist() == [17, 18, 19, 20]  # DROP_NEW refuses the newest
    finally:
        bus.close()


def test_offer_holds_what_does_not_fit_and_marks_what_went_in(topics):
    cfg = load_config(environ={}, overrides={"records.payload_bytes": 32, "queues.batch.capacity": 16,
                                             "queues.realtime.capacity": 16, "processors.batch.max_workers": 1})
    bus = EventBusMulti(cfg, DTYPE, seq_base=500)
    try:
        recs = make_records(topics, 40, priority=1)
        recs["priority"][::2] = 4  # 20 realtime, 20 batch, interleaved
        off = bus.offer(recs)
        assert recs["seq"].tolist() == list(range(500, 540))  # stamped in order
        assert off.placed == 32 and off.refused == []
        # the last 4 of each queue did not fit: held, in the batch's order
        assert off.held.tolist() == [32, 33, 34, 35, 36, 37, 38, 39]
        rt, bt = bus["realtime"].rings[0], bus["batch"].rings[0]
        assert sorted((r.name, end) for r, end in off.marks) == [("batch", 16), ("realtime", 16)]
        assert rt.completed() == 0
        views = rt.poll(100)
        rt.release(sum(len(v) for v in views))
        assert rt.completed() == 16  # the realtime mark is done, the batch mark is not
        again = bus.offer(recs[off.held], stamp=False)
        assert again.placed == 4 and again.held.tolist() == [1, 3, 5, 7]  # realtime had room again
        assert bus.received == 36  # placed so far (4 still held): what a full queue holds back is not received yet
    finally:
        bus.close()


def test_a_hold_is_counted_once_however_often_it_is_offered_again(topics, tmp_path):
    from eventstream.engine.engine import Engine
    from eventstream.ingest.delivery import Delivery, IngestStats
    from eventstream.metrics.registry import MetricsRegistry

    cfg = load_config(environ={}, overrides={"records.payload_bytes": 32, "queues.batch.capacity": 16,
                                             "processors.batch.max_workers": 1,
                                             "storage.data_dir": str(tmp_path / "data")})
    engine = Engine(cfg, MetricsRegistry()).open()  # not started: nothing consumes the queue
    try:
        stats = IngestStats()
        delivery = Delivery(engine, None, stats)
        recs = make_records(topics, 20, priority=0)
        d = delivery.deliver(recs, np.arange(20), [], 1, want_nacks=True)
        assert d.accepted == 16 and len(d.held) == 4 and stats.holds == 1
        for _ in range(3):  # the queue is still full: the same hold goes on
            d = delivery.deliver(d.held, d.held_indices, [], 1, want_nacks=True, retry=True)
            assert d.accepted == 0 and len(d.held) == 4
        assert stats.holds == 1
    finally:
        engine.close()


def test_offer_sheds_at_the_edge_only_where_configured(topics):
    cfg = load_config(environ={}, overrides={"records.payload_bytes": 32, "queues.batch.capacity": 16,
                                             "queues.batch.overflow": "DROP_NEW", "processors.batch.max_workers": 1})
    bus = EventBusMulti(cfg, DTYPE)
    try:
        off = bus.offer(make_records(topics, 20, priority=0))
        assert off.held is None and off.placed == 16
        assert [(pos.tolist(), why) for pos, why in off.refused] == [([16, 17, 18, 19], "overflow:batch")]
        off = bus.offer(make_records(topics, 3, priority=4), shed_all=True)  # UDP: never held
        assert off.placed == 3 and off.held is None
    finally:
        bus.close()



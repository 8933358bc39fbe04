"""A read's realtime frames (the priorities the engine's realtime queue takes) are decoded and offered
before the rest of the read is decoded (ingest/connection.py, protocol/decoder.py `first`): their handler
does not wait for the decode of the bulk frames read with them. Frame indices, NACK order, holding and the
ACK count are the read's as if it had been decoded in one piece."""

from __future__ import annotations

import numpy as np

from eventstream.core.records import ACK_STORED
from eventstream.ingest.connection import Connection
from eventstream.ingest.delivery import Delivery, IngestStats
from eventstream.ingest.limits import RejectMeter
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2, split_control_frames
from ingest_helpers import Rejects


def connection(sink) -> Connection:
    engine = sink.engine
    delivery = Delivery(engine, Rejects(), IngestStats())
    dec = FrameDecoder(engine.topics, payload_bytes=sink.cfg.records.payload_bytes, conn_id=7,
                       ack_default=ACK_STORED, payloads=engine.payloads)
    return Connection(None, 7, ("127.0.0.1", 40000), dec, 0.0, 1.0, delivery=delivery, meter=RejectMeter(100, 0.0))


def due(c: Connection, sink, timeout: float = 10.0) -> list[tuple[int, int, str]]:
    marks = [m for _count, ms, _nacks, _ts in c.chunks for m in ms]
    assert sink.engine.stored.wait(marks, timeout), "the engine did not store the records in time"
    data, _done = c.take_due()
    return [(k, v, p.decode()) for k, v, p in split_control_frames(bytearray(data))]


def frames(prios: list[int], base: int = 1) -> list[bytes]:
    """Frame i (1-based: base + i - 1) on topic `bulk.<p>` or `rt.<p>`, event id = its index."""
    return [encode_v2(("rt." if p >= 3 else "bulk.") + str(p), b"x%d" % i, p, base + i) for i, p in enumerate(prios)]


def test_realtime_frames_are_handled_before_the_bulk_frames_of_the_read_are_decoded(engine_sinks):
    seen: list[tuple[list[int], bool]] = []

    def handler(batch):  # which events, and whether the read's bulk topics were decoded (interned) yet
        seen.append((batch.records["event_id"].tolist(), "bulk.2" in sink.engine.topics.snapshot().values()))

    sink = engine_sinks(handlers={"realtime": handler})
    c = connection(sink)
    prios = [2, 0, 4, 1, 3, 2, 2, 4, 0, 1, 3, 2]
    step = c.receive(b"".join(frames(prios)), 0.0)
    assert (step.records, step.errors) == (12, 0)
    assert seen == [([3, 5, 8, 11], False)]  # in frame order, before any bulk frame was decoded
    assert due(c, sink) == [(KIND_ACK, 12, "")]
    recs = sink.records()
    assert sorted(recs["event_id"].tolist()) == list(range(1, 13))
    ts = dict(zip(recs["event_id"].tolist(), recs["ingest_ts"].tolist(), strict=True))
    assert max(ts[i] for i in (3, 5, 8, 11)) < min(ts[i] for i in (1, 2, 4, 6, 7, 9, 10, 12))


def test_nacks_keep_frame_order_and_indices_when_realtime_frames_went_first(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    fs = frames([2, 4, 2, 3, 1, 4, 0])
    bad = bytearray(fs[2])
    bad[-1] ^= 0xFF  # frame 3 (bulk): CRC mismatch
    fs[2] = bytes(bad)
    bad = bytearray(fs[4])
    bad[-1] ^= 0xFF  # frame 5 (bulk)
    fs[4] = bytes(bad)
    step = c.receive(b"".join(fs), 0.0)
    assert (step.records, step.errors) == (5, 2)
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 3), (KIND_NACK, 5), (KIND_ACK, 5)]
    assert sorted(sink.records()["event_id"].tolist()) == [1, 2, 4, 6, 7]


def test_a_bad_realtime_frame_decodes_the_read_in_order(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    fs = frames([2, 4, 1, 3, 0])
    bad = bytearray(fs[3])
    bad[-1] ^= 0xFF  # frame 4 (realtime): CRC mismatch
    fs[3] = bytes(bad)
    c.receive(b"".join(fs), 0.0)
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 4), (KIND_ACK, 4)]
    assert sorted(sink.records()["event_id"].tolist()) == [1, 2, 3, 5]


def test_realtime_refusals_merge_with_bulk_nacks_in_frame_order(engine_sinks):
    # the realtime queue sheds what does not fit (DROP_NEW); its handler waits, so 2 fit and the rest is refused
    sink = engine_sinks(capacity=2, gated=True, **{"queues.realtime.overflow": "DROP_NEW"})
    c = connection(sink)
    fs = frames([4, 2, 4, 2, 4, 2, 3])
    bad = bytearray(fs[3])
    bad[-1] ^= 0xFF  # frame 4 (bulk): CRC mismatch
    fs[3] = bytes(bad)
    step = c.receive(b"".join(fs), 0.0)
    assert step.errors == 1 and c.held is None
    sink.release.set()
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 4), (KIND_NACK, 5), (KIND_NACK, 7), (KIND_ACK, 4)]
    assert got[1][2].startswith("overflow:realtime") and got[0][2].startswith("crc32 mismatch")


def test_realtime_and_bulk_records_held_together_in_frame_order(engine_sinks):
    sink = engine_sinks(capacity=2, gated=True)  # every tier's handler waits: rings of 2 fill up
    c = connection(sink)
    prios = [4, 2, 4, 2, 4, 2, 3, 2]
    c.receive(b"".join(frames(prios)), 0.0)
    assert c.held is not None and c.accepted == 4
    assert c.held_idx.tolist() == [5, 6, 7, 8]
    assert c.held["event_id"].tolist() == [5, 6, 7, 8]
    assert not c.chunks  # no ACK while the read is held
    sink.release.set()
    for _ in range(1000):
        if c.retry_held():
            break
        ring = c.blocked[0]
        sink.engine.stored.wait([(ring, ring.completed() + 1)], 0.05)
    assert c.held is None and c.accepted == 8
    assert due(c, sink) == [(KIND_ACK, 8, "")]
    assert sorted(sink.records()["event_id"].tolist()) == list(range(1, 9))


def test_at_an_admission_level_a_read_keeps_its_order(engine_sinks):
    seen: list[list[int]] = []
    sink = engine_sinks(handlers={"realtime": lambda b: seen.append(b.records["event_id"].tolist())})
    sink.admission.tcp_min_priority = 3  # HIGH and CRITICAL only: held from the first frame not admitted
    c = connection(sink)
    c.receive(b"".join(frames([4, 2, 4, 3])), 0.0)
    assert c.accepted == 1 and c.held_idx.tolist() == [2, 3, 4] and seen == [[1]]
    sink.admission.tcp_min_priority = 0
    assert c.retry_held() and c.accepted == 4
    assert due(c, sink) == [(KIND_ACK, 4, "")]
    assert np.array_equal(np.sort(sink.records()["event_id"]), np.arange(1, 5))

"""A connection's protocol state without a socket (ingest/connection.py): bytes in -> records offered
to a real engine, ACK/NACK bytes out. The HELLO preamble, NACK by frame index, BATCH frames counted
by event, holding and retrying, the ACK watermark waiting on `stored`."""

from __future__ import annotations

import numpy as np
import pytest

from eventstream.core.records import ACK_STORED
from eventstream.ingest.auth import TokenSet
from eventstream.ingest.connection import REASON_HELD_AT_STOP, Connection
from eventstream.ingest.delivery import Delivery, IngestStats
from eventstream.ingest.limits import REASON_AUTH, RejectMeter
from eventstream.ingest.preamble import REFUSE_BAD_TOKEN, REFUSE_NO_HELLO, Preamble
from eventstream.ingest.tenants import Tenants
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import (
    KIND_ACK,
    KIND_NACK,
    encode_batch,
    encode_hello,
    encode_v1,
    encode_v2,
    split_control_frames,
)
from ingest_helpers import Rejects

TOKEN = "t0ken"


def connection(sink, tokens=None, max_rejects: int = 100) -> Connection:
    engine = sink.engine
    delivery = Delivery(engine, Rejects(), IngestStats())
    dec = FrameDecoder(engine.topics, payload_bytes=sink.cfg.records.payload_bytes, conn_id=7,
                       ack_default=ACK_STORED, payloads=engine.payloads)
    return Connection(None, 7, ("127.0.0.1", 40000), dec, 0.0, 1.0, delivery=delivery,
                      preamble=Preamble(TokenSet(tokens) if tokens else None),
                      meter=RejectMeter(max_rejects, 0.0), tenants=Tenants.unbounded())


def due(c: Connection, sink, timeout: float = 10.0) -> list[tuple[int, int, str]]:
    """Wait on `stored` for every chunk in flight (the barrier ACK writers wait on), then take the
    bytes that are due, as (kind, value, reason) frames."""
    marks = [m for _count, ms, _nacks, _ts in c.chunks for m in ms]
    assert sink.engine.stored.wait(marks, timeout), "the engine did not store the records in time"
    data, _done = c.take_due()
    return [(k, v, p.decode()) for k, v, p in split_control_frames(bytearray(data))]


def test_frames_in_any_pieces_are_acked_once_stored(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    stream = b"".join(encode_v2("orders", b"p%d" % i, 2, 100 + i) for i in range(5))
    for k in range(0, len(stream), 7):  # pieces that cut frames anywhere
        step = c.receive(stream[k : k + 7], 0.0)
        assert not step.refusal and step.fatal is None
    assert c.v2 and c.accepted == 5
    assert due(c, sink) == [(KIND_ACK, 5, "")]
    assert c.take_due() == (b"", [])  # an ACK is sent once
    assert sorted(sink.records()["event_id"].tolist()) == [100, 101, 102, 103, 104]


def test_a_rejected_frame_is_nacked_by_index_before_the_ack_that_covers_later_frames(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    bad = bytearray(encode_v2("orders", b"x", 2, 3))
    bad[-1] ^= 0xFF  # the CRC no longer matches
    step = c.receive(encode_v2("orders", b"a", 2, 1) + encode_v2("orders", b"b", 2, 2) + bytes(bad)
                     + encode_v2("orders", b"d", 2, 4), 0.0)
    assert (step.records, step.errors, step.fatal) == (3, 1, None)
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 3), (KIND_ACK, 3)]
    assert got[0][2].startswith("crc32 mismatch")


def test_a_batch_frame_counts_each_of_its_events(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    batch = encode_batch([("b", b"e%d" % i, 2, 10 + i) for i in range(5)])
    bad_priority = bytearray(encode_v2("b", b"after", 2, 99))
    bad_priority[6] = 9  # priority 9: refused
    step = c.receive(encode_v2("b", b"first", 2, 1) + batch + bytes(bad_priority) + encode_v2("b", b"z", 2, 20), 0.0)
    assert step.records == 7 and step.errors == 1
    # events 1 (v2), 2..6 (the batch's five), 7 refused, 8 accepted: ACK counts events, the NACK names 7
    assert [(k, v) for k, v, _ in due(c, sink)] == [(KIND_NACK, 7), (KIND_ACK, 7)]


def test_v1_frames_get_no_acknowledgements(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    c.receive(encode_v1("legacy", b"a") + encode_v1("legacy", b"b"), 0.0)
    assert not c.v2 and c.accepted == 2 and not c.chunks
    assert sink.wait_for(2, 10)


def test_a_framing_error_is_fatal_and_nacked(engine_sinks):
    sink = engine_sinks()
    c = connection(sink)
    step = c.receive(encode_v2("a", b"1", 2, 1) + b"\x00\x00\x00\x05\xe5abcd", 0.0)
    assert step.fatal is not None and step.fatal.index == 2
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 2), (KIND_ACK, 1)] and "too short" in got[0][2]


@pytest.mark.parametrize("opening", ["no_hello", "wrong_token"])
def test_with_tokens_a_missing_or_wrong_hello_is_refused_with_nack_0(engine_sinks, opening):
    sink = engine_sinks()
    c = connection(sink, tokens=[TOKEN])
    first = encode_v2("t", b"x", 2, 1) if opening == "no_hello" else encode_hello("wrong")
    step = c.receive(first, 0.0)
    reason = REFUSE_NO_HELLO if opening == "no_hello" else REFUSE_BAD_TOKEN
    assert (step.refusal, step.counted) == (reason, REASON_AUTH)
    assert [(k, v, p.decode()) for k, v, p in split_control_frames(bytearray(step.send))] == [(KIND_NACK, 0, reason)]
    assert c.accepted == 0 and c.preamble is None


def test_a_valid_hello_in_pieces_then_events(engine_sinks):
    sink = engine_sinks()
    c = connection(sink, tokens=[TOKEN])
    hello = encode_hello(TOKEN)
    assert c.receive(hello[:5], 0.0).pending  # not enough to know the first frame yet
    step = c.receive(hello[5:] + encode_v2("auth", b"ok", 2, 1), 1.0)
    assert not step.pending and not step.refusal and c.preamble is None
    assert c.principal is not None and c.tenant is not None and c.partial_since == 1.0
    assert due(c, sink) == [(KIND_ACK, 1, "")]  # the HELLO is not an event: the first event is 1


def test_records_the_engine_cannot_take_are_held_then_offered_again(engine_sinks):
    sink = engine_sinks(capacity=4, gated=True)  # the handler waits: 4 MEDIUM events fill the ring
    c = connection(sink)
    c.receive(b"".join(encode_v2("q", b"", 2, i + 1) for i in range(6)), 0.0)
    assert c.accepted == 4 and c.held is not None and c.held_idx.tolist() == [5, 6] and c.busy
    assert not c.retry_held()  # the full ring has no room yet: not even offered
    sink.release.set()
    for _ in range(1000):
        if c.retry_held():
            break
        sink.engine.stored.wait([(c.blocked[0], c.blocked[0].completed() + 1)], 0.05)
    assert c.held is None and c.accepted == 6
    assert due(c, sink) == [(KIND_ACK, 6, "")]


def test_held_below_the_admitted_level_until_admitted(engine_sinks):
    sink = engine_sinks()
    sink.admission.tcp_min_priority = 3  # HIGH and CRITICAL only
    c = connection(sink)
    c.receive(encode_v2("q", b"", 4, 1) + encode_v2("q", b"", 2, 2) + encode_v2("q", b"", 4, 3), 0.0)
    assert c.accepted == 1 and c.held_idx.tolist() == [2, 3]  # held from the first one not admitted
    assert not c.may_progress() and not c.retry_held()
    sink.admission.tcp_min_priority = 0
    assert c.retry_held() and c.accepted == 3
    assert due(c, sink) == [(KIND_ACK, 3, "")]


def test_held_records_at_stop_are_dead_lettered_and_nacked_after_the_ack(engine_sinks):
    sink = engine_sinks()
    sink.admission.paused = True  # only CRITICAL
    c = connection(sink)
    c.receive(encode_v2("q", b"", 4, 1) + encode_v2("q", b"", 2, 2), 0.0)
    held = c.held
    assert held is not None and len(held) == 1
    c.dead_letter_held()
    assert c.held is None
    got = due(c, sink)
    assert [(k, v) for k, v, _ in got] == [(KIND_NACK, 2), (KIND_ACK, 1)] and got[0][2] == REASON_HELD_AT_STOP
    rejects = c.delivery.on_reject
    assert [(len(r), why) for r, why, _ in rejects.calls if r is not None] == [(1, REASON_HELD_AT_STOP)]


def test_rejects_past_the_limit_without_a_good_frame_mark_garbage(engine_sinks):
    sink = engine_sinks()
    c = connection(sink, max_rejects=3)
    bad = bytearray(encode_v2("g", b"x", 2, 1))
    bad[-1] ^= 1
    step = c.receive(bytes(bad) * 5, 0.0)
    assert step.errors == 5 and step.garbage
    frames = [(k, v) for k, v, _ in due(c, sink)]
    assert frames == [(KIND_NACK, i) for i in range(1, 6)]  # every reject is still NACKed
    reported = c.delivery.on_reject.rejections()
    assert len(reported) == 3  # one by one up to the limit; the rest is summarised at close
    c.release()
    (summary,) = [r for r in c.delivery.on_reject.rejections() if r.reason.startswith("rejects_limited:")]
    assert summary.count == 2


def test_closing_gives_held_payload_slots_back(engine_sinks):
    sink = engine_sinks()
    sink.admission.paused = True
    c = connection(sink)
    before = sink.engine.payloads.statistics()["used_bytes"]
    c.receive(encode_v2("big", bytes(5000), 2, 1), 0.0)  # over payload_bytes: in the payload arena
    assert c.held is not None and sink.engine.payloads.statistics()["used_bytes"] > before
    c.release()
    assert c.held is None and sink.engine.payloads.statistics()["used_bytes"] == before
    assert np.all(sink.records()["event_id"] != 1)

"""BATCH frames (v2 kind 11): round trips of any shape through any re-splitting, mixed with single
frames; refused events NACKed by their own index; garbage never raises; a full payload arena stops a
batch part way and the rest follows later."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.core.payloads import payload_list as payloads
from eventstream.core.records import ACK_STORED, ACK_SYNCED, FLAG_ACK_SHIFT, FLAG_V2
from eventstream.core.topics import TopicTable
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import (
    BATCH_HEAD, BATCH_RECORD_BYTES, BATCH_RECORD_DTYPE, KIND_BATCH, V2_MAGIC, EncodeError, batch_frame_bytes,
    encode_batch, encode_batch_columns, encode_v1, encode_v2,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

topics_st = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
bevent_st = st.tuples(topics_st, st.binary(max_size=120), st.integers(0, 4), st.integers(0, 2**64 - 1),
                      st.integers(0, 2**64 - 1))
# a stream item: ("batch", [events]) or ("single", event) (v2 EVENT) or ("v1", event)
item_st = st.one_of(
    st.lists(bevent_st, min_size=1, max_size=30).map(lambda evs: ("batch", evs)),
    bevent_st.map(lambda e: ("single", e)),
    bevent_st.map(lambda e: ("v1", e)),
)


def encode_item(item) -> bytes:
    what, x = item
    if what == "batch":
        return encode_batch(x)
    topic, payload, prio, eid, ts = x
    return encode_v2(topic, payload, prio, eid, ts) if what == "single" else encode_v1(topic, payload, prio)


def flatten(items) -> list[tuple]:
    """(topic, payload, priority, event_id, timestamp_ns, v2) per event, in order."""
    out = []
    for what, x in items:
        for topic, payload, prio, eid, ts in (x if what == "batch" else [x]):
            v2 = what != "v1"
            out.append((topic, payload, prio, eid if v2 else 0, ts if v2 else 0, v2))
    return out


def feed_split(dec: FrameDecoder, stream: bytes, cuts: list[int]):
    recs, idx, errs = [], [], []
    bounds = [0, *sorted(set(c % (len(stream) + 1) for c in cuts)), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        r, i, e = dec.feed_indexed(stream[a:b])
        recs.append(r)
        idx.append(i)
        errs.extend(e)
    return np.concatenate(recs), np.concatenate(idx), errs


@SETTINGS
@given(st.lists(item_st, max_size=12), st.lists(st.integers(0, 20_000), max_size=20))
def test_round_trip_batches_and_singles_any_split(items, cuts):
    table = TopicTable()
    dec = FrameDecoder(table, conn_id=3, payload_bytes=128)
    recs, idx, errs = feed_split(dec, b"".join(encode_item(i) for i in items), cuts)
    events = flatten(items)
    assert errs == []
    assert len(recs) == len(events)
    assert idx.tolist() == list(range(1, len(events) + 1))  # a batch of N takes N indices
    assert dec.frames_seen == len(events) and dec.buffered == 0
    assert payloads(recs) == [e[1] for e in events]
    assert table.names(recs["topic_id"]) == [e[0] for e in events]
    assert recs["priority"].tolist() == [e[2] for e in events]
    assert recs["event_id"].tolist() == [e[3] for e in events]
    assert recs["producer_ts"].tolist() == [e[4] for e in events]
    assert ((recs["flags"] & FLAG_V2) != 0).tolist() == [e[5] for e in events]
    assert (recs["conn_id"] == 3).all()


def test_uniform_batch_and_worked_example_bytes():
    """The worked example of docs/protocol.md, byte for byte, and its decode."""
    frame = encode_batch([("orders", b"hi", 3, 42, 1700000000000000000), ("orders", b"", 2, 43, 0),
                          ("pay", b"abc", 4, 0, 0)])
    assert frame.hex(" ") == EXAMPLE_HEX
    table = TopicTable()
    recs, errs = FrameDecoder(table).feed(frame)
    assert errs == []
    assert payloads(recs) == [b"hi", b"", b"abc"]
    assert table.names(recs["topic_id"]) == ["orders", "orders", "pay"]
    assert (recs["crc32"] == 0).all()  # the batch's one CRC covered them


EXAMPLE_HEX = ("00 00 00 72 e5 0b 00 00 00 00 00 03 00 02 00 00 00 0b 00 00 00 00 00 00 00 00 "
               + "%s 06 6f 72 64 65 72 73 03 70 61 79 "
               "03 00 00 00 00 00 00 02 00 00 00 00 00 00 00 2a 17 97 9c fe 36 2a 00 00 "
               "02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 2b 00 00 00 00 00 00 00 00 "
               "04 00 00 01 00 00 00 03 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 "
               "68 69 61 62 63")


def _example_crc() -> str:
    body = bytes.fromhex(EXAMPLE_HEX.split("%s ")[1].replace(" ", ""))
    return struct.pack(">I", zlib.crc32(body)).hex(" ")


EXAMPLE_HEX = EXAMPLE_HEX % _example_crc()


def test_large_uniform_batch_one_reshape_and_ack_modes():
    n = 5000
    pays = np.random.default_rng(1).integers(0, 256, size=(n, 64), dtype=np.uint8)
    frame = encode_batch_columns(["a", "b"], np.arange(n) % 2, np.full(n, 64), pays.tobytes(),
                                 priorities=np.arange(n) % 5, event_ids=np.arange(1, n + 1),
                                 flags=np.where(np.arange(n) % 3 == 0, ACK_SYNCED, 0), ack=ACK_STORED)
    assert len(frame) == batch_frame_bytes(4, n, 64 * n)
    table = TopicTable()
    recs, errs = FrameDecoder(table).feed(frame)
    assert errs == [] and len(recs) == n
    assert np.array_equal(recs["payload"][:, :64], pays)
    assert recs["event_id"].tolist() == list(range(1, n + 1))
    modes = (recs["flags"] >> FLAG_ACK_SHIFT) & 3
    assert modes.tolist() == [ACK_SYNCED if i % 3 == 0 else ACK_STORED for i in range(n)]


def _patch_record(frame: bytes, j: int, field: str, value: int) -> bytes:
    """Change one field of record j and fix the CRC (a well-formed frame with one bad event)."""
    _l, _m, _k, _r, _f, count, _tc, tbytes, _z, _crc = BATCH_HEAD.unpack_from(frame, 0)
    table_at = 30 + tbytes
    b = bytearray(frame)
    rows = np.frombuffer(b, dtype=BATCH_RECORD_DTYPE, count=count, offset=table_at).copy()
    rows[field][j] = value
    b[table_at:table_at + count * BATCH_RECORD_BYTES] = rows.tobytes()
    struct.pack_into(">I", b, 26, zlib.crc32(bytes(b[30:])))
    return bytes(b)


@pytest.mark.parametrize("field,value,cls", [("priority", 9, "priority"), ("flags", 4, "batch"),
                                             ("topic", 5, "batch"), ])
def test_one_bad_event_is_refused_by_its_index_the_rest_go_on(field, value, cls):
    frame = encode_batch([("t", bytes([i]) * i, 1, i + 1) for i in range(10)])
    before = encode_v2("s", b"x", 2, 99)
    stream = before + _patch_record(frame, 4, field, value) + before
    recs, idx, errs = FrameDecoder(TopicTable()).feed_indexed(stream)
    assert [(e.index, e.error_class, e.fatal) for e in errs] == [(6, cls, False)]
    assert errs[0].event_id == 5
    assert idx.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]


def test_payload_over_the_inline_capacity_without_arena_is_refused():
    frame = encode_batch([("t", b"x" * 10), ("t", b"y" * 200), ("t", b"z")])
    recs, idx, errs = FrameDecoder(TopicTable(), payload_bytes=100).feed_indexed(frame)
    assert [(e.index, e.error_class) for e in errs] == [(2, "payload_too_large")]
    assert payloads(recs) == [b"x" * 10, b"z"]


def test_crc_mismatch_refuses_every_event_of_the_batch_only():
    frame = bytearray(encode_batch([("t", b"abc")] * 4))
    frame[-1] ^= 1
    stream = encode_v2("s", b"1") + bytes(frame) + encode_v2("s", b"2")
    recs, idx, errs = FrameDecoder(TopicTable()).feed_indexed(stream)
    assert [(e.index, e.error_class) for e in errs] == [(i, "crc") for i in (2, 3, 4, 5)]
    assert idx.tolist() == [1, 6] and payloads(recs) == [b"1", b"2"]


def test_bad_topics_refuse_only_their_events():
    frame = encode_batch_columns([b"ok", b"\xff\xfe"], [0, 1, 0], [1, 1, 1], b"abc")
    recs, idx, errs = FrameDecoder(TopicTable()).feed_indexed(frame)
    assert [(e.index, e.error_class) for e in errs] == [(2, "topic_utf8")]
    assert idx.tolist() == [1, 3]
    table = TopicTable(max_topics=1)
    frame = encode_batch([("a", b"1"), ("b", b"2"), ("a", b"3")])
    recs, idx, errs = FrameDecoder(table).feed_indexed(frame)
    assert [(e.index, e.error_class) for e in errs] == [(2, "too_many_topics")]
    assert payloads(recs) == [b"1", b"3"]


def test_tables_that_do_not_fit_the_frame_are_a_framing_error():
    good = encode_batch([("t", b"abc")] * 3)
    b = bytearray(good)
    struct.pack_into(">I", b, 8, 1000)  # count far beyond the frame
    recs, idx, errs = FrameDecoder(TopicTable()).feed_indexed(encode_v2("s", b"1") + bytes(b) + good)
    assert idx.tolist() == [1]
    assert len(errs) == 1 and errs[0].fatal and errs[0].index == 2 and errs[0].version == 2
    assert errs[0].reason.startswith("batch frame length")
    b = bytearray(good)
    struct.pack_into(">I", b, 8, 0)
    recs, idx, errs = FrameDecoder(TopicTable()).feed_indexed(bytes(b))
    assert errs[0].fatal and len(recs) == 0


def test_inconsistent_batch_is_refused_whole_with_reasons():
    good = encode_batch([("t", b"abc"), ("t", b"de")])
    b = bytearray(good)
    b[6] = 1  # reserved byte
    _, _, errs = FrameDecoder(TopicTable()).feed_indexed(bytes(b))
    assert [(e.index, e.error_class) for e in errs] == [(1, "batch"), (2, "batch")]
    patched = _patch_record(good, 0, "payload_len", 2)  # lengths no longer sum to what is carried
    _, _, errs = FrameDecoder(TopicTable()).feed_indexed(patched)
    assert [e.error_class for e in errs] == ["batch", "batch"] and "sum to" in errs[0].reason


def test_encoder_refuses_what_it_cannot_encode():
    with pytest.raises(EncodeError, match="0 events"):
        encode_batch([])
    with pytest.raises(EncodeError, match="priority 7"):
        encode_batch([("t", b"", 7)])
    with pytest.raises(EncodeError, match="topic of 0 bytes"):
        encode_batch([("", b"")])
    with pytest.raises(EncodeError, match="topic index 2"):
        encode_batch_columns(["a"], [0, 2], [0, 0], b"")
    with pytest.raises(EncodeError, match="do not match"):
        encode_batch_columns(["a"], [0], [3], b"ab")


@SETTINGS
@given(st.lists(bevent_st, min_size=1, max_size=20), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                               min_size=1, max_size=8),
       st.lists(st.integers(0, 10_000), max_size=6))
def test_garbage_in_batches_never_raises(events, flips, cuts):
    """Flipped bytes anywhere: decoding never raises, every event is accepted or refused once
    (or the stream ends in a framing error), and indices only grow."""
    frame = bytearray(encode_v2("s", b"first") + encode_batch(events) + encode_v2("s", b"last"))
    for at, x in flips:
        frame[at % len(frame)] ^= x or 1
    dec = FrameDecoder(TopicTable(), payload_bytes=64)
    recs, idx, errs = feed_split(dec, bytes(frame), cuts)
    seen = sorted(idx.tolist() + [e.index for e in errs])
    assert len(seen) == len(set(seen))
    if not any(e.fatal for e in errs) and dec.buffered == 0:
        assert seen == list(range(1, dec.frames_seen + 1))


@SETTINGS
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_after_a_batch_header_never_raise(tail):
    head = BATCH_HEAD.pack(26 + len(tail), V2_MAGIC, KIND_BATCH, 0, 0, len(tail) // 30 + 1, 1, 2, bytes(8),
                           zlib.crc32(tail))
    FrameDecoder(TopicTable()).feed_indexed(head + tail)


def test_full_arena_stops_a_batch_part_way_and_the_rest_follows():
    from eventstream.core.payloads import PayloadArena, payload_list, release_records

    with PayloadArena(2 << 20, (1 << 20) - 4, min_payload=16) as arena:  # 2 chunks of 1 MiB
        dec = FrameDecoder(TopicTable(), payload_bytes=16, payloads=arena, max_frame_bytes=4 << 20)
        pays = [b"a" * 10, b"b" * 300_000, b"c" * 5, b"d" * 300_000, b"x" * 300_000, b"e" * 600_000, b"f"]
        stream = encode_v2("s", b"0") + encode_batch([("t", p, 2, i + 1) for i, p in enumerate(pays)]) \
            + encode_v2("s", b"9")
        recs, idx, errs = dec.feed_indexed(stream)
        # 300 KB payloads take 512 KiB slots (one chunk holds two); the 600 KB one finds no free chunk
        assert errs == [] and idx.tolist() == [1, 2, 3, 4, 5, 6]
        assert payload_list(recs) == [b"0"] + pays[:5]
        assert dec.arena_blocked == 600_000 and dec.frames_seen == 6
        more, idx2, _ = dec.feed_indexed(b"")
        assert len(more) == 0
        release_records(recs)
        rest, idx3, errs3 = dec.feed_indexed(b"")
        assert errs3 == [] and idx3.tolist() == [7, 8, 9]
        assert payload_list(rest) == pays[5:] + [b"9"]
        release_records(rest)
        assert dec.frames_seen == 9 and dec.buffered == 0

"""Codec properties: round trip, any re-splitting, content errors isolated, corruption never raises."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.core.payloads import payload_list as payloads
from eventstream.core.records import FLAG_V2
from eventstream.core.topics import TopicTable
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import (
    KIND_ACK, V2_HEAD, V2_MAGIC, encode_ack, encode_nack, encode_nacks, encode_v1, encode_v2, split_control_frames,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

topics_st = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
event_st = st.tuples(
    st.sampled_from([1, 2]), topics_st, st.binary(max_size=80), st.integers(0, 4),
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
)


def encode(ev) -> bytes:
    version, topic, payload, prio, eid, ts = ev
    return encode_v1(topic, payload, prio) if version == 1 else encode_v2(topic, payload, prio, eid, ts)


def feed_split(dec: FrameDecoder, stream: bytes, cuts: list[int]):
    recs, errs = [], []
    bounds = [0, *sorted(set(c % (len(stream) + 1) for c in cuts)), len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        r, e = dec.feed(stream[a:b])
        recs.append(r)
        errs.extend(e)
    return np.concatenate(recs), errs


def check_matches(table: TopicTable, recs: np.ndarray, events: list) -> None:
    assert len(recs) == len(events)
    assert payloads(recs) == [ev[2] for ev in events]
    assert table.names(recs["topic_id"]) == [ev[1] for ev in events]
    assert recs["priority"].tolist() == [ev[3] for ev in events]
    v2 = np.array([ev[0] == 2 for ev in events], dtype=bool)
    assert recs["event_id"].tolist() == [ev[4] if ev[0] == 2 else 0 for ev in events]
    assert recs["producer_ts"].tolist() == [ev[5] if ev[0] == 2 else 0 for ev in events]
    assert ((recs["flags"] & FLAG_V2) != 0).tolist() == v2.tolist()
    crcs = [zlib.crc32(ev[2], zlib.crc32(ev[1].encode())) if ev[0] == 2 else 0 for ev in events]
    assert recs["crc32"].tolist() == crcs
    assert (recs["seq"] == 0).all()


@SETTINGS
@given(st.lists(event_st, max_size=40), st.lists(st.integers(0, 10_000), max_size=30))
def test_round_trip_any_split(events, cuts):
    table = TopicTable()
    dec = FrameDecoder(table, conn_id=7)
    stream = b"".join(encode(ev) for ev in events)
    recs, errs = feed_split(dec, stream, cuts)
    assert errs == []
    check_matches(table, recs, events)
    assert (recs["conn_id"] == 7).all()
    assert dec.buffered == 0 and dec.frames_seen == len(events)


def test_one_byte_at_a_time_and_uniform_runs():
    table = TopicTable()
    events = [(2, "orders", bytes([i % 256]) * 64, 2, i + 1, 5) for i in range(300)]
    events += [(1, "x", b"", 0, 0, 0), (2, "é", b"p", 4, 9, 9)]
    stream = b"".join(encode(ev) for ev in events)
    dec = FrameDecoder(table)
    recs = [dec.feed(stream[i:i + 1])[0] for i in range(len(stream))]
    check_matches(table, np.concatenate(recs), events)
    whole, errs = FrameDecoder(table).feed(stream)
    assert errs == []
    check_matches(table, whole, events)


def bad_content_frames(cap: int) -> list[tuple[bytes, str]]:
    """(frame, error_class) for every content error; each keeps the stream's framing intact."""
    good = encode_v2("t", b"abc", 2, 5, 6)
    bad_crc = good[:26] + bytes([good[26] ^ 0xFF]) + good[27:]
    bad_prio = bytearray(good)
    bad_prio[6] = 9
    v1_no_topic = struct.pack(">IBH", 3 + 2, 1, 0) + b"zz"
    h = V2_HEAD.pack(26 + 2, V2_MAGIC, 1, 1, 0, 77, 0, 0, 0)
    v2_no_topic = h + b"zz"
    bad_utf8 = struct.pack(">IBH", 3 + 2 + 1, 2, 2) + b"\xff\xfe" + b"q"
    too_large = encode_v1("t", b"x" * (cap + 1), 3)
    ack_from_client = encode_v2("t", b"", 0, 1, 0, kind=KIND_ACK)
    return [(bad_crc, "crc"), (bytes(bad_prio), "priority"), (v1_no_topic, "topic_len"),
            (v2_no_topic, "topic_len"), (bad_utf8, "topic_utf8"), (too_large, "payload_too_large"),
            (ack_from_client, "kind")]


@SETTINGS
@given(st.lists(st.one_of(event_st.map(lambda e: ("ok", e)), st.integers(0, 6).map(lambda k: ("bad", k))),
                max_size=40),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_content_errors_reject_only_their_frame(items, cuts):
    table = TopicTable()
    bads = bad_content_frames(cap=100)
    dec = FrameDecoder(table, payload_bytes=100)
    stream, good, expect_bad = [], [], []
    for i, (what, x) in enumerate(items, 1):
        if what == "ok":
            stream.append(encode(x))
            good.append(x)
        else:
            stream.append(bads[x][0])
            expect_bad.append((i, bads[x][1]))
    recs, errs = feed_split(dec, b"".join(stream), cuts)
    assert [(e.index, e.error_class) for e in errs] == expect_bad
    assert not any(e.fatal for e in errs)
    check_matches(table, recs, good)


def test_large_payloads_go_to_the_arena_and_a_full_arena_stops_decoding():
    """With a payload arena nothing is too large below max_frame_bytes; when the arena is full the
    decoder stops before that frame, keeps the rest, and goes on once slots come back."""
    from eventstream.core.payloads import PayloadArena, payload_list, release_records

    with PayloadArena(3 << 20, (1 << 20) - 4, min_payload=16) as arena:  # 3 chunks of 1 MiB
        dec = FrameDecoder(TopicTable(), payload_bytes=16, payloads=arena)
        pays = [b"a" * 10, b"b" * 600_000, b"c" * 17, b"d" * 700_000, b"e" * 3, b"f" * 800_000, b"g"]
        stream = b"".join(encode_v2("t", p, 2, i + 1) for i, p in enumerate(pays))
        recs, idx, errs = dec.feed_indexed(stream[:1_500_000])  # the 800 KB frame arrives in part too
        assert errs == [] and idx.tolist() == [1, 2, 3, 4, 5]
        assert payload_list(recs) == pays[:5]
        assert recs["ext_class"].tolist()[:4] == [0, 1 + arena.class_sizes.index(1 << 20), 1, len(arena.class_sizes)]
        more, idx2, errs2 = dec.feed_indexed(stream[1_500_000:])
        assert len(more) == 0 and errs2 == [] and dec.arena_blocked == 800_000  # every chunk in use
        assert not arena.has_room(800_000)
        release_records(recs)
        assert arena.has_room(800_000)
        rest, idx3, errs3 = dec.feed_indexed(b"")
        assert errs3 == [] and idx3.tolist() == [6, 7] and dec.arena_blocked == 0 and dec.buffered == 0
        assert payload_list(rest) == pays[5:]
        release_records(rest)
        assert arena.statistics()["used_bytes"] == 0


def test_payload_too_large_names_the_limit():
    dec = FrameDecoder(TopicTable(), payload_bytes=16)  # no payload arena: the inline capacity is the limit
    recs, errs = dec.feed(encode_v2("t", b"x" * 17, 3, 42) + encode_v1("t", b"y" * 16))
    assert len(recs) == 1 and payloads(recs) == [b"y" * 16]
    (e,) = errs
    assert "records.payload_bytes" in e.reason and "16" in e.reason and "17" in e.reason
    assert (e.index, e.event_id, e.topic, e.priority, e.version, e.fatal) == (1, 42, "t", 3, 2, False)


def test_framing_errors_are_fatal_and_stop_the_decoder():
    cases = {
        "unknown first byte": encode_v1("a", b"1") + struct.pack(">I", 5) + b"\x07abcd",
        "length over max": encode_v1("a", b"1") + struct.pack(">I", 5000) + b"\xe5",
        "v2 too short": encode_v1("a", b"1") + struct.pack(">I", 10) + b"\xe5" + b"\0" * 9,
        "zero length": encode_v1("a", b"1") + struct.pack(">I", 0),
        "topic past end": encode_v1("a", b"1") + struct.pack(">IBH", 5, 1, 9) + b"ab",
    }
    for name, stream in cases.items():
        for step in (1, 3, len(stream)):
            dec = FrameDecoder(TopicTable(), max_frame_bytes=1024)
            recs, errs = [], []
            for i in range(0, len(stream), step):
                r, e = dec.feed(stream[i:i + step])
                recs.append(r)
                errs += e
            assert sum(len(r) for r in recs) == 1, name
            assert len(errs) == 1 and errs[0].fatal and errs[0].index == 2, (name, errs)
            assert dec.failed
            assert dec.feed(encode_v1("a", b"2")) [0].size == 0


def test_garbage_fails_before_the_claimed_length_arrives():
    dec = FrameDecoder(TopicTable())
    recs, errs = dec.feed(b"GET / HTTP/1.1\r\n")
    assert len(recs) == 0 and errs[0].fatal and "max_frame_bytes" in errs[0].reason


@settings(max_examples=150, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=20), st.data())
def test_random_corruption_never_raises_and_keeps_the_prefix(events, data):
    table = TopicTable()
    frames = [encode(ev) for ev in events]
    stream = bytearray(b"".join(frames))
    pos = data.draw(st.integers(0, len(stream) - 1))
    mode = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    if mode == "flip":
        stream[pos] ^= data.draw(st.integers(1, 255))
    elif mode == "truncate":
        del stream[pos:]
    else:
        stream[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=10))
    recs, errs = feed_split(FrameDecoder(table), bytes(stream), cuts)
    intact, end = 0, 0
    for f in frames:
        if end + len(f) > pos:
            break
        end += len(f)
        intact += 1
    assert len(recs) >= intact
    check_matches(table, recs[:intact], events[:intact])
    assert all(e.index > intact for e in errs)


def test_control_frames_round_trip():
    buf = bytearray(encode_nack(3, "backpressure") + encode_ack(17) + encode_nacks(np.array([5, 9]), "paused"))
    buf += encode_ack(1)[:10]
    assert split_control_frames(buf) == [(3, 3, b"backpressure"), (2, 17, b""), (3, 5, b"paused"), (3, 9, b"paused")]
    assert len(buf) == 10
    assert encode_nacks(np.array([4]), "x") == encode_nack(4, "x")


@SETTINGS
@given(st.integers(9, 700), st.lists(st.integers(0, 10_000), max_size=6), st.booleans())
def test_frames_of_one_size_back_to_back_decode_as_any_others(n, marks, lead):
    """A read of frames of one size (evenly spaced: the decoder reads headers, topics and payloads
    through strided views) gives what frames decoded one by one give: bad CRCs refused by index,
    topics of the same length told apart, payloads whole; with a frame of another size first (no
    strided views) the same; a partial frame after the run stays buffered."""
    bad = {m % n for m in marks[:2]}
    other = {m % n for m in marks[2:]}
    frames = []
    for i in range(n):
        f = bytearray(encode_v2("ab" if i in other else "cd", bytes([i % 256]) * 40, i % 5, i + 1, i))
        if i in bad:
            f[-1] ^= 0xFF
        frames.append(bytes(f))
    first = encode_v2("lead", b"z", 1, 10**6, 0) if lead else b""
    tail = encode_v2("x", b"", 0, 7, 0)
    dec = FrameDecoder(TopicTable(), payload_bytes=64)
    recs, idx, errs = dec.feed_indexed(first + b"".join(frames) + tail[:-1])
    k = 2 if lead else 1  # index of the run's first frame
    assert [(e.index, e.error_class) for e in errs] == [(i + k, "crc") for i in sorted(bad)]
    keep = [i for i in range(n) if i not in bad]
    assert idx.tolist() == [1] * lead + [i + k for i in keep]
    assert recs["event_id"].tolist() == [10**6] * lead + [i + 1 for i in keep]
    names = [dec.topics.name(t) for t in recs["topic_id"].tolist()]
    assert names == ["lead"] * lead + ["ab" if i in other else "cd" for i in keep]
    assert payloads(recs)[lead:] == [bytes([i % 256]) * 40 for i in keep]
    assert dec.buffered == len(tail) - 1


def test_a_long_run_of_one_size_checks_every_frames_crc_by_columns():
    """From 8 frames per byte of topic + payload on, the CRCs of a run of one size are computed for
    all frames at once (one table lookup per byte position): a flipped bit anywhere in a frame's
    topic, payload or CRC field is refused by index, exactly as zlib.crc32 per frame refuses it."""
    n = 1000
    frames = [bytearray(encode_v2("orders", bytes([i % 251]) * 64, 2, i + 1, i)) for i in range(n)]
    flips = {3: 31, 400: 50, 401: len(frames[0]) - 1, 998: 27}  # topic, payload, last byte, the CRC field
    for i, at in flips.items():
        frames[i][at] ^= 0x10
    dec = FrameDecoder(TopicTable(), payload_bytes=64)
    recs, idx, errs = dec.feed_indexed(b"".join(frames))
    assert [(e.index, e.error_class) for e in errs] == [(i + 1, "crc") for i in sorted(flips)]
    assert idx.tolist() == [i + 1 for i in range(n) if i not in flips]
    assert recs["crc32"].tolist() == [zlib.crc32(bytes(f[30:])) for i, f in enumerate(frames) if i not in flips]


def test_scan_gives_the_same_frames_as_arrays_as_lists():
    """framing.scan(arrays=True) (the decoder's way for many frames) finds what the lists find: the
    same offsets, lengths, end position and fatal reason, for a clean stream with a partial tail and
    for one that ends in a framing error."""
    from eventstream.protocol.framing import scan

    frames = [encode_v2("t%d" % (i % 3), b"x" * (i % 7), i % 5, i + 1, i) for i in range(40)]
    clean = b"".join(frames) + frames[0][:9]
    broken = b"".join(frames[:20]) + struct.pack(">I", 30) + b"\x77" * 30 + b"".join(frames[20:])
    run = b"".join(encode_v2("u", b"y" * 10, 2, i, 0) for i in range(150))  # one size: a uniform run
    runs = b"".join(frames[:5]) + run + b"".join(frames[5:9]) + run + frames[9][:30]
    broken_run = run + struct.pack(">I", 30) + b"\x77" * 30 + run
    for stream in (clean, broken, runs, broken_run):
        lists = scan(stream, 0, len(stream), 1 << 20)
        arrays = scan(stream, 0, len(stream), 1 << 20, arrays=True)
        assert [list(map(int, a)) for a in arrays[:2]] == [list(x) for x in lists[:2]]
        assert arrays[2:] == lists[2:]
    assert lists[3] is not None and "first byte 0x77" in lists[3]

"""FrameDecoder.feed_indexed with `urgent`: the frames of the marked priorities are handed over before the
rest of the read is decoded, and together the two give exactly what decoding in one piece gives (the
same records, frame indices and errors), whatever the frames and however the stream is cut."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.core.topics import TopicTable
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import encode_batch, encode_v1, encode_v2

URGENT = bytes([0, 0, 0, 1, 1]).ljust(256, b"\0")  # HIGH and CRITICAL
CAP = 100
COMPARED = [n for n in np.dtype(FrameDecoder(TopicTable(), payload_bytes=CAP).dtype).names if n != "ingest_ts"]

inline_st = st.tuples(st.sampled_from(["v2", "v2", "v2", "crc"]), st.sampled_from(["a", "bb"]), st.integers(0, CAP),
                      st.integers(0, 4))
frame_st = st.one_of(
    st.tuples(st.just("v2"), st.sampled_from(["a", "bb", "rt.x"]), st.integers(0, CAP + 20), st.integers(0, 4)),
    st.tuples(st.just("v1"), st.just("old"), st.integers(0, 10), st.integers(0, 4)),
    st.tuples(st.just("crc"), st.just("a"), st.integers(0, 10), st.integers(0, 4)),
    st.tuples(st.just("batch"), st.just("b"), st.integers(1, 3), st.integers(0, 4)),
)


def frame(i: int, f) -> bytes:
    what, topic, size, prio = f
    if what == "v1":
        return encode_v1(topic, b"v" * size, prio)
    if what == "batch":
        return encode_batch([(topic, b"e", prio, 1000 * i + k) for k in range(size)])
    data = bytearray(encode_v2(topic, bytes([i % 251]) * size, prio, i + 1, 7))
    if what == "crc":
        data[-1 if size else -2] ^= 0xFF
    return bytes(data)


def feed_all(dec: FrameDecoder, stream: bytes, cuts: list[int], urgent: bytes | None):
    got, errs, handed = [], [], []

    def handover(records, indices):
        handed.append(indices.tolist())
        got.append((records, indices))

    bounds = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        r, i, e = dec.feed_indexed(stream[a:b], urgent, handover if urgent else None)
        got.append((r, i))
        errs.extend((x.index, x.error_class, x.fatal) for x in e)
    recs = np.concatenate([r for r, _ in got])
    idx = np.concatenate([i for _, i in got])
    order = np.argsort(idx, kind="stable")
    return recs[order], idx[order], sorted(errs), handed


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(inline_st, max_size=60), st.lists(frame_st, max_size=60)),
       st.lists(st.integers(0, 20_000), max_size=6))
def test_urgent_first_decodes_what_one_piece_decodes(frames, cuts):
    stream = b"".join(frame(i, f) for i, f in enumerate(frames))
    table = TopicTable()
    plain = feed_all(FrameDecoder(table, payload_bytes=CAP), stream, cuts, None)
    first = feed_all(FrameDecoder(table, payload_bytes=CAP), stream, cuts, URGENT)
    assert first[1].tolist() == plain[1].tolist()
    assert first[2] == plain[2]
    for name in COMPARED:
        assert first[0][name].tolist() == plain[0][name].tolist(), name
    for handed in first[3]:  # each handover: urgent frames only, in frame order
        assert handed == sorted(handed)


def test_a_read_of_mixed_priorities_hands_over_its_urgent_frames_first():
    table = TopicTable()
    dec = FrameDecoder(table, payload_bytes=CAP)
    prios = [0, 4, 2, 3, 1, 4] * 10
    stream = b"".join(encode_v2(f"t{p}", b"x" * 8, p, i + 1) for i, p in enumerate(prios))
    handed = []
    recs, idx, errs = dec.feed_indexed(stream, URGENT, lambda r, i: handed.append((r.copy(), i.copy())))
    assert len(handed) == 1 and errs == []
    urgent_idx = [i + 1 for i, p in enumerate(prios) if p >= 3]
    assert handed[0][1].tolist() == urgent_idx
    assert handed[0][0]["event_id"].tolist() == urgent_idx
    assert idx.tolist() == [i + 1 for i, p in enumerate(prios) if p < 3]
    assert recs["event_id"].tolist() == idx.tolist()
    assert int(handed[0][0]["ingest_ts"].max()) < int(recs["ingest_ts"].min())  # decoded before the rest
    assert dec.frames_seen == len(prios)

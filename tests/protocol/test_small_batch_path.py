"""The per-frame struct path for a few frames decodes exactly like the vectorized path."""

from __future__ import annotations

import random

import numpy as np
import pytest

from eventstream.core.topics import TopicTable
from eventstream.protocol import decoder as decmod
from eventstream.protocol import framing
from eventstream.protocol.decoder import FrameDecoder, decode_frames
from eventstream.protocol.framing import scan
from eventstream.protocol.frames import encode_v1, encode_v2


def frames(rng: random.Random, n: int) -> bytes:
    out = b""
    for i in range(n):
        topic = rng.choice(["a", "orders.eu", "t" * 255, "ü-topic"])
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 17, 64])))
        if rng.random() < 0.5:
            out += encode_v1(topic, payload, rng.randrange(5))
        else:
            out += encode_v2(topic, payload, rng.randrange(5), rng.randrange(1, 2**64), rng.randrange(2**63))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_small_path_equals_vectorized_path(seed, monkeypatch):
    rng = random.Random(seed)
    n = rng.randint(1, framing.SMALL_BATCH)
    data = frames(rng, n)
    topics = TopicTable()
    dec = FrameDecoder(topics, payload_bytes=64, conn_id=7)
    offs, lens, pos, fatal = scan(data, 0, len(data), 1 << 20)
    assert fatal is None and pos == len(data) and len(offs) == n
    small = decode_frames(dec, data, offs, lens, 1, ingest_ts=123)
    monkeypatch.setattr(decmod, "SMALL_BATCH", 0)
    monkeypatch.setattr(framing, "SMALL_BATCH", 0)
    offs2, lens2, pos2, fatal2 = scan(data, 0, len(data), 1 << 20)
    assert (offs2, lens2, pos2, fatal2) == (offs, lens, pos, fatal)
    big = decode_frames(dec, data, offs, lens, 1, ingest_ts=123)
    assert small[0].tobytes() == big[0].tobytes()
    assert np.array_equal(small[1], big[1]) and small[2] == big[2] == []


def test_small_batch_with_a_bad_frame_reports_it_like_the_vectorized_path():
    topics = TopicTable()
    bad = bytearray(encode_v2("t", b"payload", 2, 9, 1))
    bad[-1] ^= 0xFF  # payload no longer matches the CRC
    data = encode_v1("t", b"x", 1) + bytes(bad) + encode_v1("t", b"y", 3)
    recs, errors = FrameDecoder(topics, payload_bytes=64).feed(data)
    assert [bytes(r["payload"][: r["payload_len"]]) for r in recs] == [b"x", b"y"]
    assert len(errors) == 1 and errors[0].index == 2 and errors[0].error_class == "crc" and not errors[0].fatal

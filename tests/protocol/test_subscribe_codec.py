"""protocol/subscribe.py: the bytes of docs/protocol.md's examples, incremental decoding, field errors."""

from __future__ import annotations

import pytest

from eventstream.protocol import subscribe as sp


def hx(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_the_documented_examples():
    assert sp.encode_subscribe("orders.*", sp.START_OFFSET, 1200, 1000, "billing") == hx(
        "00 00 00 29 e5 05 00 02 00 00 00 00 00 00 04 b0 00 00 00 00 00 00 03 e8 00 08 5c 24 38 73"
        "6f 72 64 65 72 73 2e 2a 62 69 6c 6c 69 6e 67")
    assert sp.encode_credit(500) == hx("00 00 00 1a e5 06 00 00 00 00 00 00 00 00 01 f4" + " 00" * 14)
    assert sp.encode_deliver(1200, b"orders.eu", b"hi", event_id=42, priority=3, producer_ts=1700000000000000000,
                             stored_ns=1700000000000500000) == hx(
        "00 00 00 35 e5 07 03 00 00 00 00 00 00 00 00 2a 17 97 9c fe 36 2a 00 00 00 09 7e 68 ce f7"
        "6f 72 64 65 72 73 2e 65 75 00 00 00 00 00 00 04 b0 17 97 9c fe 36 31 a1 20 68 69")
    assert sp.encode_commit(250) == hx("00 00 00 1a e5 08 00 00 00 00 00 00 00 00 00 fa" + " 00" * 14)
    assert sp.encode_end(1300) == hx("00 00 00 1a e5 0a 00 00 00 00 00 00 00 00 05 14" + " 00" * 14)


def test_decoding_byte_by_byte_and_round_trips():
    data = (sp.encode_deliver(7, b"t", b"payload", event_id=9, priority=4, producer_ts=5, stored_ns=6)
            + sp.encode_commit(3) + sp.encode_end(8) + sp.encode_sub_error("why"))
    dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 20)
    frames = []
    for i in range(len(data)):
        frames += dec.feed(data[i:i + 1])
    assert [f.kind for f in frames] == [sp.KIND_DELIVER, sp.KIND_COMMIT, sp.KIND_END, sp.KIND_SUB_ERROR]
    assert sp.parse_deliver(frames[0]) == sp.Delivered(7, "t", b"payload", 9, 4, 5, 6)
    assert frames[1].event_id == 3 and frames[2].event_id == 8 and frames[3].payload == b"why"
    sub = sp.parse_subscribe(sp.SubscribeDecoder(sp.CLIENT_KINDS, 4096).feed(
        sp.encode_subscribe("a.*", sp.START_TIME, 123, 10, "g-1", follow=False))[0], 100)
    assert sub == sp.Subscribe("a.*", sp.START_TIME, 123, 10, "g-1", follow=False)
    assert sub.matches("a.b") and not sub.matches("b.a")


def test_parse_start():
    assert sp.parse_start("earliest") == (sp.START_EARLIEST, 0)
    assert sp.parse_start("latest") == (sp.START_LATEST, 0)
    assert sp.parse_start("1200") == (sp.START_OFFSET, 1200)
    assert sp.parse_start("17ns") == (sp.START_TIME, 17)
    assert sp.parse_start("1970-01-01T00:00:01Z") == (sp.START_TIME, 1_000_000_000)
    with pytest.raises(ValueError, match="allowed: earliest, latest, an offset"):
        sp.parse_start("soon")


@pytest.mark.parametrize("call, expect", [
    (lambda: sp.encode_subscribe(""), "topic glob of 0 bytes is not allowed"),
    (lambda: sp.encode_subscribe("t", start=7), "start 7 is not allowed"),
    (lambda: sp.encode_subscribe("t", group="g" * 129), "group name of 129 bytes is not allowed"),
    (lambda: sp.encode_credit(0), "credit 0 is not allowed"),
])
def test_encoders_refuse_bad_fields(call, expect):
    with pytest.raises(sp.SubscribeProtocolError, match=expect):
        call()

"""The ACK bookkeeping of a connection, without sockets: records placed -> chunks with completion
marks -> the NACK and ACK bytes due, over real rings (a processor's release is what completes a mark)."""

from __future__ import annotations

import numpy as np

from eventstream.core.records import record_dtype
from eventstream.core.ring import MpscRing
from eventstream.ingest.connection import Connection
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_ack, encode_nack, split_control_frames

DTYPE = record_dtype(16)


def conn(v2: bool = True) -> Connection:
    c = Connection(None, 1, ("127.0.0.1", 1), None, 0.0, 1.0)
    c.v2 = v2
    return c


def place(c: Connection, ring: MpscRing, n: int, nacks: bytes = b"", ts: int = 1) -> None:
    """What a read does: n records placed in `ring` (their mark kept), NACKs of its rejected frames."""
    k, end = ring.try_put(np.zeros(n, dtype=DTYPE))
    assert k == n
    c.accepted += n
    c.open_marks.append((ring, end))
    c.open_nacks += nacks
    c.open_ts = ts


def consume(ring: MpscRing, n: int) -> None:
    """A processor: poll n records, release them (stored)."""
    views = ring.poll(n)
    assert sum(len(v) for v in views) == n
    ring.release(n)


def frames(data: bytes) -> list[tuple[int, int]]:
    return [(kind, value) for kind, value, _ in split_control_frames(bytearray(data))]


def test_nothing_is_due_until_the_processor_released_the_records():
    ring = MpscRing(64, DTYPE)
    try:
        c = conn()
        place(c, ring, 3)
        assert c.end_chunk()
        assert c.take_due() == (b"", [])
        consume(ring, 2)
        assert c.take_due() == (b"", [])  # one record of the chunk is not stored yet
        consume(ring, 1)
        data, done = c.take_due()
        assert data == encode_ack(3) and done == [(3, 1)] and c.acked == 3 and not c.chunks
        assert c.take_due() == (b"", [])  # an ACK is sent once
    finally:
        ring.close()


def test_chunks_complete_in_order_and_one_cumulative_ack_covers_them():
    slow, fast = MpscRing(64, DTYPE), MpscRing(64, DTYPE)
    try:
        c = conn()
        place(c, slow, 2, nacks=encode_nack(3, "crc"))
        c.end_chunk()
        place(c, fast, 4, nacks=encode_nack(8, "topic"))
        c.end_chunk()
        consume(fast, 4)
        assert c.take_due() == (b"", [])  # the second chunk is done, but the first is not
        consume(slow, 2)
        data, done = c.take_due()
        assert frames(data) == [(KIND_NACK, 3), (KIND_NACK, 8), (KIND_ACK, 6)]  # NACKs first, in frame order
        assert done == [(2, 1), (4, 1)]
    finally:
        slow.close()
        fast.close()


def test_accepted_mode_and_refused_only_chunks_are_due_at_once():
    c = conn()
    c.accepted += 5  # ack=accepted records carry no marks
    assert c.end_chunk()
    assert c.take_due()[0] == encode_ack(5)
    c.open_nacks += encode_nack(6, "crc")  # a read whose only frame was refused: no new ACK
    assert c.end_chunk()
    assert frames(c.take_due()[0]) == [(KIND_NACK, 6)]
    assert not c.end_chunk()  # nothing new: no empty chunk


def test_v1_connections_get_no_acks():
    c = conn(v2=False)
    c.accepted += 3
    assert not c.end_chunk() and not c.chunks

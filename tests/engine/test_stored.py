"""engine/stored.py: the `stored` barrier over real rings (a processor's release passes a mark)."""

from __future__ import annotations

import threading

import numpy as np

from eventstream.core.records import record_dtype
from eventstream.core.ring import MpscRing
from eventstream.engine.stored import Stored, done

DTYPE = record_dtype(16)


def put(ring: MpscRing, n: int) -> tuple[MpscRing, int]:
    k, end = ring.try_put(np.zeros(n, dtype=DTYPE))
    assert k == n
    return ring, end


def release(ring: MpscRing, n: int) -> None:
    views = ring.poll(n)
    assert sum(len(v) for v in views) == n
    ring.release(n)


def test_done_needs_every_mark_passed():
    a, b = MpscRing(64, DTYPE), MpscRing(64, DTYPE)
    try:
        marks = [put(a, 3), put(b, 2)]
        assert not done(marks)
        release(a, 3)
        assert not done(marks)
        release(b, 2)
        assert done(marks) and done([])
    finally:
        a.close()
        b.close()


def test_wait_returns_when_a_release_advances_and_times_out_otherwise():
    ring, stored = MpscRing(64, DTYPE), Stored()
    try:
        marks = [put(ring, 4)]
        assert stored.wait(marks, 0.05) is False  # nothing released: a bounded wait says so
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(stored.wait(marks, 30)))
        waiter.start()
        release(ring, 4)
        stored.advance()  # what a processor does after each release
        waiter.join(30)
        assert got == [True]
    finally:
        ring.close()


def test_every_follower_is_woken_until_it_unfollows():
    stored = Stored()
    calls: list[str] = []
    ev = threading.Event()
    stored.follow(lambda: calls.append("ack writer"), key="acks")
    stored.register(ev)  # storage/tail.py's Progress interface: subscribe tails and flows
    stored.advance()
    assert calls == ["ack writer"] and ev.is_set()
    stored.unfollow("acks")
    stored.unregister(ev)
    ev.clear()
    stored.bump()
    assert calls == ["ack writer"] and not ev.is_set() and stored.advances == 2

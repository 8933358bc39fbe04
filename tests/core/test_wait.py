"""Blocking wait strategy: a parked consumer is woken by the producer's signal, never by its safety
slice (no lost wakeup between `parked` and the cursor; see core/wait.py)."""

from __future__ import annotations

import threading
import time

from core_helpers import SMALL_DTYPE, make_batch

from eventstream.core.ring import MpscRing
from eventstream.core.wait import Blocking

ROUNDS = 3000
POLL_TIMEOUT_S = 5.0  # a lost wakeup makes one poll wait this long (slices are longer still)


def _poll_one(ring: MpscRing, wait: Blocking) -> tuple:
    """What a processor does: park on the ring's wait strategy until it holds records, then poll.

    `depth` counts claimed records, so the wait can end while the producer is still between its
    claim and its publish: poll again then, as a processor's loop does (it goes round once more).
    """
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        wait.wait_for(lambda: ring.depth > 0, max(0.0, deadline - time.monotonic()))
        views = ring.poll(1)
        if views or time.monotonic() >= deadline:
            return views


def _pong(inbox: MpscRing, outbox: MpscRing, wait: Blocking, stop: threading.Event) -> None:
    while not stop.is_set():
        views = _poll_one(inbox, wait)
        if views:
            rec = views[0].copy()
            inbox.release(1)
            assert outbox.try_put(rec)[0] == 1


def test_ping_pong_through_parked_consumers_never_misses_a_signal():
    # no spinning or yielding first: every wait parks, so every handoff races a park against a signal
    wa, wb = Blocking(spins=0, yields=0, park_slice=60.0), Blocking(spins=0, yields=0, park_slice=60.0)
    with MpscRing(8, SMALL_DTYPE, wait=wa) as ping, MpscRing(8, SMALL_DTYPE, wait=wb) as pong:
        stop = threading.Event()
        t = threading.Thread(target=_pong, args=(ping, pong, wa, stop), daemon=True)
        t.start()
        got = []
        try:
            for i in range(ROUNDS):
                assert ping.try_put(make_batch(1, i, 1))[0] == 1
                views = _poll_one(pong, wb)
                assert views, f"round {i}: no reply within {POLL_TIMEOUT_S} s"
                got.append(int(views[0]["seq"][0]))
                pong.release(1)
                assert wa.late_wakeups == 0 and wb.late_wakeups == 0, f"round {i}: a park ended without its signal"
        finally:
            stop.set()
            ping.try_put(make_batch(1, 0, 1))  # wakes the other thread if it is parked
            t.join(10)
    assert not t.is_alive()
    assert got == list(range(ROUNDS))  # every round trip, in order


def test_a_waiter_parks_instead_of_polling_and_wakes_on_signal():
    w = Blocking(spins=0, yields=0, park_slice=60.0)
    flag = threading.Event()
    parked = threading.Event()
    result = []

    def waiter():
        def ready():
            if w.parked:
                parked.set()
            return flag.is_set()
        result.append(w.wait_for(ready, 30.0))

    t = threading.Thread(target=waiter)
    t.start()
    assert parked.wait(10)
    flag.set()
    w.signal()
    t.join(10)
    assert result == [True] and w.late_wakeups == 0

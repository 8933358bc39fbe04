"""MpscRing: try_put of what fits, poll/release of views, wraparound, and real concurrency."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from core_helpers import SMALL_DTYPE, checksum, make_batch

from eventstream.core import arena as arena_mod
from eventstream.core.records import EVENT_DTYPE, empty
from eventstream.core.ring import MpscRing, RingClosed
from eventstream.core.wait import Blocking


def seqs(views) -> list[int]:
    return [int(s) for v in views for s in v["seq"]]


def put(ring: MpscRing, records: np.ndarray) -> int:
    n, _end = ring.try_put(records)
    return n


def test_defaults_and_validation():
    with MpscRing() as r:
        assert r.capacity == 65536 and r.dtype == EVENT_DTYPE
    with pytest.raises(ValueError, match="power of two"):
        MpscRing(1000)
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        with pytest.raises(TypeError, match="dtype"):
            r.try_put(empty(2))
        with pytest.raises(ValueError, match="allowed: >= 1"):
            r.poll(0)


def test_empty_poll_and_release_bounds():
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        assert r.poll() == ()
        assert len(r.take()) == 0
        with pytest.raises(ValueError, match="release"):
            r.release(1)
        put(r, make_batch(0, 0, 3))
        assert len(r.poll(2)[0]) == 2
        with pytest.raises(ValueError, match=r"allowed: 0..2"):
            r.release(3)


def test_wraparound_keeps_order_and_counts():
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        got, nxt = [], 0
        for step in range(40):
            n = 1 + step % 5
            assert put(r, make_batch(0, nxt, n)) == n
            nxt += n
            views = r.poll(3 + step % 4)
            got += seqs(views)
            r.release(sum(len(v) for v in views))
        got += seqs([r.take()])
        assert got == list(range(nxt))
        assert r.completed() == nxt and r.depth == 0 and r.drained()


def test_poll_returns_two_views_when_wrapping():
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        put(r, make_batch(0, 0, 6))
        r.take(6)
        put(r, make_batch(0, 6, 5))
        views = r.poll()
        assert len(views) == 2 and seqs(views) == [6, 7, 8, 9, 10]
        assert all(v.base is not None for v in views)  # views into the ring, not copies
        r.release(2)
        assert seqs(r.poll()) == [8, 9, 10]


def test_try_put_takes_the_prefix_that_fits_and_says_where_it_ends():
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        assert r.try_put(make_batch(0, 0, 5)) == (5, 5)
        assert r.try_put(make_batch(0, 5, 6)) == (3, 8)  # full: the first 3 went in
        assert r.try_put(make_batch(0, 8, 1)) == (0, 0)
        assert r.depth == 8 and not r.drained()
        assert seqs(r.poll(4)) == [0, 1, 2, 3]
        r.release(4)
        assert r.completed() == 4 < 5  # the first batch's mark (end 5) is not passed yet
        assert r.try_put(make_batch(0, 8, 30)) == (4, 12)  # room made by the release
        assert seqs([r.take()]) == [4, 5, 6, 7, 8, 9, 10, 11]
        assert r.completed() == 12 and r.drained()


def test_a_batch_larger_than_the_ring_goes_in_as_far_as_it_fits():
    with MpscRing(8, dtype=SMALL_DTYPE) as r:
        r.try_put(make_batch(0, 0, 3))
        r.take()
        assert r.try_put(make_batch(0, 3, 20)) == (8, 11)  # wraps the ring within one call
        assert seqs([r.take()]) == list(range(3, 11))


def test_close_frees_memory_and_refuses_afterwards():
    before = arena_mod.live_arenas()
    r = MpscRing(16)
    assert arena_mod.live_arenas() == before + 1
    rec = empty(1)
    rec["seq"] = 7
    assert put(r, rec) == 1
    assert r.take()["seq"].tolist() == [7]
    r.close()
    r.close()
    assert arena_mod.live_arenas() == before
    with pytest.raises(RingClosed):
        r.try_put(rec)
    with pytest.raises(RingClosed):
        r.poll()


def test_rings_share_a_caller_arena():
    with arena_mod.Arena(1 << 20, name="shared") as a:
        r1 = MpscRing(64, SMALL_DTYPE, arena=a)
        r2 = MpscRing(64, SMALL_DTYPE, arena=a)
        put(r1, make_batch(1, 0, 3))
        put(r2, make_batch(2, 0, 4))
        assert len(r1.take()) == 3 and len(r2.take()) == 4
        r1.close()
        r2.close()
        assert not a.closed  # the caller owns it
        assert a.nodes()["used_bytes"] > 0


# -- concurrency ----------------------------------------------------------------------------------------


def _transfer(workers, ring: MpscRing, producers: int, per_producer: int, batch: int) -> None:
    """Move records from `producers` threads to one consumer and check every one of them: producers
    put again what did not fit (as the engine's edge holds it), so nothing is lost or reordered."""
    next_seq = [0] * producers
    done = [False] * producers
    total = producers * per_producer

    def produce(pid: int):
        def run():
            sent = 0
            while sent < per_producer and not workers.stop.is_set():
                n = min(batch, per_producer - sent)
                k = put(ring, make_batch(pid, sent, n))
                if k == 0:
                    os.sched_yield()
                sent += k
            done[pid] = True

        return run

    got = [0]

    def consume():
        deadline = time.monotonic() + 110
        while not workers.stop.is_set() and time.monotonic() < deadline:
            views = ring.poll(4096)
            if not views:
                if all(done) and ring.depth == 0:
                    return
                os.sched_yield()
                continue
            for v in views:
                conn, seq = v["conn_id"], v["seq"]
                assert (v["event_id"] == checksum(conn, seq)).all(), "checksum mismatch"
                for pid in np.unique(conn):
                    s = seq[conn == pid]
                    assert s[0] == next_seq[pid], f"producer {pid}: expected {next_seq[pid]}, got {s[0]}"
                    assert (np.diff(s.astype(np.int64)) == 1).all(), f"producer {pid}: gap or reorder"
                    next_seq[pid] = int(s[-1]) + 1
                got[0] += len(v)
            ring.release(sum(len(v) for v in views))
        raise AssertionError("consumer ran out of time")

    workers.start(consume, "consumer", len(workers.threads) + 1)
    for pid in range(producers):
        workers.start(produce(pid), f"producer-{pid}", pid)
    workers.join(120)
    assert got[0] == total and ring.completed() == total and ring.depth == 0 and ring.drained()
    assert next_seq == [per_producer] * producers


@pytest.mark.slow
@pytest.mark.parametrize("producers", [1, 2, 4])
def test_mpsc_moves_a_million_records(workers, producers):
    with MpscRing(16384, SMALL_DTYPE) as r:
        _transfer(workers, r, producers, 1_000_000 // producers + 1, 384)


def test_mpsc_small_ring_odd_batches(workers):
    with MpscRing(64, SMALL_DTYPE) as r:
        _transfer(workers, r, 3, 20_000, 37)


def test_constructor_failure_frees_the_ring_arena(monkeypatch):
    from eventstream.core import atomic

    before = arena_mod.live_arenas()

    def broken(*a, **k):
        raise RuntimeError("cells unavailable")

    monkeypatch.setattr(atomic, "CellBlock", broken)
    with pytest.raises(RuntimeError, match="cells unavailable"):
        MpscRing(64, SMALL_DTYPE)
    assert arena_mod.live_arenas() == before


def test_too_small_caller_arena_is_a_clear_error():
    with arena_mod.Arena(4096) as a, pytest.raises(arena_mod.ArenaFull, match="make the arena larger"):
        MpscRing(1024, EVENT_DTYPE, arena=a)


def test_cycles_of_rings_do_not_leak():
    before = (arena_mod.live_arenas(), arena_mod.live_bytes())
    for i in range(50):
        with MpscRing(256, SMALL_DTYPE) as r:
            put(r, make_batch(0, i, 10))
            assert len(r.take()) == 10
    assert (arena_mod.live_arenas(), arena_mod.live_bytes()) == before


def test_a_publish_wakes_a_consumer_parked_on_the_rings_blocking_wait():
    """The engine's processors park on their queue's wait strategy until a ring has records; the
    ring signals it after every publish."""
    ring = MpscRing(64, SMALL_DTYPE, wait="block")
    try:
        wait = ring._wait
        assert isinstance(wait, Blocking)
        assert not wait.wait_for(lambda: ring.depth > 0, 0.01)  # nothing published: False at the deadline
        got = {}
        started = threading.Event()

        def consumer():
            started.set()
            got["woken"] = wait.wait_for(lambda: ring.depth > 0, 30.0)
            views = ring.poll(8)
            got["n"] = sum(len(v) for v in views)
            ring.release(got["n"])

        t = threading.Thread(target=consumer)
        t.start()
        started.wait(10)
        assert put(ring, make_batch(1, 0, 3)) == 3
        t.join(30)
        assert not t.is_alive() and got == {"woken": True, "n": 3}
        with pytest.raises(ValueError, match="allowed: a number of seconds >= 0"):
            wait.wait_for(lambda: False, -1)
    finally:
        ring.close()

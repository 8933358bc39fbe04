"""Ring buffers: unit behaviour per overflow policy, wraparound, timeouts, and real concurrency."""

from __future__ import annotations

import time

import numpy as np
import pytest
from core_helpers import SMALL_DTYPE, checksum, make_batch

from eventstream.core import arena as arena_mod
from eventstream.core.records import EVENT_DTYPE, empty
from eventstream.core.ring import MpscRing, Overflow, RingClosed, SpscRing
from eventstream.core.wait import BusySpin

RINGS = [SpscRing, MpscRing]


def seqs(views) -> list[int]:
    return [int(s) for v in views for s in v["seq"]]


@pytest.mark.parametrize("cls", RINGS)
def test_defaults_and_validation(cls):
    with cls() as r:
        assert r.capacity == (16384 if cls is SpscRing else 65536)
        assert r.dtype == EVENT_DTYPE and r.overflow is Overflow.BLOCK_PRODUCER
    with pytest.raises(ValueError, match="power of two"):
        cls(1000)
    with pytest.raises(ValueError, match="allowed: DROP_OLD"):
        cls(8, overflow="DROP_SOME")
    assert Overflow["DROP_OLD"] is Overflow.DROP_OLD
    with cls(8, dtype=SMALL_DTYPE) as r, pytest.raises(TypeError, match="dtype"):
        r.put_batch(empty(2))


@pytest.mark.parametrize("cls", RINGS)
def test_empty_poll_and_timeout(cls):
    with cls(8, dtype=SMALL_DTYPE) as r:
        assert r.poll() == ()
        t0 = time.monotonic()
        assert r.poll(timeout=0.05) == ()
        assert time.monotonic() - t0 >= 0.04
        assert len(r.take()) == 0
        with pytest.raises(ValueError, match="release"):
            r.release(1)


@pytest.mark.parametrize("cls", RINGS)
@pytest.mark.parametrize("overflow", list(Overflow))
def test_wraparound_keeps_order(cls, overflow):
    with cls(8, dtype=SMALL_DTYPE, overflow=overflow) as r:
        got, nxt = [], 0
        for step in range(40):
            n = 1 + step % 5
            assert len(r.put_batch(make_batch(0, nxt, n))) == 0
            nxt += n
            views = r.poll(3 + step % 4)
            got += seqs(views)
            r.release(sum(len(v) for v in views))
        got += seqs([r.take()])
        assert got == list(range(nxt))
        st = r.statistics()
        assert st["claimed"] == st["published"] == st["consumed"] == nxt and st["dropped"] == 0
        assert st["depth"] == 0


@pytest.mark.parametrize("cls", RINGS)
def test_poll_returns_two_views_when_wrapping(cls):
    with cls(8, dtype=SMALL_DTYPE) as r:
        r.put_batch(make_batch(0, 0, 6))
        r.take(6)
        r.put_batch(make_batch(0, 6, 5))
        views = r.poll()
        assert len(views) == 2 and seqs(views) == [6, 7, 8, 9, 10]
        assert all(v.base is not None for v in views)  # views into the ring, not copies
        r.release(2)
        assert seqs(r.poll()) == [8, 9, 10]


@pytest.mark.parametrize("cls", RINGS)
def test_drop_new_returns_overflow(cls):
    with cls(8, dtype=SMALL_DTYPE, overflow="DROP_NEW") as r:
        rest = r.put_batch(make_batch(0, 0, 11))
        assert rest["seq"].tolist() == [8, 9, 10]
        assert not r.put(make_batch(0, 11, 1)[0])
        st = r.statistics()
        assert st["dropped"] == st["rejected"] == 4 and st["depth"] == 8 and st["published"] == 8
        assert seqs([r.take()]) == list(range(8))


@pytest.mark.parametrize("cls", RINGS)
def test_block_producer_times_out_and_returns_rest(cls):
    with cls(8, dtype=SMALL_DTYPE, overflow="BLOCK_PRODUCER", block_timeout=0.05, wait=BusySpin()) as r:
        t0 = time.monotonic()
        rest = r.put_batch(make_batch(0, 0, 10))
        assert time.monotonic() - t0 >= 0.04
        assert rest["seq"].tolist() == [8, 9]
        assert r.statistics()["rejected"] == 2


@pytest.mark.parametrize("cls", RINGS)
def test_block_producer_waits_for_consumer(cls, workers):
    with cls(8, dtype=SMALL_DTYPE, block_timeout=30.0) as r:
        got = []

        def consume():
            while len(got) < 100 and not workers.stop.is_set():
                got.extend(seqs([r.take(4, timeout=0.5)]))

        workers.start(consume, "consumer", 1)
        assert len(r.put_batch(make_batch(0, 0, 100))) == 0
        workers.join(60)
        assert got == list(range(100))


@pytest.mark.parametrize("cls", RINGS)
def test_drop_old_evicts_oldest_and_returns_them(cls):
    dropped = []
    with cls(8, dtype=SMALL_DTYPE, overflow="DROP_OLD", on_drop=dropped.append) as r:
        assert len(r.put_batch(make_batch(0, 0, 6))) == 0
        ev = r.put_batch(make_batch(0, 6, 5))
        assert ev["seq"].tolist() == [0, 1, 2]
        ev = r.put_batch(make_batch(0, 11, 20))  # more than the capacity: earlier new ones are evicted too
        assert ev["seq"].tolist() == list(range(3, 23))
        assert r.put(make_batch(0, 31, 1)[0])
        assert [int(s) for d in dropped for s in d["seq"]] == [23]
        assert seqs([r.take()]) == list(range(24, 32))
        st = r.statistics()
        assert st["evicted"] == 24 and st["consumed"] == 8 and st["published"] == 32 and st["depth"] == 0


@pytest.mark.parametrize("cls", RINGS)
def test_drop_old_never_evicts_held_records(cls):
    with cls(8, dtype=SMALL_DTYPE, overflow="DROP_OLD", block_timeout=0.05) as r:
        r.put_batch(make_batch(0, 0, 8))
        views = r.poll(3)  # the consumer holds 0..2
        # full, consumer holds a range: producer waits for the release, then hands the new ones back
        rest = r.put_batch(make_batch(0, 8, 2))
        assert rest["seq"].tolist() == [8, 9]
        assert seqs(views) == [0, 1, 2]
        r.release(3)
        ev = r.put_batch(make_batch(0, 10, 4))  # 3 free slots + 1 eviction
        assert ev["seq"].tolist() == [3]
        assert seqs([r.take()]) == [4, 5, 6, 7, 10, 11, 12, 13]


def test_put_single_and_close_frees_memory():
    before = arena_mod.live_arenas()
    r = SpscRing(16)
    assert arena_mod.live_arenas() == before + 1
    rec = empty(1)[0]
    rec["seq"] = 7
    assert r.put(rec)
    assert r.take()["seq"].tolist() == [7]
    r.close()
    r.close()
    assert arena_mod.live_arenas() == before
    with pytest.raises(RingClosed):
        r.put(rec)


def test_rings_share_a_caller_arena():
    with arena_mod.Arena(1 << 20, name="shared") as a:
        r1 = SpscRing(64, SMALL_DTYPE, arena=a)
        r2 = MpscRing(64, SMALL_DTYPE, arena=a)
        r1.put_batch(make_batch(1, 0, 3))
        r2.put_batch(make_batch(2, 0, 4))
        assert len(r1.take()) == 3 and len(r2.take()) == 4
        r1.close()
        r2.close()
        assert not a.closed  # the caller owns it
        assert a.nodes()["used_bytes"] > 0


# -- concurrency ----------------------------------------------------------------------------------------

def _transfer(workers, ring, producers: int, per_producer: int, batch: int, overflow_ok: bool = False):
    """Move records from `producers` threads to one consumer and check every one of them."""
    next_seq = [0] * producers
    done = [False] * producers
    dropped: list[np.ndarray] = []
    total = producers * per_producer

    def produce(pid: int):
        def run():
            sent = 0
            while sent < per_producer and not workers.stop.is_set():
                n = min(batch, per_producer - sent)
                rest = ring.put_batch(make_batch(pid, sent, n))
                if len(rest):
                    assert overflow_ok, f"producer {pid}: {len(rest)} records refused"
                    dropped.append(rest)
                sent += n
            done[pid] = True
        return run

    got = [0]

    def consume():
        deadline = time.monotonic() + 110
        while not workers.stop.is_set() and time.monotonic() < deadline:
            views = ring.poll(4096, timeout=0.2)
            if not views:
                if all(done) and ring.depth == 0:
                    return
                continue
            for v in views:
                conn, seq = v["conn_id"], v["seq"]
                assert (v["event_id"] == checksum(conn, seq)).all(), "checksum mismatch"
                for pid in np.unique(conn):
                    s = seq[conn == pid]
                    if not overflow_ok:
                        assert s[0] == next_seq[pid], f"producer {pid}: expected {next_seq[pid]}, got {s[0]}"
                        assert (np.diff(s.astype(np.int64)) == 1).all(), f"producer {pid}: gap or reorder"
                    else:
                        assert s[0] >= next_seq[pid] and (np.diff(s.astype(np.int64)) > 0).all()
                    next_seq[pid] = int(s[-1]) + 1
                got[0] += len(v)
            ring.release(sum(len(v) for v in views))
        raise AssertionError("consumer ran out of time")

    workers.start(consume, "consumer", len(workers.threads) + 1)
    for pid in range(producers):
        workers.start(produce(pid), f"producer-{pid}", pid)
    workers.join(120)
    st = ring.statistics()
    n_dropped = sum(len(d) for d in dropped)
    assert got[0] + n_dropped == total
    assert st["consumed"] == got[0] and st["dropped"] == n_dropped and st["depth"] == 0
    if not overflow_ok:
        assert next_seq == [per_producer] * producers and st["published"] == total
    return dropped


@pytest.mark.slow
def test_spsc_moves_a_million_records(workers):
    with SpscRing(16384, SMALL_DTYPE, block_timeout=30.0) as r:
        _transfer(workers, r, 1, 1_000_000, 512)


@pytest.mark.slow
@pytest.mark.parametrize("producers", [2, 4])
def test_mpsc_moves_a_million_records(workers, producers):
    with MpscRing(16384, SMALL_DTYPE, block_timeout=30.0) as r:
        _transfer(workers, r, producers, 1_000_000 // producers + 1, 384)


def test_mpsc_small_ring_odd_batches(workers):
    with MpscRing(64, SMALL_DTYPE, block_timeout=30.0) as r:
        _transfer(workers, r, 3, 20_000, 37)


@pytest.mark.parametrize("cls", RINGS)
def test_drop_old_under_concurrency_loses_nothing(workers, cls):
    """Producers outrun the consumer: every record is either consumed or returned, exactly once."""
    producers = 1 if cls is SpscRing else 2
    with cls(256, SMALL_DTYPE, overflow="DROP_OLD", block_timeout=30.0) as r:
        dropped = _transfer(workers, r, producers, 100_000, 64, overflow_ok=True)
    # evicted records came back in order per producer, and consumed + evicted is exactly all of them
    for pid in range(producers):
        ev = np.concatenate([d["seq"][d["conn_id"] == pid] for d in dropped]) if dropped else np.empty(0)
        assert len(np.unique(ev)) == len(ev)


def test_drop_old_held_view_is_not_overwritten(workers):
    with MpscRing(64, SMALL_DTYPE, overflow="DROP_OLD", block_timeout=0.01) as r:
        r.put_batch(make_batch(0, 0, 64))
        views = r.poll(32)
        snapshot = np.concatenate(views).copy()
        progress = [0]

        def hammer():
            for i in range(200):
                r.put_batch(make_batch(1, i * 16, 16))
                progress[0] += 1

        workers.start(hammer, "producer", 0)
        workers.join(60)
        assert progress[0] == 200
        assert (np.concatenate(views) == snapshot).all()
        r.release(32)


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
        SpscRing(1024, EVENT_DTYPE, arena=a)


@pytest.mark.parametrize("cls", RINGS)
def test_cycles_of_rings_do_not_leak(cls):
    before = (arena_mod.live_arenas(), arena_mod.live_bytes())
    for i in range(50):
        with cls(256, SMALL_DTYPE) as r:
            r.put_batch(make_batch(0, i, 10))
            assert len(r.take()) == 10
    assert (arena_mod.live_arenas(), arena_mod.live_bytes()) == before


def test_blocking_wait_is_woken_by_a_publish_and_honours_its_timeout():
    import threading

    from eventstream.core.ring import SpscRing
    from eventstream.core.wait import Blocking

    ring = SpscRing(64, SMALL_DTYPE, wait="block")
    try:
        assert isinstance(ring._wait, Blocking)
        assert ring.poll(8, 0.01) == ()  # nothing published: returns at the deadline
        got = {}
        started = threading.Event()

        def consumer():
            started.set()
            views = ring.poll(8, 30.0)
            got["n"] = sum(len(v) for v in views)
            ring.release(got["n"])

        t = threading.Thread(target=consumer)
        t.start()
        started.wait(10)
        assert len(ring.put_batch(make_batch(1, 0, 3))) == 0
        t.join(30)
        assert not t.is_alive() and got["n"] == 3
        with pytest.raises(ValueError, match="allowed: a number of seconds >= 0"):
            ring._wait.wait_for(lambda: False, -1)
    finally:
        ring.close()

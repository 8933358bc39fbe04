"""EventPool and Deduplicator: unit behaviour and multi-thread exactly-once guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import SMALL_DTYPE

from eventstream.core.dedup import Deduplicator
from eventstream.core.pool import DoubleRelease, EventPool, PoolExhausted


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- pool -----------------------------------------------------------------------------------------

def test_pool_acquire_release_and_errors():
    with EventPool(4, SMALL_DTYPE) as pool:
        assert pool.free_count == 4 and len(pool.records) == 4
        got = [pool.acquire() for _ in range(4)]
        assert sorted(got) == [0, 1, 2, 3] and pool.free_count == 0
        with pytest.raises(PoolExhausted, match="cannot acquire 1 slot"):
            pool.acquire()
        pool.release(got[1])
        with pytest.raises(DoubleRelease, match=f"slot {got[1]} released twice"):
            pool.release(got[1])
        assert pool.acquire() == got[1]
        with pytest.raises(IndexError, match="allowed: 0..3"):
            pool.release(9)


def test_pool_batch_calls():
    with EventPool(10, SMALL_DTYPE) as pool:
        a = pool.acquire_many(6)
        assert len(set(a.tolist())) == 6 and pool.free_count == 4
        with pytest.raises(PoolExhausted, match="cannot acquire 5"):
            pool.acquire_many(5)
        assert pool.free_count == 4  # all or nothing
        pool.records["seq"][a] = np.arange(6)
        pool.release_many(a[:3])
        with pytest.raises(DoubleRelease, match="released twice"):
            pool.release_many(a[2:4])  # a[2] is free already, a[3] is released anyway
        assert pool.free_count == 8
        b = pool.acquire_many(8)
        assert sorted(set(b.tolist()) | set(a[4:].tolist())) == list(range(10))


def test_pool_from_several_threads(workers):
    with EventPool(256, SMALL_DTYPE) as pool:
        owners = np.full(256, -1)
        rounds = 3000

        def worker(tid):
            def run():
                for i in range(rounds):
                    idxs = pool.acquire_many(3) if i % 2 else np.array([pool.acquire()])
                    for x in idxs.tolist():
                        assert owners[x] == -1, f"slot {x} handed out twice"
                        owners[x] = tid
                    for x in idxs.tolist():
                        owners[x] = -1
                    pool.release_many(idxs) if i % 3 else [pool.release(int(x)) for x in idxs]
            return run

        for tid in range(4):
            workers.start(worker(tid), f"pool-{tid}", tid)
        workers.join(120)
        assert pool.free_count == 256
        assert sorted(pool.acquire_many(256).tolist()) == list(range(256))


# -- dedup ----------------------------------------------------------------------------------------

def test_dedup_seen_commit_and_zero_id():
    clock = FakeClock()
    with Deduplicator(16, window_s=10.0, clock=clock) as d:
        ids = np.array([5, 0, 7, 5], dtype=np.uint64)
        assert d.seen(ids).tolist() == [False] * 4
        d.commit(ids)
        assert d.seen(ids).tolist() == [True, False, True, True]
        assert len(d) == 2
        assert d.admit([5, 9, 0, 9]).tolist() == [False, True, True, False]


def test_dedup_window_expiry_with_fake_clock():
    clock = FakeClock(100.0)
    with Deduplicator(64, window_s=60.0, clock=clock) as d:
        d.commit(np.arange(1, 11, dtype=np.uint64))
        clock.t = 130.0
        d.commit(np.arange(11, 16, dtype=np.uint64))
        clock.t = 159.9
        assert d.seen(np.array([1, 12])).tolist() == [True, True]
        clock.t = 160.0
        assert d.seen(np.array([1, 12])).tolist() == [False, True]
        assert d.admit(np.array([2, 12])).tolist() == [True, False]  # expired id admitted again
        assert d.expire() == 9  # 1, 3..10 (2 was refreshed)
        assert len(d) == 6
        assert d.seen(np.array([2, 3, 11])).tolist() == [True, False, True]
        assert d.statistics()["removed"] == 9


@pytest.mark.parametrize("policy", ["grow", "evict"])
def test_dedup_table_full(policy):
    clock = FakeClock(0.0)
    with Deduplicator(16, window_s=1e6, clock=clock, when_full=policy) as d:
        for i in range(10):
            clock.t = float(i)
            d.commit(np.arange(i * 10 + 1, i * 10 + 11, dtype=np.uint64))
        st = d.statistics()
        if policy == "grow":
            assert st["buckets"] >= 128 and st["grows"] >= 1
            assert d.seen(np.arange(1, 101)).all()
        else:
            assert st["buckets"] == 16 and st["evictions"] >= 1
            assert d.seen(np.arange(91, 101)).all()  # the newest survive
            assert not d.seen(np.arange(1, 11)).any()
            assert len(d) <= 12


def test_dedup_validation():
    with pytest.raises(ValueError, match="power of two"):
        Deduplicator(100)
    with pytest.raises(ValueError, match="allowed: grow, evict"):
        Deduplicator(16, when_full="panic")


def test_dedup_each_id_admitted_exactly_once_across_threads(workers):
    with Deduplicator(1024, window_s=3600.0) as d:
        rng_ids = np.arange(1, 20001, dtype=np.uint64)
        wins = []

        def worker(tid):
            def run():
                rng = np.random.default_rng(tid)
                mine = []
                for _ in range(40):
                    batch = rng.choice(rng_ids, 600)
                    mine.append(batch[d.admit(batch)])
                wins.append(np.concatenate(mine))
            return run

        for tid in range(4):
            workers.start(worker(tid), f"dedup-{tid}", tid)
        workers.join(120)
        all_wins = np.concatenate(wins)
        assert len(np.unique(all_wins)) == len(all_wins), "an id was admitted twice"
        assert d.seen(all_wins).all()
        st = d.statistics()
        assert st["admitted"] == len(all_wins) == len(d) and st["grows"] >= 1


def test_commit_exclusive_matches_commit_and_grows():
    clock = {"t": 100.0}
    a = Deduplicator(16, 10.0, clock=lambda: clock["t"])
    b = Deduplicator(16, 10.0, clock=lambda: clock["t"])
    try:
        rng = np.random.default_rng(3)
        for _ in range(20):
            ids = rng.integers(0, 500, size=int(rng.integers(1, 200)), dtype=np.uint64)
            a.commit(ids)
            b.commit_exclusive(ids)
            probe = np.arange(0, 600, dtype=np.uint64)
            assert np.array_equal(a.seen(probe), b.seen(probe))
            assert len(a) == len(b)
            clock["t"] += 1.0
        assert b.statistics()["grows"] >= 1
        clock["t"] += 100.0  # everything expired
        assert not b.seen(np.arange(1, 600, dtype=np.uint64)).any()
    finally:
        a.close()
        b.close()


def test_exclusive_small_and_vectorized_paths_agree():
    import random

    from eventstream.core.dedup import SMALL, Deduplicator

    rng = random.Random(11)
    clock = [1000.0]
    small = Deduplicator(16, 10.0, clock=lambda: clock[0])
    big = Deduplicator(16, 10.0, clock=lambda: clock[0])
    universe = [rng.getrandbits(64) for _ in range(300)] + [0]
    for _ in range(400):
        batch = np.array([rng.choice(universe) for _ in range(rng.randint(1, SMALL))], dtype=np.uint64)
        # the same ids through the plain-int path (<= SMALL) and, padded, the vectorized path
        pad = np.concatenate([batch, np.zeros(SMALL + 1 - len(batch), dtype=np.uint64)])
        assert small.seen_exclusive(batch).tolist() == big.seen_exclusive(pad)[:len(batch)].tolist()
        if rng.random() < 0.7:
            small.commit_exclusive(batch)
            big.commit_exclusive(pad)
        clock[0] += rng.uniform(0, 0.5)  # entries expire after 10 s; tables grow past 16 buckets
    assert len(small) == len(big) and small.grows >= 1
    live = np.array(universe[:-1], dtype=np.uint64)
    assert small.seen_exclusive(live).tolist() == big.seen_exclusive(live).tolist()
    assert small.seen_exclusive(live).tolist() == small.seen(live).tolist()

"""EventPool: unit behaviour and multi-thread exactly-once guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from core_helpers import SMALL_DTYPE

from eventstream.core.pool import DoubleRelease, EventPool, PoolExhausted


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

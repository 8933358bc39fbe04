"""Rings and pool under contention: real threads, exact counts, per-producer order.

Every producer stamps (producer id, sequence) into the records it sends, so the consumer can check
that nothing was lost, duplicated or reordered per producer. Threads are joined with timeouts and a
thread that did not finish fails the test by name.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from stress_helpers import run_threads, scaled

from eventstream.core.pool import EventPool, PoolExhausted
from eventstream.core.records import record_dtype
from eventstream.core.ring import MpscRing, SpscRing

DTYPE = record_dtype(16)
JOIN_S = 120.0


def run_all(targets: list, names: list[str]) -> None:
    run_threads(targets, names, JOIN_S)


def stamped(producer: int, start: int, n: int) -> np.ndarray:
    r = np.zeros(n, DTYPE)
    r["conn_id"] = producer
    r["seq"] = np.arange(start, start + n, dtype=np.uint64)
    return r


@pytest.mark.parametrize("overflow", ["BLOCK_PRODUCER", "DROP_NEW"])
def test_mpsc_ring_many_producers_exact_and_ordered(tally, overflow):
    producers, per = 3, scaled(200_000, 3_000)
    ring = MpscRing(1024, DTYPE, overflow=overflow, block_timeout=30.0, wait="yield")
    refused = [0] * producers
    got = [np.zeros(0, np.uint64)] * producers
    seen: list[list[np.ndarray]] = [[] for _ in range(producers)]
    done = threading.Event()

    def produce(p):
        def run():
            sent, rng = 0, np.random.default_rng(p)
            while sent < per:
                n = min(int(rng.integers(1, 300)), per - sent)
                rest = ring.put_batch(stamped(p, sent, n))
                if overflow == "BLOCK_PRODUCER":
                    assert len(rest) == 0, f"producer {p}: ring refused {len(rest)} with BLOCK_PRODUCER"
                else:
                    refused[p] += len(rest)
                    # DROP_NEW keeps the prefix that fitted; resend the rest to keep the sequence whole
                    while len(rest):
                        os.sched_yield()
                        rest = ring.put_batch(rest)
                sent += n
        return run

    def consume():
        total = producers * per
        n = 0
        while n < total and not done.is_set():
            views = ring.poll(512, timeout=0.05)
            k = 0
            for v in views:
                ids = v["conn_id"]
                for p in range(producers):
                    seen[p].append(v["seq"][ids == p].copy())
                k += len(v)
            ring.release(k)
            n += k

    try:
        run_all([produce(p) for p in range(producers)] + [consume], [f"producer-{p}" for p in range(producers)]
                + ["consumer"])
    finally:
        done.set()
        ring.close()
    lost = 0
    for p in range(producers):
        got[p] = np.concatenate(seen[p]) if seen[p] else np.zeros(0, np.uint64)
        assert np.array_equal(got[p], np.arange(per, dtype=np.uint64)), \
            f"producer {p}: {len(got[p])} of {per} records, in order: {bool(np.all(np.diff(got[p].astype(np.int64)) == 1))}"
        lost += per - len(got[p])
    tally.add(moved=producers * per, lost=lost)


def test_spsc_drop_old_every_record_consumed_or_evicted_once(tally):
    total = scaled(300_000, 5_000)
    ring = SpscRing(256, DTYPE, overflow="DROP_OLD", block_timeout=5.0, wait="yield")
    evicted: list[np.ndarray] = []
    consumed: list[np.ndarray] = []
    finished = threading.Event()

    def produce():
        sent = 0
        while sent < total:
            n = min(200, total - sent)
            out = ring.put_batch(stamped(0, sent, n))
            if len(out):
                evicted.append(out["seq"].copy())
            sent += n
        finished.set()

    def consume():
        while True:
            views = ring.poll(64, timeout=0.01)
            k = sum(len(v) for v in views)
            for v in views:
                consumed.append(v["seq"].copy())
            ring.release(k)
            if not k and finished.is_set() and ring.depth == 0:
                return

    try:
        run_all([produce, consume], ["producer", "consumer"])
    finally:
        ring.close()
    c = np.concatenate(consumed) if consumed else np.zeros(0, np.uint64)
    e = np.concatenate(evicted) if evicted else np.zeros(0, np.uint64)
    both = np.sort(np.concatenate([c, e]))
    assert len(np.unique(c)) == len(c), "a record was consumed twice"
    assert np.all(np.diff(c.astype(np.int64)) > 0), "consumer saw records out of order"
    assert np.array_equal(both, np.arange(total, dtype=np.uint64)), \
        f"consumed {len(c)} + evicted {len(e)} != produced {total} exactly once"
    tally.add(moved=total, lost=total - len(np.unique(both)), evicted=len(e))


def test_pool_slots_are_never_handed_out_twice(tally):
    capacity, threads, rounds = 512, 4, scaled(1_500, 150)
    pool = EventPool(capacity, DTYPE)
    owner = np.full(capacity, -1, dtype=np.int64)  # written only by the thread holding the slot
    handed = [0] * threads

    def worker(w):
        def run():
            rng = np.random.default_rng(w)
            for i in range(rounds):
                n = int(rng.integers(1, 40))
                try:
                    idx = pool.acquire_many(n) if n > 1 else np.array([pool.acquire()])
                except PoolExhausted:
                    continue
                assert (owner[idx] == -1).all(), f"worker {w}: slots {idx[owner[idx] != -1]} already owned"
                owner[idx] = w
                assert (owner[idx] == w).all(), f"worker {w}: a slot changed owner while held"
                owner[idx] = -1
                handed[w] += len(idx)
                if i % 2:
                    pool.release_many(idx)
                else:
                    for j in idx.tolist():
                        pool.release(j)
        return run

    try:
        run_all([worker(w) for w in range(threads)], [f"pool-{w}" for w in range(threads)])
        assert pool.free_count == capacity, f"{capacity - pool.free_count} slots leaked"
        again = pool.acquire_many(capacity)
        assert sorted(again.tolist()) == list(range(capacity)), "free list lost or duplicated slots"
    finally:
        pool.close()
    tally.add(moved=sum(handed), lost=0)

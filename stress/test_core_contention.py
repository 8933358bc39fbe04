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
from eventstream.core.ring import MpscRing

DTYPE = record_dtype(16)
JOIN_S = 120.0


def run_all(targets: list, names: list[str]) -> None:
    run_threads(targets, names, JOIN_S)


def stamped(producer: int, start: int, n: int) -> np.ndarray:
    r = np.zeros(n, DTYPE)
    r["conn_id"] = producer
    r["seq"] = np.arange(start, start + n, dtype=np.uint64)
    return r


def test_mpsc_ring_many_producers_exact_and_ordered(tally):
    producers, per = 3, scaled(200_000, 3_000)
    ring = MpscRing(1024, DTYPE, wait="yield")
    refused = [0] * producers
    seen: list[list[np.ndarray]] = [[] for _ in range(producers)]
    done = threading.Event()

    def produce(p):
        def run():
            sent, rng = 0, np.random.default_rng(p)
            while sent < per:
                n = min(int(rng.integers(1, 300)), per - sent)
                k, _end = ring.try_put(stamped(p, sent, n))
                # try_put keeps the prefix that fitted; the rest is offered again (the edge holds it)
                refused[p] += n - k
                if k < n:
                    os.sched_yield()
                sent += k
        return run

    def consume():
        total = producers * per
        n = 0
        while n < total and not done.is_set():
            views = ring.poll(512)
            if not views:
                os.sched_yield()
                continue
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
        got = np.concatenate(seen[p]) if seen[p] else np.zeros(0, np.uint64)
        assert np.array_equal(got, np.arange(per, dtype=np.uint64)), \
            f"producer {p}: {len(got)} of {per} records, in order: {bool(np.all(np.diff(got.astype(np.int64)) == 1))}"
        lost += per - len(got)
    tally.add(moved=producers * per, lost=lost, offered_again=sum(refused))


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

"""IdTable: the open-addressing table under the Deduplicator (u64 ids -> u64 stamps, arena memory).

Two u64 arrays, `keys` (0 = empty) and `stamps`. Linear probing from a Fibonacci-hash home slot;
slots are filled in place and never emptied (a rebuild makes a new table), so a lookup stops at the
first empty slot. This module knows nothing of windows or expiry: core/dedup.py gives stamps their
meaning and does the concurrent (CAS) inserts through `key_base` / `stamp_base`.

Three ways in, by who is asking:
* `lookup` / `insert_bulk`: numpy over a whole batch (`insert_bulk` only for a table nobody else
  is writing: a rebuild, or the one thread that owns a partition's table);
* `home_int` and the plain arrays: a few ids as plain ints, no numpy temporaries.
"""

from __future__ import annotations

import numpy as np

from eventstream.core import atomic
from eventstream.core.arena import Arena

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
GOLDEN_INT = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


class IdTable:
    """`buckets` (a power of two) slots in `arena` (or a private arena on `node` when None)."""

    def __init__(self, buckets: int, arena: Arena | None, node: int):
        self.buckets = buckets
        self.mask = buckets - 1
        self.bits = buckets.bit_length() - 1
        self.own = arena is None
        self.arena = arena if arena is not None else Arena(buckets * 16 + 256, node, name="dedup.table")
        self.keys = self.arena.array(buckets, np.uint64)
        self.stamps = self.arena.array(buckets, np.uint64)
        self.key_base = atomic.address_of(self.keys)
        self.stamp_base = atomic.address_of(self.stamps)

    def home(self, ids: np.ndarray) -> np.ndarray:
        """Home slot of each id (vectorized)."""
        if self.bits == 0:
            return np.zeros(len(ids), dtype=np.int64)
        return ((ids * GOLDEN) >> np.uint64(64 - self.bits)).astype(np.int64)

    def home_int(self, k: int) -> int:
        """Home slot of one id given as a plain int."""
        return 0 if self.bits == 0 else ((k * GOLDEN_INT) & M64) >> (64 - self.bits)

    def slot_int(self, k: int) -> tuple[int, bool]:
        """(slot, True) where the id `k` (a plain int, not 0) sits, else (the empty slot that ends its
        probe, False): where an owner inserts it."""
        keys, mask = self.keys, self.mask
        pos = 0 if self.bits == 0 else ((k * GOLDEN_INT) & M64) >> (64 - self.bits)
        while True:
            cur = int(keys[pos])
            if cur == k:
                return pos, True
            if cur == 0:
                return pos, False
            pos = (pos + 1) & mask

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot of each id or -1 if absent, home slots), vectorized probing."""
        slot_of = np.full(len(ids), -1, dtype=np.int64)
        home = self.home(ids)
        active = np.arange(len(ids))
        for probe in range(self.buckets):
            if not len(active):
                break
            slots = (home[active] + probe) & self.mask
            k = self.keys[slots]
            hit = k == ids[active]
            slot_of[active[hit]] = slots[hit]
            active = active[(k != 0) & ~hit]
        return slot_of, home

    def insert_bulk(self, keys: np.ndarray, stamps: np.ndarray) -> None:
        """Vectorized linear-probing insert of distinct keys into a table nobody else touches."""
        home = self.home(keys)
        offset = np.zeros(len(keys), dtype=np.int64)
        pending = np.arange(len(keys))
        while len(pending):
            slots = (home[pending] + offset[pending]) & self.mask
            cand = np.flatnonzero(self.keys[slots] == 0)
            # keys racing for one free slot: the last assignment wins; reading back says who
            # (no sort: the keys are distinct, so exactly one of them is there)
            cslots, ckeys = slots[cand], keys[pending[cand]]
            self.keys[cslots] = ckeys
            win = cand[self.keys[cslots] == ckeys]
            self.stamps[slots[win]] = stamps[pending[win]]
            lose = np.ones(len(pending), dtype=bool)
            lose[win] = False
            pending = pending[lose]
            offset[pending] += 1  # its slot is taken now (by another key, or was already)

    def occupied(self) -> int:
        """Slots holding an id."""
        return int(np.count_nonzero(self.keys))

    def close(self) -> None:
        if self.own:
            self.arena.close()

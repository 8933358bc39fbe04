"""EventPool: record slots that outlive a ring slot (retries, windows), acquired from any thread.

Free list: a Treiber stack threaded through a `next` array, with the head in one atomic cell holding
(tag << 32 | index + 1). The tag grows on every push and pop, so a CAS on the head fails whenever the
stack changed since it was read (no ABA). acquire/release are O(1): one load + one CAS.

acquire_many(n) walks n links and takes them all with ONE CAS: if the head (with its tag) is still
what was read, nothing was pushed or popped in between, so the chain that was walked is intact.
release_many links the slots with numpy and pushes the whole chain with one CAS.

Double release: every slot has an in-use cell; release flips it 1 -> 0 with a CAS, so of two racing
releases exactly one succeeds and the other raises DoubleRelease.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from eventstream.core import atomic
from eventstream.core.arena import owned_arena
from eventstream.core.records import EVENT_DTYPE

_NONE = 0  # index + 1 stored in the head; 0 = empty stack
_IDX_MASK = (1 << 32) - 1


class PoolExhausted(RuntimeError):
    pass


class DoubleRelease(ValueError):
    pass


class EventPool:
    """`capacity` record slots in arena memory with a lock-free free list."""

    def __init__(
        self, capacity: int, dtype: npt.DTypeLike = EVENT_DTYPE, arena=None, *, node: int = -1, name: str = "pool"
    ):
        if not isinstance(capacity, int) or not 1 <= capacity < _IDX_MASK:
            raise ValueError(f"EventPool capacity={capacity!r} is not allowed; allowed: 1..{_IDX_MASK - 1}")
        self.capacity = capacity
        self.name = name
        dtype = np.dtype(dtype)
        need = capacity * (dtype.itemsize + 16) + 4 * atomic.CACHE_LINE + 256
        self._arena, self._owns = owned_arena(arena, need, node, f"{name}.arena")
        try:
            self._cells = atomic.CellBlock(self._arena, 2)
            self.records = self._arena.array(capacity, dtype)
            self._next = self._arena.array(capacity, np.int64)  # index + 1 of the next free slot
            self._in_use = self._arena.array(capacity, np.uint64)
        except BaseException:
            if self._owns:
                self._arena.close()
            raise
        self._head, self._free = self._cells.cells
        self._next[:-1] = np.arange(2, capacity + 1)
        self._next[-1] = _NONE
        self._head.store(1)  # slot 0 first, tag 0
        self._free.store(capacity)
        self._in_use_base = atomic.address_of(self._in_use)

    @property
    def free_count(self) -> int:
        """Free slots (exact when quiescent)."""
        return self._free.load()

    def _exhausted(self, n: int) -> PoolExhausted:
        return PoolExhausted(
            f"{self.name}: cannot acquire {n} slot(s), {self.free_count} of {self.capacity} free; "
            "release slots first or configure a larger pool"
        )

    def acquire(self) -> int:
        """One free slot index; raises PoolExhausted when none is free."""
        head = self._head
        h = head.load()
        while True:
            top = h & _IDX_MASK
            if top == _NONE:
                raise self._exhausted(1)
            nxt = int(self._next[top - 1])
            ok, h2 = head.cas(h, (((h >> 32) + 1) & _IDX_MASK) << 32 | nxt)
            if ok:
                break
            h = h2
        idx = top - 1
        atomic.store(self._in_use_base + 8 * idx, 1)
        self._free.fetch_add(-1)
        return idx

    def acquire_many(self, n: int) -> np.ndarray:
        """`n` free slot indexes (all or nothing: PoolExhausted if fewer are free)."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        head = self._head
        nxt_arr = self._next
        h = head.load()
        while True:
            out = np.empty(n, dtype=np.int64)
            top = h & _IDX_MASK
            cur = top
            for i in range(n):
                if cur == _NONE:
                    break
                out[i] = cur - 1
                cur = int(nxt_arr[cur - 1])
            else:
                ok, h2 = head.cas(h, (((h >> 32) + 1) & _IDX_MASK) << 32 | cur)
                if ok:
                    break
                h = h2
                continue
            h2 = head.load()
            if h2 == h:  # the stack really is that short
                raise self._exhausted(n)
            h = h2
        self._in_use[out] = 1  # these slots are ours alone now
        self._free.fetch_add(-n)
        return out

    def release(self, idx: int) -> None:
        """Give slot `idx` back; DoubleRelease if it is not in use."""
        idx = self._check_index(idx)
        ok, _ = atomic.cas(self._in_use_base + 8 * idx, 1, 0)
        if not ok:
            raise DoubleRelease(f"{self.name}: slot {idx} released twice (it is already free)")
        self._push(idx, idx)
        self._free.fetch_add(1)

    def release_many(self, idxs) -> None:
        """Give several slots back with one push; DoubleRelease names the slots that were already free."""
        idxs = np.asarray(idxs, dtype=np.int64).reshape(-1)
        if len(idxs) == 0:
            return
        if idxs.min() < 0 or idxs.max() >= self.capacity:
            raise IndexError(f"{self.name}: slot indexes must be 0..{self.capacity - 1}")
        if len(np.unique(idxs)) != len(idxs):
            raise DoubleRelease(f"{self.name}: the same slot appears twice in one release_many call")
        cas, base = atomic.cas, self._in_use_base
        bad = []
        freed = []
        for i in idxs.tolist():
            if cas(base + 8 * i, 1, 0)[0]:
                freed.append(i)
            else:
                bad.append(i)
        if freed:
            chain = np.asarray(freed, dtype=np.int64)
            self._next[chain[:-1]] = chain[1:] + 1
            self._push(int(chain[0]), int(chain[-1]))
            self._free.fetch_add(len(freed))
        if bad:
            raise DoubleRelease(
                f"{self.name}: slots {bad[:10]} released twice (already free); the others were released"
            )

    def _push(self, first: int, last: int) -> None:
        head = self._head
        h = head.load()
        while True:
            self._next[last] = h & _IDX_MASK
            ok, h2 = head.cas(h, (((h >> 32) + 1) & _IDX_MASK) << 32 | (first + 1))
            if ok:
                return
            h = h2

    def _check_index(self, idx) -> int:
        i = int(idx)
        if not 0 <= i < self.capacity:
            raise IndexError(f"{self.name}: slot index {idx!r} is not allowed; allowed: 0..{self.capacity - 1}")
        return i

    def close(self) -> None:
        if self._owns:
            self._arena.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""MpscRing: the engine's queue, a lock-free batch ring in arena memory, many producers, one consumer.

Records are rows of a numpy structured dtype in a power-of-two slot array. A producer claims `n`
slots with one CAS (see sequencer.py), copies the batch in with one or two numpy slice assignments,
and publishes the range. `try_put` never waits: it enqueues the longest prefix that fits now and
says how much (the engine holds or sheds the rest at its edge). The consumer polls up to `max_n`
published records as VIEWS into the ring (two views when the range wraps; no copy), handles them,
and releases them with one store; `take()` is the copying convenience. No mutex anywhere.

Cells (each on its own cache line): `claim` (the producers' cursor), `pos` (the consumer's release
cursor: only the consumer stores it, producers load it to see the room) and a fence cell for the
sequencer on weakly ordered CPUs.

Waiting is not the ring's: a consumer with nothing to do waits on its queue's wait strategy
(core/wait.py) for `depth > 0`, and the ring signals that strategy after every publish when it is a
parking one (Blocking).
"""

from __future__ import annotations

from typing import Self

import numpy as np

from eventstream.core import atomic
from eventstream.core.arena import ALIGN, Arena, owned_arena
from eventstream.core.records import EVENT_DTYPE
from eventstream.core.sequencer import MultiProducerSequencer
from eventstream.core.wait import WaitStrategy, make_wait


class RingClosed(RuntimeError):
    pass


class _ConsumerState:
    """The consumer's private cursors and counters.

    Why a separate object: on a free-threaded build, the consumer writing attributes of the ring
    object would bounce the cache lines the producers read on every try_put; an object allocated
    by the consumer thread lives in that thread's own heap pages.
    """

    __slots__ = ("r", "polled", "consumed", "seen")

    def __init__(self) -> None:
        self.r = 0  # next sequence to read
        self.polled = 0  # records returned by the last poll and not yet released
        self.consumed = 0  # records released so far
        self.seen = 0  # cache of the producers' cursor (read by the sequencer)


class MpscRing:
    """Any number of producer threads, one consumer thread (default capacity 65536)."""

    def __init__(
        self,
        capacity: int = 65536,
        dtype: np.dtype | type | str = EVENT_DTYPE,
        *,
        wait: str | WaitStrategy = "sleep",
        arena: Arena | None = None,
        node: int = -1,
        name: str = "",
    ):
        if not isinstance(capacity, int) or capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"MpscRing capacity={capacity!r} is not allowed; allowed: a power of two >= 2")
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self.mask = capacity - 1
        self.name = name or "mpscring"
        self._wait = make_wait(wait)
        need = capacity * self.dtype.itemsize + capacity * 8 + 8 * atomic.CACHE_LINE + 4 * ALIGN
        self._arena, self._owns_arena = owned_arena(arena, need, node, f"{self.name}.arena")
        try:
            self._cells = atomic.CellBlock(self._arena, 3)
            self.slots = self._arena.array(capacity, self.dtype)
            # Copies go through an opaque void view: numpy copies structured rows field by field
            # (µs of setup per call), opaque rows are a plain memcpy.
            self._void = np.dtype((np.void, self.dtype.itemsize))
            self._vslots = self.slots.view(self._void)
            claim, self._pos, fence = self._cells.cells
            self._pos_addr = self._pos.address
            markers = self._arena.array(capacity, np.int64)
            self._seq = MultiProducerSequencer(capacity, claim, markers, fence)
        except BaseException:
            if self._owns_arena:
                self._arena.close()
            raise
        self._signal = self._wait.signal if self._wait.signals else None  # wake a parked consumer
        self._empty = np.empty(0, dtype=self.dtype)  # creating structured arrays costs µs: share one
        self._empty.flags.writeable = False
        self._limit = capacity  # producers' cached gate: some past `pos` + capacity
        self._cs: _ConsumerState | None = None
        self._closed = False

    # -- producer side ----------------------------------------------------------------------------
    def _write_publish(self, start: int, recs: np.ndarray) -> None:
        """Copy `recs` (void rows) into the slots from sequence `start` and publish them."""
        k = len(recs)
        idx = start & self.mask
        first = self.capacity - idx
        if k <= first:
            self._vslots[idx : idx + k] = recs
        else:
            self._vslots[idx:] = recs[:first]
            self._vslots[: k - first] = recs[first:]
        self._seq.publish(start, k)
        if self._signal is not None:
            self._signal()

    def try_put(self, records: np.ndarray) -> tuple[int, int]:
        """Enqueue the longest prefix of `records` that fits now, never waiting. Returns (count
        enqueued, end): `end` is the ring sequence just past the last enqueued record, so once
        `completed() >= end` the consumer has released every one of them. (0, 0) when nothing fitted.
        """
        if self._closed:
            raise RingClosed(f"{self.name} is closed")
        if not isinstance(records, np.ndarray) or (records.dtype is not self.dtype and records.dtype != self.dtype):
            got = getattr(records, "dtype", type(records).__name__)
            raise TypeError(f"{self.name}: records must be a numpy array of the ring's dtype; got {got}")
        if records.ndim != 1:
            records = records.reshape(-1)
        if not records.flags.c_contiguous:
            records = np.ascontiguousarray(records)
        recs = records.view(self._void)
        n = len(recs)
        seq = self._seq
        # the common case: the whole batch fits the room the producer already knows of (one CAS)
        start = seq.claim_all(n, self._limit)
        if start >= 0:
            self._write_publish(start, recs)
            done, end = n, start + n
        else:
            done = end = 0
            while done < n:
                want = min(n - done, self.capacity)
                start, k = seq.claim(want, self._limit)
                if k == 0:  # refresh the cached gate once
                    self._limit = self._pos.load() + self.capacity
                    start, k = seq.claim(want, self._limit)
                    if k == 0:
                        break
                self._write_publish(start, recs[done : done + k])
                done += k
                end = start + k
        return done, end

    # -- consumer side (one thread at a time) -------------------------------------------------------
    def _views(self, start: int, k: int) -> tuple[np.ndarray, ...]:
        if k <= 0:
            return ()
        idx = start & self.mask
        first = min(k, self.capacity - idx)
        if k == first:
            return (self.slots[idx : idx + k],)
        return (self.slots[idx:], self.slots[: k - first])

    def _consumer(self) -> _ConsumerState:
        """The consumer's private state, created by the consumer thread on its first call."""
        cs = self._cs
        if cs is None:
            cs = self._cs = _ConsumerState()
        return cs

    def poll(self, max_n: int = 4096) -> tuple[np.ndarray, ...]:
        """Up to `max_n` published records as views (two when the range wraps), oldest first; ()
        when there are none. Consumer only. The views stay valid until release(); call release(n)
        before the next poll."""
        if self._closed:
            raise RingClosed(f"{self.name} is closed")
        if max_n <= 0:
            raise ValueError(f"poll max_n={max_n!r} is not allowed; allowed: >= 1")
        cs = self._cs or self._consumer()
        k = self._seq.consumer_available(cs.r, min(max_n, self.capacity), cs)
        cs.polled = k
        return self._views(cs.r, k)

    def release(self, n: int) -> None:
        """Give back the first `n` records of the last poll (one store)."""
        cs = self._cs or self._consumer()
        if not 0 <= n <= cs.polled:
            raise ValueError(
                f"{self.name}: release({n}) is not allowed; allowed: 0..{cs.polled} "
                "(the number of records returned by the last poll)"
            )
        if n == 0:
            return
        cs.polled -= n
        cs.consumed += n
        cs.r += n
        atomic.store(self._pos_addr, cs.r, atomic.RELEASE)

    def completed(self) -> int:
        """Records the consumer has released so far (the consumer's own counter, read without an
        atomic: a completion watermark may lag by one release, never run ahead of one)."""
        cs = self._cs
        return cs.consumed if cs is not None else 0

    def take(self, max_n: int = 4096) -> np.ndarray:
        """poll + copy + release: up to `max_n` records as a new array (safe to keep)."""
        views = self.poll(max_n)
        if not views:
            return self._empty
        out = views[0].copy() if len(views) == 1 else np.concatenate(views)
        self.release(len(out))
        return out

    # -- state --------------------------------------------------------------------------------------
    def drained(self) -> bool:
        """Everything claimed so far is released: for a thread that excludes the consumer meanwhile
        (holds its ownership token), so the consumer's own counter is stable (one atomic load)."""
        return self._seq.claim_position() == self.completed()

    @property
    def depth(self) -> int:
        """Records in the ring not yet released by the consumer (approximate under concurrency)."""
        return max(0, self._seq.claim_position() - self._pos.load())

    def close(self) -> None:
        """Free the ring's memory if it owns its arena (idempotent); views become invalid."""
        if self._closed:
            return
        self._closed = True
        if self._owns_arena:
            self._arena.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MpscRing {self.name!r} capacity={self.capacity}>"

"""The consumer side of a ring (core/ring.py): poll published records as views, release them.

One consumer thread per ring. Its cursors live in a `_ConsumerState` the consumer thread allocates
(see `_consumer`); in DROP_OLD mode it claims ranges by CAS on `pos` so producers may evict (the
protocol is described in ring.py).
"""

from __future__ import annotations

import time

import numpy as np

from eventstream.core import atomic

IDLE = (1 << 63) - 1  # `held` when the consumer holds no range


class RingClosed(RuntimeError):
    pass


class _ConsumerState:
    """Consumer-private cursors and counters (see _Ring._consumer)."""

    __slots__ = ("r", "held_lo", "held_hi", "polled", "consumed", "seen")

    def __init__(self):
        self.r = 0  # next sequence to read (modes other than DROP_OLD)
        self.held_lo = self.held_hi = 0  # DROP_OLD: the range the consumer holds
        self.polled = 0
        self.consumed = 0
        self.seen = 0  # cache of the producers' cursor


class ConsumerSide:
    """Mixin of _Ring: everything the consumer thread calls. Uses the ring's slots, sequencer, cells
    (`_pos`, `_held`), wait strategy and flags set up by _Ring.__init__."""

    def _views(self, start: int, k: int) -> tuple[np.ndarray, ...]:
        if k <= 0:
            return ()
        idx = start & self.mask
        first = min(k, self.capacity - idx)
        if k == first:
            return (self.slots[idx : idx + k],)
        return (self.slots[idx:], self.slots[: k - first])

    def _consumer(self) -> _ConsumerState:
        """The consumer's private state, created by the consumer thread on its first call.

        Why a separate object: on a free-threaded build, the consumer writing attributes of the ring
        object would bounce the cache lines the producers read on every put_batch; an object
        allocated by the consumer thread lives in that thread's own heap pages.
        """
        cs = self._cs
        if cs is None:
            cs = self._cs = _ConsumerState()
        return cs

    def poll(self, max_n: int = 4096, timeout: float = 0.0) -> tuple[np.ndarray, ...]:
        """Up to `max_n` published records as views (two when the range wraps), oldest first.

        Consumer thread only. The views stay valid until release(); call release(n) before the next
        poll. Waits up to `timeout` seconds when nothing is there.
        """
        if self._closed:
            raise RingClosed(f"{self.name} is closed")
        cs = self._cs or self._consumer()
        if max_n > self.capacity:
            max_n = self.capacity
        if max_n <= 0:
            raise ValueError(f"poll max_n={max_n!r} is not allowed; allowed: >= 1")
        if self._drop_old:
            return self._poll_claiming(cs, max_n, timeout)
        seq = self._seq
        k = seq.consumer_available(cs.r, max_n, cs)
        if k == 0 and timeout > 0:
            self._wait.wait_for(lambda: seq.consumer_available(cs.r, 1, cs) > 0, timeout)
            k = seq.consumer_available(cs.r, max_n, cs)
        cs.polled = k
        return self._views(cs.r, k)

    def _poll_claiming(self, cs: _ConsumerState, max_n: int, timeout: float) -> tuple[np.ndarray, ...]:
        if cs.held_hi > cs.held_lo:  # not fully released last time: the rest first
            k = min(max_n, cs.held_hi - cs.held_lo)
            cs.polled = k
            return self._views(cs.held_lo, k)
        deadline = None
        seq = self._seq
        while True:
            p = self._pos.load()
            k = seq.consumer_available(p, max_n, cs)
            if k > 0:
                self._held.store(p)
                ok, _ = self._pos.cas(p, p + k)
                if ok:
                    cs.held_lo, cs.held_hi, cs.polled = p, p + k, k
                    return self._views(p, k)
                self._held.store(IDLE)
                continue  # a producer evicted meanwhile: look again
            if deadline is None:
                if timeout <= 0:
                    break
                deadline = time.monotonic() + timeout
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait.wait_for(lambda: seq.consumer_available(self._pos.load(), 1, cs) > 0, left):
                break
        cs.polled = 0
        return ()

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
        if self._drop_old:
            cs.held_lo += n
            self._held.store(IDLE if cs.held_lo == cs.held_hi else cs.held_lo)
        else:
            cs.r += n
            atomic.store(self._pos_addr, cs.r, atomic.RELEASE)
        if self._wait.signals:  # wake a producer parked on a full ring
            self._wait.signal()

    def completed(self) -> int:
        """Records the consumer has released so far (the consumer's own counter, read without an
        atomic: a completion watermark may lag by one release, never run ahead of one)."""
        cs = self._cs
        return cs.consumed if cs is not None else 0

    def take(self, max_n: int = 4096, timeout: float = 0.0) -> np.ndarray:
        """poll + copy + release: up to `max_n` records as a new array (safe to keep)."""
        views = self.poll(max_n, timeout)
        if not views:
            return self._empty
        cs = self._cs
        k = sum(len(v) for v in views)
        out = self._copy_range(cs.held_lo if self._drop_old else cs.r, k)
        self.release(k)
        return out

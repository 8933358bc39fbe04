"""Batch ring buffers in arena memory: SpscRing (one producer) and MpscRing (many producers).

Records are rows of a numpy structured dtype in a power-of-two slot array. A producer claims `n`
slots with one atomic operation (see sequencer.py), copies the batch in with one or two numpy slice
assignments, and publishes the range. The consumer polls up to `max_n` published records as VIEWS
into the ring (two views when the range wraps; no copy), processes them, and releases them with one
store. `take()` is the copying convenience. No mutex anywhere on these paths; blocking waits use a
WaitStrategy and always have a timeout.

Cells (each on its own cache line): `claim` (producers' cursor), `pos` (consumer cursor) and `held`
(start of the range the consumer is reading, or IDLE). The consumer's side (poll, release, take) is
in ring_consumer.py.

Overflow, when a batch does not fit:
* DROP_NEW: enqueue what fits, return the rest.
* BLOCK_PRODUCER: wait (wait strategy) up to `block_timeout` seconds for room, return what still
  did not fit.
* DROP_OLD: evict the oldest records to make room and return copies of them.

Why DROP_OLD is correct under a concurrent consumer. Eviction means advancing the consumer's cursor
from the producer side, so the two must never both own a record. In DROP_OLD mode `pos` therefore
means "claimed by the consumer or evicted up to", and both sides move it only by CAS:
* poll: the consumer loads `pos` = p, stores `held` = p, then CASes `pos` p -> p+k. Success means it
  owns [p, p+k) until release, which stores `held` = IDLE (one store).
* evict: a producer loads `pos` = p, copies the published records [p, p+e) out, then CASes `pos`
  p -> p+e. Success means nobody claimed them in between (pos only grows, so no ABA) and, because
  no slot below `pos` can be overwritten before `pos` passes it, the copy it took is intact. On
  failure the copy is discarded and the producer retries.
* gating: producers may write sequence s only when s < min(pos, held) + capacity, loading `pos`
  first. Any range the consumer claims later starts at a `pos` >= the loaded one, and a range it
  holds has `held` at its start, so the minimum never passes a record the consumer is reading.
  A producer does not evict while the consumer holds a range (that would free nothing until the
  release); it waits for the release instead, bounded by `block_timeout`.
In the other modes `pos` is simply the release cursor: only the consumer stores it.
"""

from __future__ import annotations

import enum
import threading
import time

import numpy as np
import structlog

from eventstream.core import atomic
from eventstream.core.arena import ALIGN, owned_arena
from eventstream.core.records import EVENT_DTYPE
from eventstream.core.ring_consumer import IDLE, ConsumerSide, RingClosed, _ConsumerState
from eventstream.core.sequencer import MultiProducerSequencer, SingleProducerSequencer
from eventstream.core.wait import WaitStrategy, make_wait

log = structlog.get_logger("eventstream.ring")


class Overflow(enum.Enum):
    DROP_OLD = "DROP_OLD"
    BLOCK_PRODUCER = "BLOCK_PRODUCER"
    DROP_NEW = "DROP_NEW"


class _Counters:
    """One producer thread's counters: written by that thread only, summed by statistics()."""

    __slots__ = ("claimed", "published", "rejected", "evicted")

    def __init__(self):
        self.claimed = self.published = self.rejected = self.evicted = 0


class _Ring(ConsumerSide):
    _multi = False
    _default_capacity = 16384

    def __init__(
        self,
        capacity: int | None = None,
        dtype: np.dtype = EVENT_DTYPE,
        *,
        overflow: Overflow | str = Overflow.BLOCK_PRODUCER,
        block_timeout: float = 1.0,
        wait: str | WaitStrategy = "sleep",
        arena=None,
        node: int = -1,
        name: str = "",
        on_drop=None,
    ):
        kind = type(self).__name__
        capacity = self._default_capacity if capacity is None else capacity
        if not isinstance(capacity, int) or capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"{kind} capacity={capacity!r} is not allowed; allowed: a power of two >= 2")
        if isinstance(overflow, str):
            if overflow not in Overflow.__members__:
                raise ValueError(f"overflow={overflow!r} is not allowed; allowed: {', '.join(Overflow.__members__)}")
            overflow = Overflow[overflow]
        if not isinstance(block_timeout, (int, float)) or not 0 <= block_timeout < float("inf"):
            raise ValueError(f"block_timeout={block_timeout!r} is not allowed; allowed: seconds >= 0 (finite)")
        self.dtype = np.dtype(dtype)
        self.capacity = capacity
        self.mask = capacity - 1
        self.overflow = overflow
        self.block_timeout = float(block_timeout)
        self.name = name or kind.lower()
        self._wait = make_wait(wait)
        self._on_drop = on_drop
        self._drop_old = overflow is Overflow.DROP_OLD
        need = capacity * self.dtype.itemsize + capacity * 8 + 8 * atomic.CACHE_LINE + 4 * ALIGN
        self._arena, self._owns_arena = owned_arena(arena, need, node, f"{self.name}.arena")
        try:
            self._cells = atomic.CellBlock(self._arena, 4)
            self.slots = self._arena.array(capacity, self.dtype)
            # Copies go through an opaque void view: numpy copies structured rows field by field
            # (µs of setup per call), opaque rows are a plain memcpy.
            self._void = np.dtype((np.void, self.dtype.itemsize))
            self._vslots = self.slots.view(self._void)
            claim, self._pos, self._held, fence = self._cells.cells
            self._pos_addr = self._pos.address
            self._held.store(IDLE)
            if self._multi:
                markers = self._arena.array(capacity, np.int64)
                self._seq = MultiProducerSequencer(capacity, claim, markers, fence)
            else:
                self._seq = SingleProducerSequencer(capacity, claim)
        except BaseException:
            if self._owns_arena:
                self._arena.close()
            raise
        if self._wait.signals:  # wake a parked consumer after each publish
            publish, signal = self._seq.publish, self._wait.signal

            def _publish(start: int, n: int) -> None:
                publish(start, n)
                signal()

            self._publish = _publish
        else:
            self._publish = self._seq.publish
        self._empty = np.empty(0, dtype=self.dtype)  # creating structured arrays costs µs: share one
        self._empty.flags.writeable = False
        self._limit = capacity  # producers' cached gate: some past lowest + capacity
        self._tls = threading.local()
        self._all_counters: list[_Counters] = []
        self._cs: _ConsumerState | None = None
        self._closed = False
        self._warned_put_evict = False

    # -- producer side ----------------------------------------------------------------------------
    def _counters(self) -> _Counters:
        c = getattr(self._tls, "c", None)
        if c is None:
            c = self._tls.c = _Counters()
            self._all_counters.append(c)
        return c

    def _lowest(self) -> int:
        p = self._pos.load()
        if self._drop_old:
            return min(p, self._held.load())
        return p

    def _has_room(self) -> bool:
        return self._lowest() + self.capacity - self._seq.claim_position() > 0

    def _can_progress(self) -> bool:
        if self._has_room():
            return True
        p = self._pos.load()
        return self._held.load() > p and self._seq.producer_available(p, 1) > 0

    def _as_batch(self, records) -> np.ndarray:
        if not isinstance(records, np.ndarray) or (records.dtype is not self.dtype and records.dtype != self.dtype):
            got = getattr(records, "dtype", type(records).__name__)
            raise TypeError(f"{self.name}: records must be a numpy array of the ring's dtype; got {got}")
        if records.ndim != 1:
            records = records.reshape(-1)
        if not records.flags.c_contiguous:
            records = np.ascontiguousarray(records)
        return records.view(self._void)

    def _write(self, start: int, recs: np.ndarray) -> None:
        k = len(recs)
        idx = start & self.mask
        first = min(k, self.capacity - idx)
        self._vslots[idx : idx + first] = recs[:first]
        if k > first:
            self._vslots[: k - first] = recs[first:]

    def _copy_range(self, start: int, k: int) -> np.ndarray:
        idx = start & self.mask
        first = min(k, self.capacity - idx)
        if k == first:
            out = self._vslots[idx : idx + k].copy()
        else:
            out = np.concatenate((self._vslots[idx:], self._vslots[: k - first]))
        return out.view(self.dtype)

    def _evict(self, want: int) -> np.ndarray | None:
        """DROP_OLD: evict published, unclaimed records so `want` more fit; None when it cannot now."""
        p = self._pos.load()
        if self._held.load() <= p:
            return None  # the consumer holds a range: evicting frees nothing until it releases
        room = p + self.capacity - self._seq.claim_position()
        e = self._seq.producer_available(p, max(1, want - max(room, 0)))
        if e <= 0:
            return None
        copy = self._copy_range(p, e)
        ok, _ = self._pos.cas(p, p + e)
        return copy if ok else copy[:0]

    def _claim_write(self, recs: np.ndarray, done: int) -> tuple[int, int]:
        """Claim room for as much of recs[done:] as fits now (refreshing the cached gate once), copy
        it in and publish it. Returns (first sequence, count); count 0 when the ring is full."""
        want = min(len(recs) - done, self.capacity)
        start, k = self._seq.claim(want, self._limit)
        if k == 0:
            self._limit = self._lowest() + self.capacity
            start, k = self._seq.claim(want, self._limit)
        if k:
            self._write(start, recs[done : done + k])
            self._publish(start, k)
        return start, k

    def _put(self, records: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        if self._closed:
            raise RingClosed(f"{self.name} is closed")
        recs = self._as_batch(records)
        n = len(recs)
        cnt = self._counters()
        done = 0
        evicted: list[np.ndarray] = []
        deadline = None
        cap = self.capacity
        while done < n:
            want = min(n - done, cap)
            _start, k = self._claim_write(recs, done)
            if k:
                cnt.claimed += k
                cnt.published += k
                done += k
                continue
            if self.overflow is Overflow.DROP_NEW:
                break
            if self._drop_old:
                ev = self._evict(want)
                if ev is not None:
                    if len(ev):
                        evicted.append(ev)
                        cnt.evicted += len(ev)
                    continue
            if deadline is None:
                deadline = time.monotonic() + self.block_timeout
            left = deadline - time.monotonic()
            ready = self._can_progress if self._drop_old else self._has_room
            if left <= 0 or not self._wait.wait_for(ready, left):
                break
        if done == n:
            return evicted, self._empty
        cnt.rejected += n - done
        return evicted, recs[done:].copy().view(self.dtype)

    def put_batch(self, records: np.ndarray) -> np.ndarray:
        """Enqueue `records` in order; return the records that are not (or no longer) in the ring.

        DROP_NEW: the overflow. BLOCK_PRODUCER: what did not fit within `block_timeout`. DROP_OLD: the
        old records evicted to make room (copies), followed by new ones if the consumer kept the
        ring pinned for `block_timeout`. Empty array when everything went in and nothing was evicted.
        """
        # Fast path, the common case: the whole batch fits the room the producer already knows of.
        dt = getattr(records, "dtype", None)
        if dt is self.dtype and records.ndim == 1 and not self._closed:
            n = len(records)
            start = self._seq.claim_all(n, self._limit)
            if start >= 0:
                rv = records.view(self._void)
                idx = start & self.mask
                first = self.capacity - idx
                if n <= first:
                    self._vslots[idx : idx + n] = rv
                else:
                    self._vslots[idx:] = rv[:first]
                    self._vslots[: n - first] = rv[first:]
                self._publish(start, n)
                try:
                    cnt = self._tls.c
                except AttributeError:
                    cnt = self._counters()
                cnt.claimed += n
                cnt.published += n
                return self._empty
        evicted, rest = self._put(records)
        if not evicted:
            return rest  # (the shared read-only empty array when everything went in)
        return np.concatenate([*evicted, rest])

    def try_put(self, records: np.ndarray) -> tuple[int, int]:
        """Enqueue the longest prefix of `records` that fits now, never waiting, whatever the overflow
        policy (not for DROP_OLD rings). Returns (count enqueued, end): `end` is the ring sequence just
        past the last enqueued record, so once `completed() >= end` the consumer has released every
        one of them. (0, 0) when nothing fitted.
        """
        if self._drop_old:
            raise ValueError(f"{self.name}: try_put is not available on a DROP_OLD ring")
        if self._closed:
            raise RingClosed(f"{self.name} is closed")
        recs = self._as_batch(records)
        n = len(recs)
        done = end = 0
        while done < n:
            start, k = self._claim_write(recs, done)
            if k == 0:
                break
            done += k
            end = start + k
        if done:
            cnt = self._counters()
            cnt.claimed += done
            cnt.published += done
        return done, end

    def put(self, record) -> bool:
        """Enqueue one record (np.void row or 1-element array); False if it was refused.

        Records evicted by DROP_OLD go to `on_drop` (constructor argument) when given; use put_batch
        to receive them directly.
        """
        arr = record.reshape(1) if isinstance(record, np.ndarray) else np.array([record], dtype=self.dtype)
        evicted, rest = self._put(arr)
        if evicted:
            if self._on_drop is not None:
                self._on_drop(np.concatenate(evicted))
            elif not self._warned_put_evict:
                self._warned_put_evict = True
                log.warning(
                    "put_evicted_without_on_drop",
                    ring=self.name,
                    hint="pass on_drop= or use put_batch to receive evicted records",
                )
        return len(rest) == 0

    # -- state --------------------------------------------------------------------------------------
    def drained(self) -> bool:
        """Everything claimed so far is released: for a thread that excludes the consumer meanwhile
        (holds its ownership token), so the consumer's own counter is stable (one atomic load)."""
        return self._seq.claim_position() == self.completed()

    @property
    def depth(self) -> int:
        """Records in the ring not yet released by the consumer (approximate under concurrency)."""
        return max(0, self._seq.claim_position() - self._lowest())

    def statistics(self) -> dict:
        """Lock-free counters (exact when producers and consumer are quiescent)."""
        cs = list(self._all_counters)
        rejected = sum(c.rejected for c in cs)
        evicted = sum(c.evicted for c in cs)
        return {
            "depth": self.depth,
            "claimed": sum(c.claimed for c in cs),
            "published": sum(c.published for c in cs),
            "consumed": self._cs.consumed if self._cs is not None else 0,
            "dropped": rejected + evicted,
            "rejected": rejected,
            "evicted": evicted,
            "capacity": self.capacity,
        }

    def placement(self) -> dict:
        return self._arena.nodes()

    def close(self) -> None:
        """Free the ring's memory if it owns its arena (idempotent); views become invalid."""
        if self._closed:
            return
        self._closed = True
        if self._owns_arena:
            self._arena.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} capacity={self.capacity} {self.overflow.name}>"


class SpscRing(_Ring):
    """One producer thread, one consumer thread (default capacity 16384)."""

    _multi = False
    _default_capacity = 16384


class MpscRing(_Ring):
    """Any number of producer threads, one consumer thread (default capacity 65536)."""

    _multi = True
    _default_capacity = 65536

"""Deduplicator: which (tag, id) pairs were committed within the idempotency window.

A pair is an event id (u64, 0 = "no id": never deduplicated) and a tag (u64: the scope the id lives
in; the engine uses the topic and the principal, see engine/idempotency.py). Two events are duplicates only when both
the id and the tag are equal: the table (core/idtable.py) compares both, the hash only places them.

One user at a time: the engine keeps one table per queue partition, touched only by the thread
holding that partition's token (and before the threads start, by the rebuild from the log). So
nothing here is atomic, and whole batches are probed and inserted with numpy.

Stamps are the clock's ns when a pair was committed. An expired entry stays in place until a
rebuild; committing its pair again refreshes the stamp. When the table would pass `max_load`, it is
rebuilt without expired entries and doubled while the MemoryBudget it shares with the other tables
allows (`dedup.max_bytes`; 24 bytes a bucket, tables 37.5-75 % full: 32-64 bytes per id held; a
rebuild briefly holds the old table too). At the bound, the oldest entries are evicted instead: the
window actually held then shrinks, and `window_held_s()` says by how much (`evictions` counts the
rebuilds that evicted, `evicted` the entries).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from eventstream.core.idtable import BYTES_PER_BUCKET, IdTable
from eventstream.core.records import SMALL_BATCH

SMALL = SMALL_BATCH  # up to this many pairs, the *_few calls probe with plain ints (core/records.py)


def bytes_for(buckets: int) -> int:
    """Memory of a table of `buckets` slots."""
    return buckets * BYTES_PER_BUCKET


def buckets_within(max_bytes: int) -> int:
    """The largest power-of-two bucket count whose table fits in `max_bytes` (at least 16)."""
    b = 16
    while bytes_for(b * 2) <= max_bytes:
        b *= 2
    return b


_BUILD_MIN = 4096  # load() of at least this many pairs into an empty table builds it by sorting


class MemoryBudget:
    """Bytes that several tables may use together (`dedup.max_bytes`): a table grows only while the
    sum stays within it, so a busy partition can use what idle ones leave. Growing is rare (a table
    doubles), so one lock is enough; lookups and inserts never touch the budget."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < bytes_for(16):
            raise ValueError(f"dedup max_bytes={max_bytes!r} is not allowed; allowed: an integer >= {bytes_for(16)}")
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, *, force: bool = False) -> bool:
        """Reserve `nbytes`; False (nothing reserved) when that would pass the budget, unless `force`."""
        with self._lock:
            if not force and self.used + nbytes > self.max_bytes:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class Deduplicator:
    """Pairs seen within `window_s` seconds; `buckets` a power of two (the initial size). `budget`:
    a MemoryBudget shared with other tables (None: a private one of `max_buckets` buckets)."""

    def __init__(
        self,
        buckets: int = 4096,
        window_s: float = 3600.0,
        *,
        clock=time.monotonic,
        node: int = -1,
        max_load: float = 0.75,
        max_buckets: int = 1 << 26,
        budget: MemoryBudget | None = None,
    ):
        if not isinstance(buckets, int) or buckets < 2 or buckets & (buckets - 1):
            raise ValueError(f"Deduplicator buckets={buckets!r} is not allowed; allowed: a power of two >= 2")
        if not window_s >= 0:
            raise ValueError(f"window_s={window_s!r} is not allowed; allowed: seconds >= 0")
        if not 0.1 <= max_load <= 0.95:
            raise ValueError(f"max_load={max_load!r} is not allowed; allowed: 0.1..0.95")
        if not isinstance(max_buckets, int) or max_buckets < 2 or max_buckets & (max_buckets - 1):
            raise ValueError(f"max_buckets={max_buckets!r} is not allowed; allowed: a power of two >= 2")
        self.window_ns = int(window_s * 1e9)
        self.clock = clock
        self.max_load = max_load
        self.max_buckets = max(max_buckets, buckets)
        self.budget = MemoryBudget(bytes_for(self.max_buckets)) if budget is None else budget
        self.budget.take(bytes_for(buckets), force=True)  # the initial table exists whatever the budget
        self._node = node
        self._table = IdTable(buckets, None, node)
        self._used = 0
        self.grows = 0
        self.evictions = 0  # rebuilds that had to evict live entries (the table was at max_buckets)
        self.evicted = 0  # live entries evicted
        self.removed = 0  # entries removed: expired or evicted
        self._evicted_ns = 0  # newest stamp ever evicted: pairs committed at or before it may be forgotten

    # -- helpers --------------------------------------------------------------------------------------
    def _now_ns(self, now) -> int:
        return max(1, int((self.clock() if now is None else now) * 1e9))

    def _expired(self, stamps: np.ndarray, now_ns: int) -> np.ndarray:
        return stamps.view(np.int64) + self.window_ns <= now_ns  # stamps < 2**63: the same values

    @staticmethod
    def _pairs(ids, tags) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.uint64).reshape(-1)
        tags = np.asarray(tags, dtype=np.uint64).reshape(-1)
        if len(tags) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(tags)} tags; allowed: one tag per id")
        return ids, tags

    def _room(self, extra: int, now_ns: int) -> IdTable:
        """The table, rebuilt first when `extra` more entries would pass max_load."""
        t = self._table
        if self._used + extra > self.max_load * t.buckets:
            self._rebuild(now_ns, extra)
        return self._table

    def _rebuild(self, now_ns: int, extra: int) -> None:
        """A new table without expired entries, grown (or, at max_buckets, evicting the oldest) so
        that `extra` more entries fit under max_load."""
        old = self._table
        live = (old.ids != 0) & ~self._expired(old.stamps, now_ns)
        ids, tags, stamps = old.ids[live].copy(), old.tags[live].copy(), old.stamps[live].copy()
        removed = self._used - len(ids)
        buckets = old.buckets
        while (
            len(ids) + extra > self.max_load * buckets / 2
            and buckets < self.max_buckets
            and self.budget.take(bytes_for(buckets))
        ):  # doubling adds as many bytes as there are
            buckets *= 2
        if buckets > old.buckets:
            self.grows += 1
        keep = max(0, int(self.max_load * buckets / 2) - extra)
        if len(ids) > keep:  # at the bound: keep the newest entries (half full, so this stays rare)
            drop = len(ids) - max(keep, 0)
            order = np.argsort(stamps, kind="stable")
            self._evicted_ns = max(self._evicted_ns, int(stamps[order[drop - 1]]))
            newest = order[drop:]
            ids, tags, stamps = ids[newest], tags[newest], stamps[newest]
            removed += drop
            self.evicted += drop
            self.evictions += 1
        table = IdTable(buckets, None, self._node)
        table.build(ids, tags, stamps)  # distinct pairs into an empty table: by sorting, not probing
        self._table = table
        self._used = len(ids)
        self.removed += removed
        old.close()

    # -- batches (numpy) --------------------------------------------------------------------------------
    def seen(self, ids, tags, now=None) -> np.ndarray:
        """Mask: True where the pair was committed within the window (id 0: always False)."""
        return self.seen_probe(ids, tags, now)[0]

    def seen_probe(self, ids, tags, now=None) -> tuple[np.ndarray, np.ndarray, IdTable]:
        """seen(), plus where each pair sits in the table now: (seen, slots, table), a slot < 0 =
        absent (-1 for id 0; else `IdTable.probe`'s -(empty slot + 2), where commit_probed puts it;
        an expired pair is not seen but has a slot). For `commit_probed`."""
        ids, tags = self._pairs(ids, tags)
        t = self._table
        if ids.all():  # the usual batch: every event has an id (no selection)
            slot_of = t.probe(ids, tags)
            found = slot_of >= 0
            if not found.any():
                return np.zeros(len(ids), dtype=bool), slot_of, t
            out = np.zeros(len(ids), dtype=bool)
            at = np.flatnonzero(found)
            out[at] = ~self._expired(t.stamps[slot_of[at]], self._now_ns(now))
            return out, slot_of, t
        now_ns = self._now_ns(now)
        out = np.zeros(len(ids), dtype=bool)
        slot_of = np.full(len(ids), -1, dtype=np.int64)
        nz = np.flatnonzero(ids)  # id 0 is "no id": never seen (it would match an empty slot)
        if len(nz):
            slots = t.probe(ids[nz], tags[nz])
            slot_of[nz] = slots
            found = slots >= 0
            out[nz[found]] = ~self._expired(t.stamps[slots[found]], now_ns)
        return out, slot_of, t

    def commit_probed(self, ids, tags, slots: np.ndarray, table: IdTable, now=None) -> None:
        """commit() for DISTINCT pairs whose slots `seen_probe` returned with no commit in between:
        refreshes found pairs in place and inserts the others without a second lookup."""
        if table is not self._table:  # rebuilt meanwhile: the slots mean nothing now
            return self.commit(ids, tags, now)
        ids, tags = self._pairs(ids, tags)
        now_ns = self._now_ns(now)
        present = slots >= 0
        if not present.any():  # the usual batch: every pair new
            if ids.all():
                self._insert(ids, tags, now_ns, now_ns, ends=-2 - slots, probed=table)
                return None
        else:
            table.stamps[slots[present]] = now_ns
        new = ~present & (ids != 0)
        if new.any():
            self._insert(ids[new], tags[new], now_ns, now_ns, ends=-2 - slots[new], probed=table)
        return None

    def commit(self, ids, tags, now=None) -> None:
        """Record pairs as done at `now`: refresh present ones, insert the others (repeats allowed)."""
        ids, tags = self._pairs(ids, tags)
        now_ns = self._now_ns(now)
        self._upsert(ids, tags, np.full(len(ids), now_ns, dtype=np.uint64), now_ns)

    def load(self, ids, tags, stamps_ns) -> None:
        """Commit pairs each with its own stamp (clock ns), as the rebuild at start does: a pair given
        more than once, or already present, keeps its newest stamp."""
        ids, tags = self._pairs(ids, tags)
        stamps = np.maximum(np.asarray(stamps_ns, dtype=np.uint64).reshape(-1), 1)
        if self._used == 0 and len(ids) >= _BUILD_MIN:  # an empty table: sized once, built by sorting
            nz = ids != 0
            if not nz.all():
                ids, tags, stamps = ids[nz], tags[nz], stamps[nz]
            if self._presize(len(ids)):
                self._used = self._table.build(ids, tags, stamps)
                return
        self._upsert(ids, tags, stamps, self._now_ns(None))

    def image(self) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(buckets, seed, slots, ids, tags, stamps): copies of every occupied slot of the table,
        expired ones too (a slot emptied would cut the probe chains through it), for a snapshot
        (engine/dedup_snapshot.py). By the table's user, like every other call."""
        t = self._table
        slots = np.flatnonzero(t.ids)
        return t.buckets, t.seed, slots, t.ids[slots], t.tags[slots], t.stamps[slots]

    def adopt(self, table: IdTable, used: int) -> bool:
        """Make this EMPTY deduplicator use `table` (filled elsewhere with `used` pairs, stamps in this
        clock's ns: a snapshot put back where `image()` found it). False (nothing changed) when its
        size is not allowed here (max_buckets, the shared budget) or it is fuller than max_load."""
        buckets, old = table.buckets, self._table
        if self._used or buckets > self.max_buckets or used > self.max_load * buckets:
            return False
        if not self.budget.take(bytes_for(buckets) - bytes_for(old.buckets)):
            return False
        self._table, self._used = table, used
        old.close()
        return True

    def _presize(self, n: int) -> bool:
        """Grow the (empty) table at once so that `n` entries fill it at most half of max_load, as
        far as max_buckets and the budget allow; True when `n` then fit under max_load."""
        old = self._table
        buckets = old.buckets
        while n > self.max_load * buckets / 2 and buckets < self.max_buckets and self.budget.take(bytes_for(buckets)):
            buckets *= 2
        if buckets > old.buckets:
            self.grows += 1
            self._table = IdTable(buckets, None, self._node)
            old.close()
        return n <= self.max_load * buckets

    def _upsert(self, ids: np.ndarray, tags: np.ndarray, stamps: np.ndarray, now_ns: int) -> None:
        nz = ids != 0
        if not nz.all():
            ids, tags, stamps = ids[nz], tags[nz], stamps[nz]
        if not len(ids):
            return
        t = self._table
        slots = t.lookup(ids, tags)
        found = slots >= 0
        if found.any():
            at = slots[found]
            t.stamps[at] = np.maximum(t.stamps[at], stamps[found])
        if not found.all():
            self._insert(ids[~found], tags[~found], stamps[~found], now_ns)

    def _insert(
        self,
        ids: np.ndarray,
        tags: np.ndarray,
        stamps,
        now_ns: int,
        ends: np.ndarray | None = None,
        probed: IdTable | None = None,
    ) -> None:
        """Insert pairs absent from the current table (a pair may repeat: it keeps its newest stamp),
        stamped `stamps` (one clock ns for all, or one each); `now_ns` decides what has expired if
        the table is rebuilt to make room. `ends`: for distinct pairs, the empty slots where a probe
        of table `probed` ended (IdTable.place), used while that table is still the one in use."""
        t = self._room(len(ids), now_ns)
        keep = int(t.buckets * self.max_load)
        if ends is not None and t is probed and len(ids) <= keep:
            rest = t.place(ids, tags, stamps, ends)  # one stamp for all may stay a scalar here
            if rest is None:
                self._used += len(ids)
                return
            self._used += len(ids) - int(rest.sum())
            if np.isscalar(stamps):
                stamps = np.full(len(ids), stamps, dtype=np.uint64)
            self._used += t.upsert_bulk(ids[rest], tags[rest], stamps[rest])
            return
        if np.isscalar(stamps):
            stamps = np.full(len(ids), stamps, dtype=np.uint64)
        if len(ids) > keep:  # more than the bound holds: the newest part fits
            order = np.argsort(stamps, kind="stable")
            drop = len(ids) - keep
            self._evicted_ns = max(self._evicted_ns, int(stamps[order[drop - 1]]))
            self.evicted += drop
            self.removed += drop
            self.evictions += 1
            order = order[drop:]
            ids, tags, stamps = ids[order], tags[order], stamps[order]
        self._used += t.upsert_bulk(ids, tags, stamps)

    # -- a few pairs (plain ints) -----------------------------------------------------------------------
    def seen_few(self, pairs: list[tuple[int, int]], now_ns: int | None = None) -> list[bool]:
        """seen() for a few (id, tag) pairs given as plain ints, answered as plain bools (no numpy
        temporaries: the realtime lane at low load checks one pair per call)."""
        if now_ns is None:
            now_ns = self._now_ns(None)
        t = self._table
        stamps, win = t.stamps, self.window_ns
        res = []
        for i, tag in pairs:
            hit = False
            if i:
                pos, found = t.slot_int(i, tag)
                if found:
                    hit = int(stamps[pos]) + win > now_ns
            res.append(hit)
        return res

    def commit_few(self, pairs: list[tuple[int, int]], now_ns: int | None = None) -> None:
        """commit() for a few pairs given as plain ints."""
        if now_ns is None:
            now_ns = self._now_ns(None)
        todo = {p for p in pairs if p[0]}
        if not todo:
            return
        t = self._table
        if self._used + len(todo) > self.max_load * t.buckets:  # the vectorized path rebuilds first
            ids = np.array([p[0] for p in todo], dtype=np.uint64)
            tags = np.array([p[1] for p in todo], dtype=np.uint64)
            return self.commit(ids, tags, now_ns / 1e9)
        ids, tags, stamps = t.ids, t.tags, t.stamps
        for i, tag in todo:
            pos, found = t.slot_int(i, tag)
            if not found:
                ids[pos] = i
                tags[pos] = tag
                self._used += 1
            stamps[pos] = now_ns
        return None

    # -- upkeep and state ----------------------------------------------------------------------------------
    def expire(self, now=None) -> int:
        """Remove entries older than the window; returns how many were removed."""
        now_ns = self._now_ns(now)
        t = self._table
        expired = (t.ids != 0) & self._expired(t.stamps, now_ns)
        n = int(expired.sum())
        if n:
            self._rebuild(now_ns, 0)
        return n

    def window_held_s(self, now=None) -> float:
        """The window this table still answers for: `window_s`, or less after evictions (pairs
        committed before the newest evicted stamp may have been forgotten)."""
        if not self._evicted_ns:
            return self.window_ns / 1e9
        age = (self._now_ns(now) - self._evicted_ns) / 1e9
        return max(0.0, min(self.window_ns / 1e9, age))

    def __len__(self) -> int:
        """Entries stored (expired ones count until a rebuild removes them)."""
        return self._used

    def statistics(self) -> dict:
        t = self._table
        buckets = 0 if t is None else t.buckets  # None: closed
        n = self._used
        return {
            "buckets": buckets,
            "bytes": bytes_for(buckets),
            "budget_bytes": self.budget.max_bytes,
            "entries": n,
            "load": n / buckets if buckets else 0.0,
            "removed": self.removed,
            "grows": self.grows,
            "evictions": self.evictions,
            "evicted": self.evicted,
            "window_s": self.window_ns / 1e9,
            "window_held_s": self.window_held_s(),
        }

    def close(self) -> None:
        if self._table is not None:
            self.budget.give(bytes_for(self._table.buckets))
            self._table.close()
            self._table = None  # type: ignore[assignment]  # closed: a use after close() fails loudly

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

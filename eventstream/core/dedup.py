"""Deduplicator: which event ids were seen within the idempotency window (CAS open addressing).

Table (core/idtable.py): u64 `keys` (0 = empty) and `stamps` (ns of the clock when the id was
admitted/committed; 0 = being inserted right now, which counts as present). Linear probing, and
slots are only ever filled in place, never emptied: a lookup can therefore stop at the first empty
slot, and two threads inserting the same id race for the same first empty slot - one CAS wins, the
other sees the id there. That is what makes `admit` hand each id out exactly once across threads.

An expired entry stays in place; admitting its id again wins by CAS on its stamp (old -> now), so a
refresh is also exactly-once. Physical removal (`expire`) and growing/evicting when the table is too
full rebuild the table. Rebuilds are rare structural changes, so they are serialized by a gate instead
of being lock-free: batch calls register in an `active` cell (one fetch-add per call, not per id); a
rebuild closes the `gate` cell, waits until `active` is 0, swaps tables and reopens the gate.
Both sides use sequentially consistent atomics (Dekker pattern), so neither misses the other.

Vectorized: hashing, lookups (`seen`, the first-slot pre-check of `admit`, `commit` refreshes) and
rebuilds are numpy over the whole batch; only inserts of new ids use per-id CAS.

Id 0 means "no id": never deduplicated (seen -> False, admit -> True, commit ignores it).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from eventstream.core import atomic
from eventstream.core.arena import Arena
from eventstream.core.idtable import IdTable
from eventstream.core.wait import SleepBackoff

WHEN_FULL = ("grow", "evict")
SMALL = 8  # up to this many ids, the *_exclusive calls probe with plain ints (no numpy temporaries)


class DedupTableFull(RuntimeError):
    pass


class Deduplicator:
    """Ids seen within `window_s` seconds; `buckets` a power of two; `when_full` "grow" | "evict"."""

    def __init__(self, buckets: int = 4096, window_s: float = 3600.0, *, clock=time.monotonic,
                 when_full: str = "grow", arena: Arena | None = None, node: int = -1,
                 max_load: float = 0.75, max_buckets: int = 1 << 26):
        if not isinstance(buckets, int) or buckets < 2 or buckets & (buckets - 1):
            raise ValueError(f"Deduplicator buckets={buckets!r} is not allowed; allowed: a power of two >= 2")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full={when_full!r} is not allowed; allowed: {', '.join(WHEN_FULL)}")
        if not window_s >= 0:
            raise ValueError(f"window_s={window_s!r} is not allowed; allowed: seconds >= 0")
        if not 0.1 <= max_load <= 0.95:
            raise ValueError(f"max_load={max_load!r} is not allowed; allowed: 0.1..0.95")
        self.window_ns = int(window_s * 1e9)
        self.clock = clock
        self.when_full = when_full
        self.max_load = max_load
        self.max_buckets = max(max_buckets, buckets)
        self._node = node
        self._ctl_arena = Arena(8 * atomic.CACHE_LINE, node, name="dedup.ctl")
        cells = atomic.CellBlock(self._ctl_arena, 6)
        self._gate, self._active, self._used, self._admitted, self._dupes, self._removed = cells.cells
        self._cells = cells
        self._table = IdTable(buckets, arena, node)
        self._struct_lock = threading.Lock()  # serializes rebuilds only; batch calls never take it
        self._wait = SleepBackoff()
        self.grows = 0
        self.evictions = 0

    # -- gate ---------------------------------------------------------------------------------------
    def _enter(self) -> IdTable:
        while True:
            if self._gate.load() == 0:
                self._active.fetch_add(1)
                if self._gate.load() == 0:
                    return self._table
                self._active.fetch_add(-1)
            if not self._wait.wait_for(lambda: self._gate.load() == 0, 60.0):
                raise TimeoutError("dedup table rebuild did not finish within 60 s")

    def _exit(self) -> None:
        self._active.fetch_add(-1)

    def _rebuild(self, reason: str, now_ns: int, extra: int = 0) -> int:
        """Rebuild without expired entries; grow or evict when still too full (with room for `extra`
        more entries). Returns entries removed."""
        with self._struct_lock:
            self._gate.store(1)
            try:
                if not self._wait.wait_for(lambda: self._active.load() == 0, 60.0):
                    raise TimeoutError("dedup rebuild: batch calls did not drain within 60 s")
                return self._rebuild_locked(reason, now_ns, extra)
            finally:
                self._gate.store(0)

    def _rebuild_locked(self, reason: str, now_ns: int, extra: int = 0) -> int:
        old = self._table
        occupied = old.keys != 0
        live = occupied & ~self._expired(old.stamps, now_ns)
        keys, stamps = old.keys[live].copy(), old.stamps[live].copy()
        removed = int(occupied.sum()) - len(keys)
        buckets = old.buckets
        if reason == "full":
            if self.when_full == "grow" and buckets < self.max_buckets:
                while len(keys) + extra + 1 > self.max_load * buckets / 2 and buckets < self.max_buckets:
                    buckets *= 2
                self.grows += 1
            keep = int(self.max_load * buckets / 2)
            if len(keys) > keep:  # evict policy, or grown to the limit: keep the newest entries
                newest = np.argsort(stamps, kind="stable")[len(keys) - keep:]
                removed += len(keys) - keep
                keys, stamps = keys[newest], stamps[newest]
                self.evictions += 1
        if buckets == old.buckets and removed == 0:
            return 0
        table = old if buckets == old.buckets else IdTable(buckets, None, self._node)
        if table is old:
            old.keys[:] = 0
            old.stamps[:] = 0
        table.insert_bulk(keys, stamps)
        self._table = table
        self._used.store(len(keys))
        self._removed.fetch_add(removed)
        if table is not old:
            old.close()
        return removed

    # -- helpers --------------------------------------------------------------------------------------
    def _now_ns(self, now) -> int:
        return max(1, int((self.clock() if now is None else now) * 1e9))

    def _expired(self, stamps: np.ndarray, now_ns: int) -> np.ndarray:
        return (stamps != 0) & (stamps.astype(np.int64) + self.window_ns <= now_ns)

    @staticmethod
    def _ids(ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.uint64).reshape(-1)

    # -- public batch API -----------------------------------------------------------------------------
    def seen(self, ids, now=None) -> np.ndarray:
        """Mask: True where the id was admitted/committed within the window (id 0: always False)."""
        ids = self._ids(ids)
        now_ns = self._now_ns(now)
        out = np.zeros(len(ids), dtype=bool)
        nz = np.flatnonzero(ids)
        if not len(nz):
            return out
        t = self._enter()
        try:
            slot_of, _ = t.lookup(ids[nz])
            found = slot_of >= 0
            stamps = t.stamps[slot_of[found]]
            out[nz[found]] = ~self._expired(stamps, now_ns)
        finally:
            self._exit()
        return out

    def admit(self, ids, now=None) -> np.ndarray:
        """Claim ids not present within the window; mask True for the ones THIS call claimed.

        Across threads and within one batch, each id is admitted exactly once per window.
        """
        ids = self._ids(ids)
        now_ns = self._now_ns(now)
        out = np.zeros(len(ids), dtype=bool)
        out[ids == 0] = True
        todo = np.flatnonzero(ids)
        while len(todo):
            todo, full = self._admit_some(ids, todo, out, now_ns, refresh=False)
            if full or self._used.load() > self.max_load * self._table.buckets:
                self._rebuild("full", now_ns)
        return out

    def commit(self, ids, now=None) -> None:
        """Record ids as done at `now` (insert, or refresh the stamp of a present id)."""
        ids = self._ids(ids)
        now_ns = self._now_ns(now)
        scratch = np.zeros(len(ids), dtype=bool)
        todo = np.flatnonzero(ids)
        while len(todo):
            todo, full = self._admit_some(ids, todo, scratch, now_ns, refresh=True)
            if full or self._used.load() > self.max_load * self._table.buckets:
                self._rebuild("full", now_ns)

    def seen_exclusive(self, ids, now=None) -> np.ndarray:
        """seen() for the table's only user (no gate: no rebuild can run meanwhile)."""
        ids = self._ids(ids)
        now_ns = self._now_ns(now)
        t = self._table
        if len(ids) > SMALL:
            out = np.zeros(len(ids), dtype=bool)
            nz = np.flatnonzero(ids)  # id 0 is "no id": never seen (it would match an empty slot)
            if len(nz):
                slot_of, _ = t.lookup(ids[nz])
                found = slot_of >= 0
                out[nz[found]] = ~self._expired(t.stamps[slot_of[found]], now_ns)
            return out
        return np.array(self.seen_few(ids.tolist(), now_ns), dtype=bool)

    def seen_probe(self, ids, now=None) -> tuple[np.ndarray, np.ndarray, IdTable]:
        """seen_exclusive, plus where each id sits in the table now: (seen, slots, table), slot -1 =
        absent (an expired id is not seen but has a slot). For `commit_probed` by the only user."""
        ids = self._ids(ids)
        now_ns = self._now_ns(now)
        t = self._table
        out = np.zeros(len(ids), dtype=bool)
        slot_of = np.full(len(ids), -1, dtype=np.int64)
        nz = np.flatnonzero(ids)  # id 0 is "no id": never seen (it would match an empty slot)
        if len(nz):
            slots, _ = t.lookup(ids[nz])
            slot_of[nz] = slots
            found = slots >= 0
            out[nz[found]] = ~self._expired(t.stamps[slots[found]], now_ns)
        return out, slot_of, t

    def commit_probed(self, ids: np.ndarray, slots: np.ndarray, table: IdTable, now=None) -> None:
        """commit_exclusive for DISTINCT ids whose slots `seen_probe` returned, by the table's only user
        with no commit in between: refreshes found ids in place and inserts the others without a
        second lookup (falls back to commit_exclusive when the table was rebuilt meanwhile)."""
        if self.when_full != "grow" or table is not self._table:
            return self.commit_exclusive(ids, now)
        now_ns = self._now_ns(now)
        present = slots >= 0
        if present.any():
            table.stamps[slots[present]] = now_ns
        new = ids[~present & (ids != 0)]
        if not len(new):
            return None
        t = table
        if self._used.load() + len(new) > self.max_load * t.buckets:
            self._rebuild("full", now_ns, extra=len(new))
            t = self._table
        if self._used.load() + len(new) > self.max_load * t.buckets:  # at max_buckets: the CAS path evicts
            return self.commit(new, now)
        t.insert_bulk(new, np.full(len(new), now_ns, dtype=np.uint64))
        self._used.fetch_add(len(new))
        return None

    def seen_few(self, keys: list[int], now_ns: int | None = None) -> list[bool]:
        """seen_exclusive for a few ids given as plain ints, answered as plain bools (no numpy
        temporaries: the realtime lane at low load checks one id per call). `now_ns`: the clock in ns."""
        if now_ns is None:
            now_ns = self._now_ns(None)
        t = self._table
        stamps, win = t.stamps, self.window_ns
        res = []
        for k in keys:
            hit = False
            if k:
                pos, found = t.slot_int(k)
                if found:
                    st = int(stamps[pos])
                    hit = st == 0 or st + win > now_ns
            res.append(hit)
        return res

    def commit_few(self, keys: list[int], now_ns: int | None = None) -> None:
        """commit_exclusive for a few ids given as plain ints."""
        if now_ns is None:
            now_ns = self._now_ns(None)
        if self.when_full != "grow" or not self._commit_few(keys, now_ns):
            self.commit_exclusive(np.array(keys, dtype=np.uint64), now_ns / 1e9)

    def commit_exclusive(self, ids, now=None) -> None:
        """commit() for a caller that is this table's only user while the call runs (the engine keeps
        one table per partition and calls this while holding the partition's token). New ids go in
        with one vectorized probe loop instead of one CAS each (a few ids: plain-int probes)."""
        if self.when_full != "grow":
            return self.commit(ids, now)
        ids = self._ids(ids)
        if len(ids) <= SMALL and self._commit_few(ids.tolist(), self._now_ns(now)):
            return None
        ids = np.unique(ids[ids != 0])
        if not len(ids):
            return None
        now_ns = self._now_ns(now)
        t = self._table
        slot_of, _ = t.lookup(ids)
        found = slot_of >= 0
        t.stamps[slot_of[found]] = now_ns
        new = ids[~found]
        if not len(new):
            return None
        if self._used.load() + len(new) > self.max_load * t.buckets:
            self._rebuild("full", now_ns, extra=len(new))
            t = self._table
        if self._used.load() + len(new) > self.max_load * t.buckets:  # at max_buckets: the CAS path evicts
            return self.commit(new, now)
        t.insert_bulk(new, np.full(len(new), now_ns, dtype=np.uint64))
        self._used.fetch_add(len(new))
        return None

    def _commit_few(self, ids: list[int], now_ns: int) -> bool:
        """commit_exclusive for a few ids with plain ints; False (nothing done) when the table would
        need a rebuild first (the vectorized path does that)."""
        todo = {k for k in ids if k}
        if not todo:
            return True
        t = self._table
        used = self._used.load()
        if used + len(todo) > self.max_load * t.buckets:
            return False
        keys, stamps = t.keys, t.stamps
        new = 0
        for k in todo:
            pos, found = t.slot_int(k)
            if not found:
                keys[pos] = k
                new += 1
            stamps[pos] = now_ns
        if new:
            self._used.fetch_add(new)
        return True

    def _admit_some(self, ids, todo, out, now_ns: int, refresh: bool):
        """Admit ids[todo] into the current table; returns (indexes left for after a rebuild, full)."""
        cas, load, store = atomic.cas, atomic.load, atomic.store
        admitted = dupes = inserted = 0
        left = []
        t = self._enter()
        try:
            slot_of, home = t.lookup(ids[todo])
            found = slot_of >= 0
            if refresh:  # commit: present ids just get a new stamp (vectorized)
                t.stamps[slot_of[found]] = now_ns
            else:
                fresh = found.copy()
                fresh[found] = ~self._expired(t.stamps[slot_of[found]], now_ns)
                dupes += int(fresh.sum())
                found = fresh  # expired ones go through the CAS path below
            kb, sb, m = t.key_base, t.stamp_base, t.mask
            # inserts allowed before the table passes max_load: past it, probing slows down sharply,
            # so the rest waits for the rebuild (grow/evict) instead of filling the table to the brim
            budget = int(self.max_load * t.buckets) - self._used.load()
            for j in np.flatnonzero(~found).tolist():
                i = int(todo[j])
                if inserted >= budget:
                    left.append(i)
                    continue
                key = int(ids[i])
                slot = int(home[j])
                for _ in range(t.buckets):
                    k = load(kb + 8 * slot)
                    if k == key:
                        st = load(sb + 8 * slot)
                        if st != 0 and st + self.window_ns <= now_ns:  # expired: refresh wins by CAS
                            ok, _ = cas(sb + 8 * slot, st, now_ns)
                        else:
                            ok = False
                            if refresh:
                                store(sb + 8 * slot, now_ns)
                        out[i] = ok
                        admitted += ok
                        dupes += not ok
                        break
                    if k == 0:
                        ok, k = cas(kb + 8 * slot, 0, key)
                        if ok:
                            store(sb + 8 * slot, now_ns)
                            out[i] = True
                            admitted += 1
                            inserted += 1
                            break
                        if k == key:
                            dupes += 1
                            break
                    slot = (slot + 1) & m
                else:
                    left.append(i)
        finally:
            self._exit()
        if inserted:
            self._used.fetch_add(inserted)
        if not refresh:
            if admitted:
                self._admitted.fetch_add(admitted)
            if dupes:
                self._dupes.fetch_add(dupes)
        return np.asarray(left, dtype=np.int64), bool(left)

    def expire(self, now=None) -> int:
        """Remove entries older than the window; returns how many were removed."""
        now_ns = self._now_ns(now)
        t = self._table
        if not self._expired(t.stamps, now_ns).any():
            return 0
        return self._rebuild("expire", now_ns)

    def __len__(self) -> int:
        """Entries stored (expired ones count until expire() removes them)."""
        return self._table.occupied()

    def statistics(self) -> dict:
        t = self._table
        n = len(self)
        return {
            "buckets": t.buckets,
            "entries": n,
            "load": n / t.buckets,
            "admitted": self._admitted.load(),
            "duplicates": self._dupes.load(),
            "removed": self._removed.load(),
            "grows": self.grows,
            "evictions": self.evictions,
        }

    def close(self) -> None:
        self._table.close()
        self._ctl_arena.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""IdTable: the open-addressing table under the Deduplicator: exact (id, tag) pairs -> stamps.

Three arrays in arena memory: `ids` (u64, 0 = empty slot), `tags` (u64: which scope the id belongs
to, e.g. the topic and who sent it) and `stamps` (u64). A pair is present only where BOTH the id and the tag match:
the hash only chooses where probing starts, it never decides equality, so no (tag, id) can stand in
for another one (an id chosen to collide on another topic's hash only lengthens a probe).

Linear probing from a home slot given by a seeded multiplicative hash of the pair (the seed is drawn
per table, so nobody outside can aim ids at one probe chain). Slots are filled in place and never
emptied (a rebuild makes a new table), so a lookup stops at the first empty slot. This module knows
nothing of windows or expiry: core/dedup.py gives stamps their meaning. The table has one user at a
time (core/dedup.py says who); nothing here is atomic.

Two ways in:
* `lookup` / `upsert_bulk`: numpy over a whole batch;
* `slot_int`: one pair as plain ints, no numpy temporaries (a few events at a time).
"""

from __future__ import annotations

import secrets

import numpy as np

from eventstream.core.arena import Arena

_G1 = 0x9E3779B97F4A7C15
_G2 = 0xC2B2AE3D27D4EB4F
_M64 = (1 << 64) - 1
BYTES_PER_BUCKET = 8 + 8 + 8  # ids, stamps, tags
_TAIL = 8  # probe() and upsert_bulk(): pairs left when they finish them one by one with plain ints
WINDOW = 8  # slots of a chain probe() reads per pair and round (64 bytes of ids)
_STEPS = np.arange(WINDOW, dtype=np.int64)


class IdTable:
    """`buckets` (a power of two) slots in `arena` (or a private arena on `node` when None)."""

    def __init__(self, buckets: int, arena: Arena | None, node: int, seed: int | None = None):
        self.buckets = buckets
        self.mask = buckets - 1
        self.bits = buckets.bit_length() - 1
        self.seed = secrets.randbits(64) if seed is None else seed & _M64
        self._seed = np.uint64(self.seed)
        self.own = arena is None
        self.arena = (
            arena
            if arena is not None
            else Arena(buckets * BYTES_PER_BUCKET + 256, node, name="dedup.table", huge_pages=True)
        )
        # a private arena is fresh memory, zero already: not written now, so a table of millions of
        # slots costs no pass over its memory before the first insert (pages come in as it fills)
        fresh = {"zero": False} if self.own else {}
        self.ids = self.arena.array(buckets, np.uint64, **fresh)
        self.stamps = self.arena.array(buckets, np.uint64, **fresh)
        self.tags = self.arena.array(buckets, np.uint64, **fresh)
        # `ids` as overlapping items of WINDOW adjacent slots (item s = slots s..s+WINDOW-1)
        self._wins = (  # one item of WINDOW slots per slot: indexing it copies each pair's slots in one go
            np.ndarray((buckets - WINDOW + 1,), np.dtype((np.void, 8 * WINDOW)), self.ids, 0, (8,))
            if buckets >= WINDOW
            else None
        )

    def mix(self, ids: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """The seeded 64-bit hash of each pair; its top `bits` bits are the home slot."""
        x = ids ^ self._seed
        x *= np.uint64(_G1)
        x ^= tags.astype(np.uint64, copy=False) * np.uint64(_G2)
        x *= np.uint64(_G1)
        return x

    def home(self, ids: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """Home slot of each pair (vectorized; uint64 arithmetic wraps)."""
        if self.bits == 0:
            return np.zeros(len(ids), dtype=np.int64)
        x = self.mix(ids, tags)
        x >>= np.uint64(64 - self.bits)
        return x.view(np.int64)  # < buckets: the same value

    def home_int(self, i: int, tag: int) -> int:
        """Home slot of one pair given as plain ints (the same value as `home`)."""
        if self.bits == 0:
            return 0
        x = ((i ^ self.seed) * _G1) & _M64
        x ^= (tag * _G2) & _M64
        return ((x * _G1) & _M64) >> (64 - self.bits)

    def slot_int(self, i: int, tag: int) -> tuple[int, bool]:
        """(slot, True) where the pair (i, tag) (plain ints, i != 0) sits, else (the empty slot that
        ends its probe, False): where the owner inserts it."""
        ids, tags, mask = self.ids, self.tags, self.mask
        pos = self.home_int(i, tag)
        while True:
            cur = int(ids[pos])
            if cur == i and int(tags[pos]) == tag:
                return pos, True
            if cur == 0:
                return pos, False
            pos = (pos + 1) & mask

    def lookup(self, ids: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """Slot of each pair, or -1 where absent (vectorized probing)."""
        slot_of = self.probe(ids, tags)
        slot_of[slot_of < 0] = -1
        return slot_of

    def probe(self, ids: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """Like `lookup`, but an absent pair gets `-(e + 2)`, where `e` is the empty slot that ended
        its probe: where it belongs if it is inserted before anything else is (`place`).

        The first round reads each pair's home slot (one random read a pair: in a large table that
        read is the cost). The pairs whose chain goes on are then probed WINDOW slots at a time
        from the slot after it, one copy of adjacent slots per pair (the same cache lines, already
        read), so a batch takes two or three numpy rounds even in a crowded table instead of one
        round per slot of its longest chain (a numpy call costs microseconds whatever its size)."""
        n = len(ids)
        home = self.home(ids, tags)
        k = self.ids[home]
        hit = k == ids
        if hit.any():
            hit &= self.tags[home] == tags
            slot_of = np.where(hit, home, -2 - home)
            done = hit | (k == 0)
        else:
            slot_of = -2 - home
            done = k == 0
        if n == 0 or done.all():
            return slot_of
        active = np.flatnonzero(~done)
        base = home[active]
        base += 1
        base &= self.mask
        wins = self._wins
        width = WINDOW if wins is not None else self.buckets
        steps = _STEPS[:width]
        mask = self.mask
        for _ in range(self.buckets // width + 1):
            if len(active) <= _TAIL:  # a few long chains left: plain ints beat numpy rounds
                for j, b in zip(active.tolist(), base.tolist(), strict=True):
                    slot_of[j] = self._probe_int(int(ids[j]), int(tags[j]), b)
                break
            if wins is not None and int(base.max()) <= mask + 1 - WINDOW:
                # (m, WINDOW): each pair's next WINDOW slots (no wrap)
                k = wins[base].view(np.uint64).reshape(-1, WINDOW)
            else:
                k = self.ids[(base[:, None] + steps) & mask]
            stop = k == 0
            hit = k == ids[active][:, None]
            if hit.any():  # the id matches: the pair only where the tag does too
                r, c = np.nonzero(hit)
                bad = self.tags[(base[r] + c) & mask] != tags[active[r]]
                if bad.any():
                    hit[r[bad], c[bad]] = False
                stop |= hit
                first = stop.argmax(axis=1)
                slot = base + first
                slot &= mask
                res = np.where(hit[np.arange(len(first)), first], slot, -2 - slot)
            else:
                first = stop.argmax(axis=1)
                slot = base + first
                slot &= mask
                res = -2 - slot
            done = stop.any(axis=1)
            slot_of[active[done]] = res[done]
            left = ~done
            active = active[left]
            if not len(active):
                break
            base = base[left]
            base += width
            base &= mask
        return slot_of

    def _probe_int(self, i: int, tag: int, pos: int) -> int:
        """probe() of one pair (plain ints) from slot `pos` of its chain on."""
        ids, tags, mask = self.ids, self.tags, self.mask
        while True:
            cur = int(ids[pos])
            if cur == i and int(tags[pos]) == tag:
                return pos
            if cur == 0:
                return -2 - pos
            pos = (pos + 1) & mask

    def place(self, ids: np.ndarray, tags: np.ndarray, stamps, ends: np.ndarray) -> np.ndarray | None:
        """Insert DISTINCT absent pairs at the empty slots `ends` where `probe` ended their probes
        (nothing inserted since): one write per pair instead of probing again. Linear probing puts a
        pair in the first empty slot of its chain, which is that slot; no other pair's chain runs
        through an empty slot, so filling it moves no one. Of pairs whose probes ended at the same
        slot, one takes it; those (and pairs without one, end < 0) are not placed: returns their
        mask, for `upsert_bulk`, or None when every pair was placed. `stamps`: one per pair, or one
        for all."""
        n = len(ends)
        if n == 0:
            return None
        if int(ends.min()) < 0:
            later = ends < 0
            ok = np.flatnonzero(~later)
            rest = self.place(ids[ok], tags[ok], stamps if np.isscalar(stamps) else stamps[ok], ends[ok])
            if rest is not None:
                later[ok[rest]] = True
            return later
        if self.ids[ends].any():  # the contract was broken (a commit in between): probe again
            return np.ones(n, dtype=bool)
        # pairs racing for one empty slot: each writes its index into the slot's stamp (an empty
        # slot's stamp means nothing) and reading it back says which one took it
        idx = np.arange(n, dtype=np.uint64)
        self.stamps[ends] = idx
        won = self.stamps[ends] == idx
        if won.all():
            self.ids[ends] = ids
            self.tags[ends] = tags
            self.stamps[ends] = stamps
            return None
        at = ends[won]
        self.ids[at] = ids[won]
        self.tags[at] = tags[won]
        self.stamps[at] = stamps if np.isscalar(stamps) else stamps[won]
        return ~won

    def upsert_bulk(self, ids: np.ndarray, tags: np.ndarray, stamps: np.ndarray) -> int:
        """Vectorized: a pair already present keeps the newer of its stamps, an absent one is inserted;
        a pair may be given several times. Returns the slots filled (the caller makes room first)."""
        pos = self.home(ids, tags)
        pending = np.arange(len(ids))
        filled = 0
        while len(pending):
            if len(pending) <= _TAIL:  # a few left: one by one with plain ints (repeats see each other)
                for j in pending.tolist():
                    at = self._probe_int(int(ids[j]), int(tags[j]), int(pos[j]))
                    if at >= 0:
                        self.stamps[at] = max(int(self.stamps[at]), int(stamps[j]))
                    else:
                        at = -2 - at
                        self.ids[at], self.tags[at], self.stamps[at] = ids[j], tags[j], stamps[j]
                        filled += 1
                break
            slots = pos[pending]
            cur = self.ids[slots]
            same = (cur == ids[pending]) & (self.tags[slots] == tags[pending])
            if same.any():  # rare (a repeat): maximum.at handles repeats of one slot
                np.maximum.at(self.stamps, slots[same], stamps[pending[same]])
            cand = np.flatnonzero(cur == 0)
            won = np.zeros(len(pending), dtype=bool)
            if len(cand):
                # pairs racing for one free slot: each writes its index into the free slot's stamp
                # (free slots' stamps mean nothing) and reading back says which one took it
                cslots = slots[cand]
                self.stamps[cslots] = cand
                win = cand[self.stamps[cslots] == cand.astype(np.uint64)]
                at, who = slots[win], pending[win]
                self.ids[at] = ids[who]
                self.tags[at] = tags[who]
                self.stamps[at] = stamps[who]
                won[win] = True
                filled += len(win)
            # the losers of a race look at the same slot again (the winner may be the same pair);
            # the others move on
            move = (cur != 0) & ~same
            pos[pending[move]] = (slots[move] + 1) & self.mask
            pending = pending[~(same | won)]
        return filled

    def build(self, ids: np.ndarray, tags: np.ndarray, stamps: np.ndarray) -> int:
        """Fill this EMPTY table with pairs (ids != 0; a repeated pair keeps its newest stamp) by one
        sort and sequential writes instead of probing: the rebuild at start loads millions of pairs.

        Sorted by hash, pairs come in home-slot order, and linear probing places the k-th at
        max(its home, the slot after the (k-1)-th): a running maximum. The sort key is the hash's top
        bits with the pair's index in the low bits (a plain sort, no argsort). Pairs whose top bits
        meet another's (repeats, and rare look-alikes) and the few that would run past the last slot
        go in afterwards through `upsert_bulk`. Returns the slots filled."""
        n = len(ids)
        low = max(1, (n - 1).bit_length())
        if self.bits == 0 or n < 2 or self.bits + low > 64:
            return self.upsert_bulk(ids, tags, stamps)
        low_mask = np.uint64((1 << low) - 1)
        key = self.mix(ids, tags)
        key &= ~low_mask
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        order = (key & low_mask).view(np.int64)  # < 2**low: the same values
        key >>= np.uint64(low)  # the top 64 - low bits of each hash, in rising order
        alike = key[1:] == key[:-1]
        if alike.any():
            later = np.zeros(n, dtype=bool)
            later[1:] = alike
            later[:-1] |= alike
            rest, order, key = order[later], order[~later], key[~later]
        else:
            rest = order[:0]
        k = np.arange(len(order), dtype=np.int64)
        key >>= np.uint64(64 - low - self.bits)
        pos = key.view(np.int64)  # home slots (< buckets: the same values; key is not needed after)
        pos -= k
        np.maximum.accumulate(pos, out=pos)
        pos += k
        n_in = int(np.searchsorted(pos, self.buckets))  # pos rises strictly: the ones that fit come first
        at, take = pos[:n_in], order[:n_in]
        self.ids[at] = ids[take]
        self.tags[at] = tags[take]
        self.stamps[at] = stamps[take]
        if n_in < len(order):
            rest = np.concatenate((order[n_in:], rest))
        if len(rest):
            return n_in + self.upsert_bulk(ids[rest], tags[rest], stamps[rest])
        return n_in

    def occupied(self) -> int:
        """Slots holding a pair."""
        return int(np.count_nonzero(self.ids))

    def close(self) -> None:
        if self.own:
            self.arena.close()

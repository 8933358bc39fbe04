"""Deduplicator: exact (id, tag) pairs, the window, growth within a shared memory budget, eviction
that says what it cost, and the plain-int and numpy paths agreeing."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from eventstream.core.dedup import SMALL, Deduplicator, MemoryBudget, bytes_for, buckets_within
from eventstream.core.idtable import IdTable

U64 = np.uint64
U32 = np.uint32


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pairs(ids, tags):
    return np.asarray(ids, dtype=U64), np.asarray(tags, dtype=U32)


def test_seen_commit_zero_id_and_exact_pairs():
    clock = FakeClock()
    with Deduplicator(16, window_s=10.0, clock=clock) as d:
        ids, tags = pairs([5, 0, 7, 5], [1, 1, 1, 2])
        assert d.seen(ids, tags).tolist() == [False] * 4
        d.commit(ids, tags)
        assert d.seen(ids, tags).tolist() == [True, False, True, True]
        assert len(d) == 3  # (5,1) (7,1) (5,2): id 0 is "no id"
        # the same id under another tag, another id under the same tag: not seen
        assert d.seen(*pairs([5, 7, 6], [3, 2, 1])).tolist() == [False, False, False]
        assert d.seen_few([(5, 1), (5, 3), (0, 1), (7, 1)]) == [True, False, False, True]


def old_key(event_id: int, topic: str) -> int:
    """The key the engine used before keys were exact: id * golden ^ blake2b-64(topic)."""
    h = int.from_bytes(hashlib.blake2b(topic.encode(), digest_size=8).digest(), "little") or 1
    return ((event_id * 0x9E3779B97F4A7C15) & (2**64 - 1)) ^ h


def forged_id(victim_id: int, victim_topic: str, own_topic: str) -> int:
    """An id on `own_topic` whose old key equals the victim's (golden is odd: it has an inverse)."""
    inv = pow(0x9E3779B97F4A7C15, -1, 2**64)
    h_own = old_key(0, own_topic) ^ 0  # the topic hash alone (0 * golden = 0)
    return ((old_key(victim_id, victim_topic) ^ h_own) * inv) & (2**64 - 1)


def test_ids_forged_to_collide_with_another_topic_are_not_duplicates():
    victim = list(range(1, 21))
    forged = [forged_id(v, "victim", "attacker") for v in victim]
    assert all(old_key(f, "attacker") == old_key(v, "victim") for f, v in zip(forged, victim))
    with Deduplicator(16, 60.0) as d:
        d.commit(*pairs(forged, [2] * 20))  # the attacker's topic id 2, stored first
        assert not d.seen(*pairs(victim, [1] * 20)).any()
        assert d.seen_few([(v, 1) for v in victim]) == [False] * 20
        d.commit_few([(v, 1) for v in victim[:5]])
        d.commit(*pairs(victim[5:], [1] * 15))
        assert d.seen(*pairs(victim, [1] * 20)).all() and d.seen(*pairs(forged, [2] * 20)).all()
        assert len(d) == 40


def test_pairs_sharing_one_probe_chain_stay_apart():
    """Pairs that land on the same home slot (found by brute force for this table's seed) are all
    kept, and each is found only as itself."""
    t = IdTable(64, None, -1, seed=12345)
    try:
        want = t.home_int(1, 1)
        same = [(i, g) for i in range(1, 4000) for g in (1, 2) if t.home_int(i, g) == want][:12]
        assert len(same) >= 8
        ids, tags = pairs([p[0] for p in same], [p[1] for p in same])
        assert (t.home(ids, tags) == want).all()
        assert t.upsert_bulk(ids, tags, np.arange(1, len(same) + 1, dtype=U64)) == len(same)
        slots = t.lookup(ids, tags)
        assert len(set(slots.tolist())) == len(same) and (slots >= 0).all()
        assert t.stamps[slots].tolist() == list(range(1, len(same) + 1))
        assert [t.slot_int(i, g) for i, g in same] == [(s, True) for s in slots.tolist()]
        swapped = t.lookup(ids, tags ^ U32(3))  # tags 1<->2: the other pair where it exists, else absent
        for k, (i, g) in enumerate(same):
            other = (i, g ^ 3)
            assert (swapped[k] >= 0) == (other in same)
    finally:
        t.close()


def test_window_expiry_refresh_and_expire():
    clock = FakeClock(100.0)
    with Deduplicator(64, window_s=60.0, clock=clock) as d:
        tag = np.ones
        d.commit(np.arange(1, 11, dtype=U64), tag(10, U32))
        clock.t = 130.0
        d.commit(np.arange(11, 16, dtype=U64), tag(5, U32))
        clock.t = 159.9
        assert d.seen(*pairs([1, 12], [1, 1])).tolist() == [True, True]
        clock.t = 160.0
        assert d.seen(*pairs([1, 12], [1, 1])).tolist() == [False, True]
        d.commit(*pairs([2], [1]))  # an expired pair committed again: refreshed in place
        assert len(d) == 15
        assert d.expire() == 9  # 1, 3..10
        assert len(d) == 6 and d.statistics()["removed"] == 9
        assert d.seen(*pairs([2, 3, 11], [1, 1, 1])).tolist() == [True, False, True]


def test_grows_until_its_budget_then_evicts_the_oldest_and_says_what_it_held():
    clock = FakeClock(0.0)
    budget = MemoryBudget(bytes_for(64))
    with Deduplicator(16, window_s=1e6, clock=clock, budget=budget) as d:
        for i in range(30):
            clock.t = float(i)
            d.commit(np.arange(i * 10 + 1, i * 10 + 11, dtype=U64), np.ones(10, U32))
        st = d.statistics()
        assert st["buckets"] == 64 and st["bytes"] <= budget.max_bytes and budget.used == st["bytes"]
        assert st["grows"] >= 1 and st["evictions"] >= 1 and st["evicted"] > 0
        assert d.seen(np.arange(291, 301, dtype=U64), np.ones(10, U32)).all()  # the newest survive
        assert not d.seen(np.arange(1, 11, dtype=U64), np.ones(10, U32)).any()
        assert len(d) + st["evicted"] == 300
        # the window it still answers for: since the newest evicted stamp, not the configured 1e6 s
        held = d.window_held_s()
        assert 0 < held < 30 and st["window_s"] == 1e6
    assert budget.used == 0


def test_tables_share_one_budget():
    budget = MemoryBudget(bytes_for(80))  # both start at 16 buckets; 48 more: a can reach 64
    a = Deduplicator(16, 1e6, budget=budget)
    b = Deduplicator(16, 1e6, budget=budget)
    try:
        a.commit(np.arange(1, 200, dtype=U64), np.ones(199, U32))  # a takes what b does not use
        assert a.statistics()["buckets"] == 64 and budget.used == budget.max_bytes
        b.commit(np.arange(1, 200, dtype=U64), np.ones(199, U32))
        assert b.statistics()["buckets"] == 16 and b.statistics()["evicted"] > 0  # nothing left to grow into
        assert budget.used == budget.max_bytes
    finally:
        a.close()
        b.close()
    assert budget.used == 0


def test_validation_names_what_is_allowed():
    with pytest.raises(ValueError, match="power of two"):
        Deduplicator(100)
    with pytest.raises(ValueError, match="allowed: an integer >="):
        MemoryBudget(10)
    with pytest.raises(ValueError, match="one tag per id"):
        Deduplicator(16).seen([1, 2], [1])
    assert buckets_within(bytes_for(1024)) == 1024 and buckets_within(bytes_for(1024) - 1) == 512


def test_probed_commit_refreshes_expired_pairs_and_inserts_new_ones_once():
    clock = FakeClock(100.0)
    with Deduplicator(16, 10.0, clock=clock) as d:
        d.commit(*pairs([11, 12], [1, 1]))
        clock.t += 20.0  # both expired, still in the table
        ids, tags = pairs([11, 12, 13, 14, 0], [1, 1, 1, 1, 1])
        seen, slots, table = d.seen_probe(ids, tags)
        assert seen.tolist() == [False] * 5
        assert (slots[:2] >= 0).all() and (slots[2:] < 0).all()
        d.commit_probed(ids, tags, slots, table)
        assert d.seen(ids, tags).tolist() == [True, True, True, True, False]
        assert d.statistics()["entries"] == 4  # refreshed in place, not inserted twice


def test_probed_commits_place_pairs_where_their_probe_ended_and_agree_with_a_set():
    """commit_probed puts absent pairs into the empty slot that ended their probe (IdTable.place);
    pairs of one batch ending at the same slot, long chains (a crowded small table) and pairs
    probed but then committed by someone else first all end up stored exactly once."""
    rng = np.random.default_rng(5)
    ref: set[tuple[int, int]] = set()
    with Deduplicator(64, 3600.0, max_load=0.9) as d:
        for _ in range(300):
            ids = rng.integers(1, 400, 24).astype(U64)
            tags = rng.integers(0, 3, 24).astype(U32)
            keys = {(int(i), int(t)) for i, t in zip(ids, tags, strict=True)}
            _, at = np.unique(np.stack([ids, tags.astype(U64)]), axis=1, return_index=True)
            first = np.zeros(24, dtype=bool)
            first[at] = True  # distinct pairs, as the processors commit them
            seen, slots, table = d.seen_probe(ids, tags)
            assert seen.tolist() == [(int(i), int(t)) in ref for i, t in zip(ids, tags, strict=True)]
            if rng.random() < 0.1:  # committed elsewhere between the probe and the commit
                d.commit(ids[:3], tags[:3])
            d.commit_probed(ids[first], tags[first], slots[first], table)
            ref |= keys
            assert len(d) == len(ref)
        everything = np.array(sorted(ref), dtype=np.uint64)
        assert d.seen(everything[:, 0], everything[:, 1].astype(U32)).all()
        assert d._table.occupied() == len(ref)


def test_probed_commit_after_a_rebuild_falls_back_to_a_fresh_lookup():
    with Deduplicator(8, 60.0) as d:
        ids, tags = pairs(range(1, 6), [1] * 5)
        _seen, slots, table = d.seen_probe(ids, tags)
        d.commit(np.arange(100, 120, dtype=U64), np.ones(20, U32))  # grows: a new table
        assert d._table is not table
        d.commit_probed(ids, tags, slots, table)
        assert d.seen(ids, tags).all() and d.seen(np.arange(100, 120, dtype=U64), np.ones(20, U32)).all()


def test_plain_int_and_numpy_paths_agree():
    rng = random.Random(11)
    clock = [1000.0]
    small = Deduplicator(16, 10.0, clock=lambda: clock[0])
    big = Deduplicator(16, 10.0, clock=lambda: clock[0])
    try:
        universe = [(rng.getrandbits(64), rng.randrange(1, 4)) for _ in range(300)] + [(0, 1)]
        for _ in range(400):
            batch = [rng.choice(universe) for _ in range(rng.randint(1, SMALL))]
            ids, tags = pairs([p[0] for p in batch], [p[1] for p in batch])
            assert small.seen_few(batch) == big.seen(ids, tags).tolist()
            if rng.random() < 0.7:
                small.commit_few(batch)
                big.commit(ids, tags)
            clock[0] += rng.uniform(0, 0.5)  # entries expire after 10 s; tables grow past 16 buckets
        assert len(small) == len(big) and small.grows >= 1
        live = [p for p in universe if p[0]]
        ids, tags = pairs([p[0] for p in live], [p[1] for p in live])
        assert small.seen(ids, tags).tolist() == big.seen(ids, tags).tolist() == small.seen_few(live)
    finally:
        small.close()
        big.close()


def test_load_keeps_each_pairs_newest_stamp_and_expires_by_it():
    clock = FakeClock(100.0)
    with Deduplicator(16, window_s=10.0, clock=clock) as d:
        d.commit(*pairs([9], [1]), now=85.0)  # present already, older than what the log says
        s = lambda t: int(t * 1e9)  # noqa: E731
        d.load(*pairs([1, 1, 2, 9, 0], [1, 1, 1, 1, 1]), [s(95.0), s(89.0), s(89.0), s(96.0), s(99.0)])
        assert len(d) == 3  # (1,1) (2,1) (9,1); id 0 never
        assert d.seen(*pairs([1, 2, 9], [1, 1, 1])).tolist() == [True, False, True]  # (2,1) expired at 99
        clock.t = 105.5
        assert d.seen(*pairs([1, 9], [1, 1])).tolist() == [False, True]  # 95 + 10 <= 105.5 < 96 + 10


def test_upsert_places_a_repeated_pair_once_with_its_newest_stamp():
    t = IdTable(64, None, -1, seed=7)
    try:
        ids, tags = pairs([4, 4, 5, 4, 5, 6], [1, 1, 1, 1, 2, 1])
        assert t.upsert_bulk(ids, tags, np.array([3, 9, 2, 5, 8, 1], dtype=U64)) == 4  # (4,1) (5,1) (5,2) (6,1)
        slots = t.lookup(*pairs([4, 5, 5, 6], [1, 1, 2, 1]))
        assert t.stamps[slots].tolist() == [9, 2, 8, 1]
        assert t.upsert_bulk(*pairs([4, 7], [1, 1]), np.array([4, 4], dtype=U64)) == 1  # (4,1) keeps 9
        assert t.stamps[t.lookup(*pairs([4, 7], [1, 1]))].tolist() == [9, 4] and t.occupied() == 5
    finally:
        t.close()


@pytest.mark.parametrize("buckets,n,distinct,seed", [
    (1 << 12, 3000, 2500, 1),   # load 0.73: long runs, many wrap past the last slot
    (1 << 10, 700, 40, 2),      # mostly repeats
    (1 << 16, 20000, 20000, 3),  # no repeats
    (16, 12, 5, 4),             # tiny
])
def test_build_by_sorting_places_what_probing_places(buckets, n, distinct, seed):
    """IdTable.build (the rebuild's sort-and-place) answers every lookup as upsert_bulk does: each
    distinct pair once, findable by probing from its home, with its newest stamp."""
    rng = np.random.default_rng(seed)
    pool_ids = rng.integers(1, 2**64 - 1, distinct, dtype=U64)
    pool_tags = rng.integers(0, 5, distinct).astype(U32)
    pick = rng.integers(0, distinct, n)
    ids, tags = pool_ids[pick], pool_tags[pick]
    stamps = rng.integers(1, 10**12, n).astype(U64)
    built, probed = IdTable(buckets, None, -1, seed=seed), IdTable(buckets, None, -1, seed=seed)
    try:
        filled = built.build(ids, tags, stamps)
        assert filled == probed.upsert_bulk(ids, tags, stamps) == built.occupied()
        uniq = {(int(i), int(t)) for i, t in zip(ids, tags)}
        assert filled == len(uniq)
        slots = built.lookup(ids, tags)
        assert (slots >= 0).all()
        assert (built.stamps[slots] == probed.stamps[probed.lookup(ids, tags)]).all()
        newest: dict[tuple[int, int], int] = {}
        for i, t, s in zip(ids.tolist(), tags.tolist(), stamps.tolist()):
            newest[(i, t)] = max(s, newest.get((i, t), 0))
        assert built.stamps[slots].tolist() == [newest[(i, t)] for i, t in zip(ids.tolist(), tags.tolist())]
        absent = built.lookup(*pairs(rng.integers(1, 2**64 - 1, 500, dtype=U64), np.zeros(500)))
        assert (absent == -1).all()
    finally:
        built.close()
        probed.close()


def test_load_into_an_empty_table_sizes_it_once_and_builds_it():
    clock = FakeClock(100.0)
    with Deduplicator(16, window_s=10.0, clock=clock, max_buckets=1 << 16) as d:
        ids = np.arange(1, 10001, dtype=U64)
        d.load(ids, np.full(10000, 3, dtype=U32), np.full(10000, int(95e9), dtype=U64))
        st = d.statistics()
        assert st["entries"] == 10000 and st["grows"] == 1 and st["buckets"] == 1 << 15
        assert d.seen(ids, np.full(10000, 3, dtype=U32)).all()
        assert not d.seen(ids, np.full(10000, 4, dtype=U32)).any()  # the same ids on another topic
        clock.t = 105.0
        assert not d.seen(ids[:5], np.full(5, 3, dtype=U32)).any()  # expired by the stamps loaded


@pytest.mark.parametrize("buckets,fill,seed", [(1 << 12, 0.74, 1), (1 << 10, 0.5, 2), (64, 0.7, 3), (4, 0.5, 4)])
def test_probe_answers_what_walking_each_chain_answers(buckets, fill, seed):
    """IdTable.probe (home slot, then WINDOW slots a round, then plain ints) gives every pair the
    slot a walk along its chain gives: where it sits, or -(the empty slot ending the chain + 2);
    crowded tables, chains running past the last slot, pairs present under another tag."""
    rng = np.random.default_rng(seed)
    t = IdTable(buckets, None, -1, seed=seed)
    try:
        n = int(buckets * fill)
        ids = rng.integers(1, 1 << 20, n).astype(U64)
        tags = rng.integers(0, 3, n).astype(U64)
        t.upsert_bulk(ids, tags, np.ones(n, dtype=U64))
        q_ids = np.concatenate([ids, ids, rng.integers(1, 1 << 20, 3 * n).astype(U64)])
        q_tags = np.concatenate([tags, (tags + 1) % 3, rng.integers(0, 3, 3 * n).astype(U64)])
        want = []
        for i, g in zip(q_ids.tolist(), q_tags.tolist(), strict=True):
            pos, found = t.slot_int(i, g)
            want.append(pos if found else -2 - pos)
        assert t.probe(q_ids, q_tags).tolist() == want
        assert t.probe(q_ids[:0], q_tags[:0]).tolist() == []
    finally:
        t.close()

"""Idempotency: events with an id are stored once per (topic, event id) within `dedup.window_s`.

Every tier deduplicates. Each queue partition has its own Deduplicator (core/dedup.py), used only by
the worker holding that partition's token, so commits are vectorized (`commit_exclusive`). A topic
lives in exactly one partition of its tier, so a resent event (same topic, priority and id) always
meets its first copy there.

    key = event_id * golden ^ topic_hash(topic name)      (0 = no id: never deduplicated)

The topic hash is stable across runs (core.topics.topic_hash), so the tables can be rebuilt at start
from the tail of events.bin (`rebuild`): a client that resends after a restart gets its event
stored once. A duplicate is not stored again but is counted (dedup_hits) and ACKed like any other
event: its first copy is stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.dedup import Deduplicator
from eventstream.core.topics import TopicTable, topic_hash

log = structlog.get_logger("eventstream.idempotency")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN_INT = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
SMALL = 8  # up to this many records: plain ints (a realtime batch at low load is one event)


def keys(records: np.ndarray, topics: TopicTable) -> np.ndarray:
    """The dedup key of each record (0 where the record has no event id). uint64 arithmetic wraps."""
    ids = records["event_id"]
    hashes = topics.hashes(records["topic_id"])
    if len(ids) <= SMALL:
        return np.array([((e * _GOLDEN_INT) & _M64) ^ h if e else 0 for e, h in zip(ids.tolist(), hashes.tolist())],
                        dtype=np.uint64)
    k = (ids * _GOLDEN) ^ hashes
    k[ids == 0] = 0
    return k


def duplicates_few(records: np.ndarray, dedup: Deduplicator, topics: TopicTable) -> tuple[list[int], list[bool]]:
    """duplicates() for at most SMALL records, with plain ints and bools (no numpy temporaries)."""
    hash_of = topics.hash_of
    ks = [((e * _GOLDEN_INT) & _M64) ^ hash_of(t) if e else 0
          for e, t in zip(records["event_id"].tolist(), records["topic_id"].tolist())]
    skip = dedup.seen_few(ks)
    if len(ks) > 1:
        first: set[int] = set()
        for i, key in enumerate(ks):
            if key and not skip[i]:
                if key in first:
                    skip[i] = True
                first.add(key)
    return ks, skip


class Probed:
    """Dedup keys of records to store, with where `Deduplicator.seen_probe` found them, so the commit
    after the store needs no second lookup (`commit`)."""

    __slots__ = ("keys", "slots", "table")

    def __init__(self, keys: np.ndarray, slots: np.ndarray, table):
        self.keys, self.slots, self.table = keys, slots, table

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, which) -> "Probed":
        return Probed(self.keys[which], self.slots[which], self.table)

    def commit(self, dedup: Deduplicator) -> None:
        dedup.commit_probed(self.keys, self.slots, self.table)


def duplicates(records: np.ndarray, dedup: Deduplicator, topics: TopicTable) -> tuple[np.ndarray, np.ndarray]:
    """(keys, mask of records to skip): keys already committed, and repeats inside this batch (the
    first occurrence of a key is kept). For the table's only user (the partition's token holder)."""
    k, skip, _probed = duplicates_probed(records, dedup, topics)
    return k, skip


def duplicates_probed(records: np.ndarray, dedup: Deduplicator, topics: TopicTable):
    """duplicates(), plus a Probed of all the keys (select the kept ones before committing)."""
    k = keys(records, topics)
    skip, slots, table = dedup.seen_probe(k)
    if len(k) <= SMALL:
        if len(k) > 1:
            first: set[int] = set()
            for i, key in enumerate(k.tolist()):
                if key and not skip[i]:
                    if key in first:
                        skip[i] = True
                    first.add(key)
        return k, skip, Probed(k, slots, table)
    fresh = (k != 0) & ~skip
    if fresh.sum() > 1:
        idx = np.flatnonzero(fresh)
        _, first = np.unique(k[idx], return_index=True)
        if len(first) != len(idx):
            repeat = np.ones(len(idx), dtype=bool)
            repeat[first] = False
            skip[idx[repeat]] = True
    return k, skip, Probed(k, slots, table)


def rebuild(path: Path, tables: dict[str, list[Deduplicator]], topics: TopicTable, route: np.ndarray,
            names: tuple[str, ...], window_s: float) -> int:
    """Commit the keys of every record stored in `path` within the last `window_s` seconds into the
    table its tier and partition use in this run. Returns the number of keys committed.

    `route` maps priority -> index into `names` (the tiers). Stored entries carry their wall-clock
    store time; a key is committed with the age it has, so it expires when it would have."""
    from eventstream.storage.reader import EventLogReader

    if window_s <= 0 or not path.exists() or path.stat().st_size == 0:
        return 0
    wall_now, mono_now = time.time_ns(), time.monotonic()
    since = wall_now - int(window_s * 1e9)
    try:
        reader = EventLogReader(path)
        batches = list(reader.batches(since_ns=since))
    except (OSError, ValueError) as exc:
        log.warning("dedup_rebuild_skipped", path=str(path), error=str(exc))
        return 0
    done = 0
    for b in batches:
        r = b.records
        has = r["event_id"] != 0
        if not has.any():
            continue
        r, stored_ns = r[has], b.stored_ns[has]
        # file topic ids -> this run's ids (interning the names the file knows)
        file_ids = np.unique(r["topic_id"])
        remap = np.zeros(int(file_ids.max()) + 1, dtype=np.uint32)
        for fid in file_ids.tolist():
            remap[fid] = topics.intern(b.topics[fid])
        tids = remap[r["topic_id"]]
        k = (r["event_id"] * _GOLDEN) ^ topics.hashes(tids)
        # one commit per (tier, partition, age in seconds): stamps keep the age they have
        age_s = np.maximum(0, (wall_now - stored_ns.astype(np.int64)) // 1_000_000_000)
        tier = route[r["priority"]]
        for t in np.unique(tier).tolist():
            parts = tables[names[t]]
            sel_t = tier == t
            part = tids[sel_t] % len(parts)
            for p in np.unique(part).tolist():
                sel = np.flatnonzero(sel_t)[part == p]
                for a in np.unique(age_s[sel]).tolist():
                    s = sel[age_s[sel] == a]
                    parts[p].commit_exclusive(k[s], now=max(mono_now - a, 1e-9))
                    done += len(s)
    log.info("dedup_rebuilt", path=str(path), keys=done, window_s=window_s)
    return done

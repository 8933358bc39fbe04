"""Idempotency: events with an id are stored once per (topic, event id) within `dedup.window_s`.

Every tier deduplicates. Each queue partition has its own Deduplicator (core/dedup.py), used only by
the worker holding that partition's token. A topic lives in exactly one partition of its tier, so a
resent event (same topic, priority and id) always meets its first copy there.

The dedup key of a record is the exact pair (event id, tag) with tag = the record's topic id in this
run and the key of the principal that sent it (`key_columns`, the one place that says so; id 0 = no
id: never deduplicated). The table compares both halves, so an event is a duplicate only of an event
with the same topic, the same id and the same principal: no client can pick an id on its own topic
that stands for another topic's event, and with server.auth.principals no principal can send ids
first that stand for another principal's events on a topic both may write (without principals, or
with a shared token, the principal is 0 for everyone).

Topic ids are per run, names are stable: `rebuild` maps the names events.bin stores to this run's ids
and commits the pairs of every record stored within the window, so a client that resends after a
restart gets its event stored once. A duplicate is not stored again but is counted (dedup_hits) and
ACKed like any other event: its first copy is stored.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.dedup import SMALL, Deduplicator
from eventstream.core.topics import TopicTable

log = structlog.get_logger("eventstream.idempotency")


PRINCIPAL_SHIFT = 32  # tag = topic id | principal key << 32


def key_columns(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, tags): the dedup key of each record (id 0 = the record has no id); the tag is the
    record's topic id and its principal's key (ingest/auth.principal_keys) in one u64."""
    tags = records["principal"].astype(np.uint64)
    tags <<= np.uint64(PRINCIPAL_SHIFT)
    tags |= records["topic_id"]
    return records["event_id"], tags


def repeats(ids: np.ndarray, tags: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mask over `candidates` (indexes) of pairs that repeat an earlier candidate's pair."""
    out = np.zeros(len(candidates), dtype=bool)
    if len(candidates) < 2:
        return out
    ci, ct = ids[candidates], tags[candidates]
    order = np.lexsort((candidates, ct, ci))  # equal pairs adjacent, in batch order
    same = (ci[order][1:] == ci[order][:-1]) & (ct[order][1:] == ct[order][:-1])
    out[order[1:][same]] = True
    return out


def duplicates_few(records: np.ndarray, dedup: Deduplicator) -> tuple[list[tuple[int, int]], list[bool]]:
    """duplicates() for at most SMALL records, with plain ints and bools (no numpy temporaries)."""
    pairs = [(i, t | w << PRINCIPAL_SHIFT) for i, t, w in
             zip(records["event_id"].tolist(), records["topic_id"].tolist(), records["principal"].tolist())]
    skip = dedup.seen_few(pairs)
    if len(pairs) > 1:
        first: set[tuple[int, int]] = set()
        for i, p in enumerate(pairs):
            if p[0] and not skip[i]:
                if p in first:
                    skip[i] = True
                first.add(p)
    return pairs, skip


class Probed:
    """Dedup keys of records to store, with where `Deduplicator.seen_probe` found them, so the commit
    after the store needs no second lookup (`commit`)."""

    __slots__ = ("ids", "tags", "slots", "table")

    def __init__(self, ids: np.ndarray, tags: np.ndarray, slots: np.ndarray, table):
        self.ids, self.tags, self.slots, self.table = ids, tags, slots, table

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, which) -> "Probed":
        return Probed(self.ids[which], self.tags[which], self.slots[which], self.table)

    def commit(self, dedup: Deduplicator) -> None:
        dedup.commit_probed(self.ids, self.tags, self.slots, self.table)


def duplicates(records: np.ndarray, dedup: Deduplicator) -> tuple[Probed, np.ndarray]:
    """(keys as a Probed, mask of records to skip): pairs already committed, and repeats inside this
    batch (the first occurrence is kept). For the table's only user (the partition's token holder);
    select the kept ones of the Probed before committing them."""
    ids, tags = key_columns(records)
    skip, slots, table = dedup.seen_probe(ids, tags)
    fresh = np.flatnonzero((ids != 0) & ~skip)
    again = repeats(ids, tags, fresh)
    if again.any():
        skip[fresh[again]] = True
    return Probed(ids, tags, slots, table), skip


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
        batches = list(reader.batches(since_ns=since, payloads=False))  # the headers: ids, topics, priorities
    except (OSError, ValueError) as exc:
        log.warning("dedup_rebuild_skipped", path=str(path), error=str(exc))
        return 0
    # per (tier, partition): the pairs and their stamps on this run's clock (the age they have)
    found: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    mono_now_ns = int(mono_now * 1e9)
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
        tags = (r["principal"].astype(np.uint64) << np.uint64(PRINCIPAL_SHIFT)) | tids
        age_ns = np.maximum(0, wall_now - stored_ns.astype(np.int64))
        stamps = np.maximum(1, mono_now_ns - age_ns).astype(np.uint64)
        tier = route[r["priority"]]
        for t in np.unique(tier).tolist():
            sel_t = np.flatnonzero(tier == t)
            part = tids[sel_t] % len(tables[names[t]])
            for p in np.unique(part).tolist():
                sel = sel_t[part == p]
                found.setdefault((t, p), []).append((r["event_id"][sel], tags[sel], stamps[sel]))
    def load(item) -> int:
        (t, p), chunks = item
        ids, tags, stamps = (np.concatenate(c) for c in zip(*chunks))
        tables[names[t]][p].load(ids, tags, stamps)  # each table has one loader: no sharing
        return len(ids)

    # the tables are independent: load them on every allowed CPU at once (numpy runs in parallel
    # with the GIL off)
    workers = max(1, min(len(found), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="es-dedup-load") as pool:
        done = sum(pool.map(load, found.items()))
    log.info("dedup_rebuilt", path=str(path), keys=done, window_s=window_s)
    return done

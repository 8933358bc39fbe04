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

from eventstream.core.dedup import Deduplicator
from eventstream.core.topics import TopicTable
from eventstream.engine import dedup_snapshot
from eventstream.engine.bus import partition_of
from eventstream.storage import format as fmt
from eventstream.storage.reader import ColumnCollector, EventLogReader

log = structlog.get_logger("eventstream.idempotency")


PRINCIPAL_SHIFT = 32  # tag = topic id | principal key << 32


def key_columns(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, tags): the dedup key of each record (id 0 = the record has no id); the tag is the
    record's topic id and its principal's key (ingest/auth.principal_keys) in one u64."""
    tags = records["principal"].astype(np.uint64)
    tags <<= np.uint64(PRINCIPAL_SHIFT)
    tags |= records["topic_id"]
    # a copy: the column is strided over whole records, and the probe reads it several times
    return records["event_id"].copy(), tags


def repeats(ids: np.ndarray, tags: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mask over `candidates` (indexes) of pairs that repeat an earlier candidate's pair."""
    out = np.zeros(len(candidates), dtype=bool)
    if len(candidates) < 2:
        return out
    ci = ids[candidates]
    if (ci[1:] > ci[:-1]).all():  # rising ids (a client numbering its events): no pair repeats
        return out
    ct = tags[candidates]
    order = np.lexsort((candidates, ct, ci))  # equal pairs adjacent, in batch order
    same = (ci[order][1:] == ci[order][:-1]) & (ct[order][1:] == ct[order][:-1])
    out[order[1:][same]] = True
    return out


def duplicates_few(records: np.ndarray, dedup: Deduplicator) -> tuple[list[tuple[int, int]], list[bool]]:
    """duplicates() for at most SMALL records, with plain ints and bools (no numpy temporaries)."""
    pairs = [
        (i, t | w << PRINCIPAL_SHIFT)
        for i, t, w in zip(
            records["event_id"].tolist(), records["topic_id"].tolist(), records["principal"].tolist(), strict=True
        )
    ]
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

    def select(self, which) -> Probed:
        return Probed(self.ids[which], self.tags[which], self.slots[which], self.table)

    def commit(self, dedup: Deduplicator) -> None:
        dedup.commit_probed(self.ids, self.tags, self.slots, self.table)


def duplicates(records: np.ndarray, dedup: Deduplicator) -> tuple[Probed, np.ndarray]:
    """(keys as a Probed, mask of records to skip): pairs already committed, and repeats inside this
    batch (the first occurrence is kept). For the table's only user (the partition's token holder);
    select the kept ones of the Probed before committing them."""
    ids, tags = key_columns(records)
    skip, slots, table = dedup.seen_probe(ids, tags)
    if len(ids) > 1 and (ids[1:] > ids[:-1]).all():  # rising ids (a client numbering its events): no repeats
        return Probed(ids, tags, slots, table), skip
    fresh = np.flatnonzero((ids != 0) & ~skip)
    again = repeats(ids, tags, fresh)
    if again.any():
        skip[fresh[again]] = True
    return Probed(ids, tags, slots, table), skip


KEY_FIELDS = ("event_id", "topic_id", "priority", "principal")  # what the rebuild reads of each record


def collector(window_s: float, from_offset: int = 0) -> ColumnCollector | None:
    """What the event log's recovery collects while it verifies the active file (EventLog(collect=)),
    so `rebuild` reads the keys of that file in the same pass (None: dedup is off). `from_offset`:
    where a dedup snapshot's position is in the active file (only what follows it is collected)."""
    if window_s <= 0:
        return None
    return ColumnCollector(KEY_FIELDS, time.time_ns() - int(window_s * 1e9), from_offset)


def snapshot_offset(path: Path, snap_path: Path) -> tuple[int, int] | None:
    """(created_ns, offset) of the snapshot at `snap_path` when its position is in the active file
    `path` (the offset to collect from while recovering it), else None."""
    head = dedup_snapshot.read_head(snap_path)
    if head is None:
        return None
    try:
        with open(path, "rb") as f:
            created = fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(path))[1]
    except (OSError, fmt.LogFormatError):
        return None
    return head if head[0] == created else None


def _after(reader: EventLogReader, snap: dedup_snapshot.Snapshot, active: ColumnCollector | None):
    """(file, offset) to read the log from after `snap`, or (None, why the snapshot is not usable)."""
    files = reader.files()
    at = [p for created, p in files if created == snap.log_created_ns]
    if not at:
        return None, f"the log file it covers (created_ns {snap.log_created_ns}) is gone"
    path = at[-1]
    size = path.stat().st_size
    if size < snap.log_offset:
        return None, f"it covers {snap.log_offset} bytes of {path.name}, which holds {size} (cut by recovery)"
    collected_from = active.from_offset if active is not None else 0
    if path == reader.path and collected_from != snap.log_offset:
        return None, "the active file was not read from its position"
    if path != reader.path and collected_from != 0:
        return None, "the active file was read from another position"
    return (path, snap.log_offset), None


def rebuild(
    path: Path,
    tables: dict[str, list[Deduplicator]],
    topics: TopicTable,
    route: np.ndarray,
    names: tuple[str, ...],
    window_s: float,
    active: ColumnCollector | None = None,
    snapshot: dedup_snapshot.Snapshot | None = None,
) -> dict:
    """Commit the keys of every record stored in `path` within the last `window_s` seconds into the
    table its tier and partition use in this run. Returns what it did: keys, from_snapshot (keys
    restored from `snapshot`), replayed (keys read from the log), read_s, load_s.

    `route` maps priority -> index into `names` (the tiers). Stored entries carry their wall-clock
    store time; a key is committed with the age it has, so it expires when it would have. `active`:
    the collector the recovery of the active file filled (`collector`); then only the closed segments
    are read here. `snapshot` (engine/dedup_snapshot.py): restored first, then only the log after
    its position is read; one that cannot be used is ignored (logged) and the whole log is read."""
    out = {"keys": 0, "from_snapshot": 0, "replayed": 0, "read_s": 0.0, "load_s": 0.0}
    if window_s <= 0 or not path.exists() or path.stat().st_size == 0:
        if snapshot is not None:
            dedup_snapshot.discard(snapshot)
        return out
    t0 = time.perf_counter()
    wall_now, mono_now_ns = time.time_ns(), time.monotonic_ns()
    since = wall_now - int(window_s * 1e9)
    try:
        reader = EventLogReader(path)
        after, why = _after(reader, snapshot, active) if snapshot is not None else (None, None)
        if after is not None:
            assert snapshot is not None
            why = dedup_snapshot.restore(snapshot, tables, topics, window_s)
            if why is None:
                out["from_snapshot"] = snapshot.keys
            else:
                after = None
        if why is not None:
            log.warning("dedup_snapshot_ignored", reason=why, hint="the dedup tables are rebuilt from the whole log")
        if after is not None:
            parts = list(reader.columns(KEY_FIELDS, since_ns=since, segments_only=True, after=after))
        elif active is None or active.from_offset:
            parts = list(reader.columns(KEY_FIELDS, since_ns=since))  # header columns only: no record built
        else:
            parts = list(reader.columns(KEY_FIELDS, since_ns=int(active.since), segments_only=True))
        last = active.result() if active is not None and (after is not None or not active.from_offset) else None
        if last is not None:
            parts.append(last)
    except (OSError, ValueError) as exc:
        log.warning("dedup_rebuild_skipped", path=str(path), error=str(exc))
        return out
    finally:
        if snapshot is not None:
            dedup_snapshot.discard(snapshot)  # tables prepared but not adopted
    ids_l, tids_l, prio_l, who_l, wall_l = [], [], [], [], []
    for part in parts:
        c = part.cols
        has = c["event_id"] != 0
        if not has.any():
            continue
        fids = c["topic_id"][has]
        # file topic ids -> this run's ids (each file numbers its own topics; interning the names)
        known = np.flatnonzero(np.bincount(fids))
        remap = np.zeros(int(known[-1]) + 1, dtype=np.uint32)
        for fid in known.tolist():
            remap[fid] = topics.intern(part.topics[fid])
        ids_l.append(c["event_id"][has])
        tids_l.append(remap[fids])
        prio_l.append(c["priority"][has])
        who_l.append(c["principal"][has])
        wall_l.append(part.stored_ns[has])
    if not ids_l:
        out["keys"] = out["from_snapshot"]
        out["read_s"] = round(time.perf_counter() - t0, 3)
        log.info("dedup_rebuilt", path=str(path), window_s=window_s, **out)
        return out
    one = len(ids_l) == 1
    ids, tids, prio, who, wall = (a[0] if one else np.concatenate(a) for a in (ids_l, tids_l, prio_l, who_l, wall_l))
    del ids_l, tids_l, prio_l, who_l, wall_l
    tier = route[prio]
    groups = [(t, p) for t in np.flatnonzero(np.bincount(tier)).tolist() for p in range(len(tables[names[t]]))]
    t_read = time.perf_counter()

    def load(group: tuple[int, int]) -> int:
        """One table's keys, selected, tagged and stamped on the loading thread (the tables are
        independent: they load on every allowed CPU at once, numpy runs in parallel with the GIL off)."""
        t, p = group
        n_parts = len(tables[names[t]])
        mask = tier == t
        if n_parts > 1:
            mask &= partition_of(tids, n_parts) == p  # the bus's rule (engine/bus.py)
        sel = np.flatnonzero(mask)
        del mask
        if not len(sel):
            return 0
        tags = who[sel].astype(np.uint64)
        tags <<= np.uint64(PRINCIPAL_SHIFT)
        tags |= tids[sel]
        # a key is committed with the age it has, so it expires when it would have
        stamps = wall[sel].view(np.int64)
        stamps -= wall_now
        stamps += mono_now_ns
        np.clip(stamps, 1, mono_now_ns, out=stamps)  # stored "in the future" (the clock stepped back): age 0
        tables[names[t]][p].load(ids[sel], tags, stamps.view(np.uint64))  # each table has one loader
        return len(sel)

    workers = max(1, min(len(groups), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="es-dedup-load") as pool:
        done = sum(pool.map(load, groups))
    out.update(replayed=done, read_s=round(t_read - t0, 3), load_s=round(time.perf_counter() - t_read, 3))
    out["keys"] = out["from_snapshot"] + done
    log.info("dedup_rebuilt", path=str(path), window_s=window_s, tables=len(groups), **out)
    return out

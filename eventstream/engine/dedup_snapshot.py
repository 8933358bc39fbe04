"""Dedup snapshot: the dedup tables saved to `<data_dir>/dedup.snap`, so a start does not rebuild them
from the whole log (engine/idempotency.py).

What a snapshot holds: every occupied slot of every table (tier, partition) as it was, with the
table's size and hash seed, so loading it is a copy back to the same slots (no hashing, no sorting);
the stamps as wall-clock ns (a key keeps the age it had, and expires when it would have); the topic
names behind the topic ids in the tags (ids are per run: a start interns the same names in the same
order first, or the snapshot is not used); and the log position it covers: (the created_ns of the
events file that was active, the bytes written to it). Every record stored before that position has
its key in the snapshot; a start loads the snapshot and reads only the log after the position.

When: by the thread `es-dedup-snapshot`, soon after a start that read much of the log, then every
`dedup.snapshot_interval_s` while the log grows, and once more at a clean stop. The position is
read BEFORE any table is copied, and each table is copied under its partition's token (the only
user of a table is the token holder, and a batch's keys are committed before its token is given
back): so every record stored before the position has its key in the copy. Keys committed after
the position may be in it too; they are in the log after it as well, and loading a key twice keeps
its newest stamp.

Torn, damaged or stale files are never trusted: the file is written to `dedup.snap.tmp`, fsynced,
then renamed over the old one; the header and the whole body carry a CRC; a snapshot whose log
file is gone, whose position is past the end of that file (a power loss cut the log), whose tier
layout or topic names do not match this run, is ignored with a warning and the tables are rebuilt
from the whole log (`dedup_snapshot_ignored`). Deleting the file is always safe.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.dedup import Deduplicator
from eventstream.core.idtable import IdTable
from eventstream.core.topics import TopicLimitError, TopicTable

log = structlog.get_logger("eventstream.dedup_snapshot")

FILE_NAME = "dedup.snap"
MAGIC = b"ESDEDUP\x00"
VERSION = 1
# magic, version, meta bytes, body bytes (meta + arrays), body CRC, then the header's own CRC
HEAD = struct.Struct("<8sIQQI")
HEAD_CRC = struct.Struct("<I")
HEAD_BYTES = HEAD.size + HEAD_CRC.size
TOPIC_BITS = 0xFFFFFFFF  # the topic id in a tag's low 32 bits (engine/idempotency.key_columns)
SOON_KEYS = 100_000  # a start that read at least this many keys from the log saves a snapshot at once


class SnapshotError(ValueError):
    """A snapshot file that is not whole and valid (the message says what is wrong)."""


@dataclass
class TableImage:
    tier: str
    partition: int
    buckets: int
    seed: int
    slots: np.ndarray
    ids: np.ndarray
    tags: np.ndarray
    walls: np.ndarray  # stamps as wall-clock ns
    table: IdTable | None = None  # filled by `prepare` (stamps in this run's clock), until adopted


@dataclass
class Snapshot:
    log_created_ns: int  # the events file the position is in (its header's created_ns)
    log_offset: int  # bytes of that file covered
    wall_ns: int  # when it was taken
    names: list[str]  # topic id i (1-based) -> names[i - 1], as the tags number them
    tables: list[TableImage]
    prepared: bool = False  # `prepare` ran: stamps are this run's

    @property
    def keys(self) -> int:
        return sum(len(t.slots) for t in self.tables)


def _pad(n: int) -> int:
    return -n % 8


def write(path: Path, snap: Snapshot) -> int:
    """Write `snap` to `path` (through `<path>.tmp`, fsynced, renamed, directory fsynced); returns bytes."""
    meta = {
        "log_created_ns": snap.log_created_ns,
        "log_offset": snap.log_offset,
        "wall_ns": snap.wall_ns,
        "names": snap.names,
        "tables": [
            {"tier": t.tier, "partition": t.partition, "buckets": t.buckets, "seed": t.seed, "n": len(t.slots)}
            for t in snap.tables
        ],
    }
    meta_b = json.dumps(meta).encode("utf-8")
    meta_b += b" " * _pad(len(meta_b))
    arrays: list[bytes | memoryview] = [meta_b]
    for t in snap.tables:
        for a, dt in (
            (t.slots, np.uint32 if t.buckets <= 1 << 32 else np.uint64),
            (t.ids, np.uint64),
            (t.tags, np.uint64),
            (t.walls, np.uint64),
        ):
            b = np.ascontiguousarray(a, dtype=dt)
            arrays.append(memoryview(b).cast("B"))
            if _pad(b.nbytes):
                arrays.append(b"\0" * _pad(b.nbytes))
    crc = 0
    size = 0
    for part in arrays:
        crc = zlib.crc32(part, crc)
        size += len(part)
    head = HEAD.pack(MAGIC, VERSION, len(meta_b), size, crc)
    head += HEAD_CRC.pack(zlib.crc32(head))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for part in arrays:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return HEAD_BYTES + size


def read_head(path: Path) -> tuple[int, int] | None:
    """(log_created_ns, log_offset) of the snapshot at `path` from its header and metadata alone, or
    None when there is none or its header is not valid (the body is checked by `read`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            magic, version, meta_len, size, _crc = _check_head(head)
            meta = json.loads(f.read(meta_len))
        return int(meta["log_created_ns"]), int(meta["log_offset"])
    except (OSError, SnapshotError, ValueError, KeyError, TypeError):
        return None


def _check_head(head: bytes) -> tuple[bytes, int, int, int, int]:
    if len(head) < HEAD_BYTES:
        raise SnapshotError(f"{len(head)} bytes: shorter than a snapshot header ({HEAD_BYTES})")
    (hcrc,) = HEAD_CRC.unpack_from(head, HEAD.size)
    if zlib.crc32(head[: HEAD.size]) != hcrc:
        raise SnapshotError("header CRC mismatch")
    magic, version, meta_len, size, crc = HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise SnapshotError(f"magic {magic!r} version {version}; allowed: {MAGIC!r} version {VERSION}")
    if meta_len > size:
        raise SnapshotError(f"metadata of {meta_len} bytes in a body of {size}")
    return magic, version, meta_len, size, crc


def read(path: Path) -> Snapshot:
    """The snapshot at `path`, verified whole (header and body CRC); SnapshotError (or OSError) if not."""
    with open(path, "rb") as f:
        _magic, _version, meta_len, size, crc = _check_head(f.read(HEAD_BYTES))
        body = bytearray(size)
        got = f.readinto(body)
    if got != size:
        raise SnapshotError(f"torn: {got} of {size} body bytes")
    if zlib.crc32(body) != crc:
        raise SnapshotError("body CRC mismatch")
    try:
        meta = json.loads(bytes(body[:meta_len]))
        pos = meta_len
        tables = []
        for m in meta["tables"]:
            n, buckets = int(m["n"]), int(m["buckets"])
            cols = []
            for dt in (np.uint32 if buckets <= 1 << 32 else np.uint64, np.uint64, np.uint64, np.uint64):
                a = np.frombuffer(body, dtype=dt, count=n, offset=pos)
                pos += a.nbytes + _pad(a.nbytes)
                cols.append(a)
            slots, ids, tags, walls = cols
            tables.append(
                TableImage(str(m["tier"]), int(m["partition"]), buckets, int(m["seed"]), slots, ids, tags, walls)
            )
        if pos != size:
            raise SnapshotError(f"the tables end at {pos} of {size} body bytes")
        return Snapshot(
            int(meta["log_created_ns"]),
            int(meta["log_offset"]),
            int(meta["wall_ns"]),
            [str(x) for x in meta["names"]],
            tables,
        )
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(f"metadata not valid ({type(exc).__name__}: {exc})") from None


def prepare(snap: Snapshot, window_s: float, node: int = -1) -> None:
    """Fill a table of each image's size and seed with its pairs, at the slots they had (no probing),
    stamps turned into this run's clock: a key keeps the age it had. Pairs expired by now stay in
    place (they carry probe chains) with a stamp that is never seen; when this clock cannot hold
    such a stamp (started less than a window ago) the image is left for `restore` to load by
    inserting the live pairs. Tables on every allowed CPU at once (numpy runs with the GIL off)."""
    wall_now, mono_now = time.time_ns(), time.monotonic_ns()
    window_ns = int(window_s * 1e9)

    def fill(t: TableImage) -> None:
        if t.buckets & (t.buckets - 1) or t.buckets < 2 or (len(t.slots) and int(t.slots.max()) >= t.buckets):
            return  # not a table image: restore refuses it
        walls = t.walls.view(np.int64)
        stamps = walls - wall_now
        stamps += mono_now
        np.clip(stamps, 1, mono_now, out=stamps)  # stored "in the future" (the clock stepped back): age 0
        expired = walls + window_ns <= wall_now
        if expired.any():
            if mono_now <= window_ns:  # restore inserts the live ones (stamps now this run's, 0: expired)
                stamps[expired] = 0
                t.walls = stamps.view(np.uint64)
                return
            stamps[expired] = 1
        table = IdTable(t.buckets, None, node, seed=t.seed)
        table.ids[t.slots] = t.ids
        table.tags[t.slots] = t.tags
        table.stamps[t.slots] = stamps.view(np.uint64)
        t.table = table

    workers = max(1, min(len(snap.tables), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers, thread_name_prefix="es-dedup-restore") as pool:
        list(pool.map(fill, snap.tables))
    snap.prepared = True


def discard(snap: Snapshot) -> None:
    """Free the prepared tables that were not adopted."""
    for t in snap.tables:
        if t.table is not None:
            t.table.close()
            t.table = None


class PendingRead:
    """`read` and `prepare` on their own thread (the engine reads the snapshot while recovery
    verifies the log); `result()` is the Snapshot, or None when it is not valid (logged:
    dedup_snapshot_ignored)."""

    def __init__(self, path: Path, window_s: float, node: int = -1):
        self.path, self.window_s, self.node = path, window_s, node
        self._got: Snapshot | None = None
        self._thread = threading.Thread(target=self._read, name="es-dedup-snapshot-read", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._got = read(self.path)
        except (OSError, SnapshotError) as exc:
            log.warning(
                "dedup_snapshot_ignored",
                path=str(self.path),
                reason=str(exc),
                hint="the dedup tables are rebuilt from the whole log",
            )
            return
        prepare(self._got, self.window_s, self.node)

    def result(self) -> Snapshot | None:
        self._thread.join()
        return self._got


def take(
    tables: dict[str, list[Deduplicator]],
    tokens: dict[str, list[threading.Lock]],
    topics: TopicTable,
    position: Callable[[], tuple[int, int]],
    timeout: float = 10.0,
) -> Snapshot | None:
    """Copy every table under its partition's token, after reading the log position (see the module
    doc). None when a token was not free within `timeout` (a batch stuck in a handler)."""
    created_ns, offset = position()
    wall_now, mono_now = time.time_ns(), time.monotonic_ns()
    images = []
    for tier, ds in tables.items():
        for p, d in enumerate(ds):
            token = tokens[tier][p]
            if not token.acquire(timeout=timeout):
                return None
            try:
                buckets, seed, slots, ids, tags, stamps = d.image()
            finally:
                token.release()
            walls = stamps.view(np.int64) - mono_now + wall_now  # a new array: the copy is ours
            images.append(TableImage(tier, p, buckets, seed, slots, ids, tags, walls.view(np.uint64)))
    top = max((int((t.tags & np.uint64(TOPIC_BITS)).max()) for t in images if len(t.tags)), default=0)
    names = [topics.name(i) for i in range(1, top + 1)]
    return Snapshot(created_ns, offset, wall_now, names, images)


def restore(snap: Snapshot, tables: dict[str, list[Deduplicator]], topics: TopicTable, window_s: float) -> str | None:
    """Put `snap` into this run's EMPTY tables (`prepare`d first when it was not); None when done,
    else why it was not used (then no table was changed, unless the reason says so)."""
    layout = {tier: len(ds) for tier, ds in tables.items()}
    got: dict[str, int] = {}
    for t in snap.tables:
        got[t.tier] = got.get(t.tier, 0) + 1
    if got != layout or {(t.tier, t.partition) for t in snap.tables} != {
        (tier, p) for tier, n in layout.items() for p in range(n)
    }:
        return f"its tables {sorted(got.items())} are not this run's {sorted(layout.items())}"
    try:
        for i, name in enumerate(snap.names, 1):
            tid = topics.intern(name)
            if tid != i:
                return f"topic {name!r} has id {tid} in this run, {i} in the snapshot"
    except TopicLimitError as exc:
        return str(exc)
    if not snap.prepared:
        prepare(snap, window_s)
    for t in snap.tables:
        d = tables[t.tier][t.partition]
        if t.table is None:
            if t.buckets & (t.buckets - 1) or t.buckets < 2:
                return f"table {t.tier}/{t.partition}: {t.buckets} buckets is not a table size; tables changed"
            keep = t.walls != 0  # prepare marked what expired
            d.load(t.ids[keep], t.tags[keep], t.walls[keep])
        elif d.adopt(t.table, len(t.slots)):
            t.table = None
        else:
            return f"table {t.tier}/{t.partition} of {t.buckets} buckets does not fit (dedup.max_bytes); tables changed"
    return None


class Snapshotter:
    """The thread `es-dedup-snapshot`: a snapshot `soon` after start (when the start read much of the
    log), then every `interval_s` while the log grows; `stop(final=True)` writes one more (after the
    processors stopped)."""

    def __init__(
        self,
        path: Path,
        tables: dict[str, list[Deduplicator]],
        tokens: dict[str, list[threading.Lock]],
        topics: TopicTable,
        position: Callable[[], tuple[int, int]],
        interval_s: float,
        *,
        soon: bool,
        covered: tuple[int, int] | None = None,
    ):
        self.path, self.tables, self.tokens, self.topics = path, tables, tokens, topics
        self.position, self.interval_s = position, interval_s
        self._soon = soon
        self._covered = covered  # the position the file on disk covers
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one writer at a time (the thread, or stop)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failures = 0
        self.last_bytes = 0
        self.last_s = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="es-dedup-snapshot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = 0.0 if self._soon else self.interval_s
        while not self._stop.wait(wait):
            self.save()
            wait = self.interval_s

    def save(self) -> bool:
        """Write a snapshot if the log moved since the last one; True when one was written."""
        with self._lock:
            if self.position() == self._covered:
                return False
            t0 = time.perf_counter()
            try:
                snap = take(self.tables, self.tokens, self.topics, self.position)
                if snap is None:
                    log.warning("dedup_snapshot_skipped", reason="a partition token was held past 10 s")
                    return False
                nbytes = write(self.path, snap)
            except OSError as exc:
                self.failures += 1
                log.warning("dedup_snapshot_failed", path=str(self.path), error=str(exc))
                return False
            self._covered = (snap.log_created_ns, snap.log_offset)
            self.written += 1
            self.last_bytes, self.last_s = nbytes, time.perf_counter() - t0
            log.info(
                "dedup_snapshot_written",
                path=str(self.path),
                keys=snap.keys,
                bytes=nbytes,
                seconds=round(self.last_s, 3),
                log_offset=snap.log_offset,
            )
            return True

    def stop(self, final: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)
        if final:
            self.save()

"""Following the event log from a position: what is stored, then live (subscribers, eventstream/subscribe).

Offsets. An event's *offset* is its ordinal among the record entries of the whole log, counted from 0
at the first record of the oldest file, across the closed segments (`events.bin.<n>`) and then the
active file, in file order. Within a file it is the index of the (verified) record entry; a file's
*base* (the offset of its first record) is kept in `SegmentIndex`, a small JSON file in the data dir
keyed by each file's `created_ns` (the file header's creation time, which a rotation keeps), so
offsets stay the same across restarts and when retention deletes old segments. Files that existed
before the index are counted once (a scan) when it is built.

Live. `LogTail.read()` returns what was appended since the last call (a bounded chunk), or nothing.
The writer side calls `Progress.bump()` after each append (in the service: the engine's `stored`
barrier, advanced after each stored batch's release); a tail at the end registers an Event with it
and is woken by the next append. No timer drives it:
a waiter's bounded wait (subscribe/session.py) is only a safety net.

A tail reads the files through its own descriptor: it never touches the engine's rings, so a slow
reader delays nobody else. When the active file is rotated the descriptor keeps the old inode; the
tail reads it to its end, then moves to the next file (the smallest created_ns above it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from eventstream.core import records as rec
from eventstream.storage import format as fmt
from eventstream.storage.scan import scan_buffer
from eventstream.storage.segments import segment_paths

CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 30


class TailEvent(NamedTuple):
    offset: int
    topic: str
    event_id: int
    priority: int
    producer_ts: int
    stored_ns: int
    payload: bytes


class Progress:
    """The writer's progress signal: bump() after each append wakes every registered waiter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[threading.Event] = set()
        self.appends = 0

    def bump(self) -> None:
        self.appends += 1  # a hint for statistics only; waking is by the events below
        if self._waiters:
            with self._lock:
                waiters = list(self._waiters)
            for ev in waiters:
                ev.set()

    def register(self, ev: threading.Event) -> None:
        with self._lock:
            self._waiters.add(ev)

    def unregister(self, ev: threading.Event) -> None:
        with self._lock:
            self._waiters.discard(ev)


def file_created_ns(path: Path) -> int | None:
    """created_ns of a log file's header, or None if it is missing or not (yet) a whole header."""
    try:
        with open(path, "rb") as f:
            head = f.read(fmt.FILE_HEADER_BYTES)
        return fmt.decode_file_header(head, str(path))[1]
    except (OSError, fmt.LogFormatError):
        return None


def _list_once(path: Path) -> list[tuple[int, Path]]:
    out = []
    for _, p in [*segment_paths(path), (0, path)]:
        c = file_created_ns(p)
        if c is not None:
            out.append((c, p))
    return out


def log_files(path: Path) -> list[tuple[int, Path]]:
    """(created_ns, path) of every readable log file, oldest first: closed segments, then the active one.

    A listing is not atomic: a rotation between the directory glob and the read of the active file's
    header would hide the file just renamed. So it lists until two listings in a row agree."""
    prev = _list_once(path)
    for _ in range(20):
        cur = _list_once(path)
        if cur == prev:
            return cur
        prev = cur
    return prev


def count_records(path: Path, dtype: np.dtype) -> int:
    """Verified record entries in one (closed) log file."""
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= fmt.FILE_HEADER_BYTES:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return scan_buffer(mm, dtype).records


class SegmentIndex:
    """created_ns of each log file -> its base offset; persisted (write, fsync, atomic rename)."""

    def __init__(self, log_path: Path, index_path: Path, dtype: np.dtype):
        self.log_path = Path(log_path)
        self.path = Path(index_path)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._bases: dict[int, int] = {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            self._bases = {int(k): int(v) for k, v in raw.get("bases", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"{self.path}: unreadable segment index ({exc}); allowed: the JSON file eventstream "
                "writes (delete it to rebuild; offsets then restart from the oldest file)"
            ) from None

    def base(self, created_ns: int) -> int | None:
        return self._bases.get(created_ns)

    def refresh(self) -> list[tuple[int, int, Path]]:
        """(base, created_ns, path) of every log file, oldest first; bases missing are computed (a file
        before a known one: its successor's base minus its records; after: its predecessor's base plus
        the predecessor's records) and persisted."""
        with self._lock:
            files = log_files(self.log_path)
            if not files:
                return []
            bases = self._bases
            changed = False
            known = [i for i, (c, _) in enumerate(files) if c in bases]
            if not known:
                bases[files[0][0]] = 0
                known = [0]
                changed = True
            k = known[0]
            for i in range(k - 1, -1, -1):
                bases[files[i][0]] = max(0, bases[files[i + 1][0]] - count_records(files[i][1], self.dtype))
                changed = True
            for i in range(k + 1, len(files)):
                if files[i][0] not in bases:
                    bases[files[i][0]] = bases[files[i - 1][0]] + count_records(files[i - 1][1], self.dtype)
                    changed = True
            if changed:
                self._save_locked()
            return [(bases[c], c, p) for c, p in files]

    def record(self, created_ns: int, base: int) -> int:
        """Set a file's base unless already known; returns the known base."""
        with self._lock:
            have = self._bases.get(created_ns)
            if have is not None:
                return have
            self._bases[created_ns] = base
            self._save_locked()
            return base

    def _save_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"bases": {str(k): v for k, v in sorted(self._bases.items())}}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


class LogTail:
    """Reads record entries from offset `start` on, in file order, live. Not thread-safe (one owner)."""

    def __init__(
        self,
        log_path: Path,
        dtype: np.dtype,
        index: SegmentIndex,
        start: int = 0,
        *,
        since_ns: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        rows: np.dtype | None = None,
    ):
        """`rows`: the TailBatch rows' dtype, BATCH_DTYPE (default) or ORIGIN_DTYPE."""
        self.log_path = Path(log_path)
        self.rows = BATCH_DTYPE if rows is None else rows
        # record columns copied into the rows by name (offset, topic, stored_ns and pos are computed)
        self.copied = tuple(n for n in self.rows.names or () if n not in ("offset", "topic", "stored_ns", "pos"))
        self.dtype = dtype
        self.index = index
        self.next_offset = start  # first offset not yet returned
        self.since_ns = since_ns  # time start: skip records stored before it, until the first one after
        self.chunk_bytes = max(chunk_bytes, 4 * (fmt.ENTRY_HEADER_BYTES + dtype.itemsize))
        self.skipped = 0  # offsets that no longer exist (retention deleted them) when the tail began
        self._fd = -1
        self._created = 0
        self._base = 0
        self._pos = 0
        self._ordinal = 0
        self._topics: dict[int, str] = {}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------------------------ files
    def _open(self, base: int, created: int, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        head = os.pread(fd, fmt.FILE_HEADER_BYTES, 0)
        try:
            _, c = fmt.decode_file_header(head, str(path))
        except fmt.LogFormatError:
            c = None
        if c != created:  # renamed or replaced meanwhile: the caller lists again
            os.close(fd)
            return False
        self.close()
        self._fd, self._created, self._base = fd, created, base
        self._pos, self._ordinal, self._topics = fmt.FILE_HEADER_BYTES, 0, {}
        return True

    def _open_first(self) -> bool:
        """Open the file holding next_offset (or, for a time start, the last file created before it)."""
        for _ in range(5):
            files = self.index.refresh()
            if not files:
                return False
            pick = files[0]
            if pick[0] > self.next_offset:  # older offsets were deleted by retention
                self.skipped += pick[0] - self.next_offset
                self.next_offset = pick[0]
            for f in files:
                if self.since_ns is not None:
                    if f[1] <= self.since_ns:
                        pick = f
                elif f[0] <= self.next_offset:
                    pick = f
            if self.since_ns is not None:
                self.next_offset = max(self.next_offset, pick[0])
            if self._open(*pick):
                return True
        return False

    def _advance_file(self) -> bool:
        """At the end of a file that was rotated: open its successor. False if there is none yet."""
        if file_created_ns(self.log_path) == self._created:
            return False  # still the active file
        size = os.fstat(self._fd).st_size
        if size > self._pos:
            return True  # written before the rotation: read it first
        succ_base = self._base + self._ordinal
        for c, p in log_files(self.log_path):
            if c > self._created:
                base = self.index.record(c, succ_base)
                return self._open(base, c, p)
        return False

    # ------------------------------------------------------------------------------------ reading
    def read(self) -> list[TailEvent]:
        """Events appended since the last call as one TailEvent each (read_batch() without the
        per-event objects is what subscribers use), [] if none."""
        batch = self.read_batch()
        return batch.events() if batch is not None else []

    def read_batch(self) -> TailBatch | None:
        """Events appended since the last call (at most about chunk_bytes of the log) as columns, or
        None if there are none. A constant number of numpy operations per log entry (a batch entry, or
        a run of version 1 record entries): no Python object per event."""
        if self._fd < 0 and not self._open_first():
            return None
        while True:  # until events, or the end of what is written
            size = os.fstat(self._fd).st_size
            if size <= self._pos:
                if not self._advance_file():
                    return None
                continue
            data = os.pread(self._fd, min(size - self._pos, self.chunk_bytes), self._pos)
            reader = _ChunkReader(self, data)
            res = scan_buffer(
                data,
                self.dtype,
                on_records=reader.on_records,
                on_topic=reader.on_topic,
                start=0,
                on_ext=reader.on_ext,
                on_rows=reader.on_rows,
            )
            self._pos += res.valid_bytes
            if reader.parts:
                parts = reader.parts
                # joined as bytes: concatenating structured arrays would promote their dtype each time
                rows = (
                    parts[0] if len(parts) == 1 else np.concatenate([p.view(np.uint8) for p in parts]).view(self.rows)
                )
                self.next_offset = int(rows["offset"][-1]) + 1
                return TailBatch(rows, data, self._topics)
            if res.valid_bytes == 0:
                if len(data) < size - self._pos and self.chunk_bytes < MAX_CHUNK_BYTES:
                    self.chunk_bytes *= 2  # one entry larger than a chunk (a large payload): read more
                    continue
                return None  # a partial entry at the end: wait for the rest

    def seek_end(self) -> int:
        """Skip everything stored now; returns the offset the next appended event will have."""
        self.next_offset = 1 << 64  # nothing qualifies: read() only counts (and opens the last file)
        while self.read():
            pass
        self.next_offset = self._base + self._ordinal if self._fd >= 0 else 0
        return self.next_offset

    def end_offset(self) -> int:
        """The offset after the last event read so far in the current file (for END frames)."""
        return max(self.next_offset, self._base + self._ordinal) if self._fd >= 0 else self.next_offset


# one event of a TailBatch: where its payload is in the batch's `data`, and the columns subscribers send
BATCH_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("event_id", "<u8"),
        ("producer_ts", "<u8"),
        ("stored_ns", "<u8"),
        ("pos", "<i8"),  # first payload byte in TailBatch.data
        ("payload_len", "<u4"),
        ("topic", "<u4"),  # the file's topic id: TailBatch.topics names it
        ("priority", "u1"),
    ],
    align=True,  # 56-byte rows: aligned fields copy several times faster than packed ones
)
# BATCH_DTYPE and where an event came from: its server sequence number (an event without an id is
# known by it) and source connection (the NATS sink skips the NATS source's own events); for a tail
# built with rows=ORIGIN_DTYPE (subscribers keep the narrower rows)
ORIGIN_DTYPE = np.dtype(
    [
        ("offset", "<u8"),
        ("event_id", "<u8"),
        ("producer_ts", "<u8"),
        ("stored_ns", "<u8"),
        ("pos", "<i8"),
        ("payload_len", "<u4"),
        ("topic", "<u4"),
        ("priority", "u1"),
        ("seq", "<u8"),
        ("conn_id", "<u4"),
    ],
    align=True,
)
_PAYLOAD_AT = fmt.ENTRY_HEADER_BYTES + rec.HEADER_BYTES  # a record entry's inline payload, from the entry


class TailBatch:
    """Events read from the log, as columns: `rows` (BATCH_DTYPE, in offset order unless a consumer
    group handed some back), the log bytes `data` their payloads are in (rows["pos"], rows["payload_len"];
    nothing is copied out of what was read), `topics` (file topic id -> name). Slicing and selecting
    make new row arrays over the same data."""

    __slots__ = ("data", "rows", "topics")

    def __init__(self, rows: np.ndarray, data: bytes, topics: dict[int, str]):
        self.rows = rows
        self.data = data
        self.topics = topics

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> TailBatch:
        return TailBatch(self.rows[s], self.data, self.topics)

    def select(self, mask: np.ndarray) -> TailBatch:
        return TailBatch(self.rows[mask], self.data, self.topics)

    @property
    def first_offset(self) -> int:
        return int(self.rows["offset"][0])

    def topic_names(self) -> list[str]:
        """Names of the file topic ids in this batch (unknown ids as "#<id>"), by np.unique order."""
        return [self.topics.get(t, f"#{t}") for t in np.unique(self.rows["topic"]).tolist()]

    def matching(self, glob: str, cache: dict[str, bool]) -> TailBatch:
        """The events whose topic matches `glob` (fnmatch; per distinct topic, `cache` remembers)."""
        if glob == "*" or not len(self.rows):  # fnmatch's * matches every topic name
            return self
        tids = self.rows["topic"]
        first = int(tids[0])
        ids = np.array([first], dtype=tids.dtype) if bool((tids == first).all()) else np.unique(tids)
        hits = []
        for t in ids.tolist():
            name = self.topics.get(t, f"#{t}")
            m = cache.get(name)
            if m is None:
                m = cache[name] = fnmatch.fnmatchcase(name, glob)
            hits.append(m)
        if all(hits):
            return self
        if not any(hits):
            return self[:0]
        return self.select(np.isin(self.rows["topic"], ids[np.array(hits, dtype=bool)]))

    def payload_parts(self) -> list:
        """The payloads of the rows, in row order, as buffers to join (see payload_parts_by)."""
        return self.payload_parts_by([(0, len(self.rows))])[0] if len(self.rows) else []

    def payload_parts_by(self, cuts: list[tuple[int, int]]) -> list[list]:
        """For each (start, stop) row range of `cuts` (in order, together all rows), the payloads of those
        rows as buffers to join: slices of `data` per run of payloads that lie back to back there (a
        batch entry's), or, when runs are short (version 1 record entries, each payload in its own
        entry), slices of one numpy gather. The runs are found once for all cuts."""
        r = self.rows
        n = len(r)
        if n == 0:
            return [[] for _ in cuts]
        pos = r["pos"]
        lens = r["payload_len"].astype(np.int64)
        ends = pos + lens
        breaks = np.flatnonzero(pos[1:] != ends[:-1]) + 1
        if len(breaks) <= max(8, n // 64):
            mv = memoryview(self.data)
            run_first = [0, *breaks.tolist()]  # row index where each run starts
            run_pos = pos[run_first].tolist()
            run_end = ends[np.concatenate((breaks, [n])) - 1].tolist()
            out = []
            k = 0
            for a, z in cuts:
                while k + 1 < len(run_first) and run_first[k + 1] <= a:
                    k += 1
                parts = []
                j = k
                start = int(pos[a])
                stop = int(ends[z - 1])
                while j < len(run_first) and run_first[j] < z:
                    lo = start if j == k else run_pos[j]
                    hi = stop if j + 1 >= len(run_first) or run_first[j + 1] >= z else run_end[j]
                    parts.append(mv[lo:hi])
                    j += 1
                out.append(parts)
            return out
        at = np.cumsum(lens)
        total = int(at[-1])
        src = np.frombuffer(self.data, dtype=np.uint8)
        idx = np.arange(total, dtype=np.int64) + np.repeat(pos - (at - lens), lens)
        blob = memoryview(src[idx].tobytes())
        starts = np.concatenate(([0], at)).tolist()
        return [[blob[starts[a] : starts[z]]] for a, z in cuts]

    def payload_bytes(self) -> bytes:
        """The payloads of the rows, in row order, back to back."""
        return b"".join(self.payload_parts())

    def events(self) -> list[TailEvent]:
        """One TailEvent per row (for callers that work per event)."""
        r = self.rows
        if not len(r):
            return []
        ids, inverse = np.unique(r["topic"], return_inverse=True)
        names = np.array([self.topics.get(t, f"#{t}") for t in ids.tolist()], dtype=object)
        data = self.data
        pos = r["pos"].tolist()
        ends = (r["pos"] + r["payload_len"]).tolist()
        return list(
            map(
                TailEvent,
                r["offset"].tolist(),
                names[inverse.ravel()].tolist(),
                r["event_id"].tolist(),
                r["priority"].tolist(),
                r["producer_ts"].tolist(),
                r["stored_ns"].tolist(),
                [data[a:b] for a, b in zip(pos, ends, strict=True)],
            )
        )


def _offset_in(view: np.ndarray, base: int) -> int:
    """Where `view` (an array over a read chunk) starts in that chunk, whose first byte is at `base`."""
    return view.ctypes.data - base


class _ChunkReader:
    """scan_buffer's callbacks for one chunk read by LogTail.read_batch: each entry (or run of record
    entries) becomes rows of BATCH_DTYPE pointing into the chunk, with a constant number of numpy
    operations."""

    def __init__(self, tail: LogTail, data: bytes):
        self.tail = tail
        self.base = np.frombuffer(data, dtype=np.uint8).ctypes.data if data else 0
        self.parts: list[np.ndarray] = []

    def on_topic(self, tid: int, name: str) -> None:
        self.tail._topics[tid] = name

    def _take(self, n: int) -> tuple[int, int] | None:
        """Count n records; (offset of the first, index of the first wanted) or None if none is wanted."""
        tail = self.tail
        first = tail._base + tail._ordinal
        tail._ordinal += n
        lo = max(0, tail.next_offset - first)
        return None if lo >= n else (first, lo)

    def _add(self, first: int, lo: int, n: int, cols, wall, pos) -> None:
        tail = self.tail
        if tail.since_ns is not None:  # a time start: skip what was stored before it
            if isinstance(wall, np.ndarray):
                hit = np.flatnonzero(wall[lo:] >= np.uint64(tail.since_ns))
                if not hit.size:
                    return
                lo += int(hit[0])
            elif int(wall) < tail.since_ns:
                return
            tail.since_ns = None
        out = np.empty(n - lo, dtype=tail.rows)
        out["offset"] = np.arange(first + lo, first + n, dtype=np.uint64)
        for name in tail.copied:
            out[name] = cols[name][lo:]
        out["topic"] = cols["topic_id"][lo:]
        out["stored_ns"] = wall[lo:] if isinstance(wall, np.ndarray) else wall
        out["pos"] = pos[lo:] if isinstance(pos, np.ndarray) else pos
        self.parts.append(out)

    def on_records(self, view: np.ndarray) -> None:
        """A run of version 1 record entries (inline payloads, at a fixed place in each entry)."""
        n = len(view)
        got = self._take(n)
        if got is None:
            return
        at = _offset_in(view, self.base) + _PAYLOAD_AT
        pos = np.arange(at, at + n * view.dtype.itemsize, view.dtype.itemsize, dtype=np.int64)
        self._add(*got, n, view["record"], view["wall_ns"], pos)

    def on_rows(self, rows: np.ndarray, wall_ns: int) -> None:
        """A batch entry: its rows, then its payloads packed back to back."""
        n = len(rows)
        got = self._take(n)
        if got is None:
            return
        at = _offset_in(rows, self.base) + rows.nbytes
        lens = rows["payload_len"].astype(np.int64)
        pos = np.cumsum(lens) - lens + at
        self._add(*got, n, rows, wall_ns, pos)

    def on_ext(self, view: np.ndarray, payload) -> None:
        """A large-payload entry: one record, its payload after it."""
        got = self._take(1)
        if got is None:
            return
        self._add(*got, 1, view["record"], view["wall_ns"], _offset_in(view, self.base) + view.dtype.itemsize)


def payload_capacity_of(path: Path) -> int:
    """records.payload_bytes of an existing log (its header)."""
    with open(path, "rb") as f:
        return fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(path))[0]


__all__ = [
    "BATCH_DTYPE",
    "ORIGIN_DTYPE",
    "LogTail",
    "Progress",
    "SegmentIndex",
    "TailBatch",
    "TailEvent",
    "count_records",
    "log_files",
    "payload_capacity_of",
    "rec",
]

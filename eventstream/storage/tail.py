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

import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from eventstream.core import records as rec
from eventstream.storage import format as fmt
from eventstream.storage.scan import scan_buffer
from eventstream.storage.writer import segment_paths

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
    ):
        self.log_path = Path(log_path)
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
        """Events appended since the last call (at most about chunk_bytes of the log), [] if none."""
        if self._fd < 0 and not self._open_first():
            return []
        while True:  # until events, or the end of what is written
            size = os.fstat(self._fd).st_size
            if size <= self._pos:
                if not self._advance_file():
                    return []
                continue
            data = os.pread(self._fd, min(size - self._pos, self.chunk_bytes), self._pos)
            out: list[TailEvent] = []
            topics = self._topics
            base = self._base

            # the callbacks run only inside this iteration's scan_buffer call: the loop variables they
            # use are this iteration's (ruff B023 is a false alarm here)
            def on_topic(tid: int, name: str) -> None:
                topics[tid] = name  # noqa: B023

            def on_records(view: np.ndarray, ext: bytes | None = None) -> None:
                n = len(view)
                first = base + self._ordinal  # noqa: B023
                self._ordinal += n
                lo = max(0, self.next_offset - first)
                if lo >= n:
                    return
                r = view["record"][lo:]
                wall = view["wall_ns"][lo:]
                if self.since_ns is not None:
                    hit = np.flatnonzero(wall >= np.uint64(self.since_ns))
                    if not hit.size:
                        return
                    lo += int(hit[0])
                    r, wall = r[hit[0] :], wall[hit[0] :]
                    self.since_ns = None
                k = len(r)
                if ext is not None:  # one large-payload entry: its payload follows the record
                    payloads = [ext]
                else:
                    payloads = _packed_payloads(r)
                ids, inverse = np.unique(r["topic_id"], return_inverse=True)
                names = np.array([topics.get(t, f"#{t}") for t in ids.tolist()], dtype=object)  # noqa: B023
                # one TailEvent per event is the interface; everything else is done over the columns
                out.extend(  # noqa: B023 - called within this loop iteration, never later
                    map(
                        TailEvent,
                        range(first + lo, first + lo + k),
                        names[inverse.ravel()].tolist(),  # noqa: B023
                        r["event_id"].tolist(),
                        r["priority"].tolist(),
                        r["producer_ts"].tolist(),
                        wall.tolist(),
                        payloads,
                    )
                )

            def on_ext(view: np.ndarray, payload) -> None:
                on_records(view, bytes(payload))

            res = scan_buffer(data, self.dtype, on_records=on_records, on_topic=on_topic, start=0, on_ext=on_ext)
            self._pos += res.valid_bytes
            if out:
                self.next_offset = out[-1].offset + 1
                return out
            if res.valid_bytes == 0:
                if len(data) < size - self._pos and self.chunk_bytes < MAX_CHUNK_BYTES:
                    self.chunk_bytes *= 2  # one entry larger than a chunk (a large payload): read more
                    continue
                return []  # a partial entry at the end: wait for the rest

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


def _packed_payloads(r: np.ndarray) -> list[bytes]:
    """Each record's inline payload as bytes: one masked copy of the payload bytes, then slices."""
    k = len(r)
    if "payload" not in (r.dtype.names or ()) or k == 0:
        return [b""] * k
    lens = r["payload_len"].astype(np.int64)
    top = int(lens.max())
    if top == 0:
        return [b""] * k
    block = r["payload"][:, :top]
    if int(lens.min()) == top:
        flat = np.ascontiguousarray(block).tobytes()
    else:
        flat = block[np.arange(top) < lens[:, None]].tobytes()
    ends = np.cumsum(lens).tolist()
    return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def payload_capacity_of(path: Path) -> int:
    """records.payload_bytes of an existing log (its header)."""
    with open(path, "rb") as f:
        return fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(path))[0]


__all__ = [
    "LogTail",
    "Progress",
    "SegmentIndex",
    "TailEvent",
    "count_records",
    "log_files",
    "payload_capacity_of",
    "rec",
]

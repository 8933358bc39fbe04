"""EventLog: the append-only writer of `data/events.bin` (layout in storage.format).

Whole batches are encoded with numpy outside the lock (the CRC per entry is the only per-record Python,
see storage.format), so several processor threads may call append() at once; the lock only orders the
buffered bytes and the write(2) calls. Topic ids are remapped to *file* topic ids, which stay stable
across engine restarts (engine ids are assigned per run); a topic entry is queued before the first
record that uses it, under the same lock, so it always precedes that record in the file.

Flushing: buffered bytes go to the OS once `flush_events` records are pending, or when the oldest
pending record is `flush_interval_ms` old (a small flusher thread checks that, so a trickle of events is
not held back). fsync: "none" never (the OS decides), "always" after every flush, "interval" at most
every `fsync_interval_ms` (checked on each flush and by the flusher thread). close() flushes and, unless
fsync is "none", fsyncs.

The engine runs it with `flush_events=1` (every append is written to the OS before it returns, one
write(2) per batch, or one writev(2) of its pieces when it has arena payloads) and calls `sync()` for
events whose ACK promises an fsync: group commit, one fsync covers everything written when it starts,
and callers that arrive meanwhile share the next one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.topics import TopicTable
from eventstream.runtime.affinity import pin_current_thread
from eventstream.storage import format as fmt
from eventstream.storage.recovery import RecoveryReport, recover
from eventstream.storage.segments import expired, rotate

log = structlog.get_logger("eventstream.storage")

FSYNC_POLICIES = ("none", "interval", "always")
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16  # buffers per writev


class EventLog:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: np.dtype,
        topics: TopicTable,
        flush_events: int = 100,
        flush_interval_ms: float = 50.0,
        fsync: str = "interval",
        fsync_interval_ms: float = 1000.0,
        flusher: bool = True,
        cpus: list[int] | None = None,
        max_segment_bytes: int = 0,
        max_segments: int = 0,
        max_age_s: float = 0.0,
        collect=None,
    ):
        """Segments: past `max_segment_bytes` (0 = never) the file is renamed `<name>.<n>` and a new one
        starts, declaring every known topic first (each segment reads on its own); `max_segments`
        (0 = all) and `max_age_s` (0 = no limit) bound how many old segments are kept."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync={fsync!r} is not allowed; allowed: {', '.join(FSYNC_POLICIES)}")
        if flush_events < 1:
            raise ValueError(f"flush_events={flush_events!r} is not allowed; allowed: an integer >= 1")
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.payload_bytes = self.dtype.itemsize - 64
        self.topics = topics
        self.flush_events = flush_events
        self.flush_interval_ns = int(flush_interval_ms * 1e6)
        self.fsync_policy = fsync
        self.fsync_interval_ns = int(fsync_interval_ms * 1e6)
        self.recovery: RecoveryReport = recover(self.path, self.payload_bytes, collect)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives until close()
        # what earlier runs wrote is made durable once at open: a duplicate of it gets a `synced` ACK
        # (its first copy is stored), even if that run died before its own fsync
        os.fsync(self._file.fileno())
        self._size = self.path.stat().st_size
        with open(self.path, "rb") as f:  # the active file's identity (its header's creation time)
            self._created_ns = fmt.decode_file_header(f.read(fmt.FILE_HEADER_BYTES), str(self.path))[1]
        self.max_segment_bytes = max_segment_bytes
        self.max_segments = max_segments
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        # engine topic id -> file topic id (0 = not yet mapped); read lock-free, grown under the lock
        self._file_ids = np.zeros(64, dtype=np.uint32)
        self._file_id_by_name: dict[str, int] = {name: tid for tid, name in self.recovery.topics.items()}
        self._next_file_id = max(self.recovery.topics, default=0) + 1
        self._pending: list[bytes] = []
        self._pending_records = 0
        self._pending_since = 0
        self._last_fsync = time.monotonic_ns()
        self._dirty = False  # written but not fsynced
        self._sync_lock = threading.Lock()  # one fsync at a time in sync(); waiters share it
        self._synced_records = 0  # records covered by the last completed fsync
        self._closed = False
        self._stats = {
            "records": 0,
            "bytes": 0,
            "flushes": 0,
            "fsyncs": 0,
            "topics": 0,
            "group_syncs": 0,
            "segments_deleted": 0,
            "segments_deleted_unread": 0,
            "segments_kept_unread": 0,
        }
        self._stop = threading.Event()
        self._cpus = cpus or []
        # readers that must not lose unread events (set by the service when consumer groups exist):
        # unread_by(segment path) -> names of the readers that have not read past that segment. With
        # keep_unread (storage.retention_respects_groups) such a segment, and every newer one, is kept;
        # without, it is deleted and counted in segments_deleted_unread
        self.unread_by: Callable[[Path], list[str]] | None = None
        self.keep_unread = True
        self._flusher: threading.Thread | None = None
        if flusher and self.flush_interval_ns > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="es-storage-flush", daemon=True)
            self._flusher.start()

    # ------------------------------------------------------------------------------------ writing
    def append(self, records: np.ndarray) -> None:
        """Append a batch of records (any length; thread-safe)."""
        n = len(records)
        if n == 0:
            return
        if records.dtype != self.dtype:
            raise TypeError(
                f"records have dtype itemsize {records.dtype.itemsize}; this log stores "
                f"{self.dtype.itemsize}-byte records (records.payload_bytes={self.payload_bytes})"
            )
        if self._closed:
            raise ValueError(f"{self.path}: append() after close()")
        ids = records["topic_id"]
        mapping = self._file_ids
        file_ids: list[int] | np.ndarray
        if n <= fmt.SMALL_BATCH:  # a few records: plain ints beat numpy temporaries
            file_ids = [int(mapping[t]) if t < len(mapping) else 0 for t in ids.tolist()]
            if not all(file_ids):
                file_ids = self._map_new_topics(ids).tolist()
        else:
            top = int(ids.max())
            known = mapping[ids] if top < len(mapping) else None
            file_ids = known if known is not None and known.all() else self._map_new_topics(ids)
        through = self.flush_events == 1
        # write-through: the entries of arena payloads come as pieces (the payloads as views of their
        # slots, which these records hold until append returns) for one writev instead of one copy
        data = fmt.record_entries(records, file_ids, time.time_ns(), gather=through)
        if through and isinstance(data, list):
            with self._lock:
                if self._pending:  # topic entries queued for these records go first
                    data[:0] = self._pending
                    self._pending.clear()
                    self._pending_records = 0
                self._stats["bytes"] += self._writev_all(data)
                self._stats["records"] += n
                self._stats["flushes"] += 1
                self._dirty = True
                if self.max_segment_bytes and self._size >= self.max_segment_bytes:
                    self._rotate_locked()
                return
        if through:
            with self._lock:  # write-through: one write(2) per batch
                if not self._pending:
                    self._write_all(data)
                    self._stats["records"] += n
                    self._stats["bytes"] += len(data)
                    self._stats["flushes"] += 1
                    self._dirty = True
                    if self.max_segment_bytes and self._size >= self.max_segment_bytes:
                        self._rotate_locked()
                    return
        with self._lock:
            if not self._pending:
                self._pending_since = time.monotonic_ns()
            self._pending.append(data)
            self._pending_records += n
            if self._pending_records >= self.flush_events:
                self._flush_locked()

    def position(self) -> tuple[int, int]:
        """(the active file's created_ns, its bytes written to the OS): everything appended so far ends
        at or before this point; a reader finds the file by its header (EventLogReader.files)."""
        with self._lock:
            return self._created_ns, self._size

    def _writev_all(self, parts: list) -> int:
        """Write to the OS (under the lock) every buffer of `parts` in order, with writev(2) calls of
        at most IOV_MAX buffers; returns the bytes written."""
        fd = self._file.fileno()
        total = 0
        i, n = 0, len(parts)
        while i < n:
            chunk = parts[i : i + _IOV_MAX]
            k = os.writev(fd, chunk)
            self._size += k
            total += k
            for p in chunk:  # past what was written (all of the chunk but after a short write)
                m = len(p)
                if k < m:
                    parts[i] = memoryview(p)[k:]
                    break
                k -= m
                i += 1
        return total

    def _write_all(self, data: bytes) -> None:
        """Write to the OS (under the lock): the whole of `data`, at the end of the active segment."""
        view = memoryview(data)
        fd = self._file.fileno()
        while view:
            k = os.write(fd, view)
            view = view[k:]
            self._size += k

    # ------------------------------------------------------------------------------------ segments
    def _rotate_locked(self) -> None:
        """Close the active file as segment `<name>.<n>` and start a new one (under the lock)."""
        os.fsync(self._file.fileno())  # a `synced` promise for what is in the old segment holds
        self._stats["fsyncs"] += 1
        self._synced_records = self._stats["records"]
        self._dirty = False
        self._file.close()
        segment = rotate(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives until close()
        self._size = 0
        now = time.time_ns()
        self._created_ns = now
        head = [fmt.encode_file_header(self.payload_bytes, now)]
        head += [
            fmt.topic_entry(fid, name.encode("utf-8"), now)
            for name, fid in sorted(self._file_id_by_name.items(), key=lambda kv: kv[1])
        ]
        self._write_all(b"".join(head))
        self._stats["segments"] = self._stats.get("segments", 0) + 1
        log.info("log_rotated", path=str(self.path), segment=segment.name)
        self._retain()

    def _retain(self) -> None:
        doomed = expired(self.path, self.max_segments or None, self.max_age_s)  # max_segments 0: no bound
        kept = 0
        for i, (_, p) in enumerate(doomed):
            readers = self._unread_by(p)
            if readers and self.keep_unread:  # every newer segment is unread by them too: keep the rest
                kept = len(doomed) - i
                log.info(
                    "log_segments_kept_unread",
                    segment=str(p),
                    kept=kept,
                    readers=readers[:8],
                    readers_total=len(readers),
                )
                break
            try:
                p.unlink()
                self._stats["segments_deleted"] += 1
                if readers:
                    self._stats["segments_deleted_unread"] += 1
                    log.warning(
                        "log_segment_deleted_unread", segment=str(p), readers=readers[:8], readers_total=len(readers)
                    )
                else:
                    log.info("log_segment_deleted", segment=str(p))
            except OSError as exc:
                log.warning("log_segment_delete_failed", segment=str(p), error=str(exc))
        self._stats["segments_kept_unread"] = kept

    def _unread_by(self, p: Path) -> list[str]:
        if self.unread_by is None:
            return []
        try:
            return list(self.unread_by(p))
        except Exception as exc:  # noqa: BLE001 - unknown: keep the segment rather than lose events
            log.warning("log_segment_readers_unknown", segment=str(p), error=f"{type(exc).__name__}: {exc}")
            return ["?"]

    def _map_new_topics(self, ids: np.ndarray) -> np.ndarray:
        """Assign file ids to engine topic ids seen for the first time; queue their topic entries."""
        with self._lock:
            mapping = self._file_ids
            top = int(ids.max())
            if top >= len(mapping):
                grown = np.zeros(max(top + 1, 2 * len(mapping)), dtype=np.uint32)
                grown[: len(mapping)] = mapping
                mapping = grown
            for tid in np.unique(ids).tolist():
                if mapping[tid]:
                    continue
                name = self.topics.name(tid) if tid else ""
                fid = self._file_id_by_name.get(name)
                if fid is None:
                    fid = self._next_file_id
                    self._next_file_id += 1
                    self._file_id_by_name[name] = fid
                    entry = fmt.topic_entry(fid, name.encode("utf-8"), time.time_ns())
                    if not self._pending:
                        self._pending_since = time.monotonic_ns()
                    self._pending.append(entry)
                    self._stats["topics"] += 1
                mapping[tid] = fid
            self._file_ids = mapping  # publish after the topic entries are queued
            return mapping[ids]

    def flush(self) -> None:
        """Write every pending entry to the OS now (and fsync if the policy says so)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._write_all(data)
            self._stats["records"] += self._pending_records
            self._stats["bytes"] += len(data)
            self._stats["flushes"] += 1
            self._pending.clear()
            self._pending_records = 0
            self._dirty = True
            if self.max_segment_bytes and self._size >= self.max_segment_bytes:
                self._rotate_locked()
        # "interval" fsyncs belong to the flusher thread, outside the lock (an fsync can take 100+ ms
        # and appenders must not wait for it); without a flusher they happen here.
        if self._dirty and (
            self.fsync_policy == "always"
            or (
                self.fsync_policy == "interval"
                and self._flusher is None
                and time.monotonic_ns() - self._last_fsync >= self.fsync_interval_ns
            )
        ):
            self._fsync_locked()

    def _fsync_locked(self) -> None:
        os.fsync(self._file.fileno())
        self._last_fsync = time.monotonic_ns()
        self._dirty = False
        self._stats["fsyncs"] += 1
        self._synced_records = self._stats["records"]

    def sync(self) -> None:
        """Group commit: return once everything written to the OS before this call is fsynced.

        Pending (unwritten) records are written first. Callers that arrive while an fsync runs wait
        for it and then share one more fsync, so N concurrent callers cost about two fsyncs, not N.
        """
        with self._lock:
            if self._pending:
                self._flush_locked()
            want = self._stats["records"]
        if self._synced_records >= want:
            return
        with self._sync_lock:
            if self._synced_records >= want:
                return  # somebody's fsync covered us while we waited
            with self._lock:
                if self._closed:
                    return  # close() fsynced
                # a duplicate descriptor: still valid if a rotation closes the file meanwhile
                upto, fd = self._stats["records"], os.dup(self._file.fileno())
            try:
                os.fsync(fd)  # outside the log lock: appends go on meanwhile
            finally:
                os.close(fd)
            with self._lock:
                self._stats["fsyncs"] += 1
                self._stats["group_syncs"] += 1
                if upto > self._synced_records:
                    self._synced_records = upto

    def _flush_loop(self) -> None:
        pin_current_thread(self._cpus, "es-storage-flush")
        period = self.flush_interval_ns / 1e9
        while not self._stop.wait(period / 2):
            now = time.monotonic_ns()
            fd = None
            with self._lock:
                if self._closed:
                    return
                if self._pending and now - self._pending_since >= self.flush_interval_ns:
                    self._flush_locked()
                if self._dirty and self.fsync_policy == "interval" and now - self._last_fsync >= self.fsync_interval_ns:
                    fd, self._dirty, self._last_fsync = os.dup(self._file.fileno()), False, now
                    upto = self._stats["records"]
            if fd is not None:
                try:
                    os.fsync(fd)  # outside the lock: appends go on meanwhile (close() joins us first)
                finally:
                    os.close(fd)  # a duplicate: still valid if a rotation closed the file meanwhile
                with self._lock:
                    self._stats["fsyncs"] += 1
                    self._synced_records = max(self._synced_records, upto)

    def close(self) -> None:
        """Flush, fsync (unless fsync is "none") and close. Idempotent."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5.0)
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            if self._dirty and self.fsync_policy != "none":
                self._fsync_locked()
            self._closed = True
            self._file.close()
        log.info("log_closed", path=str(self.path), **self._stats)

    def statistics(self) -> dict[str, int]:
        """records/bytes/flushes/fsyncs written by this EventLog (pending records not yet counted)."""
        with self._lock:
            return dict(self._stats, pending=self._pending_records, synced_records=self._synced_records)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Dead-letter log: every dropped or failed event, whole and replayable, in `data/dlq_log.txt`.

Format (docs/dlq.md): JSON Lines, one object per event, keys in this order::

    {"ts": "2026-01-31T12:00:00.123Z", "reason": "handler_error: ValueError: bad amount",
     "category": "handler_error", "id": 5001, "event_id": 5001, "seq": 17, "topic": "orders.new",
     "priority": 3, "producer_ts": 1769860800000000000, "flags": 1, "attempts": 3,
     "payload_b64": "eyJhbW91bnQiOi0xfQ==", "payload_len": 12}

`id` is the client's event_id, or the server sequence number when the client sent none (0). A frame
that failed to decode (`write_line`) never became a record: only id, topic, priority and reason are
known, and event_id is the id given, the other record fields and `payload_b64` are null. Every string
goes through json.dumps (ASCII only: control characters, quotes and non-ASCII are escaped), so no
topic or reason text can end a line, forge a field or reach a terminal as an escape sequence.

Reasons read as ``category: detail`` (e.g. ``handler_error: ValueError: bad amount``). Counts are kept
per *category* (the text before the first colon): exception texts vary without bound and the counts
feed metric labels, whose cardinality must stay small.

Write-through: each write*/write_line call is one os.write(2) of all its lines on an O_APPEND file
descriptor, under a lock, before it returns. No buffer and no flusher thread: once a call has
returned, its events are in the file as far as a kill -9 of the process is concerned (not a power
loss: nothing is fsynced). A failed write raises OSError and leaves no partial line behind.

Segments: when the next write would take the active file past `max_bytes`, the file is renamed to
``<name>.<n>`` (n = 1, 2, ... never reused) and a new one is started. At most `max_segments` old
segments are kept (oldest deleted first) and, with `max_age_s` > 0, segments last written longer ago
than that are deleted; both rules run at every rotation and when the log is opened.

Reading (dlq_reader.py): `read_dlq(path)` yields every entry of every segment, oldest first, then the active file; it
skips a torn (unterminated) last line, as a crash mid-write leaves, and still parses lines of the old
text format (``[ts] DROPPED: id=.. topic=.. priority=.. reason=..``, no payload).
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.payloads import payload_views
from eventstream.core.topics import TopicTable
from eventstream.metrics.reasons import category as bounded_category
from eventstream.storage.segments import expired, rotate, segment_paths

log = structlog.get_logger("eventstream.dlq")

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_SEGMENTS = 8

_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})
_UNESCAPE = re.compile(r"\\(.)")


def escape(text: str) -> str:
    """The old text format's escaping (backslash, CR, LF); kept for tools that still write it."""
    return text.translate(_ESCAPES)


def unescape(text: str) -> str:
    return _UNESCAPE.sub(lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


def reason_category(reason: str) -> str:
    """The counting key of a reason: the text before the first colon, stripped."""
    return reason.split(":", 1)[0].strip() or "unknown"


def timestamp_now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-01-31T12:00:00.123Z."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class DlqRecord:
    """One DLQ entry. Fields the entry does not know are None: everything but ts/reason/category/id/
    topic/priority for old text lines; the record fields and payload for frames that failed to decode."""

    ts: str
    reason: str
    category: str
    id: int
    event_id: int | None
    seq: int | None
    topic: str
    priority: int
    producer_ts: int | None
    flags: int | None
    attempts: int | None
    payload: bytes | None
    payload_len: int | None

    @property
    def timestamp(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.ts.replace("Z", "+00:00"))

    def to_json(self) -> dict:
        """The entry as the DLQ format's object (the same keys, in the same order, as the file)."""
        return {
            "ts": self.ts,
            "reason": self.reason,
            "category": self.category,
            "id": self.id,
            "event_id": self.event_id,
            "seq": self.seq,
            "topic": self.topic,
            "priority": self.priority,
            "producer_ts": self.producer_ts,
            "flags": self.flags,
            "attempts": self.attempts,
            "payload_b64": None
            if self.payload is None
            else binascii.b2a_base64(self.payload, newline=False).decode("ascii"),
            "payload_len": self.payload_len,
        }


DlqEntry = DlqRecord  # the name before payloads were kept


def _js(text: str) -> str:
    return json.dumps(text)  # ensure_ascii: control characters, quotes and non-ASCII are escaped


class DeadLetterLog:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
        max_age_s: float = 0.0,
    ):
        """Every write is write-through (see the module doc). `max_bytes`: size at which the active file
        becomes a segment; `max_segments`: old segments kept (0 = none); `max_age_s`: delete segments
        last written longer ago than this at rotation and open (0 = no age limit)."""
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes!r} is not allowed; allowed: an integer >= 1 (bytes)")
        if not isinstance(max_segments, int) or max_segments < 0:
            raise ValueError(f"max_segments={max_segments!r} is not allowed; allowed: an integer >= 0")
        if not isinstance(max_age_s, (int, float)) or not max_age_s >= 0:
            raise ValueError(f"max_age_s={max_age_s!r} is not allowed; allowed: seconds >= 0 (0 = no age limit)")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self.max_age_s = float(max_age_s)
        self._lock = threading.Lock()
        self._dirty = False  # written since the last fsync
        self._counts: dict[str, int] = {}
        self._total = 0
        self._rotations = 0
        self._deleted = 0  # old segments deleted by retention (max_segments, max_age_s)
        self._closed = False
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._cut_torn_tail()
        existing = segment_paths(self.path)
        self._next_segment = (existing[-1][0] + 1) if existing else 1
        self._retain()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _cut_torn_tail(self) -> None:
        """A crash mid-write can leave an unterminated last line: cut it, so the next line starts clean
        (its write never returned, so nothing was promised about it)."""
        if not self._size:
            return
        with open(self.path, "rb") as f:
            back = min(self._size, 1 << 20)
            f.seek(self._size - back)
            tail = f.read(back)
        if tail.endswith(b"\n"):
            return
        nl = tail.rfind(b"\n")
        if nl < 0 and back < self._size:
            log.warning("dlq_torn_tail_kept", path=str(self.path), reason="last line longer than 1 MiB")
            os.write(self._fd, b"\n")
            self._size += 1
            return
        keep = self._size - back + nl + 1
        os.ftruncate(self._fd, keep)
        log.warning("dlq_torn_tail_cut", path=str(self.path), bytes=self._size - keep)
        self._size = keep

    # ------------------------------------------------------------------------------------ writing
    def write(self, records: np.ndarray, reason: str, topics: TopicTable, payloads: list | None = None) -> None:
        """One entry per record, all with the same reason; in the file when this returns. The whole
        payload of every record is written, inline or in the payload arena; `payloads`: the payloads
        (bytes-like, one per record) when the caller copied them out already (the arena slots given
        back)."""
        if len(records):
            self._write(records, [reason] * len(records), topics, {reason_category(reason): len(records)}, payloads)

    def write_each(
        self, records: np.ndarray, reasons: list[str], topics: TopicTable, payloads: list | None = None
    ) -> None:
        """One entry per record with its own reason (len(reasons) == len(records))."""
        n = len(records)
        if len(reasons) != n:
            raise ValueError(f"{len(reasons)} reasons for {n} records; allowed: exactly one reason per record")
        if n:
            self._write(records, reasons, topics, Counter(reason_category(r) for r in reasons), payloads)

    def _write(
        self,
        records: np.ndarray,
        reasons: list[str],
        topics: TopicTable,
        categories: dict[str, int],
        payloads: list | None = None,
    ) -> None:
        eids = records["event_id"].tolist()
        seqs = records["seq"].tolist()
        tids = records["topic_id"].tolist()
        prios = records["priority"].tolist()
        pts = records["producer_ts"].tolist()
        flags = records["flags"].tolist()
        attempts = records["attempts"].tolist()
        pays = payload_views(records) if payloads is None else payloads
        topic_js: dict[int, str] = {}
        reason_js: dict[str, tuple[str, str]] = {}
        ts = timestamp_now()
        lines = []
        b64 = binascii.b2a_base64
        for i in range(len(records)):
            tid = tids[i]
            t = topic_js.get(tid)
            if t is None:
                t = topic_js[tid] = _js(topics.name(tid))
            r = reasons[i]
            rc = reason_js.get(r)
            if rc is None:
                rc = reason_js[r] = (_js(r), _js(reason_category(r)))
            payload = pays[i]
            eid = eids[i]
            lines.append(
                f'{{"ts": "{ts}", "reason": {rc[0]}, "category": {rc[1]}, "id": {eid or seqs[i]}, '
                f'"event_id": {eid}, "seq": {seqs[i]}, "topic": {t}, "priority": {prios[i]}, '
                f'"producer_ts": {pts[i]}, "flags": {flags[i]}, "attempts": {attempts[i]}, '
                f'"payload_b64": "{b64(payload, newline=False).decode("ascii")}", "payload_len": {len(payload)}}}\n'
            )
        self._add("".join(lines).encode("ascii"), len(lines), categories)

    def write_line(self, id: int, topic: str, priority: int, reason: str) -> None:
        """One event that never became a record (e.g. a frame that failed to decode): no payload."""
        if isinstance(topic, bytes):
            topic = topic.decode("utf-8", "replace")
        line = (
            f'{{"ts": "{timestamp_now()}", "reason": {_js(reason)}, "category": {_js(reason_category(reason))}, '
            f'"id": {int(id)}, "event_id": {int(id)}, "seq": null, "topic": {_js(topic)}, '
            f'"priority": {int(priority)}, "producer_ts": null, "flags": null, "attempts": null, '
            f'"payload_b64": null, "payload_len": null}}\n'
        )
        self._add(line.encode("ascii"), 1, {reason_category(reason): 1})

    def _add(self, data: bytes, n: int, categories: dict[str, int]) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: write after close(); allowed: writes before close()")
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._write_all(data)
            self._dirty = True
            self._total += n
            for c, k in categories.items():
                c = bounded_category(c)  # counts keep a fixed set of keys whatever clients send
                self._counts[c] = self._counts.get(c, 0) + k

    def _write_all(self, data: bytes) -> None:
        """One write(2) (a loop only if the kernel writes less); on failure cut what was written."""
        start = self._size
        view = memoryview(data)
        try:
            while view:
                k = os.write(self._fd, view)
                view = view[k:]
                self._size += k
        except OSError:
            if self._size != start:
                try:
                    os.ftruncate(self._fd, start)
                    self._size = start
                except OSError:
                    self._size = os.fstat(self._fd).st_size
            raise

    # ------------------------------------------------------------------------------------ segments
    def _rotate(self) -> None:
        n = self._next_segment
        try:
            target = rotate(self.path, n)
        except OSError as exc:
            log.warning("dlq_rotate_failed", path=str(self.path), segment=n, error=str(exc))
            return  # keep appending to the active file: an event is never dropped for a failed rotation
        self._next_segment = n + 1
        old = self._fd
        if self._dirty:
            os.fsync(old)  # a `synced` promise made for lines in the old segment still holds
            self._dirty = False
        self._fd = self._open()
        os.close(old)
        self._size = os.fstat(self._fd).st_size
        self._rotations += 1
        log.info("dlq_rotated", path=str(self.path), segment=str(target))
        self._retain()

    def _retain(self) -> None:
        for _, p in expired(self.path, self.max_segments, self.max_age_s):  # max_segments 0: none kept
            try:
                os.unlink(p)
                self._deleted += 1
                log.info("dlq_segment_deleted", segment=str(p))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("dlq_segment_delete_failed", segment=str(p), error=str(exc))

    # ------------------------------------------------------------------------------------ lifecycle
    def sync(self) -> None:
        """fsync what was written (for `synced` ACKs; the DLQ is small, so under the lock)."""
        with self._lock:
            if self._dirty and not self._closed:
                os.fsync(self._fd)
                self._dirty = False

    def close(self) -> None:
        """Close the file (idempotent). Later writes raise ValueError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)
        log.info("dlq_closed", path=str(self.path), total=self._total, by_reason=dict(self._counts))

    def counts(self) -> dict[str, int]:
        """Dropped events per reason category."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        return self._total

    def statistics(self) -> dict:
        with self._lock:
            return {
                "total": self._total,
                "by_reason": dict(self._counts),
                "pending": 0,
                "bytes": self._size,
                "rotations": self._rotations,
                "segments_deleted": self._deleted,
            }

    def __enter__(self) -> DeadLetterLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

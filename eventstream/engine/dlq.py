"""Dead-letter log: every dropped or failed event as one line of `data/dlq_log.txt`.

Line format (EventStreamCore's)::

    [2026-01-31T12:00:00.123Z] DROPPED: id=<id> topic=<topic> priority=<n> reason=<reason>

`id` is the client's event_id, or the server sequence number when the client sent none. Backslashes,
CR and LF in topics and reasons are escaped (``\\\\``, ``\\r``, ``\\n``) so one event is always one line.

Reasons read as ``category: detail`` (e.g. ``handler_error: ValueError: bad amount``). Counts are kept
per *category* (the text before the first colon): exception texts vary without bound and the counts
feed metric labels, whose cardinality must stay small.

Lines are buffered and written at most every `flush_interval_ms` (a small flusher thread) or when
`flush_lines` are pending, and on flush()/close(); the lock only guards the buffer and the file.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from eventstream.core.topics import TopicTable

log = structlog.get_logger("eventstream.dlq")

_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})
_LINE = re.compile(r"^\[(?P<ts>[^\]]+)\] DROPPED: id=(?P<id>\d+) topic=(?P<topic>.*?) "
                   r"priority=(?P<priority>-?\d+) reason=(?P<reason>.*)$")
_UNESCAPE = re.compile(r"\\(.)")


def escape(text: str) -> str:
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
class DlqEntry:
    timestamp: dt.datetime
    id: int
    topic: str
    priority: int
    reason: str


class DeadLetterLog:
    def __init__(self, path: str | os.PathLike, *, flush_interval_ms: float = 50.0, flush_lines: int = 1000,
                 flusher: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._pending_since = 0
        self._counts: dict[str, int] = {}
        self._total = 0
        self._closed = False
        self.flush_interval_ns = int(flush_interval_ms * 1e6)
        self.flush_lines = flush_lines
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if flusher and self.flush_interval_ns > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="es-dlq-flush", daemon=True)
            self._flusher.start()

    # ------------------------------------------------------------------------------------ writing
    def write(self, records: np.ndarray, reason: str, topics: TopicTable) -> None:
        """One line per record, all with the same reason."""
        if len(records):
            self._write(records, [reason] * len(records), topics, {reason_category(reason): len(records)})

    def write_each(self, records: np.ndarray, reasons: list[str], topics: TopicTable) -> None:
        """One line per record with its own reason (len(reasons) == len(records))."""
        n = len(records)
        if len(reasons) != n:
            raise ValueError(f"{len(reasons)} reasons for {n} records; allowed: exactly one reason per record")
        if n:
            self._write(records, reasons, topics, Counter(reason_category(r) for r in reasons))

    def _write(self, records: np.ndarray, reasons: list[str], topics: TopicTable, categories: dict[str, int]) -> None:
        ids = np.where(records["event_id"] != 0, records["event_id"], records["seq"]).tolist()
        names = [escape(t) for t in topics.names(records["topic_id"])]
        prios = records["priority"].tolist()
        ts = timestamp_now()
        lines = [f"[{ts}] DROPPED: id={i} topic={t} priority={p} reason={escape(r)}\n"
                 for i, t, p, r in zip(ids, names, prios, reasons)]
        self._add(lines, categories)

    def write_line(self, id: int, topic: str, priority: int, reason: str) -> None:
        """One event that never became a record (e.g. a rejected frame)."""
        line = f"[{timestamp_now()}] DROPPED: id={int(id)} topic={escape(topic)} priority={int(priority)} reason={escape(reason)}\n"
        self._add([line], {reason_category(reason): 1})

    def _add(self, lines: list[str], categories: dict[str, int]) -> None:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: write after close()")
            if not self._pending:
                self._pending_since = time.monotonic_ns()
            self._pending.extend(lines)
            self._total += len(lines)
            for c, k in categories.items():
                self._counts[c] = self._counts.get(c, 0) + k
            if len(self._pending) >= self.flush_lines:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending and not self._closed:
            self._file.write("".join(self._pending))
            self._file.flush()
            self._pending.clear()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_ns / 2e9):
            with self._lock:
                if self._pending and time.monotonic_ns() - self._pending_since >= self.flush_interval_ns:
                    self._flush_locked()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=5.0)
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._file.close()
            self._closed = True
        log.info("dlq_closed", path=str(self.path), total=self._total, by_reason=dict(self._counts))

    # ------------------------------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        """Dropped events per reason category."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        return self._total

    def statistics(self) -> dict:
        with self._lock:
            return {"total": self._total, "by_reason": dict(self._counts), "pending": len(self._pending)}

    def __enter__(self) -> DeadLetterLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_line(line: str) -> DlqEntry:
    """Parse one DLQ line; ValueError naming the line if it does not have the DLQ format."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        raise ValueError(f"not a DLQ line: {line[:120]!r}; allowed: "
                         "[timestamp] DROPPED: id=<id> topic=<topic> priority=<n> reason=<reason>")
    ts = dt.datetime.fromisoformat(m["ts"].replace("Z", "+00:00"))
    return DlqEntry(ts, int(m["id"]), unescape(m["topic"]), int(m["priority"]), unescape(m["reason"]))


def read_dlq(path: str | os.PathLike) -> list[DlqEntry]:
    """Every entry of a DLQ file, in order (for tests and tools)."""
    with open(path, encoding="utf-8") as f:
        return [parse_line(line) for line in f if line.strip()]

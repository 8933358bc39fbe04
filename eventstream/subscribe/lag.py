"""Consumer-group lag: how far each named group's committed offset is behind the end of the log.

Read at scrape time (metrics) and by nobody on a hot path. The end of the log is counted by a private
tail that only counts entries (after the first call it reads only what was appended since the
previous one). A group's lag in seconds is the age of the first event it has not committed: its stored
time is read by a tail that follows that group's committed offset forward (it reads what the group
committed since the last scrape; a new tail only when the offset goes back, e.g. a group file restored
by an operator), and the chunk it read last answers later scrapes while the offset stays inside it.

Series (metrics/engine_gauges.py): group names are chosen by clients, and each label value is a
series kept forever, so at most `max_series` groups (server.subscribe.lag_group_series) get their own
series: the groups on disk at the first scrape by name, then new ones as they first commit. Every
other group is folded into the one series labelled OTHER: events summed, seconds the largest (the
oldest uncommitted event among them). OTHER is always exported (0 without such groups), so the series
exist from the first scrape. `lag()` keeps the worst case over every group.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from eventstream.storage.tail import LogTail, SegmentIndex

OTHER = "_other"
DEFAULT_MAX_SERIES = 100


class StoredAt:
    """Stored time of the first event at or after an offset that mostly moves forward."""

    def __init__(self, log_path: Path, dtype, index: SegmentIndex):
        self.log_path, self.dtype, self.index = log_path, dtype, index
        self.tail: LogTail | None = None
        self.offsets = np.empty(0, dtype=np.uint64)  # the chunk read last: its offsets and stored times
        self.stored = np.empty(0, dtype=np.uint64)

    def at(self, offset: int) -> int | None:
        """ns since the epoch, or None when no event at or after `offset` is stored yet."""
        offs = self.offsets
        if len(offs) and int(offs[0]) <= offset <= int(offs[-1]):
            return int(self.stored[int(np.searchsorted(offs, np.uint64(offset)))])
        if self.tail is None or offset < self.tail.next_offset:
            self.close()
            self.tail = LogTail(self.log_path, self.dtype, self.index, offset)
        else:
            self.tail.next_offset = offset
        batch = self.tail.read_batch()
        if batch is None:
            self.offsets = self.stored = np.empty(0, dtype=np.uint64)
            return None
        self.offsets = batch.rows["offset"].copy()
        self.stored = batch.rows["stored_ns"].copy()
        return int(self.stored[0])

    def close(self) -> None:
        if self.tail is not None:
            self.tail.close()
            self.tail = None


class GroupLag:
    def __init__(
        self,
        log_path: Path,
        dtype,
        index: SegmentIndex,
        store,
        clock=time.time_ns,
        max_series: int = DEFAULT_MAX_SERIES,
    ):
        self.log_path, self.dtype, self.index, self.store = Path(log_path), dtype, index, store
        self.clock = clock
        self.max_series = max_series
        self._lock = threading.Lock()
        self._end = LogTail(self.log_path, dtype, index, 0)
        self._series: dict[str, None] = {}  # groups with their own series, in the order they got it
        self._ages: dict[str, StoredAt] = {}  # per group with a series, and OTHER

    def end_offset(self) -> int:
        """The offset the next stored event will get."""
        with self._lock:
            return self._end.seek_end()

    def _age_locked(self, key: str, offset: int, end: int, now: int) -> float:
        if offset >= end:
            return 0.0
        reader = self._ages.get(key)
        if reader is None:
            reader = self._ages[key] = StoredAt(self.log_path, self.dtype, self.index)
        ns = reader.at(offset)
        return 0.0 if ns is None else max(0.0, (now - ns) / 1e9)

    def by_group(self) -> dict[str, dict[str, float]]:
        """{group: {"events": stored after its committed offset, "seconds": age of the first event it
        has not committed (0 when caught up)}} for the groups with their own series, and OTHER for
        every other group (events summed, seconds the largest; 0 without such groups)."""
        offsets = self.store.offsets()
        with self._lock:
            end = self._end.seek_end()
            now = self.clock()
            for name in sorted(offsets):  # on disk at the first call: by name; later: as they commit
                if len(self._series) >= self.max_series:
                    break
                if name not in self._series:
                    self._series[name] = None
            out: dict[str, dict[str, float]] = {}
            for name in self._series:
                off = offsets.get(name)
                if off is None:
                    continue
                out[name] = {
                    "events": float(max(0, end - off)),
                    "seconds": self._age_locked(name, off, end, now),
                }
            rest = [off for name, off in offsets.items() if name not in self._series]
            out[OTHER] = {
                "events": float(sum(max(0, end - off) for off in rest)),
                "seconds": self._age_locked(OTHER, min(rest), end, now) if rest else 0.0,
            }
            return out

    def lag(self) -> dict[str, float]:
        """The worst case over every named group: events: end of the log minus the lowest committed
        offset (0 without groups); seconds: the age of the oldest event not committed by every group
        (0 when all are caught up); groups: named groups with a committed offset."""
        offsets = self.store.offsets()
        per = self.by_group()
        if not offsets:
            return {"events": 0, "seconds": 0.0, "groups": 0}
        with self._lock:
            end = self._end.seek_end()
        return {
            "events": max(0, end - min(offsets.values())),
            "seconds": max(v["seconds"] for v in per.values()),
            "groups": len(offsets),
        }

    def close(self) -> None:
        with self._lock:
            self._end.close()
            for reader in self._ages.values():
                reader.close()
            self._ages.clear()

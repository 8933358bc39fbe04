"""Consumer-group lag: how far the named groups' committed offsets are behind the end of the log.

Read at scrape time (metrics) and by nobody on a hot path. The end of the log is counted by a private
tail that only counts entries (it decodes no event and, after the first call, reads only what was
appended since the previous one). The age of the oldest uncommitted event is the stored time of the
event at the lowest committed offset, read with a second tail that moves forward with that offset
(a new tail only when the offset goes back, e.g. a group file restored by an operator).

Lag is reported for the group furthest behind (events) and for the oldest uncommitted event (seconds):
group names are chosen by clients, so they are not metric labels (each label value would be a series
kept forever); `eventstream top` and the `groups` file directory name the groups.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from eventstream.storage.tail import LogTail, SegmentIndex


class GroupLag:
    def __init__(self, log_path: Path, dtype, index: SegmentIndex, store, clock=time.time_ns):
        self.log_path, self.dtype, self.index, self.store = Path(log_path), dtype, index, store
        self.clock = clock
        self._lock = threading.Lock()
        self._end = LogTail(self.log_path, dtype, index, 0)
        self._at: LogTail | None = None  # follows the lowest committed offset
        self._chunk: list = []  # the events _at read last (offset, stored_ns)

    def end_offset(self) -> int:
        """The offset the next stored event will get."""
        with self._lock:
            return self._end.seek_end()

    def _stored_ns(self, offset: int) -> int | None:
        """Stored time (ns since the epoch) of the first event at or after `offset`; None if none yet."""
        for off, ns in self._chunk:
            if off >= offset:
                return ns
        if self._at is None or offset < self._at.next_offset:
            if self._at is not None:
                self._at.close()
            self._at = LogTail(self.log_path, self.dtype, self.index, offset)
        else:
            self._at.next_offset = offset
        events = self._at.read()
        self._chunk = [(ev.offset, ev.stored_ns) for ev in events]
        return self._chunk[0][1] if self._chunk else None

    def lag(self) -> dict[str, float]:
        """events: end of the log minus the lowest committed offset (0 without groups); seconds: the
        age of the oldest event not committed by every group (0 when all are caught up); groups: named
        groups with a committed offset."""
        offsets = self.store.offsets()
        with self._lock:
            end = self._end.seek_end()
            if not offsets:
                return {"events": 0, "seconds": 0.0, "groups": 0}
            low = min(offsets.values())
            events = max(0, end - low)
            seconds = 0.0
            if events:
                ns = self._stored_ns(low)
                if ns is not None:
                    seconds = max(0.0, (self.clock() - ns) / 1e9)
            return {"events": events, "seconds": seconds, "groups": len(offsets)}

    def close(self) -> None:
        with self._lock:
            self._end.close()
            if self._at is not None:
                self._at.close()

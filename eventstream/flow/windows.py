"""Window definitions: which windows an event time falls in.

    Tumbling(size)            fixed, non-overlapping [start, start + size)
    Hopping(size, hop)        fixed, overlapping: a new window every `hop` (size a multiple of hop);
                              Sliding is the same thing under its other name
    Session(gap)              per key: events closer than `gap` to each other share a window

Sizes are seconds (int or float) or datetime.timedelta. `time="event"` (the default) windows on event
time: the producer's timestamp_ns, or what the window operator's `time=` function returns;
`time="processing"` windows on the flow's clock when the event is processed (no lateness then).

Window starts are aligned to the epoch (plus `offset`), so every partition and every run agree on them.
Assignment is numpy over the whole batch: one event -> one (tumbling) or size/hop (hopping) windows.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

import numpy as np

TIMES = ("event", "processing")


def to_ns(value, what: str) -> int:
    """Seconds (int/float) or a timedelta -> ns; errors name `what` and what is allowed."""
    if isinstance(value, datetime.timedelta):
        ns = value // datetime.timedelta(microseconds=1) * 1000
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ns = int(round(value * 1e9))
    else:
        raise ValueError(f"{what}={value!r} is not allowed; allowed: seconds (a number) or a datetime.timedelta")
    return ns


class WindowResult(NamedTuple):
    """What a windowed aggregation emits: one per key and window (times in ns since the epoch)."""

    key: Any
    start: int
    end: int
    value: Any


class Window:
    kind = "window"
    size_ns = 0

    def __init__(self, time: str = "event"):
        if time not in TIMES:
            raise ValueError(f"window time={time!r} is not allowed; allowed: {', '.join(TIMES)}")
        self.time = time


class Tumbling(Window):
    kind = "tumbling"

    def __init__(self, size, *, offset=0, time: str = "event"):
        super().__init__(time)
        self.size_ns = to_ns(size, "Tumbling size")
        self.offset_ns = to_ns(offset, "Tumbling offset")
        if self.size_ns <= 0:
            raise ValueError(f"Tumbling size={size!r} is not allowed; allowed: a duration > 0")
        self.hop_ns = self.size_ns

    def __repr__(self) -> str:
        return f"Tumbling({self.size_ns / 1e9:g}s)"

    def assign(self, ts: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(event positions or None for 'one window each, in order', window starts)."""
        return None, ts - (ts - self.offset_ns) % self.size_ns


class Hopping(Window):
    kind = "hopping"

    def __init__(self, size, hop, *, offset=0, time: str = "event"):
        super().__init__(time)
        self.size_ns = to_ns(size, "Hopping size")
        self.hop_ns = to_ns(hop, "Hopping hop")
        self.offset_ns = to_ns(offset, "Hopping offset")
        if self.hop_ns <= 0 or self.size_ns <= 0 or self.size_ns % self.hop_ns:
            raise ValueError(
                f"Hopping(size={size!r}, hop={hop!r}) is not allowed; allowed: size and hop > 0, "
                "size a whole multiple of hop"
            )
        self.per_event = self.size_ns // self.hop_ns

    def __repr__(self) -> str:
        return f"Hopping({self.size_ns / 1e9:g}s, every {self.hop_ns / 1e9:g}s)"

    def assign(self, ts: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        k = self.per_event
        last = ts - (ts - self.offset_ns) % self.hop_ns
        if k == 1:
            return None, last
        pos = np.repeat(np.arange(len(ts)), k)
        starts = np.repeat(last, k) - np.tile(np.arange(k - 1, -1, -1, dtype=np.int64) * self.hop_ns, len(ts))
        return pos, starts  # per event: oldest window first


Sliding = Hopping


class Session(Window):
    kind = "session"

    def __init__(self, gap, *, time: str = "event"):
        super().__init__(time)
        self.gap_ns = to_ns(gap, "Session gap")
        if self.gap_ns <= 0:
            raise ValueError(f"Session gap={gap!r} is not allowed; allowed: a duration > 0")
        self.size_ns = self.gap_ns

    def __repr__(self) -> str:
        return f"Session(gap {self.gap_ns / 1e9:g}s)"

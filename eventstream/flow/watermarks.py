"""Watermarks: how far event time has progressed in one partition.

BoundedOutOfOrderness: the watermark after an event is the largest event time the partition has seen
so far minus `max_out_of_orderness`. It is computed per event (a running maximum over the batch, one
numpy call), not per batch, so which events are late depends only on the order of the events a
partition receives (the log's order), never on how the log was cut into batches: a replay after a
crash classifies every event exactly as the first run did.

An event is late for a window once the watermark has reached the window's end plus `allowed_lateness`:
the window has fired (emitted its result) and is gone. Late events go to the side output the
operator names (a topic) or to the dead-letter log with reason `late`; they are never dropped.

ProcessingTime: the watermark is the flow's clock (no event is ever late).
"""

from __future__ import annotations

import numpy as np

MIN_TS = -(1 << 62)


class BoundedOutOfOrderness:
    def __init__(self, max_out_of_orderness_ns: int = 0):
        if max_out_of_orderness_ns < 0:
            raise ValueError(
                f"max_out_of_orderness={max_out_of_orderness_ns / 1e9:g}s is not allowed; allowed: a duration >= 0"
            )
        self.bound = int(max_out_of_orderness_ns)
        self.max_ts = MIN_TS

    @property
    def watermark(self) -> int:
        return self.max_ts - self.bound if self.max_ts > MIN_TS else MIN_TS

    def advance(self, ts: np.ndarray) -> np.ndarray:
        """The watermark after each event of `ts` (in order); moves the partition's maximum."""
        if not len(ts):
            return np.zeros(0, dtype=np.int64)
        run = np.maximum.accumulate(ts)
        np.maximum(run, self.max_ts, out=run)
        self.max_ts = int(run[-1])
        run -= self.bound
        return run

    def state(self) -> int:
        return self.max_ts

    def restore(self, max_ts: int) -> None:
        self.max_ts = int(max_ts)

"""Batch tier: LOW and BATCH events in tumbling windows per topic.

A window is [k*W, (k+1)*W) of wall-clock time (W = `window_s`), keyed by (topic, k); an event falls in
the window of its ingest time. Per window: count, payload bytes, first/last event time, and the value
of an optional user aggregate ``aggregate(state, batch) -> state`` folded batch by batch. A window
closes when the wall clock passes its end; closed windows go to the handler and to the log, and open
windows are flushed on shutdown.

Window state is kept per queue partition (not per worker) and touched only by the worker holding that
partition's token, so several workers can share partitions without splitting a topic's window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from eventstream.engine.handlers import Batch
from eventstream.engine.processors.base import Processor, error_text

log = structlog.get_logger("eventstream.batch")

# window index bits in the (topic, window) key: ms windows stay below 2**43 until the year 2248
_WIN_BITS = 43
_WIN_MASK = (1 << _WIN_BITS) - 1


@dataclass
class Window:
    topic: str
    topic_id: int
    start_ns: int
    end_ns: int
    count: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    aggregate: Any = None
    partial: bool = False  # flushed at shutdown before its end

    def summary(self) -> dict:
        return {
            "topic": self.topic,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "count": self.count,
            "bytes": self.bytes,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "aggregate": self.aggregate,
            "partial": self.partial,
        }


@dataclass
class WindowTable:
    """Open windows of one partition: (topic_id, window index) -> Window."""

    open: dict[tuple[int, int], Window] = field(default_factory=dict)
    closed: int = 0


class WindowHandler(Protocol):
    """What the batch tier's handler is: a callable taking each closed Window (not a Batch: the tier
    hands its events to the optional aggregate, batch by batch, and its windows to the handler)."""

    def __call__(self, window: Window, /) -> Any: ...


def wall_offset_ns() -> int:
    """time.time_ns() - time.monotonic_ns(): maps ingest timestamps (monotonic) to wall-clock time."""
    return time.time_ns() - time.monotonic_ns()


class BatchProcessor(Processor):
    kind = "batch"

    def __init__(
        self,
        queue,
        sinks,
        handler: WindowHandler | None,
        *,
        tables: list[WindowTable],
        window_s: float = 5.0,
        aggregate=None,
        clock=time.time_ns,
        offset_ns: int | None = None,
        **kw,
    ):
        super().__init__(queue, sinks, None, **kw)  # no Batch handler: events go to windows
        self.on_window = handler
        self.tables = tables
        self.window_ns = int(window_s * 1e9)
        self.aggregate = aggregate
        self.clock = clock
        self.offset_ns = wall_offset_ns() if offset_ns is None else offset_ns
        self._last_sweep = 0

    def handle(self, records: np.ndarray, partition: int) -> None:
        records, keys = self.skip_duplicates(records, partition)
        if len(records) == 0:
            return
        table = self.tables[partition]
        wall = records["ingest_ts"].astype(np.int64) + self.offset_ns
        win = wall // self.window_ns
        key = (records["topic_id"].astype(np.int64) << _WIN_BITS) | win  # topic ids < 2**20
        uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        nbytes = np.bincount(inverse, weights=records["payload_len"], minlength=len(uniq))
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        last = np.full(len(uniq), np.iinfo(np.int64).min)
        np.minimum.at(first, inverse, wall)
        np.maximum.at(last, inverse, wall)
        topics = self.sinks.topics
        subscribed = self.filter.mask(records["topic_id"]) if self.aggregate is not None else None
        for g, k in enumerate(uniq.tolist()):
            tid, widx = k >> _WIN_BITS, k & _WIN_MASK
            w = table.open.get((tid, widx))
            if w is None:
                start = widx * self.window_ns
                w = table.open[(tid, widx)] = Window(
                    topics.name(tid), tid, start, start + self.window_ns, first_ns=int(first[g]), last_ns=int(last[g])
                )
            w.count += int(counts[g])
            w.bytes += int(nbytes[g])
            w.first_ns = min(w.first_ns, int(first[g]))
            w.last_ns = max(w.last_ns, int(last[g]))
            if self.aggregate is not None:
                sel = (inverse == g) & subscribed
                if sel.any():
                    try:
                        w.aggregate = self.aggregate(w.aggregate, Batch(records[sel], topics, "batch"))
                    except Exception as exc:  # noqa: BLE001 - a user's aggregate: log, keep the window
                        log.warning("aggregate_failed", topic=w.topic, error=error_text(exc))
        handled_ns = time.monotonic_ns()
        self.sinks.store(records)
        self.commit_ids(keys, partition)
        self.processed("batch", records, handled_ns)
        self._sweep(table, self.clock())

    def on_idle(self) -> None:
        now = self.clock()
        if now - self._last_sweep < self.window_ns // 20:
            return
        self._last_sweep = now
        for i, token in enumerate(self.queue.tokens):
            if token.acquire(blocking=False):
                try:
                    self._sweep(self.tables[i], now)
                finally:
                    token.release()

    def _sweep(self, table: WindowTable, now_ns: int, *, everything: bool = False) -> None:
        due = [k for k, w in table.open.items() if everything or w.end_ns <= now_ns]
        for k in sorted(due, key=lambda k: (k[1], k[0])):
            w = table.open.pop(k)
            w.partial = w.end_ns > now_ns
            table.closed += 1
            self.emit(w)

    def emit(self, w: Window) -> None:
        log.info("window_closed", **w.summary())
        if self.on_window is not None and self.filter.mask(np.array([w.topic_id], dtype=np.uint32))[0]:
            try:
                self.on_window(w)
            except Exception as exc:  # noqa: BLE001 - a user's handler: log, keep running
                log.warning("window_handler_failed", topic=w.topic, error=error_text(exc))


def flush_windows(processor: BatchProcessor) -> int:
    """Close every open window of every partition (shutdown). Workers must be stopped first."""
    n = 0
    for table in processor.tables:
        n += len(table.open)
        processor._sweep(table, processor.clock(), everything=True)
    return n

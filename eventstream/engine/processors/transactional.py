"""Transactional tier: MEDIUM events, handled with retries.

Per batch: skip events already stored (same topic and event id within the window, and repeats inside
the batch, see engine/idempotency.py; every tier does this), counting `dedup_hits`; call the
handler with the batch; if it raises, isolate the failures by calling it per event, retrying each
failing event up to `max_retries` times with exponential backoff (one sleep per retry round, not per
event); commit ids to the dedup table only after success; exhausted events go to the dead-letter log
with the last error. Handlers should be idempotent: a batch that raised may have been partly applied.
"""

from __future__ import annotations

import time

import numpy as np

from eventstream.engine.handlers import Batch
from eventstream.engine.processors.base import Processor, error_text


class _Requeue(Exception):
    """The handler raised on a caller's thread: the batch goes to the queue, where workers retry."""


class TransactionalProcessor(Processor):
    kind = "transactional"
    _inline = False  # True while handle_inline runs (on a caller's thread: no retry sleeps there)

    def __init__(self, queue, sinks, handler, *, max_retries: int = 3, retry_backoff_ms: float = 10.0, **kw):
        super().__init__(queue, sinks, handler, **kw)
        self.max_retries = max_retries
        self.backoff = retry_backoff_ms / 1000.0
        self.retried = 0

    def handle(self, records: np.ndarray, partition: int) -> None:
        sinks = self.sinks
        n = len(records)
        # duplicates are counted once the batch cannot be handed back (an inline attempt whose handler
        # raises goes to the workers, which look at the same records again)
        records, keys = self.skip_duplicates(records, partition, count=False)
        if len(records) == 0:
            sinks.dedup_hit(n)
            return
        ok = None  # every record handled (else a mask of those that were)
        if self.handler is not None:
            sub_idx = None if self.filter.match_all else np.flatnonzero(self.filter.mask(records["topic_id"]))
            if sub_idx is None or len(sub_idx) == len(records):
                failed, errors = self._run(records)
            else:
                failed, errors = self._run(records[sub_idx]) if len(sub_idx) else ([], [])
            if failed:
                bad = np.array(failed, dtype=np.intp)
                if sub_idx is not None:
                    bad = sub_idx[bad]
                ok = np.ones(len(records), dtype=bool)
                ok[bad] = False
                lost = records[bad]
                lost["attempts"] = min(255, 1 + self.max_retries)
                sinks.drop(lost, [f"retries_exhausted: {e}" for e in errors])
        if len(records) < n:
            sinks.dedup_hit(n - len(records))
        good = records if ok is None else records[ok]
        if len(good):
            handled_ns = time.monotonic_ns()
            sinks.store(good)
            self.commit_ids(keys, partition, ok)
            self.processed("transactional", good, handled_ns)

    def handle_inline(self, records: np.ndarray, partition: int) -> bool:
        """handle() without retries: when the handler raises, nothing is stored and the records are
        queued for the tier's workers, which retry them with backoff (handlers are idempotent)."""
        self._inline = True
        try:
            self.handle(records, partition)
            return True
        except _Requeue:
            return False
        finally:
            self._inline = False

    def _run(self, batch: np.ndarray) -> tuple[list[int], list[str]]:
        """Handle `batch`; return indexes (into batch) that failed every attempt, with their errors."""
        topics = self.sinks.topics
        handler = self.handler
        assert handler is not None  # handle() runs batches only through a handler
        try:
            handler(Batch(batch, topics, "transactional"))
            return [], []
        except Exception as exc:
            if self._inline:
                raise _Requeue from exc
            last = {i: error_text(exc) for i in range(len(batch))}
        if len(batch) == 1 and self.max_retries == 0:
            return [0], [last[0]]
        pending = list(range(len(batch)))
        for attempt in range(self.max_retries):
            time.sleep(self.backoff * (2**attempt))
            still = []
            for i in pending:
                self.retried += 1
                try:
                    handler(Batch(batch[i : i + 1], topics, "transactional"))
                except Exception as exc:  # noqa: BLE001 - a user's handler: retried, then dead-lettered
                    last[i] = error_text(exc)
                    still.append(i)
            pending = still
            if not pending:
                break
        return pending, [last[i] for i in pending]

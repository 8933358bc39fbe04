"""Realtime tier: CRITICAL and HIGH events. Calls the alert handler once per batch and measures
ingest -> handled latency per event (the SLA is reported, not enforced)."""

from __future__ import annotations

import time

import numpy as np

from eventstream.engine.handlers import Batch
from eventstream.engine.processors.base import Processor, error_text


class RealtimeProcessor(Processor):
    kind = "realtime"
    drains_backlog = True

    def handle(self, records: np.ndarray, partition: int) -> None:
        sinks = self.sinks
        records, keys = self.skip_duplicates(records, partition)
        if len(records) == 0:
            return
        stored = None
        if self.handler is not None:
            mask = None if self.filter.match_all else self.filter.mask(records["topic_id"])
            subscribed = records if mask is None else records[mask]
            if len(subscribed):
                try:
                    self.handler(Batch(subscribed, sinks.topics, "realtime"))
                except Exception as exc:  # noqa: BLE001 - a handler never kills its thread
                    sinks.drop(
                        subscribed.copy() if subscribed is records else subscribed, f"handler_error: {error_text(exc)}"
                    )
                    stored = np.zeros(len(records), dtype=bool) if mask is None else ~mask
                    records = records[stored]
        if len(records):
            handled_ns = time.monotonic_ns()
            sinks.store(records)
            self.commit_ids(keys, partition, stored)
            self.processed("realtime", records, handled_ns)

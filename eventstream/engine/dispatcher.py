"""The dispatcher thread: ingest ring -> admission filter -> EventBusMulti.

Per batch, all vectorized: stamp server sequence numbers, drop what the control plane no longer
admits (CRITICAL level: BATCH priority; EMERGENCY: everything below CRITICAL), route the rest by
priority. Whatever a queue refuses goes to the dead-letter log with its reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import structlog

from eventstream.engine.bus import EventBusMulti, sequence_base
from eventstream.runtime.affinity import pin_current_thread

log = structlog.get_logger("eventstream.dispatcher")

DropFn = Callable[[np.ndarray, str], None]


class Dispatcher(threading.Thread):
    def __init__(self, source, bus: EventBusMulti, drop: DropFn, *, admission=None, on_received=None, cpus=(),
                 max_batch: int = 4096, seq_base: int | None = None, poll_timeout: float = 0.005):
        super().__init__(name="es-dispatcher", daemon=True)
        self.source = source
        self.bus = bus
        self.drop = drop
        self.admission = admission
        self.on_received = on_received
        self.cpus = list(cpus)
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self.next_seq = sequence_base() if seq_base is None else seq_base
        self.received = 0
        self.batches = 0
        self._stop_when_drained = threading.Event()
        self._abandon = False
        self.error: BaseException | None = None

    def stop(self, drain: bool = True) -> None:
        """Finish what the source holds, then exit (callers stop the producers first); without
        `drain`, exit after the current batch."""
        if not drain:
            self._abandon = True
        self._stop_when_drained.set()

    def run(self) -> None:
        pin_current_thread(self.cpus, self.name)
        try:
            while not self._abandon:
                views = self.source.poll(self.max_batch, self.poll_timeout)
                if not views:
                    if self._stop_when_drained.is_set() and self.source.depth == 0:
                        return
                    continue
                n = 0
                for view in views:
                    self.route(view)
                    n += len(view)
                self.source.release(n)
        except BaseException as exc:  # keep the reason for the manager; never die silently
            self.error = exc
            log.exception("dispatcher_failed")
            raise

    def route(self, records: np.ndarray) -> None:
        n = len(records)
        records["seq"] = np.arange(self.next_seq, self.next_seq + n, dtype=np.uint64)
        self.next_seq += n
        self.received += n
        self.batches += 1
        if self.on_received is not None:
            self.on_received(n)
        adm = self.admission
        min_priority = adm.min_priority if adm is not None else 0
        if min_priority > 0:
            keep = records["priority"] >= min_priority
            if not keep.all():
                self.drop(records[~keep], "backpressure")
                records = records[keep]
        for refused, reason in self.bus.publish(records):
            self.drop(refused, reason)

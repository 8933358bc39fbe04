"""Test doubles: a sink that runs ingest without the engine.

A sink is any object with ``put_batch(records) -> records not accepted`` (empty when all were taken);
ingest/delivery.py applies admission itself for such a sink, and a put is complete at once (no
completion marks). The engine's own sink is `Engine.offer`.
"""

from __future__ import annotations

import threading

import numpy as np


class CollectingSink:
    """Keeps copies of every accepted batch; refuses records beyond `capacity` (None = unbounded)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.batches: list[np.ndarray] = []
        self.count = 0
        self._cond = threading.Condition()

    def put_batch(self, records: np.ndarray) -> np.ndarray:
        with self._cond:
            room = len(records) if self.capacity is None else max(0, self.capacity - self.count)
            take = records[:room]
            if len(take):
                self.batches.append(take.copy())
                self.count += len(take)
                self._cond.notify_all()
            return records[room:]

    def wait_for(self, n: int, timeout: float) -> bool:
        """True once at least n records arrived; False after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= n, timeout)

    def records(self) -> np.ndarray:
        with self._cond:
            if not self.batches:
                return np.zeros(0)
            return np.concatenate(self.batches)

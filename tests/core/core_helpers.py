"""Helpers for core tests (a uniquely named module: conftest names collide across test folders):
pinned worker threads with bounded joins, checksummed record batches."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from eventstream.core.records import record_dtype
from eventstream.runtime.affinity import pin_current_thread

SMALL_DTYPE = record_dtype(16)  # small inline payload keeps the million-record runs quick
CPUS = sorted(os.sched_getaffinity(0))


def checksum(conn: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """A per-record checksum a consumer can recompute: mixes producer id and sequence number."""
    x = seq.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ (conn.astype(np.uint64) << np.uint64(40))
    return x ^ (x >> np.uint64(29))


def make_batch(producer: int, first_seq: int, n: int, dtype=SMALL_DTYPE) -> np.ndarray:
    b = np.zeros(n, dtype=dtype)
    b["conn_id"] = producer
    b["seq"] = np.arange(first_seq, first_seq + n, dtype=np.uint64)
    b["event_id"] = checksum(b["conn_id"], b["seq"])
    return b


class Workers:
    """Start pinned threads, join them within a deadline, re-raise the first error in the test."""

    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def start(self, fn, role: str, cpu_index: int = 0) -> None:
        cpu = CPUS[cpu_index % len(CPUS)]

        def run():
            pin_current_thread([cpu], role)
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self.errors.append(exc)
                self.stop.set()

        t = threading.Thread(target=run, name=role, daemon=True)
        self.threads.append(t)
        t.start()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            self.stop.set()
            for t in self.threads:
                t.join(5.0)
        if self.errors:
            raise self.errors[0]
        if stuck:
            pytest.fail(f"threads {stuck} did not finish within {timeout} s")

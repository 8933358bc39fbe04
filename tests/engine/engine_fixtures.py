"""Helpers for engine tests: collecting sinks, record factories, bounded runs."""

from __future__ import annotations

import threading
import time

import numpy as np

from eventstream.core.records import record_dtype
from eventstream.core.topics import TopicTable
from eventstream.engine.processors import Sinks

PAYLOAD = 32
DTYPE = record_dtype(PAYLOAD)


class Collected:
    """Thread-safe sinks that remember everything (tests only)."""

    def __init__(self, topics: TopicTable):
        self.topics = topics
        self.lock = threading.Lock()
        self.stored: list[np.ndarray] = []
        self.dropped: list[tuple[np.ndarray, list[str]]] = []
        self.processed_n: dict[str, int] = {}
        self.dedup_hits = 0

    def store(self, records):
        with self.lock:
            self.stored.append(records.copy())

    def drop(self, records, reason):
        reasons = [reason] * len(records) if isinstance(reason, str) else list(reason)
        with self.lock:
            self.dropped.append((records.copy(), reasons))

    def processed(self, queue, records, handled_ns=None):
        with self.lock:
            self.processed_n[queue] = self.processed_n.get(queue, 0) + len(records)

    def dedup_hit(self, n):
        with self.lock:
            self.dedup_hits += n

    def sinks(self) -> Sinks:
        return Sinks(self.topics, self.store, self.drop, self.processed, self.dedup_hit)

    def stored_records(self) -> np.ndarray:
        return np.concatenate(self.stored) if self.stored else np.zeros(0, DTYPE)

    def dropped_records(self) -> tuple[np.ndarray, list[str]]:
        if not self.dropped:
            return np.zeros(0, DTYPE), []
        return np.concatenate([d[0] for d in self.dropped]), [r for d in self.dropped for r in d[1]]


def make_records(topics: TopicTable, n: int, *, topic="t", priority=2, ids=None, start_seq=1, payload=b"x"):
    r = np.zeros(n, DTYPE)
    names = [topic] * n if isinstance(topic, str) else list(topic)
    r["topic_id"] = [topics.intern(t) for t in names]
    r["priority"] = priority
    r["seq"] = np.arange(start_seq, start_seq + n)
    r["event_id"] = 0 if ids is None else ids
    r["ingest_ts"] = time.monotonic_ns()
    r["payload"][:, : len(payload)] = np.frombuffer(payload, np.uint8)
    r["payload_len"] = len(payload)
    return r


def run_until_drained(procs, queue_or_bus, timeout=30.0):
    """Start processors, wait (bounded) until their queue is empty and they stop."""
    for p in procs:
        p.start()
    for p in procs:
        p.stop()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        assert not p.is_alive(), f"{p.name} did not finish within {timeout}s"
        assert p.error is None, p.error


def offer_all(bus, records, timeout: float = 30.0) -> list:
    """Offer `records` to the bus (keeping their seq) as a held TCP reader does: what full queues hold
    back is offered again until it is placed. Returns (records, reason) a shedding queue refused."""
    import time

    refused, pending, deadline = [], records, time.monotonic() + timeout
    while True:
        off = bus.offer(pending, stamp=False)
        refused += [(pending[pos], why) for pos, why in off.refused]
        if off.held is None:
            return refused
        assert time.monotonic() < deadline, "the queues never took the held records"
        pending = pending[off.held]
        time.sleep(0.001)  # the reader's HELD_RETRY_S: a processor frees room meanwhile

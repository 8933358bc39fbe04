"""User handlers: plain Python callables named in YAML as ``module:function``.

A handler receives one `Batch` per call: the records (a numpy view of the record dtype) plus access to
topics and payloads. Handlers are called with whole batches so per-event Python stays the handler's
choice; `Batch.events()` gives per-event objects for handlers that want them.

Subscriptions: a handler may be limited to topic patterns (``orders.*``); `TopicFilter` turns the
patterns into a boolean lookup table indexed by topic id, extended lazily as new topics appear, so
filtering a batch is one numpy fancy-index.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog

from eventstream.core.payloads import payload_view, payload_views
from eventstream.core.records import PRIORITY_NAMES
from eventstream.core.topics import TopicTable

log = structlog.get_logger("eventstream.handlers")


class Handler(Protocol):
    """What a handler is: any callable taking one Batch (a function, a bound method, an object with
    __call__). Its return value is ignored; an exception it raises fails the batch, and the tier's
    policy decides what follows (transactional: retries, then the dead-letter log)."""

    def __call__(self, batch: Batch) -> Any: ...


class HandlerError(ValueError):
    """A handler named in the configuration cannot be loaded."""


def resolve(spec: str, key: str = "handler") -> Handler | None:
    """Import ``module:function``; '' means no handler. Errors name the key and what is allowed."""
    if not spec:
        return None
    if ":" not in spec:
        raise HandlerError(f"{key}: {spec!r} is not allowed; allowed: 'module:function'")
    modname, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(modname)
    except ImportError as exc:
        raise HandlerError(f"{key}: cannot import module {modname!r} ({exc}); allowed: an importable module") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise HandlerError(f"{key}: module {modname!r} has no attribute {attr!r}; allowed: a callable in it")
    if not callable(obj):
        raise HandlerError(f"{key}: {spec!r} is not callable; allowed: a function or callable object")
    return obj


@dataclass(frozen=True)
class Event:
    """One event, for handlers that prefer per-event objects (costs Python per event)."""

    id: int
    seq: int
    topic: str
    priority: int
    producer_ts: int
    ingest_ts: int
    payload: bytes

    @property
    def priority_name(self) -> str:
        return PRIORITY_NAMES[self.priority]


class Batch:
    """What a handler receives: records plus topic and payload access."""

    __slots__ = ("records", "topics", "queue")

    def __init__(self, records: np.ndarray, topics: TopicTable, queue: str = ""):
        self.records = records
        self.topics = topics
        self.queue = queue

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> np.ndarray:
        """event_id where the client gave one, else the server sequence number."""
        r = self.records
        return np.where(r["event_id"] != 0, r["event_id"], r["seq"])

    def topic_names(self) -> list[str]:
        return self.topics.names(self.records["topic_id"])

    def payload(self, i: int) -> bytes:
        """Record i's payload as bytes (a copy: safe to keep after the handler returns)."""
        return bytes(payload_view(self.records, i))

    def payloads(self) -> list[memoryview]:
        """Every record's payload as a zero-copy memoryview (format "B"), inline or in the payload
        arena alike; `np.frombuffer(view, np.uint8)` gives a numpy view. Valid while the handler runs:
        copy (bytes(view)) what you keep. A memoryview compares equal to bytes with the same content."""
        return payload_views(self.records)

    def events(self) -> Iterator[Event]:
        r = self.records
        ids = self.ids.tolist()
        names = self.topic_names()
        pays = [bytes(v) for v in self.payloads()]
        cols = [r[f].tolist() for f in ("seq", "priority", "producer_ts", "ingest_ts")]
        for i in range(len(r)):
            yield Event(ids[i], cols[0][i], names[i], cols[1][i], cols[2][i], cols[3][i], pays[i])

    def total_payload_bytes(self) -> int:
        return int(self.records["payload_len"].sum(dtype=np.uint64))


class TopicFilter:
    """Topic-pattern subscription as a lookup table over topic ids."""

    def __init__(self, patterns: list[str], topics: TopicTable):
        self.patterns = list(patterns) or ["*"]
        self.match_all = "*" in self.patterns
        self._topics = topics
        self._table = np.zeros(0, dtype=bool)

    def _extend(self) -> None:
        n = len(self._topics) + 1
        old = len(self._table)
        table = np.zeros(n, dtype=bool)
        table[:old] = self._table
        for tid in range(max(old, 1), n):
            name = self._topics.name(tid)
            table[tid] = any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
        self._table = table

    def mask(self, topic_ids: np.ndarray) -> np.ndarray:
        if self.match_all:
            return np.ones(len(topic_ids), dtype=bool)
        if len(topic_ids) == 0:
            return np.zeros(0, dtype=bool)
        top = int(topic_ids.max())
        if top >= len(self._table):
            self._extend()
        return self._table[topic_ids]


# ----------------------------------------------------------------------------------- stock handlers
def noop(batch: Batch) -> None:
    """Accept every event (storage still records them)."""


def log_alert(batch: Batch) -> None:
    """Realtime example: log one line per batch with its topics."""
    log.info("alert", events=len(batch), topics=sorted(set(batch.topic_names())))


def log_window(window) -> None:
    """Batch example: log each closed window."""
    log.info("window", **window.summary())


def payload_bytes(state, batch: Batch):
    """Aggregate example: total payload bytes seen in a window."""
    return (state or 0) + batch.total_payload_bytes()

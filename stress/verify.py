"""Reading back what a service stored: events.bin by topic, the DLQ by topic, unique payload tags.

Stress senders put a unique 8-byte big-endian tag at the start of every payload (and, on v2, use it
to build the event_id), so the store can be checked event by event: which tags arrived, which arrived
twice, which are missing, and which of the missing ones the DLQ accounts for.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from pathlib import Path

import numpy as np

from eventstream.engine.dlq_reader import read_dlq
from eventstream.storage.reader import EventLogReader

TAG = struct.Struct(">Q")
FILLER = bytes(range(56))


def payload(tag: int, size: int = 64) -> bytes:
    """`size` bytes starting with the tag (64 by default: the benchmark payload size)."""
    body = TAG.pack(tag) + FILLER
    return body[:size] if size >= 8 else body[:8]


def event_id(stream: int, i: int) -> int:
    """Unique, non-zero v2 event id of event `i` of sender `stream`."""
    return (stream << 40) | (i + 1)


class Store:
    """events.bin + DLQ of one data dir, grouped by topic."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.tags: dict[str, np.ndarray] = {}
        self.ids: dict[str, np.ndarray] = {}
        self.dlq: dict[str, list] = defaultdict(list)
        events = self.data_dir / "events.bin"
        self.scan = None
        if events.exists():
            reader = EventLogReader(events)
            batch = reader.read()
            self.scan = reader.last_scan
            recs = batch.records
            names = np.array(batch.topic_names(), dtype=object)
            tags = np.ascontiguousarray(recs["payload"][:, :8]).view(">u8").reshape(-1) if len(recs) else \
                np.zeros(0, np.uint64)
            for topic in set(names.tolist()):
                sel = names == topic
                self.tags[topic] = tags[sel].astype(np.uint64)
                self.ids[topic] = recs["event_id"][sel]
        dlq = self.data_dir / "dlq_log.txt"
        if dlq.exists():
            for e in read_dlq(dlq):
                self.dlq[e.topic].append(e)

    @property
    def stored_total(self) -> int:
        return sum(len(t) for t in self.tags.values())

    @property
    def dlq_total(self) -> int:
        return sum(len(v) for v in self.dlq.values())

    def stored_tags(self, topic: str) -> np.ndarray:
        return self.tags.get(topic, np.zeros(0, np.uint64))

    def stored_ids(self, topic: str) -> np.ndarray:
        return self.ids.get(topic, np.zeros(0, np.uint64))

    def dlq_ids(self, topic: str) -> set[int]:
        return {e.id for e in self.dlq.get(topic, [])}

    def duplicates(self, topic: str) -> int:
        t = self.stored_tags(topic)
        return len(t) - len(np.unique(t))

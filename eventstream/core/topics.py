"""Topic interning: topic names <-> u32 ids shared by every thread of one engine.

Lookups are lock-free dict reads (safe on free-threaded CPython); only the first sight of a new topic
takes a lock, so ids are dense and assigned exactly once. Id 0 is reserved for "no topic".

The table is bounded (`server.max_topics`): every client can name new topics, and each costs memory
here, in the event log's file-id map and in per-topic processor state, forever. Past the bound a new
name raises TopicLimitError, which the decoder turns into a rejected frame (reason class
``too_many_topics``). Topics are never evicted: their ids live on in queued records, in the event
log's id map and in batch windows, so reusing an id could file an event under another topic.
"""

from __future__ import annotations

import fnmatch
import threading

import numpy as np

MAX_TOPIC_BYTES = 255
DEFAULT_MAX_TOPICS = 65536


class TopicLimitError(OverflowError):
    """A new topic name would exceed the table's bound; `str()` is the reason given to the client."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(
            f"too_many_topics: the server already has {limit} distinct topics "
            f"(server.max_topics); allowed: a topic it already knows"
        )


class TopicTable:
    def __init__(self, max_topics: int = DEFAULT_MAX_TOPICS):
        self._ids: dict[bytes, int] = {}
        self._names: list[bytes] = [b""]
        self._lock = threading.Lock()
        self._max = max_topics

    def intern(self, name: bytes | str) -> int:
        """The id of `name`, assigning the next id on first sight."""
        if isinstance(name, str):
            name = name.encode("utf-8")
        tid = self._ids.get(name)
        if tid is not None:
            return tid
        with self._lock:
            tid = self._ids.get(name)
            if tid is None:
                if len(self._names) > self._max:
                    raise TopicLimitError(self._max)
                tid = len(self._names)
                self._names.append(name)
                self._ids[name] = tid
            return tid

    def name(self, topic_id: int) -> str:
        return self._names[topic_id].decode("utf-8")

    def name_bytes(self, topic_id: int) -> bytes:
        return self._names[topic_id]

    def names(self, topic_ids: np.ndarray) -> list[str]:
        names = self._names
        return [names[i].decode("utf-8") for i in topic_ids.tolist()]

    def matching(self, pattern: str) -> np.ndarray:
        """Ids of every known topic matching a glob pattern such as ``orders.*``."""
        names = list(self._names)
        return np.array(
            [i for i, n in enumerate(names) if i and fnmatch.fnmatchcase(n.decode("utf-8"), pattern)],
            dtype=np.uint32,
        )

    @property
    def limit(self) -> int:
        """Most distinct topics the table takes (id 0 is not counted)."""
        return self._max

    def __len__(self) -> int:
        return len(self._names) - 1

    def snapshot(self) -> dict[int, str]:
        return {i: n.decode("utf-8") for i, n in enumerate(list(self._names)) if i}

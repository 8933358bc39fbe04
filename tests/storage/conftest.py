from __future__ import annotations

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.topics import TopicTable


def make_batch(topics: TopicTable, n: int, *, start_seq: int = 0, names=("orders.new", "orders.paid", "metrics.cpu"),
               dtype=rec.EVENT_DTYPE) -> np.ndarray:
    b = rec.empty(n, dtype)
    seq = np.arange(start_seq, start_seq + n, dtype=np.uint64)
    b["seq"] = seq
    b["event_id"] = seq + 1000
    b["producer_ts"] = 1_700_000_000_000_000_000 + seq * 1000
    b["priority"] = seq % 5
    ids = np.array([topics.intern(t) for t in names], dtype=np.uint32)
    b["topic_id"] = ids[seq % len(names)]
    if rec.payload_capacity(dtype):
        for i in range(n):
            rec.set_payload(b[i:i + 1][0], f"payload-{start_seq + i}".encode())
    return b


@pytest.fixture(name="make_batch")
def make_batch_fixture():
    return make_batch


@pytest.fixture
def topics():
    return TopicTable()


@pytest.fixture
def v1_writer(monkeypatch):
    """EventLog writes what a version 1 writer wrote (a KIND_RECORD entry per record, header version
    1): these logs must still read and recover exactly as before."""
    from eventstream.storage import format as fmt

    monkeypatch.setattr(fmt, "record_entries", fmt.record_entries_v1)
    monkeypatch.setattr(fmt, "FILE_VERSION", 1)

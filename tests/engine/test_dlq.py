"""DeadLetterLog: line format, escaping, counts by reason category, threads, buffering."""

from __future__ import annotations

import datetime as dt
import threading
import time

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.topics import TopicTable
from eventstream.engine.dlq import DeadLetterLog, parse_line, read_dlq


def batch(topics, n, start=0, event_ids=True):
    b = rec.empty(n)
    b["seq"] = np.arange(start, start + n)
    b["event_id"] = (np.arange(start, start + n) + 5000) if event_ids else 0
    b["priority"] = np.arange(n) % 5
    b["topic_id"] = topics.intern("orders.new")
    return b


def test_line_format_matches_eventstreamcore(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    b = batch(topics, 3)
    b["event_id"][1] = 0  # no client id: the server sequence number is the id
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with DeadLetterLog(path, flusher=False) as dlq:
        dlq.write(b, "queue_full: BATCH ring full", topics)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    head, rest = lines[1].split("] ", 1)
    assert rest == "DROPPED: id=1 topic=orders.new priority=1 reason=queue_full: BATCH ring full"
    stamp = head[1:]
    assert stamp.endswith("Z") and len(stamp) == len("2026-01-31T12:00:00.123Z")
    assert dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) >= before
    entries = read_dlq(path)
    assert [e.id for e in entries] == [5000, 1, 5002]
    assert [e.priority for e in entries] == [0, 1, 2]


def test_reasons_are_escaped_to_one_line_and_round_trip(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    nasty = "handler_error: ValueError: line one\nline two\r\\ back"
    with DeadLetterLog(path, flusher=False) as dlq:
        dlq.write_each(batch(topics, 2), [nasty, "dedup: again"], topics)
        dlq.write_line(77, "weird\ntopic", 4, "bad_frame: crc mismatch")
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    entries = read_dlq(path)
    assert entries[0].reason == nasty and entries[1].reason == "dedup: again"
    assert (entries[2].id, entries[2].topic, entries[2].priority) == (77, "weird\ntopic", 4)
    with pytest.raises(ValueError, match="not a DLQ line"):
        parse_line("garbage")


def test_counts_by_reason_category(tmp_path):
    topics = TopicTable()
    with DeadLetterLog(tmp_path / "d.txt", flusher=False) as dlq:
        dlq.write(batch(topics, 10), "queue_full", topics)
        dlq.write_each(batch(topics, 3), ["handler_error: A", "handler_error: B", "retries_exhausted: C"], topics)
        dlq.write_line(1, "t", 0, "bad_frame: short")
        assert dlq.counts() == {"queue_full": 10, "handler_error": 2, "retries_exhausted": 1, "bad_frame": 1}
        assert dlq.statistics()["total"] == 14 == dlq.total
        with pytest.raises(ValueError, match="exactly one reason per record"):
            dlq.write_each(batch(topics, 2), ["x"], topics)


def test_buffered_lines_reach_the_file_within_the_interval(tmp_path):
    topics = TopicTable()
    path = tmp_path / "d.txt"
    dlq = DeadLetterLog(path, flush_interval_ms=10)
    try:
        dlq.write(batch(topics, 4), "x", topics)
        deadline = time.monotonic() + 10
        while len(path.read_text().splitlines()) < 4:
            assert time.monotonic() < deadline, "DLQ lines were not flushed within 10 s"
            time.sleep(0.005)
    finally:
        dlq.close()
    with pytest.raises(ValueError, match="after close"):
        dlq.write_line(1, "t", 0, "late")


def test_concurrent_writers_lose_no_line(tmp_path):
    topics = TopicTable()
    path = tmp_path / "d.txt"
    dlq = DeadLetterLog(path, flush_lines=50, flush_interval_ms=1)
    n_threads, rounds = 4, 100

    def worker(k):
        for j in range(rounds):
            dlq.write(batch(topics, 5, start=(k * rounds + j) * 5, event_ids=False), f"r{k}", topics)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "writer thread did not finish in 60 s"
    dlq.close()
    entries = read_dlq(path)
    assert sorted(e.id for e in entries) == list(range(n_threads * rounds * 5))
    assert dlq.counts() == {f"r{k}": rounds * 5 for k in range(n_threads)}

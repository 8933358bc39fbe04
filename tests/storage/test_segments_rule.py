"""One segment rule for the event log and the DLQ (storage/segments.py): naming, rotation, retention."""

from __future__ import annotations

import os
import time

from eventstream.storage.segments import expired, next_segment, rotate, segment_paths


def test_rotation_numbers_after_the_highest_closed_segment_and_ignores_other_names(tmp_path):
    log = tmp_path / "events.bin"
    for name in ("events.bin.3", "events.bin.10", "events.bin.x", "events.bin.idx", "other.bin.99"):
        (tmp_path / name).write_bytes(b"s")
    assert [n for n, _ in segment_paths(log)] == [3, 10] and next_segment(log) == 11
    log.write_bytes(b"active")
    assert rotate(log) == tmp_path / "events.bin.11" and not log.exists()
    assert (tmp_path / "events.bin.11").read_bytes() == b"active"
    log.write_bytes(b"next")
    assert rotate(log, 20).name == "events.bin.20"  # a writer that keeps its own count (the DLQ)
    assert [n for n, _ in segment_paths(log)] == [3, 10, 11, 20]


def test_retention_by_count_and_by_age_oldest_first(tmp_path):
    log = tmp_path / "dlq_log.txt"
    now = time.time()
    for n in range(1, 6):
        p = tmp_path / f"dlq_log.txt.{n}"
        p.write_text("x")
        os.utime(p, (now - 1000 * (6 - n), now - 1000 * (6 - n)))  # .1 oldest (5000 s), .5 newest (1000 s)
    names = lambda segs: [n for n, _ in segs]  # noqa: E731
    assert names(expired(log, None, 0)) == []  # the event log's max_segments 0: no count bound
    assert names(expired(log, 0, 0)) == [1, 2, 3, 4, 5]  # the DLQ's max_segments 0: none kept
    assert names(expired(log, 2, 0)) == [1, 2, 3]
    assert names(expired(log, None, 2500)) == [1, 2, 3]  # older than 2,500 s
    assert names(expired(log, 4, 3500)) == [1, 2]  # the count retires .1, the age .2
    assert expired(tmp_path / "missing" / "log", 0, 1) == []

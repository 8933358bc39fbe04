"""storage/tail.py: offsets across segments and restarts, live reads, time starts, the segment index."""

from __future__ import annotations

import threading
import time

import numpy as np

from eventstream.core.records import record_dtype
from eventstream.core.topics import TopicTable
from eventstream.storage.tail import LogTail, Progress, SegmentIndex, log_files
from eventstream.storage.writer import EventLog

DT = record_dtype(32)


def recs(topics: TopicTable, names, start: int = 0) -> np.ndarray:
    r = np.zeros(len(names), DT)
    r["topic_id"] = [topics.intern(t) for t in names]
    r["event_id"] = np.arange(start, start + len(names))
    for i in range(len(names)):
        p = b"p%d" % (start + i)
        r["payload"][i, :len(p)] = np.frombuffer(p, np.uint8)
        r["payload_len"][i] = len(p)
    return r


def open_log(path, topics, **kw) -> EventLog:
    return EventLog(path, dtype=DT, topics=topics, flush_events=1, fsync="none", flusher=False, **kw)


def drain(tail: LogTail) -> list:
    out = []
    while True:
        got = tail.read()
        if not got:
            return out
        out += got


def test_offsets_are_ordinals_across_segments_and_survive_a_restart(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable(100)
    log = open_log(path, topics, max_segment_bytes=400)  # a few records per segment
    for k in range(10):
        log.append(recs(topics, ["a", "b", "a"], start=3 * k))
    log.close()
    assert len(log_files(path)) > 3
    index = SegmentIndex(path, tmp_path / "idx.json", DT)
    evs = drain(LogTail(path, DT, index, 0))
    assert [e.offset for e in evs] == list(range(30))
    assert [e.event_id for e in evs] == list(range(30))
    assert [e.payload for e in evs] == [b"p%d" % i for i in range(30)]
    assert [e.topic for e in evs] == ["a", "b", "a"] * 10
    # from the middle (a later segment), with a fresh index object reading the persisted file
    index2 = SegmentIndex(path, tmp_path / "idx.json", DT)
    assert [e.event_id for e in drain(LogTail(path, DT, index2, 17))] == list(range(17, 30))
    # the oldest segment deleted (retention): the others keep their offsets
    first = log_files(path)[0][1]
    first.unlink()
    index3 = SegmentIndex(path, tmp_path / "idx.json", DT)
    tail = LogTail(path, DT, index3, 0)
    rest = drain(tail)
    assert tail.skipped == rest[0].offset > 0
    assert all(e.offset == e.event_id for e in rest) and rest[-1].offset == 29


def test_a_live_tail_follows_appends_and_rotations(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable(100)
    log = open_log(path, topics, max_segment_bytes=700)
    progress = Progress()
    index = SegmentIndex(path, tmp_path / "idx.json", DT)
    tail = LogTail(path, DT, index, 0)
    assert tail.read() == []
    got: list = []
    done = threading.Event()

    def follow():
        ev = threading.Event()
        deadline = time.monotonic() + 20
        while len(got) < 200 and time.monotonic() < deadline:
            ev.clear()
            progress.register(ev)
            batch = tail.read()
            if not batch:
                ev.wait(1.0)
            progress.unregister(ev)
            got.extend(batch)
        done.set()

    t = threading.Thread(target=follow)
    t.start()
    for k in range(40):
        log.append(recs(topics, ["x"] * 5, start=5 * k))
        progress.bump()
    assert done.wait(30)
    t.join()
    log.close()
    assert [e.offset for e in got] == list(range(200)), (tail._created, tail._pos, tail._ordinal, tail._base, tail.next_offset, [(c, p.name, p.stat().st_size) for c, p in log_files(path)], open(tmp_path / "idx.json").read())
    assert [e.event_id for e in got] == list(range(200))
    assert len(log_files(path)) > 5
    # a tail started now at the end sees only what comes next
    log = open_log(path, topics, max_segment_bytes=700)
    end = LogTail(path, DT, SegmentIndex(path, tmp_path / "idx.json", DT), 0)
    assert end.seek_end() == 200
    log.append(recs(topics, ["y"], start=999))
    assert [(e.offset, e.event_id) for e in end.read()] == [(200, 999)]
    log.close()


def test_time_start_skips_what_was_stored_before(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable(100)
    log = open_log(path, topics)
    log.append(recs(topics, ["t"] * 3, start=0))
    index = SegmentIndex(path, tmp_path / "idx.json", DT)
    stored = drain(LogTail(path, DT, index, 0))
    cut = stored[-1].stored_ns + 1
    while time.time_ns() <= cut:  # the next append's clock is past the cut
        time.sleep(0.001)
    log.append(recs(topics, ["t"] * 2, start=3))
    log.close()
    assert [e.offset for e in drain(LogTail(path, DT, index, 0, since_ns=cut))] == [3, 4]


def test_a_torn_tail_is_not_delivered_until_it_is_whole(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable(100)
    log = open_log(path, topics)
    log.append(recs(topics, ["t"] * 2, start=0))
    log.close()
    whole = path.read_bytes()
    index = SegmentIndex(path, tmp_path / "idx.json", DT)
    # a third record entry written halfway (as a reader may see a write in progress)
    log = open_log(path, topics)
    log.append(recs(topics, ["t"], start=2))
    log.close()
    full = path.read_bytes()
    path.write_bytes(full[:len(whole) + 40])
    tail = LogTail(path, DT, index, 0)
    assert [e.offset for e in drain(tail)] == [0, 1]
    with open(path, "ab") as f:
        f.write(full[len(whole) + 40:])
    assert [e.offset for e in tail.read()] == [2]


def test_an_entry_larger_than_a_chunk_is_read_whole(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable(100)
    log = open_log(path, topics)
    log.append(recs(topics, ["t"] * 40, start=0))
    log.close()
    index = SegmentIndex(path, tmp_path / "idx.json", DT)
    tail = LogTail(path, DT, index, 0)
    tail.chunk_bytes = 50  # smaller than one entry (as a large-payload entry can be): the read has to grow
    assert [e.event_id for e in drain(tail)] == list(range(40))

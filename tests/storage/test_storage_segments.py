"""events.bin in segments: rotation by size, retention by count and age, reading every segment,
restarts after a rotation, and the idempotency rebuild across segments."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

from eventstream.config import load_config
from eventstream.core import records as rec
from eventstream.core.topics import TopicTable
from eventstream.protocol.frames import KIND_ACK, encode_v2, split_control_frames
from eventstream.service import Service
from eventstream.storage import EventLogReader
from eventstream.storage.segments import segment_paths
from eventstream.storage.writer import EventLog


@pytest.fixture(autouse=True)
def _old_format(v1_writer):
    """These tests pin the geometry of version 1 logs (one entry per record): old logs still read,
    recover and rotate as they did. tests/storage/test_batch_entries.py covers version 2."""


def batch(topics: TopicTable, start: int, n: int, topic: str) -> np.ndarray:
    r = np.zeros(n, dtype=rec.EVENT_DTYPE)
    r["topic_id"] = topics.intern(topic)
    r["event_id"] = np.arange(start, start + n)
    r["payload_len"] = 1
    return r


def open_log(path, topics, **kw):
    return EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flush_events=1, flusher=False, fsync="none", **kw)


def test_rotation_by_size_keeps_every_record_in_order_and_each_segment_reads_alone(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable()
    with open_log(path, topics, max_segment_bytes=64 << 10) as log:
        for k in range(60):
            log.append(batch(topics, 1 + 10 * k, 10, f"t{k % 3}"))
    segs = segment_paths(path)
    assert len(segs) >= 4 and [n for n, _ in segs] == list(range(1, len(segs) + 1))
    got = EventLogReader(path).read()
    assert got.records["event_id"].tolist() == list(range(1, 601))
    names = got.topic_names()
    assert names == [f"t{(i // 10) % 3}" for i in range(600)]
    first = EventLogReader(segs[0][1]).read()  # a segment declares its topics itself
    assert len(first) > 0 and set(first.topic_names()) <= {"t0", "t1", "t2"}
    assert all(p.stat().st_size <= (64 << 10) + 10 * rec.EVENT_DTYPE.itemsize + 4096 for _, p in segs)


def test_retention_keeps_the_newest_segments(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable()
    with open_log(path, topics, max_segment_bytes=32 << 10, max_segments=2) as log:
        for k in range(80):
            log.append(batch(topics, 1 + 10 * k, 10, "kept"))
    segs = segment_paths(path)
    assert len(segs) == 2 and segs[0][0] > 2  # older ones deleted, numbering goes on
    ids = EventLogReader(path).read().records["event_id"].tolist()
    assert ids == list(range(ids[0], 801)) and ids[0] > 1  # a contiguous tail, nothing out of order


def test_age_retention_deletes_old_segments(tmp_path):
    path = tmp_path / "events.bin"
    topics = TopicTable()
    with open_log(path, topics, max_segment_bytes=32 << 10, max_age_s=3600) as log:
        for k in range(20):
            log.append(batch(topics, 1 + 10 * k, 10, "a"))
        old = segment_paths(path)
        assert old
        past = time.time() - 7200
        for _, p in old:
            os.utime(p, (past, past))  # as if written two hours ago
        for k in range(20, 40):
            log.append(batch(topics, 1 + 10 * k, 10, "a"))
    left = {p for _, p in segment_paths(path)}
    assert left and not (left & {p for _, p in old})


def test_restart_after_rotation_keeps_topic_names_right(tmp_path):
    path = tmp_path / "events.bin"
    t1 = TopicTable()
    with open_log(path, t1, max_segment_bytes=16 << 10) as log:
        for k in range(30):
            log.append(batch(t1, 1 + 10 * k, 10, f"old{k % 2}"))
    t2 = TopicTable()
    t2.intern("new")  # another run: other engine ids
    with open_log(path, t2, max_segment_bytes=16 << 10) as log:
        log.append(batch(t2, 1000, 5, "new"))
        log.append(batch(t2, 2000, 5, "old1"))
    got = EventLogReader(path).read()
    pairs = list(zip(got.topic_names(), got.records["event_id"].tolist()))
    assert pairs[-10:] == [("new", 1000 + i) for i in range(5)] + [("old1", 2000 + i) for i in range(5)]
    assert pairs[:10] == [("old0", 1 + i) for i in range(10)]


def test_rotation_covers_synced_records_and_a_resend_after_restart_is_stored_once(tmp_path):
    data = tmp_path / "data"
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "storage.events_max_bytes": 8192, "server.ack": "synced"}
    frames = [encode_v2(f"s{i % 4}", b"p%d" % i, i % 5, 100 + i) for i in range(300)]

    def send_all(svc, check_sync=True):
        with socket.create_connection(svc.tcp.address) as s:
            for k in range(0, len(frames), 30):
                s.sendall(b"".join(frames[k:k + 30]))
            s.shutdown(socket.SHUT_WR)
            buf, acks = bytearray(), []
            s.settimeout(30)
            while data_ := s.recv(65536):
                buf += data_
                acks += [v for kind, v, _ in split_control_frames(buf) if kind == KIND_ACK]
                if acks and check_sync:
                    assert svc.engine.event_log.statistics()["synced_records"] >= acks[-1]  # never before the fsync
            return acks[-1]

    svc = Service(load_config(environ={}, overrides=over)).start()
    try:
        assert send_all(svc) == len(frames)
    finally:
        svc.stop()
    assert len(segment_paths(data / "events.bin")) >= 2
    svc = Service(load_config(environ={}, overrides=over)).start()  # dedup rebuilt from every segment
    try:
        # duplicates are ACKed (their first copies were fsynced: at close, and again when the log opens)
        assert send_all(svc, check_sync=False) == len(frames)
        assert svc.metrics.dedup_hits_total() == len(frames)
    finally:
        svc.stop()
    ids = EventLogReader(data / "events.bin").read().records["event_id"].tolist()
    assert sorted(ids) == [100 + i for i in range(300)]  # ... and stored once

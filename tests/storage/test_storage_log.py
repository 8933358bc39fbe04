"""EventLog writer + reader: round trip, filters, flushing, fsync policy, threads, topic stability."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.payloads import payload_of
from eventstream.core.topics import TopicTable
from eventstream.storage import EventLog, EventLogReader, LogFormatError


def open_log(path, topics, **kw):
    kw.setdefault("flusher", False)
    return EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, **kw)


def test_round_trip_keeps_every_field_and_topic_names(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    batch = make_batch(topics, 250)
    with open_log(path, topics) as log:
        log.append(batch[:100])
        log.append(batch[100:])
    got = EventLogReader(path).read()
    assert len(got) == 250
    assert got.topic_names() == topics.names(batch["topic_id"])
    for field in ("seq", "event_id", "producer_ts", "priority", "payload_len", "payload"):
        np.testing.assert_array_equal(got.records[field], batch[field])
    assert payload_of(got.records[7]) == b"payload-7"
    assert np.all(got.stored_ns > 0)


def test_filters_topic_glob_priority_and_time(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    batch = make_batch(topics, 300)
    with open_log(path, topics) as log:
        log.append(batch)
    reader = EventLogReader(path)
    orders = reader.read(topic="orders.*")
    assert set(orders.topic_names()) == {"orders.new", "orders.paid"}
    assert len(orders) == 200
    crit = reader.read(priorities=["CRITICAL", "3"])
    assert set(crit.records["priority"].tolist()) == {3, 4} and len(crit) == 120
    both = reader.count(topic="metrics.cpu", priorities=[4])
    expected = int(np.sum((batch["seq"] % 3 == 2) & (batch["seq"] % 5 == 4)))
    assert both == expected
    t0 = int(batch["producer_ts"][100])
    assert reader.count(since_ns=t0, until_ns=t0 + 50 * 1000, time_field="producer") == 50
    stored = int(reader.read().stored_ns[0])
    assert reader.count(since_ns=stored) == 300 and reader.count(until_ns=stored) == 0
    with pytest.raises(ValueError, match="allowed: 0-4"):
        reader.count(priorities=["URGENT"])
    with pytest.raises(ValueError, match="time_field"):
        list(reader.batches(time_field="wall"))


def test_flush_by_count_and_by_interval(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    log = open_log(path, topics, flush_events=100, flush_interval_ms=20, flusher=True)
    try:
        log.append(make_batch(topics, 99))
        assert log.statistics()["pending"] in (0, 99)  # the flusher may already have written it
        log.append(make_batch(topics, 1, start_seq=99))
        assert log.statistics()["records"] == 100  # the 100th record flushed synchronously
        log.append(make_batch(topics, 5, start_seq=100))
        deadline = time.monotonic() + 10
        while log.statistics()["records"] < 105:  # written by the flusher thread after ~20 ms
            assert time.monotonic() < deadline, "flusher did not write a small batch within 10 s"
            time.sleep(0.005)
        assert EventLogReader(path).count() == 105  # on disk (OS cache) before close
    finally:
        log.close()


def test_pending_records_wait_for_threshold_without_flusher(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    log = open_log(path, topics, flush_events=100)
    log.append(make_batch(topics, 10))
    assert log.statistics()["records"] == 0 and log.statistics()["pending"] == 10
    assert EventLogReader(path).count() == 0
    log.flush()
    assert EventLogReader(path).count() == 10
    log.close()


@pytest.mark.parametrize("policy", ["none", "interval", "always"])
def test_fsync_policy(tmp_path, topics, policy, make_batch):
    log = open_log(tmp_path / "events.bin", topics, flush_events=10, fsync=policy, fsync_interval_ms=3_600_000)
    for i in range(5):
        log.append(make_batch(topics, 10, start_seq=i * 10))
    stats = log.statistics()
    assert stats["flushes"] == 5
    if policy == "always":
        assert stats["fsyncs"] == 5
    elif policy == "interval":
        assert stats["fsyncs"] <= 1  # at most the first flush may be due (interval 1 h)
    else:
        assert stats["fsyncs"] == 0
    log.close()
    assert log.statistics()["fsyncs"] == (0 if policy == "none" else stats["fsyncs"] + (policy == "interval"))


def test_bad_fsync_policy_names_allowed_values(tmp_path, topics):
    with pytest.raises(ValueError, match="allowed: none, interval, always"):
        open_log(tmp_path / "events.bin", topics, fsync="sometimes")


def test_topic_ids_stay_stable_across_restarts(tmp_path, make_batch):
    path = tmp_path / "events.bin"
    t1 = TopicTable()
    with open_log(path, t1) as log:
        log.append(make_batch(t1, 30, names=("a", "b")))
    t2 = TopicTable()
    t2.intern("zzz")  # different engine ids in the second run
    with open_log(path, t2) as log:
        assert log.recovery.records == 30 and log.recovery.topics == {1: "a", 2: "b"}
        log.append(make_batch(t2, 30, start_seq=30, names=("b", "c")))
    got = EventLogReader(path).read()
    assert got.topics == {1: "a", 2: "b", 3: "c"}
    assert got.topic_names() == ["a", "b"] * 15 + ["b", "c"] * 15


def test_payload_size_mismatch_is_refused(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    with open_log(path, topics) as log:
        log.append(make_batch(topics, 3))
    with pytest.raises(LogFormatError, match="payload_bytes=448"):
        EventLog(path, dtype=rec.record_dtype(64), topics=topics, flusher=False)
    with pytest.raises(TypeError, match="512-byte records"):
        with open_log(tmp_path / "other.bin", topics) as log:
            log.append(make_batch(topics, 3, dtype=rec.record_dtype(64)))


def test_foreign_file_is_refused_not_truncated(tmp_path, topics):
    path = tmp_path / "events.bin"
    path.write_bytes(b"hello, this is not a log at all, clearly" * 3)
    with pytest.raises(LogFormatError, match="not an eventstream event log"):
        open_log(path, topics)
    assert path.stat().st_size == 120
    with pytest.raises(LogFormatError, match="not an eventstream event log"):
        EventLogReader(path)


def test_concurrent_appends_store_every_record_once(tmp_path, make_batch):
    path = tmp_path / "events.bin"
    topics = TopicTable()
    log = open_log(path, topics, flush_events=64, flusher=True, flush_interval_ms=5)
    threads_n, batches_n, size = 4, 40, 50
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker(k: int) -> None:
        try:
            start.wait(timeout=10)
            for j in range(batches_n):
                seq0 = (k * batches_n + j) * size
                log.append(make_batch(topics, size, start_seq=seq0, names=(f"t{k}.{j % 7}", "shared")))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"writer-{k}") for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), f"{t.name} did not finish within 60 s"
    log.close()
    assert not errors, errors
    got = EventLogReader(path).read()
    total = threads_n * batches_n * size
    assert len(got) == total
    assert sorted(got.records["seq"].tolist()) == list(range(total))
    names = got.topic_names()
    for seq, name in zip(got.records["seq"].tolist(), names):
        k, j = divmod(seq // size, batches_n)
        assert name == (f"t{k}.{j % 7}" if (seq - (k * batches_n + j) * size) % 2 == 0 else "shared")


def test_reading_in_small_chunks_matches_one_pass(tmp_path, monkeypatch, make_batch):
    from eventstream.storage import reader as reader_mod
    from eventstream.storage import scan as scan_mod

    path = tmp_path / "events.bin"
    topics = TopicTable()
    with open_log(path, topics) as log:
        for i in range(6):  # new topics appear between record runs
            log.append(make_batch(topics, 23, start_seq=i * 23, names=(f"t{i}", "common")))
    whole = EventLogReader(path).read(topic="t*")
    monkeypatch.setattr(scan_mod, "SCAN_CHUNK", 5)
    monkeypatch.setattr(reader_mod, "READ_CHUNK_RECORDS", 7)
    r = EventLogReader(path)
    parts = list(r.batches(topic="t*"))
    assert len(parts) == 6  # a chunk ends after the batch entry (one per append) that reached the limit
    assert [n for p in parts for n in p.topic_names()] == whole.topic_names()
    assert np.concatenate([p.records["seq"] for p in parts]).tolist() == whole.records["seq"].tolist()
    assert r.last_scan.records == 138 and r.last_scan.problem is None and r.last_scan.valid_bytes == path.stat().st_size
    for first in r.batches():  # abandoning the generator early closes the mapping cleanly
        assert len(first) > 0
        break
    assert r.count() == 138


def test_records_without_topic_round_trip(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    b = make_batch(topics, 4)
    b["topic_id"][::2] = 0  # id 0 = "no topic"
    with open_log(path, topics) as log:
        log.append(b)
    with open_log(path, topics) as log:  # recovery accepts the empty topic name
        assert log.recovery.records == 4 and log.recovery.problem is None
    assert EventLogReader(path).read().topic_names() == ["", "orders.paid", "", "orders.new"]


def test_interval_fsync_runs_in_the_flusher_and_never_blocks_appends(tmp_path, topics, make_batch, monkeypatch):
    from eventstream.storage import writer as writer_mod

    inside, release = threading.Event(), threading.Event()
    real_fsync = writer_mod.os.fsync

    def slow_fsync(fd):
        inside.set()
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(writer_mod.os, "fsync", slow_fsync)
    log = EventLog(tmp_path / "events.bin", dtype=rec.EVENT_DTYPE, topics=topics, flush_events=1,
                   flush_interval_ms=1, fsync="interval", fsync_interval_ms=1, flusher=True)
    try:
        log.append(make_batch(topics, 5))
        assert inside.wait(30)  # the flusher thread is inside a (slow) fsync now
        done = threading.Event()
        t = threading.Thread(target=lambda: (log.append(make_batch(topics, 5, start_seq=5)), done.set()))
        t.start()
        assert done.wait(30)  # the append (and its write) finished while the fsync was still running
        assert not release.is_set()
    finally:
        release.set()
        t.join(30)
        log.close()
    assert len(EventLogReader(tmp_path / "events.bin").read()) == 10

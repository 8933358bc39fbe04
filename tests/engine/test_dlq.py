"""DeadLetterLog: JSON Lines format with whole payloads, escaping, write-through, rotation, retention,
reading (segments, torn tail, old text lines) and counts by reason category."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.payloads import payload_list
from eventstream.core.topics import TopicTable
from eventstream.engine.dlq import DeadLetterLog, escape, reason_category
from eventstream.engine.dlq_reader import parse_line, read_dlq, to_records
from eventstream.storage.segments import segment_paths

KEYS = ["ts", "reason", "category", "id", "event_id", "seq", "topic", "priority", "producer_ts", "flags",
        "attempts", "payload_b64", "payload_len"]
FORGED_TOPIC = 'evil"topic\n\x1b[31m} {"id":1, "reason": "forged'


def batch(topics, n, start=0, event_ids=True, topic="orders.new"):
    b = rec.empty(n)
    b["seq"] = np.arange(start, start + n)
    b["event_id"] = (np.arange(start, start + n) + 5000) if event_ids else 0
    b["priority"] = np.arange(n) % 5
    b["topic_id"] = topics.intern(topic)
    return b


def lines_of(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="ascii").splitlines()]


def test_json_line_per_event_with_every_field(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    b = batch(topics, 3)
    b["event_id"][1] = 0  # no client id: the server sequence number is the id
    b["producer_ts"] = 1_769_860_800_000_000_123
    b["flags"] = rec.FLAG_V2
    b["attempts"] = [0, 1, 3]
    rec.set_payload(b[2:3][0], b"hello")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with DeadLetterLog(path) as dlq:
        dlq.write(b, "queue_full: BATCH ring full", topics)
    objs = lines_of(path)
    assert len(objs) == 3
    assert all(list(o) == KEYS for o in objs)
    o = objs[1]
    assert o["ts"].endswith("Z") and len(o["ts"]) == len("2026-01-31T12:00:00.123Z")
    assert dt.datetime.fromisoformat(o["ts"].replace("Z", "+00:00")) >= before
    assert {k: o[k] for k in KEYS[1:]} == {
        "reason": "queue_full: BATCH ring full", "category": "queue_full", "id": 1, "event_id": 0, "seq": 1,
        "topic": "orders.new", "priority": 1, "producer_ts": 1_769_860_800_000_000_123, "flags": 1, "attempts": 1,
        "payload_b64": "", "payload_len": 0}
    assert (objs[2]["payload_b64"], objs[2]["payload_len"], objs[2]["id"]) == ("aGVsbG8=", 5, 5002)
    entries = list(read_dlq(path))
    assert [e.id for e in entries] == [5000, 1, 5002]
    assert [e.priority for e in entries] == [0, 1, 2]
    assert entries[2].payload == b"hello" and entries[0].payload == b""
    assert entries[1].timestamp == dt.datetime.fromisoformat(o["ts"].replace("Z", "+00:00"))
    assert [e.to_json() for e in entries] == objs


@pytest.mark.parametrize("size", [0, 1, 447, 448])
def test_payloads_round_trip_whole(tmp_path, size):
    topics = TopicTable()
    rng = np.random.default_rng(size)
    n = 6
    b = batch(topics, n)
    sent = []
    for i in range(n):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if size:  # always a NUL and a 0xFF, at the edges
            data = b"\x00" + data[1:-1] + b"\xff" if size > 1 else (b"\x00", b"\xff")[i % 2]
        rec.set_payload(b[i:i + 1][0], data)
        sent.append(data)
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path) as dlq:
        dlq.write_each(b, [f"handler_error: #{i}" for i in range(n)], topics)
    entries = list(read_dlq(path))
    assert [e.payload for e in entries] == sent
    assert [e.payload_len for e in entries] == [size] * n
    back = to_records(entries, rec.EVENT_DTYPE, topics)
    assert payload_list(back) == sent
    for f in ("event_id", "seq", "priority", "topic_id", "producer_ts", "attempts", "payload_len"):
        assert back[f].tolist() == b[f].tolist(), f
    assert (back["flags"] & rec.FLAG_REPLAYED).all()


def test_records_without_payload_field_and_to_records_limits(tmp_path):
    topics = TopicTable()
    dtype0 = rec.record_dtype(0)
    b = rec.empty(2, dtype0)
    b["seq"] = [7, 8]
    b["topic_id"] = topics.intern("t")
    path = tmp_path / "d.txt"
    with DeadLetterLog(path) as dlq:
        dlq.write(b, "overflow: x", topics)
        dlq.write_line(9, "t", 2, "bad_frame: crc mismatch")
    entries = list(read_dlq(path))
    assert [e.payload for e in entries] == [b"", b"", None]
    with pytest.raises(ValueError, match="has no payload; allowed: entries with a payload"):
        to_records(entries, rec.EVENT_DTYPE, topics)
    big = DeadLetterLog(tmp_path / "big.txt")
    r = batch(topics, 1)
    rec.set_payload(r[0:1][0], b"x" * 100)
    big.write(r, "x", topics)
    big.close()
    with pytest.raises(rec.PayloadTooLarge, match="allowed: payloads of 0..32 bytes"):
        to_records(read_dlq(tmp_path / "big.txt"), rec.record_dtype(32), topics)
    # with a payload arena the large payload is rebuilt whole (its slot belongs to the record)
    from eventstream.core.payloads import PayloadArena, payload_list, release_records

    with PayloadArena(2 << 20, 1000, min_payload=32) as arena:
        back = to_records(read_dlq(tmp_path / "big.txt"), rec.record_dtype(32), topics, payloads=arena)
        assert payload_list(back) == [b"x" * 100] and back["ext_arena"][0] == arena.id
        release_records(back)
        assert arena.statistics()["used_bytes"] == 0


def test_undecodable_frame_entry_has_null_payload_and_unknown_fields(tmp_path):
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path) as dlq:
        dlq.write_line(77, "weird\ntopic", -1, "bad_frame: crc mismatch")
    (o,) = lines_of(path)
    assert list(o) == KEYS
    assert o["payload_b64"] is None and o["payload_len"] is None and o["seq"] is None
    assert (o["id"], o["event_id"], o["topic"], o["priority"], o["category"]) == (77, 77, "weird\ntopic", -1,
                                                                                   "bad_frame")
    (e,) = read_dlq(path)
    assert e.payload is None and e.producer_ts is None and e.flags is None and e.attempts is None


def test_topic_and_reason_text_cannot_forge_fields_or_escape_to_a_terminal(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    nasty_reason = 'handler_error: ValueError: line one\nline two\r\\ back "} {"id": 2\x1b]0;title\x07'
    b = batch(topics, 2, topic=FORGED_TOPIC)
    with DeadLetterLog(path) as dlq:
        dlq.write_each(b, [nasty_reason, "dedup: again"], topics)
        dlq.write_line(77, FORGED_TOPIC, 4, nasty_reason)
    raw = path.read_bytes()
    assert raw.isascii() and b"\x1b" not in raw and b"\r" not in raw and b"\x07" not in raw
    assert raw.count(b"\n") == 3  # one line per event, whatever the text
    objs = lines_of(path)
    assert all(list(o) == KEYS for o in objs)  # no extra or duplicated keys
    assert [o["topic"] for o in objs] == [FORGED_TOPIC] * 3
    assert [o["id"] for o in objs] == [5000, 5001, 77]
    assert [o["reason"] for o in objs] == [nasty_reason, "dedup: again", nasty_reason]
    entries = list(read_dlq(path))
    assert entries[0].reason == nasty_reason and entries[0].topic == FORGED_TOPIC
    assert (entries[2].id, entries[2].topic, entries[2].priority) == (77, FORGED_TOPIC, 4)


def test_counts_by_reason_category(tmp_path):
    topics = TopicTable()
    with DeadLetterLog(tmp_path / "d.txt") as dlq:
        dlq.write(batch(topics, 10), "queue_full", topics)
        dlq.write_each(batch(topics, 3), ["handler_error: A", "handler_error: B", "retries_exhausted: C"], topics)
        dlq.write_line(1, "t", 0, "bad_frame: short")
        # counted by the bounded categories of eventstream.metrics.reasons, whatever the text
        assert dlq.counts() == {"other": 11, "handler_error": 2, "retries_exhausted": 1}
        assert dlq.statistics()["total"] == 14 == dlq.total
        with pytest.raises(ValueError, match="exactly one reason per record"):
            dlq.write_each(batch(topics, 2), ["x"], topics)
    assert [e.category for e in read_dlq(tmp_path / "d.txt")] == (["queue_full"] * 10 + ["handler_error"] * 2
                                                                  + ["retries_exhausted", "bad_frame"])
    assert reason_category("  :x") == "unknown" and escape("a\nb\\") == "a\\nb\\\\"


def test_write_is_in_the_file_when_it_returns_and_close_is_final(tmp_path):
    topics = TopicTable()
    path = tmp_path / "d.txt"
    dlq = DeadLetterLog(path)
    try:
        assert not [t for t in threading.enumerate() if t.name == "es-dlq-flush"]
        dlq.write(batch(topics, 4), "x", topics)
        assert len(path.read_text().splitlines()) == 4  # no flush, no wait
        dlq.write_line(1, "t", 0, "y")
        assert len(list(read_dlq(path))) == 5
    finally:
        dlq.close()
    dlq.close()  # idempotent
    with pytest.raises(ValueError, match="after close"):
        dlq.write_line(1, "t", 0, "late")


WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from eventstream.core import records as rec
    from eventstream.core.topics import TopicTable
    from eventstream.engine.dlq import DeadLetterLog

    topics = TopicTable()
    dlq = DeadLetterLog(sys.argv[1])  # default arguments: the old log would buffer for 50 ms here
    b = rec.empty(3)
    b["topic_id"] = topics.intern("orders")
    b["event_id"] = [11, 12, 13]
    for i in range(3):
        rec.set_payload(b[i:i + 1][0], bytes([0, 255, i]) * 100)
    dlq.write(b, "retries_exhausted: RuntimeError: boom", topics)
    dlq.write_line(14, "orders", 2, "bad_frame: crc mismatch")
    os.kill(os.getpid(), signal.SIGKILL)  # right after write returns: no close, no flush, no atexit
""")


def test_entries_survive_sigkill_right_after_write_returns(tmp_path):
    path = tmp_path / "data" / "dlq_log.txt"
    r = subprocess.run([sys.executable, "-c", WRITER, str(path)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON_GIL="0"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    entries = list(read_dlq(path))
    assert [e.id for e in entries] == [11, 12, 13, 14]
    assert [e.payload for e in entries[:3]] == [bytes([0, 255, i]) * 100 for i in range(3)]
    assert entries[3].payload is None and entries[3].reason == "bad_frame: crc mismatch"


FSIZE_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from eventstream.core import records as rec
    from eventstream.core.topics import TopicTable
    from eventstream.engine.dlq import DeadLetterLog

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write(2) fails with EFBIG
    topics = TopicTable()
    dlq = DeadLetterLog(sys.argv[1])
    b = rec.empty(4)
    b["topic_id"] = topics.intern("t")
    b["event_id"] = [1, 2, 3, 4]
    dlq.write(b[:1], "first", topics)
    size = dlq.statistics()["bytes"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, resource.RLIM_INFINITY))
    try:
        dlq.write(b[1:], "second: does not fit", topics)
    except OSError as exc:
        print("failed", exc.errno, dlq.statistics()["bytes"] == size)
    dlq.write_line(9, "t", 0, "small")  # fits in the 300 bytes left
""")


def test_a_failed_write_leaves_no_partial_line(tmp_path):
    path = tmp_path / "d.txt"
    r = subprocess.run([sys.executable, "-c", FSIZE_WRITER, str(path)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON_GIL="0"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["failed", "27", "True"]  # EFBIG, size back to before the call
    assert [e.id for e in read_dlq(path)] == [1, 9]


def test_rotation_keeps_every_entry_in_order_across_segments(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path, max_bytes=4096, max_segments=100) as dlq:
        for k in range(60):
            b = batch(topics, 3, start=3 * k)
            for i in range(3):
                rec.set_payload(b[i:i + 1][0], bytes([k]) * 40)
            dlq.write(b, f"r{k}", topics)
        rotations = dlq.statistics()["rotations"]
    segs = segment_paths(path)
    assert rotations == len(segs) >= 5
    assert [n for n, _ in segs] == list(range(1, len(segs) + 1))
    assert all(p.name == f"dlq_log.txt.{n}" for n, p in segs)
    assert all(0 < p.stat().st_size <= 4096 for _, p in segs)
    for _, p in segs:  # a call's lines never straddle two segments
        ids = [e.id for e in read_dlq(p)]
        assert len(ids) % 3 == 0 and all((ids[i] - 5000) % 3 == 0 for i in range(0, len(ids), 3))
    entries = list(read_dlq(path))
    assert [e.id for e in entries] == list(range(5000, 5180))
    assert [e.payload for e in entries] == [bytes([k]) * 40 for k in range(60) for _ in range(3)]
    # a write bigger than max_bytes goes whole into a fresh file
    with DeadLetterLog(path, max_bytes=4096, max_segments=100) as dlq:
        dlq.write(batch(topics, 50, start=1000), "big", topics)
    assert path.stat().st_size > 4096
    assert [n for n, _ in segment_paths(path)][-1] == rotations + 1  # numbering continues after reopen
    assert [e.id for e in read_dlq(path)][-51:] == [5179] + list(range(6000, 6050))


def test_retention_by_count_deletes_the_oldest_segments(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path, max_bytes=1000, max_segments=2) as dlq:
        for k in range(40):
            dlq.write(batch(topics, 1, start=k), "x", topics)
        total_rotations = dlq.statistics()["rotations"]
    segs = segment_paths(path)
    assert [n for n, _ in segs] == [total_rotations - 1, total_rotations]
    ids = [e.id for e in read_dlq(path)]
    assert ids == list(range(ids[0], 5040))  # the newest entries, contiguous, in order
    assert len(ids) < 40
    with DeadLetterLog(path, max_bytes=1000, max_segments=0):  # retention also runs on open
        pass
    assert segment_paths(path) == []


def test_retention_by_age_deletes_segments_last_written_too_long_ago(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path, max_bytes=1000, max_segments=100) as dlq:
        for k in range(30):
            dlq.write(batch(topics, 1, start=k), "x", topics)
    segs = segment_paths(path)
    assert len(segs) >= 4
    old = time.time() - 7200
    for _, p in segs[:2]:
        os.utime(p, (old, old))  # last written two hours ago
    with DeadLetterLog(path, max_bytes=1000, max_segments=100, max_age_s=3600) as dlq:
        assert [n for n, _ in segment_paths(path)] == [n for n, _ in segs[2:]]  # on open
        os.utime(segs[2][1], (old, old))
        while dlq.statistics()["rotations"] == 0:  # and at the next rotation
            dlq.write(batch(topics, 1, start=100), "x", topics)
    assert [n for n, _ in segment_paths(path)] == [n for n, _ in segs[3:]] + [segs[-1][0] + 1]


def test_constructor_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"max_bytes=0 is not allowed; allowed: an integer >= 1"):
        DeadLetterLog(tmp_path / "d", max_bytes=0)
    with pytest.raises(ValueError, match=r"max_segments=-1 is not allowed; allowed: an integer >= 0"):
        DeadLetterLog(tmp_path / "d", max_segments=-1)
    with pytest.raises(ValueError, match=r"max_age_s=-5 is not allowed; allowed: seconds >= 0"):
        DeadLetterLog(tmp_path / "d", max_age_s=-5)


def test_torn_last_line_is_skipped_and_cut_on_reopen(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path) as dlq:
        dlq.write(batch(topics, 3), "x", topics)
    full = path.read_bytes()
    with open(path, "ab") as f:
        f.write(full.splitlines(keepends=True)[0][:57])  # a crash mid-write
    assert [e.id for e in read_dlq(path)] == [5000, 5001, 5002]
    with DeadLetterLog(path) as dlq:
        assert path.read_bytes() == full
        dlq.write(batch(topics, 1, start=9), "after", topics)
    assert [e.id for e in read_dlq(path)] == [5000, 5001, 5002, 5009]
    path.write_bytes(b'{"ts": "2026-01-')  # nothing but a torn line
    assert list(read_dlq(path)) == []
    DeadLetterLog(path).close()
    assert path.read_bytes() == b""


def test_damaged_complete_line_is_named_or_reported(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    with DeadLetterLog(path) as dlq:
        dlq.write(batch(topics, 2), "x", topics)
    lines = path.read_text().splitlines(keepends=True)
    bad = lines[0].replace('"payload_len": 0', '"payload_len": 3')
    path.write_text(lines[0] + "garbage\n" + bad + lines[1])
    with pytest.raises(ValueError, match=r"dlq_log.txt:2: not a DLQ line: 'garbage'; allowed: a JSON object line"):
        list(read_dlq(path))
    seen = []
    entries = list(read_dlq(path, on_bad_line=lambda f, n, problem: seen.append((f.name, n, problem))))
    assert [e.id for e in entries] == [5000, 5001]
    assert [(f, n) for f, n, _ in seen] == [("dlq_log.txt", 2), ("dlq_log.txt", 3)]
    assert "'payload_len' is 3 but the payload has 0 bytes" in seen[1][2]
    with pytest.raises(ValueError, match="not a DLQ line"):
        parse_line("garbage")
    with pytest.raises(FileNotFoundError, match="no such DLQ file"):
        read_dlq(tmp_path / "nope.txt")


def test_old_text_lines_stay_readable_and_new_entries_append_after_them(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    path.write_text(
        "[2026-01-31T12:00:00.123Z] DROPPED: id=5000 topic=orders.new priority=0 reason=queue_full: BATCH ring full\n"
        "[2026-01-31T12:00:01.000Z] DROPPED: id=77 topic=weird\\ntopic priority=4 "
        "reason=handler_error: line one\\nline two\\r\\\\ back\n")
    with DeadLetterLog(path) as dlq:
        dlq.write(batch(topics, 1, start=3), "overflow: realtime", topics)
    old1, old2, new = read_dlq(path)
    assert (old1.ts, old1.id, old1.topic, old1.priority, old1.reason, old1.category) == (
        "2026-01-31T12:00:00.123Z", 5000, "orders.new", 0, "queue_full: BATCH ring full", "queue_full")
    assert old1.payload is None and old1.event_id is None and old1.seq is None
    assert (old2.id, old2.topic, old2.reason) == (77, "weird\ntopic", "handler_error: line one\nline two\r\\ back")
    assert old2.to_json()["payload_b64"] is None
    assert (new.id, new.payload, new.category) == (5003, b"", "overflow")


def test_reader_sees_the_dlq_as_it_was_when_called(tmp_path):
    topics = TopicTable()
    path = tmp_path / "dlq_log.txt"
    dlq = DeadLetterLog(path, max_bytes=2000, max_segments=100)
    try:
        for k in range(10):
            dlq.write(batch(topics, 1, start=k), "x", topics)
        snapshot = read_dlq(path)  # files opened and sizes taken here
        for k in range(10, 40):  # more entries and rotations (the active file is renamed) meanwhile
            dlq.write(batch(topics, 1, start=k), "x", topics)
        assert dlq.statistics()["rotations"] >= 3
        assert [e.id for e in snapshot] == list(range(5000, 5010))
        assert [e.id for e in read_dlq(path)] == list(range(5000, 5040))
    finally:
        dlq.close()


def test_concurrent_writers_lose_no_entry_across_rotations(tmp_path):
    topics = TopicTable()
    path = tmp_path / "d.txt"
    dlq = DeadLetterLog(path, max_bytes=64 << 10, max_segments=1000)
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
    assert dlq.statistics()["rotations"] >= 2
    entries = list(read_dlq(path))
    assert sorted(e.id for e in entries) == list(range(n_threads * rounds * 5))
    assert dlq.counts() == {"other": n_threads * rounds * 5}  # bounded categories: r0..r3 are "other"
    assert sorted(e.reason for e in entries) == sorted(f"r{k}" for k in range(n_threads) for _ in range(rounds * 5))

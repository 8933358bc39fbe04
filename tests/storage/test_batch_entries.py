"""events.bin version 2: batch entries store events packed (one CRC per entry); corrupt bytes inside a
batch entry are skipped as one region; a torn batch entry is cut; kill -9 while batch entries are
written loses nothing written; version 1 logs read and take batch entries after them; a damaged magic
does not make the log unreadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from structlog.testing import capture_logs

from eventstream.core import records as rec
from eventstream.core.topics import TopicTable
from eventstream.protocol.frames import encode_v2
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt
from eventstream.storage.scan import CorruptLogWarning, scan_buffer


def events(n: int, *, start: int = 0, sizes=None, topics: TopicTable, names=("a.b", "c")) -> np.ndarray:
    b = rec.empty(n)
    seq = np.arange(start, start + n, dtype=np.uint64)
    b["seq"] = seq
    b["event_id"] = seq + 1
    b["producer_ts"] = 1_700_000_000_000_000_000 + seq
    b["priority"] = seq % 5
    b["principal"] = seq % 7
    b["topic_id"] = np.array([topics.intern(t) for t in names], dtype=np.uint32)[seq % len(names)]
    rng = np.random.default_rng(start)
    lens = np.full(n, 64) if sizes is None else np.asarray(sizes)
    b["payload_len"] = lens
    pay = rng.integers(0, 256, size=(n, 448), dtype=np.uint8)
    pay[np.arange(448) >= lens[:, None]] = 0
    b["payload"] = pay
    return b


def open_log(path, topics, **kw) -> EventLog:
    return EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, **kw)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    fields = ["seq", "event_id", "producer_ts", "priority", "principal", "payload_len", "payload"]
    return all(np.array_equal(a[f], b[f]) for f in fields)


def test_64_byte_events_take_at_most_1_25x_their_wire_bytes(tmp_path):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    n = 50_001
    with open_log(path, topics) as log:
        for a in range(0, n, 4096):
            log.append(events(min(4096, n - a), start=a, topics=topics, names=("orders",)))
    wire = len(encode_v2("orders", bytes(64), 2, 1, 1))  # 100 bytes: one v2 frame
    per_event = (path.stat().st_size - fmt.FILE_HEADER_BYTES) / n
    assert per_event <= 1.25 * wire, per_event  # 536 bytes in version 1
    got = EventLogReader(path).read()
    assert len(got) == n and got.records["seq"].tolist() == list(range(n))
    assert got.records["principal"].tolist() == [s % 7 for s in range(n)]  # the dedup key's principal
    heads = EventLogReader(path).read(payloads=False)
    assert heads.records.dtype.itemsize == 64 and "payload" not in heads.records.dtype.names
    assert heads.records["event_id"].tolist() == got.records["event_id"].tolist()


def test_mixed_sizes_and_large_payloads_round_trip(tmp_path):
    from eventstream.core.payloads import PayloadArena

    topics = TopicTable()
    path = tmp_path / "events.bin"
    sizes = [0, 1, 448, 17, 300, 0, 64, 448, 5]
    first = events(len(sizes), sizes=sizes, topics=topics)
    with PayloadArena(4 << 20, (1 << 20) - 4, min_payload=448) as arena:
        big = rec.empty(3)
        big["seq"] = [100, 101, 102]
        big["topic_id"] = topics.intern("big")
        offs, cls = arena.claim([1000, 5000, 2000])
        for i, (o, n) in enumerate(zip(offs.tolist(), [1000, 5000, 2000])):
            arena.buf[o:o + n] = i + 1
        big["payload_len"] = [1000, 5000, 2000]
        big["ext_off"], big["ext_class"], big["ext_arena"] = offs, cls, arena.id
        mixed = np.concatenate([first[:4], big[:2], first[4:], big[2:]])
        with open_log(path, topics) as log:
            log.append(mixed)
    got = EventLogReader(path).read()
    assert got.records["seq"].tolist() == [0, 1, 2, 3, 100, 101, 4, 5, 6, 7, 8, 102]
    pays = got.payloads()
    want = [first[i]["payload"][:first[i]["payload_len"]].tobytes() for i in range(len(sizes))]
    assert [bytes(p) for p in pays] == want[:4] + [b"\x01" * 1000, b"\x02" * 5000] + want[4:] + [b"\x03" * 2000]
    kinds = []
    scan_buffer(path.read_bytes(), rec.EVENT_DTYPE, on_records=lambda v: kinds.append(len(v)))
    assert kinds == [4, 1, 1, 5, 1]  # batch, ext, ext, batch, ext entries


@pytest.mark.parametrize("n", range(1, rec.SMALL_BATCH + 1))
def test_a_few_records_make_the_same_batch_entry_as_the_columns_do(n):
    """batch_entry builds a few records' entry with struct calls: byte for byte the columns' entry
    (payload lengths 0 to full, the file topic ids given as a list or an array)."""
    topics = TopicTable()
    batch = events(n, start=n, sizes=[(k * 149) % 449 for k in range(n)], topics=topics)
    batch["ext_off"], batch["attempts"], batch["crc32"] = 77, 3, 0xDEADBEEF  # ext_off is not in a row
    fids = [(k % 3) + 1 for k in range(n)]
    want = fmt._batch_entry_numpy(batch, np.array(fids, dtype=np.uint32), 123)
    assert fmt.batch_entry(batch, fids, 123) == want
    assert fmt.batch_entry(batch, np.array(fids, dtype=np.uint32), 123) == want


def three_batches(tmp_path):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    offsets = []
    with open_log(path, topics, flush_events=1) as log:
        for k in range(3):
            offsets.append(path.stat().st_size if k else None)
            log.append(events(100, start=k * 100, topics=topics))
            offsets[-1] = offsets[-1] if k else None
    data = path.read_bytes()
    # entry starts: the first batch follows the topic entries; then one entry per append
    starts = []
    scan = scan_buffer(data, rec.EVENT_DTYPE)
    assert scan.records == 300
    pos = fmt.FILE_HEADER_BYTES
    while pos < len(data):
        _m, length, _c, kind, _w = fmt.ENTRY_HEADER.unpack_from(data, pos)
        if kind == fmt.KIND_BATCH:
            starts.append(pos)
        pos += fmt.ENTRY_HEADER_BYTES + length
    assert len(starts) == 3
    return path, data, starts, topics


@pytest.mark.parametrize("where", ["header", "rows", "payloads"])
def test_a_corrupt_byte_inside_a_batch_entry_skips_that_entry_only(tmp_path, where):
    path, data, starts, topics = three_batches(tmp_path)
    second = starts[1]
    at = {"header": second + 9, "rows": second + fmt.ENTRY_HEADER_BYTES + 8 + fmt.BATCH_ROW_BYTES * 7 + 3,
          "payloads": starts[2] - 10}[where]
    damaged = bytearray(data)
    damaged[at] ^= 0x40
    path.write_bytes(bytes(damaged))
    with capture_logs() as logs:
        r = recover(path, 448)
    assert r.records == 200 and r.dropped_bytes == 0 and [(c.start, c.end) for c in r.corrupt] == [
        (second, starts[2])]
    assert path.read_bytes() == bytes(damaged)  # skipped in place, nothing cut
    assert any(e["event"] == "log_corrupt_regions_skipped" for e in logs)
    with pytest.warns(CorruptLogWarning, match=str(second)):
        seqs = EventLogReader(path).read().records["seq"].tolist()
    assert seqs == list(range(100)) + list(range(200, 300))
    with open_log(path, topics) as log:  # the writer goes on after the damage
        log.append(events(5, start=1000, topics=topics))
    with pytest.warns(CorruptLogWarning):
        assert EventLogReader(path).read().records["seq"].tolist()[-5:] == list(range(1000, 1005))


@pytest.mark.parametrize("cut", [1, 30, 2000])
def test_a_torn_batch_entry_at_the_tail_is_cut(tmp_path, cut):
    path, data, starts, topics = three_batches(tmp_path)
    path.write_bytes(data[:len(data) - cut])
    r = recover(path, 448)
    assert r.records == 200 and r.valid_bytes == starts[2] and "torn" in r.problem and r.saved_tail is None
    assert path.stat().st_size == starts[2]
    assert EventLogReader(path).read().records["seq"].tolist() == list(range(200))


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from eventstream.core import records as rec
    from eventstream.core.topics import TopicTable
    from eventstream.storage import EventLog
    topics = TopicTable()
    tid = topics.intern("kill.batch")
    log = EventLog(sys.argv[1], dtype=rec.EVENT_DTYPE, topics=topics, flush_events=1, fsync="none", flusher=False)
    seq = 0
    rng = np.random.default_rng(1)
    while True:
        n = int(rng.integers(1, 900))
        b = rec.empty(n)
        b["seq"] = np.arange(seq, seq + n)
        b["topic_id"] = tid
        b["payload_len"] = rng.integers(0, 449, size=n)
        log.append(b)  # flush_events=1: every append is one batch entry, written before it returns
        seq += n
        print(seq, flush=True)
""")


def test_kill_9_while_batch_entries_are_written_loses_nothing_written(tmp_path):
    path = tmp_path / "events.bin"
    env = dict(os.environ, PYTHON_GIL="0")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        written = 0
        for line in proc.stdout:
            written = int(line)
            if written >= 50_000:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    r = recover(path, 448)
    assert r.records >= written and not r.corrupt
    recs = EventLogReader(path).read(topic="kill.batch").records
    assert recs["seq"].tolist() == list(range(len(recs)))  # a gapless prefix


def test_a_version_1_log_reads_and_takes_batch_entries_after_it(tmp_path, monkeypatch):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    with monkeypatch.context() as mp:
        mp.setattr(fmt, "record_entries", fmt.record_entries_v1)
        mp.setattr(fmt, "FILE_VERSION", 1)
        with open_log(path, topics) as log:
            log.append(events(50, topics=topics))
    head = path.read_bytes()[:fmt.FILE_HEADER_BYTES]
    assert fmt.FILE_HEADER.unpack_from(head)[1] == 1
    old = EventLogReader(path).read()
    assert old.records["seq"].tolist() == list(range(50))
    with capture_logs() as logs, open_log(path, topics) as log:
        log.append(events(30, start=50, topics=topics))
    assert any(e["event"] == "log_format_upgraded" and e["version_was"] == 1 for e in logs)
    assert fmt.FILE_HEADER.unpack_from(path.read_bytes())[1] == 2  # it now holds batch entries: it says so
    got = EventLogReader(path).read()
    assert got.records["seq"].tolist() == list(range(80))
    assert same(got.records[:50], old.records)


@pytest.mark.parametrize("byte", range(8))
def test_a_damaged_magic_does_not_make_the_log_unreadable(tmp_path, byte):
    path, data, _starts, topics = three_batches(tmp_path)
    damaged = bytearray(data)
    damaged[byte] ^= 0x01
    path.write_bytes(bytes(damaged))
    assert EventLogReader(path).read().records["seq"].tolist() == list(range(300))
    with capture_logs() as logs, open_log(path, topics) as log:
        assert log.recovery.records == 300
    assert any(e["event"] == "log_header_repaired" for e in logs)
    assert path.read_bytes()[:8] == fmt.FILE_MAGIC


def test_something_else_is_still_not_an_event_log(tmp_path):
    path = tmp_path / "events.bin"
    path.write_bytes(b"PNG\x00" * 40)
    with pytest.raises(fmt.LogFormatError, match="not an eventstream event log"):
        EventLogReader(path)


def test_segments_and_retention_with_batch_entries(tmp_path):
    from eventstream.storage.segments import segment_paths

    topics = TopicTable()
    path = tmp_path / "events.bin"
    with open_log(path, topics, flush_events=1, max_segment_bytes=20_000, max_segments=3) as log:
        for k in range(40):
            log.append(events(50, start=k * 50, topics=topics))
    segs = segment_paths(path)
    assert len(segs) == 3  # older ones deleted by retention
    seqs = EventLogReader(path).read().records["seq"].tolist()
    assert seqs == list(range(seqs[0], 2000)) and seqs[0] > 0 and seqs[0] % 50 == 0
    for _, seg in segs:  # each segment reads alone (its header and topic entries are its own)
        alone = EventLogReader(seg).read()
        assert len(alone) and alone.topic_names()[0] in ("a.b", "c")


def test_header_columns_read_every_kind_of_entry_as_batches_do(tmp_path, monkeypatch):
    """EventLogReader.columns (the dedup rebuild's read: header fields straight from batch rows, no
    record built) gives the same fields as batches() over version 1 entries, batch entries and
    segments, and its `since_ns` keeps what was stored at or after it."""
    topics = TopicTable()
    path = tmp_path / "events.bin"
    with monkeypatch.context() as mp:  # a version 1 log first
        mp.setattr(fmt, "record_entries", fmt.record_entries_v1)
        mp.setattr(fmt, "FILE_VERSION", 1)
        with open_log(path, topics) as log:
            log.append(events(40, topics=topics))
    with open_log(path, topics, max_segment_bytes=20_000) as log:
        log.append(events(300, start=40, topics=topics, names=("x", "y", "z")))
        middle = time_ns_between()
        log.append(events(205, start=340, topics=topics))
    fields = ("event_id", "topic_id", "priority", "principal", "seq")
    reader = EventLogReader(path)
    want = reader.read(payloads=False)
    parts = list(reader.columns(fields))
    got = {f: np.concatenate([p.cols[f] for p in parts]) for f in fields}
    assert got["seq"].tolist() == list(range(545))
    names = [p.topics[int(t)] for p in parts for t in p.cols["topic_id"]]
    assert names == [want.topics[int(t)] for t in want.records["topic_id"]]
    for f in ("event_id", "priority", "principal"):
        assert np.array_equal(got[f], want.records[f]), f
    assert np.array_equal(np.concatenate([p.stored_ns for p in parts]), want.stored_ns)
    later = list(reader.columns(("seq",), since_ns=middle))
    assert np.concatenate([p.cols["seq"] for p in later]).tolist() == list(range(340, 545))


def time_ns_between() -> int:
    """A wall-clock instant strictly after every entry appended so far and before any later one."""
    import time

    t0 = time.time_ns()
    while time.time_ns() == t0:
        pass
    return time.time_ns()

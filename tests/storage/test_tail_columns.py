"""storage/tail.py's columnar read (LogTail.read_batch -> TailBatch): version 1 and version 2 logs,
segments, large-payload entries, a corrupt entry skipped, exact offsets, nothing lost or read twice
across reads of any size."""

from __future__ import annotations

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.payloads import PayloadArena, release_records
from eventstream.core.topics import TopicTable
from eventstream.storage import EventLog
from eventstream.storage import format as fmt
from eventstream.storage.tail import LogTail, SegmentIndex

NAMES = ("col.a", "col.b", "other")


def events(n: int, start: int, topics: TopicTable, sizes=None) -> tuple[np.ndarray, list[bytes], list[str]]:
    b = rec.empty(n)
    seq = np.arange(start, start + n, dtype=np.uint64)
    b["seq"] = seq
    b["event_id"] = seq + 1
    b["producer_ts"] = 1_700_000_000_000_000_000 + seq
    b["priority"] = seq % 5
    names = [NAMES[i % len(NAMES)] for i in range(start, start + n)]
    b["topic_id"] = [topics.intern(t) for t in names]
    lens = np.asarray(sizes if sizes is not None else (seq * 7) % 300, dtype=np.int64)
    payloads = [bytes([(start + i) % 251]) * int(k) for i, k in enumerate(lens)]
    b["payload_len"] = lens
    for i, p in enumerate(payloads):
        b["payload"][i, : len(p)] = np.frombuffer(p, np.uint8)
    return b, payloads, names


def write(path, batches, topics, **kw):
    expect = []
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, flush_events=1, fsync="none", **kw) as log:
        start = 0
        for n in batches:
            b, payloads, names = events(n, start, topics)
            log.append(b)
            expect += list(zip(range(start, start + n), names, payloads, strict=True))
            start += n
    return expect


def read_all(tail: LogTail):
    """Every batch until none is left: per event (offset, seq-as-event_id - 1, topic, payload)."""
    got, sizes = [], []
    while (b := tail.read_batch()) is not None:
        assert len(b)
        sizes.append(len(b))
        r = b.rows
        names = [b.topics[t] for t in r["topic"].tolist()]
        joined = b.payload_bytes()
        ends = np.cumsum(r["payload_len"].astype(np.int64)).tolist()
        pays = [joined[a:z] for a, z in zip([0, *ends[:-1]], ends, strict=True)]
        assert [e.payload for e in b.events()] == pays  # the per-event view agrees with the columns
        got += list(zip(r["offset"].tolist(), (r["event_id"] - 1).tolist(), names, pays, strict=True))
    return got, sizes


@pytest.mark.parametrize("chunk", [4096, 1 << 16, 1 << 20])
def test_batch_entries_across_segments_read_exactly_once_with_exact_offsets(tmp_path, chunk):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    expect = write(path, [1, 250, 3, 500, 17, 120], topics, max_segment_bytes=20_000)
    index = SegmentIndex(path, tmp_path / "idx.json", rec.EVENT_DTYPE)
    got, sizes = read_all(LogTail(path, rec.EVENT_DTYPE, index, 0, chunk_bytes=chunk))
    assert [(o, s, t, p) for o, s, t, p in got] == [(i, i, t, p) for i, t, p in expect]
    if chunk == 4096:
        assert len(sizes) >= 5  # about an entry per read: nothing lost or repeated at their edges
    got2, _ = read_all(LogTail(path, rec.EVENT_DTYPE, index, 333, chunk_bytes=chunk))  # from the middle
    assert [g[0] for g in got2] == list(range(333, len(expect))) and got2 == got[333:]


def test_a_version_1_log_then_batch_entries(tmp_path, monkeypatch):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    with monkeypatch.context() as mp:
        mp.setattr(fmt, "record_entries", fmt.record_entries_v1)
        mp.setattr(fmt, "FILE_VERSION", 1)
        expect = write(path, [40, 60], topics)
    b, payloads, names = events(30, 100, topics)
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, flush_events=1, fsync="none") as log:
        log.append(b)
    expect += list(zip(range(100, 130), names, payloads, strict=True))
    index = SegmentIndex(path, tmp_path / "idx.json", rec.EVENT_DTYPE)
    got, _ = read_all(LogTail(path, rec.EVENT_DTYPE, index, 0))
    assert got == [(i, i, t, p) for i, t, p in expect]
    tail = LogTail(path, rec.EVENT_DTYPE, index, 0)
    first = tail.read_batch()
    assert first is not None and len(first.payload_parts()) == 1  # version 1 records: one numpy gather


def test_large_payload_entries_among_batch_entries(tmp_path):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    sizes = [10, 5000, 0, 448, 449, 70_000, 3, 3]
    arena = PayloadArena(8 << 20, (1 << 20) - 4, min_payload=448)
    b = rec.empty(len(sizes), rec.EVENT_DTYPE)
    b["topic_id"] = topics.intern("big")
    b["event_id"] = np.arange(len(sizes)) + 1
    pays = []
    for i, n in enumerate(sizes):
        data = np.random.default_rng(i).bytes(n)
        pays.append(data)
        b["payload_len"][i] = n
        if n > 448:
            offs, cls = arena.claim([n])
            o = int(offs[0])
            arena.buf[o : o + n] = np.frombuffer(data, np.uint8)
            b["ext_off"][i], b["ext_class"][i], b["ext_arena"][i] = o, cls[0], arena.id
        elif n:
            b["payload"][i, :n] = np.frombuffer(data, np.uint8)
    try:
        with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, fsync="none") as log:
            log.append(b)
    finally:
        release_records(b)
        arena.close()
    index = SegmentIndex(path, tmp_path / "i.json", rec.EVENT_DTYPE)
    for chunk in (4096, 1 << 20):  # a chunk smaller than an entry grows until the entry fits
        got, _ = read_all(LogTail(path, rec.EVENT_DTYPE, index, 0, chunk_bytes=chunk))
        assert [g[3] for g in got] == pays
        assert [g[0] for g in got] == list(range(len(sizes)))


def test_a_corrupt_batch_entry_is_skipped_and_offsets_stay_ordinals(tmp_path):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    expect = write(path, [100, 100, 100], topics)
    data = bytearray(path.read_bytes())
    starts, pos = [], fmt.FILE_HEADER_BYTES
    while pos < len(data):
        _m, length, _c, kind, _w = fmt.ENTRY_HEADER.unpack_from(data, pos)
        if kind == fmt.KIND_BATCH:
            starts.append(pos)
        pos += fmt.ENTRY_HEADER_BYTES + length
    assert len(starts) == 3
    data[starts[1] + fmt.ENTRY_HEADER_BYTES + 8 + fmt.BATCH_ROW_BYTES * 5 + 1] ^= 0x10
    path.write_bytes(bytes(data))
    index = SegmentIndex(path, tmp_path / "idx.json", rec.EVENT_DTYPE)
    got, _ = read_all(LogTail(path, rec.EVENT_DTYPE, index, 0, chunk_bytes=8192))
    kept = expect[:100] + expect[200:]
    assert [g[1] for g in got] == [e[0] for e in kept]  # the damaged entry's 100 events are skipped
    assert [g[0] for g in got] == list(range(200))  # offsets count verified events
    assert [g[3] for g in got] == [e[2] for e in kept]


def test_a_time_start_and_a_glob_select_columns(tmp_path):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    write(path, [30], topics)
    index = SegmentIndex(path, tmp_path / "idx.json", rec.EVENT_DTYPE)
    whole = LogTail(path, rec.EVENT_DTYPE, index, 0).read_batch()
    assert whole is not None
    cache: dict[str, bool] = {}
    sel = whole.matching("col.*", cache)
    assert [whole.topics[t] for t in sel.rows["topic"].tolist()] == [NAMES[i % 3] for i in range(30) if i % 3 != 2]
    assert cache == {"col.a": True, "col.b": True, "other": False}
    assert [e.payload for e in sel.events()] == [e.payload for e in whole.events() if e.topic != "other"]
    stored = int(whole.rows["stored_ns"][0])
    late = LogTail(path, rec.EVENT_DTYPE, index, 0, since_ns=stored + 1).read_batch()
    assert late is None  # one entry, stored before the start
    again = LogTail(path, rec.EVENT_DTYPE, index, 0, since_ns=stored).read_batch()
    assert again is not None and again.rows["offset"].tolist() == list(range(30))


@pytest.mark.parametrize("version", [1, 2])
def test_payloads_cut_for_frames_are_the_payloads_in_order(tmp_path, monkeypatch, version):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    with monkeypatch.context() as mp:
        if version == 1:
            mp.setattr(fmt, "record_entries", fmt.record_entries_v1)
            mp.setattr(fmt, "FILE_VERSION", 1)
        expect = write(path, [7, 300, 1, 90, 400], topics)
    batch = LogTail(path, rec.EVENT_DTYPE, SegmentIndex(path, tmp_path / "i.json", rec.EVENT_DTYPE), 0).read_batch()
    assert batch is not None and len(batch) == len(expect)
    whole = b"".join(p for _, _, p in expect)
    rng = np.random.default_rng(version)
    for _ in range(20):
        edges = sorted({0, len(batch), *rng.integers(1, len(batch), size=rng.integers(0, 12)).tolist()})
        cuts = list(zip(edges[:-1], edges[1:], strict=True))
        parts = batch.payload_parts_by(cuts)
        assert b"".join(b"".join(p) for p in parts) == whole
        for (a, z), p in zip(cuts, parts, strict=True):
            assert b"".join(p) == b"".join(e[2] for e in expect[a:z])

"""events.bin stores payloads of every size exactly: KIND_RECORD_EXT entries (record + payload), mixed
with inline ones in one batch, read back whole; a torn tail inside one is cut, damage is skipped."""

from __future__ import annotations

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.core.payloads import PayloadArena, release_records
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt

MIB = 1 << 20
SIZES = [0, 1, 447, 448, 449, 511, 512, 513, 4095, 4096, 4097, 70_000, MIB - 30]


@pytest.fixture
def arena():
    a = PayloadArena(8 * MIB, MIB - 4, min_payload=448)
    yield a
    a.close()


def batch_with(arena, topics, sizes, start=0):
    """Records with payloads of `sizes` as ingest makes them: inline up to 448, else in the arena."""
    b = rec.empty(len(sizes), rec.EVENT_DTYPE)
    tid = topics.intern("big.topic")
    pays = []
    for i, n in enumerate(sizes):
        data = np.random.default_rng(start + i).bytes(n)
        pays.append(data)
        b["seq"][i] = start + i
        b["event_id"][i] = 1000 + start + i
        b["topic_id"][i] = tid
        b["payload_len"][i] = n
        if n > 448:
            offs, cls = arena.claim([n])
            o = int(offs[0])
            arena.buf[o:o + n] = np.frombuffer(data, np.uint8)
            b["ext_off"][i], b["ext_class"][i], b["ext_arena"][i] = o, cls[0], arena.id
        elif n:
            b["payload"][i, :n] = np.frombuffer(data, np.uint8)
    return b, pays


def test_mixed_batch_round_trips_exactly(tmp_path, topics, arena):
    path = tmp_path / "events.bin"
    b, pays = batch_with(arena, topics, SIZES)
    small, small_pays = batch_with(arena, topics, [5, 600, 7], start=100)  # a small batch (struct path)
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        log.append(b)
        log.append(small)
    release_records(b)
    release_records(small)
    assert arena.statistics()["used_bytes"] == 0
    got = EventLogReader(path).read()
    assert got.records["seq"].tolist() == list(range(len(SIZES))) + [100, 101, 102]
    assert got.payloads() == pays + small_pays
    assert [got.payload(i) for i in range(len(got))] == pays + small_pays
    assert (got.records["ext_off"] == 0).all() and (got.records["ext_arena"] == 0).all()
    # filters apply to large-payload entries too
    r = EventLogReader(path)
    assert r.count(topic="big.*") == len(SIZES) + 3 and r.count(topic="other") == 0
    report = recover(path, 448)
    assert report.records == len(SIZES) + 3 and report.dropped_bytes == 0


def test_torn_tail_inside_a_large_entry_is_cut(tmp_path, topics, arena):
    path = tmp_path / "events.bin"
    b, pays = batch_with(arena, topics, [10, 300_000])
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, flush_events=1) as log:
        log.append(b[:1])
        good = path.stat().st_size
        log.append(b[1:])
    release_records(b)
    full = path.stat().st_size
    assert full - good == fmt.ENTRY_HEADER_BYTES + rec.EVENT_DTYPE.itemsize + 300_000
    with open(path, "r+b") as f:
        f.truncate(good + 200_000)  # the write stopped in the middle of the payload
    report = recover(path, 448)
    assert report.valid_bytes == good and report.saved_tail is None  # torn, not damage
    assert path.stat().st_size == good
    got = EventLogReader(path).read()
    assert got.payloads() == pays[:1]


def test_damaged_large_entry_is_skipped_not_misread(tmp_path, topics, arena):
    """A flipped byte inside a large payload: that entry is a corrupt region, the entries after it are
    read, and an entry hidden inside the payload bytes is never taken for a real one."""
    path = tmp_path / "events.bin"
    inner, _ = batch_with(arena, topics, [3])
    fake = fmt.record_entries(inner, [1], 1)  # a whole valid entry as payload bytes
    b, pays = batch_with(arena, topics, [2000, 50], start=10)
    o = int(b["ext_off"][0])
    arena.buf[o:o + len(fake)] = np.frombuffer(fake, np.uint8)
    pays[0] = fake + pays[0][len(fake):]
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, flush_events=1) as log:
        start = path.stat().st_size
        log.append(b)
    release_records(b)
    got = EventLogReader(path).read()
    assert got.payloads() == pays  # the embedded entry is payload, not an entry
    data = bytearray(path.read_bytes())
    # the topic entry comes first; flip a byte in the large payload (past its record)
    ext_at = data.index(fmt.ENTRY_HEADER.pack(fmt.ENTRY_MAGIC, rec.EVENT_DTYPE.itemsize + 2000, 0, 0, 0)[:8], start)
    data[ext_at + fmt.ENTRY_HEADER_BYTES + rec.EVENT_DTYPE.itemsize + 1500] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = EventLogReader(path)
    with pytest.warns(UserWarning, match="corrupt region"):
        got = reader.read()
    assert got.records["seq"].tolist() == [11] and got.payloads() == pays[1:]
    assert reader.last_scan.corrupt[0].start == ext_at


def test_a_tail_delivers_large_payloads_whole(tmp_path, topics, arena):
    """Subscribers read events.bin through LogTail: a large-payload entry is one event with its whole
    payload, at its ordinal offset, also when it is larger than the tail's read chunk."""
    from eventstream.storage.tail import LogTail, SegmentIndex

    path = tmp_path / "events.bin"
    b, pays = batch_with(arena, topics, [5, 300_000, 449, 0, MIB - 30, 12])
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False, flush_events=1) as log:
        log.append(b)
    release_records(b)
    tail = LogTail(path, rec.EVENT_DTYPE, SegmentIndex(path, tmp_path / "idx.json", rec.EVENT_DTYPE), 0)
    got = []
    for _ in range(50):  # each read returns what one chunk holds; bounded
        part = tail.read()
        if not part:
            break
        got += part
    tail.close()
    assert [e.offset for e in got] == list(range(6))
    assert [e.payload for e in got] == pays

"""The log writer gathers the entries of arena payloads (write-through logs): record_entries(gather=True)
gives the entry headers and records as one array's rows and the payloads as views of their slots, and
EventLog writes them with writev(2) instead of copying them into one bytes. The bytes on disk are the
same, short writevs continue where they stopped, and topic entries queued for the batch go first."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.core.payloads import PayloadArena, release_records
from eventstream.core.topics import TopicTable
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import encode_batch_columns
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt
from eventstream.storage import writer as writer_mod

MIB = 1 << 20
_DATA = np.random.default_rng(5).bytes(MIB)


@pytest.fixture(scope="module")
def arena():
    a = PayloadArena(32 * MIB, MIB, min_payload=448, name="test.gathered")
    yield a
    a.close()


def decoded(arena, sizes: list[int], topics: TopicTable, names=("g.a", "g.b")) -> tuple[np.ndarray, list[bytes]]:
    """Records of one BATCH frame as the TCP reader decodes them (arena payloads, kept CRCs)."""
    pays = [_DATA[i : i + n] for i, n in enumerate(sizes)]
    frame = encode_batch_columns(
        list(names),
        np.arange(len(sizes), dtype=np.int64) % len(names),
        np.array(sizes, dtype=np.int64),
        b"".join(pays),
        1,
        np.arange(1, len(sizes) + 1, dtype=np.uint64),
        1,
    )
    dec = FrameDecoder(topics, payload_bytes=448, payloads=arena, max_frame_bytes=4 * MIB)
    records, _idx, errors = dec.feed_indexed(frame)
    assert not errors and len(records) == len(sizes)
    return records, pays


sizes_st = st.lists(st.one_of(st.integers(0, 600), st.integers(449, 70_000)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=sizes_st)
def test_gathered_pieces_are_the_same_bytes(arena, sizes):
    records, _pays = decoded(arena, sizes, TopicTable())
    try:
        fids = np.arange(len(records), dtype=np.uint32) % 3 + 1
        whole = fmt.record_entries(records.copy(), fids, 77)
        pieces = fmt.record_entries(records.copy(), fids, 77, gather=True)
        joined = pieces if isinstance(pieces, bytes) else b"".join(pieces)
        assert joined == whole
        assert isinstance(pieces, list) == any(n > 448 for n in sizes)
        v1 = fmt.record_entries_v1(records.copy(), fids, 77, gather=True)
        assert (v1 if isinstance(v1, bytes) else b"".join(v1)) == fmt.record_entries_v1(records.copy(), fids, 77)
    finally:
        release_records(records)


def test_write_through_log_reads_back_with_its_topics(tmp_path, arena):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    sizes = [10, 5000, 449, 300, 16_384, 70_000, 3]
    records, pays = decoded(arena, sizes, topics)
    with EventLog(path, dtype=records.dtype, topics=topics, flusher=False, flush_events=1) as log:
        log.append(records)  # two new topics: their entries are queued, then written first
        assert log.statistics()["records"] == len(sizes)
    release_records(records)
    got = EventLogReader(path).read()
    assert got.payloads() == pays
    assert got.topic_names() == ["g.a", "g.b"] * 3 + ["g.a"]
    assert recover(path, 448).dropped_bytes == 0


def test_short_writevs_continue_where_they_stopped(tmp_path, arena, monkeypatch):
    topics = TopicTable()
    path = tmp_path / "events.bin"
    sizes = [9000, 20, 12_000, 600, 449]
    records, pays = decoded(arena, sizes, topics)
    expected = fmt.record_entries(records.copy(), np.ones(len(sizes), dtype=np.uint32), 1)
    calls = []

    def short_writev(fd, buffers):  # the kernel may take fewer bytes than offered: here at most 777
        calls.append(len(buffers))
        left, out = 777, []
        for b in buffers:
            m = memoryview(b)[:left]
            out.append(m)
            left -= len(m)
            if not left:
                break
        return os.write(fd, b"".join(out))

    monkeypatch.setattr(writer_mod.os, "writev", short_writev)
    with EventLog(path, dtype=records.dtype, topics=topics, flusher=False, flush_events=1) as log:
        start = path.stat().st_size
        log.append(records)
        end = log.position()[1]
    release_records(records)
    assert len(calls) > 20  # it really was written in short pieces
    data = path.read_bytes()
    assert end == len(data)
    topic_entries = 2 * (fmt.ENTRY_HEADER_BYTES + 4 + len("g.a"))
    assert len(data) - start == topic_entries + len(expected)
    got = EventLogReader(path).read()
    assert got.payloads() == pays
    assert recover(path, 448).dropped_bytes == 0

"""Recovery's parallel scan (storage/recovery.scan_parallel): a large log is verified by several
threads, each from a cut where a verified entry starts; the result must be exactly one scan_buffer
pass's. Every test of test_storage_recovery.py runs again here with every log scanned in parallel,
and damaged logs (version 1 and 2, damage on and across the cuts) are compared with one pass."""

from __future__ import annotations

import numpy as np
import pytest
from test_storage_recovery import *  # noqa: F403 - every recovery test again, scanned in parallel
from test_storage_recovery import _old_format, big_log  # noqa: F401 - its fixtures (v1 logs, the big log)

from eventstream.core import records as rec
from eventstream.core.topics import TopicTable
from eventstream.engine.idempotency import KEY_FIELDS
from eventstream.storage import EventLog, recovery
from eventstream.storage import format as fmt
from eventstream.storage.reader import ColumnCollector
from eventstream.storage.scan import scan_buffer

WRITERS = {2: (fmt.record_entries, fmt.FILE_VERSION), 1: (fmt.record_entries_v1, 1)}  # taken before any pin


@pytest.fixture(autouse=True)
def _parallel(monkeypatch):
    monkeypatch.setattr(recovery, "PARALLEL_MIN_BYTES", 0)


@pytest.fixture(params=[2, 1], ids=["v2", "v1"])
def version(request, monkeypatch):
    """The writer of the logs below: batch entries (version 2, what the service writes) or one
    entry per record (version 1)."""
    entries, file_version = WRITERS[request.param]
    monkeypatch.setattr(fmt, "record_entries", entries)
    monkeypatch.setattr(fmt, "FILE_VERSION", file_version)
    return request.param


def batch_log(path, n_batches: int = 40, per: int = 30) -> bytes:
    topics = TopicTable()
    tids = np.array([topics.intern(f"t{i}") for i in range(5)], dtype=np.uint32)
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        for k in range(n_batches):
            b = rec.empty(per)
            b["event_id"] = np.arange(k * per + 1, (k + 1) * per + 1)
            b["topic_id"] = tids[b["event_id"] % 5]
            b["payload_len"] = 32
            log.append(b)
    return path.read_bytes()


def same(data: bytes, threads: int, since: int = 0, from_offset: int = 0) -> None:
    dtype = rec.EVENT_DTYPE
    one, par = ColumnCollector(KEY_FIELDS, since, from_offset), ColumnCollector(KEY_FIELDS, since, from_offset)
    a = scan_buffer(data, dtype, **one.callbacks())
    b = recovery.scan_parallel(data, dtype, par, threads=threads)
    assert (b.valid_bytes, b.records, b.problem, b.topics, b.corrupt) == (
        a.valid_bytes, a.records, a.problem, a.topics, a.corrupt)
    ra, rb = one.result(), par.result()
    assert (ra is None) == (rb is None)
    if ra is not None and rb is not None:
        for f in KEY_FIELDS:
            assert np.array_equal(ra.cols[f], rb.cols[f])
        assert np.array_equal(ra.stored_ns, rb.stored_ns) and ra.topics == rb.topics


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_an_intact_log_scans_the_same(tmp_path, threads, version):
    data = batch_log(tmp_path / "events.bin")
    assert fmt.FILE_HEADER.unpack(data[: fmt.FILE_HEADER_BYTES])[1] == version
    same(data, threads)
    same(data, threads, from_offset=len(data) // 2 - len(data) // 2 % 8)  # not an entry start: a later one


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_damage_anywhere_scans_the_same(tmp_path, threads, seed, version):
    data = bytearray(batch_log(tmp_path / "events.bin"))
    rng = np.random.default_rng(seed)
    size = len(data)
    spots = [size * k // threads for k in range(1, threads)]  # near the cuts ...
    spots += rng.integers(fmt.FILE_HEADER_BYTES, size, 3).tolist()  # ... and anywhere
    for at in spots:
        at = int(at) + int(rng.integers(-200, 200))
        if fmt.FILE_HEADER_BYTES <= at < size:
            data[at] ^= 0x5A
    if seed % 2:
        data = data[: size - int(rng.integers(1, 3000))]  # and a torn tail
    same(bytes(data), threads)

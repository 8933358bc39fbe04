"""Recovery on open: torn and corrupt tails are cut, counted and logged; a SIGKILLed writer recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from eventstream.core import records as rec
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt

ENTRY = fmt.ENTRY_HEADER_BYTES + rec.EVENT_DTYPE.itemsize


def write_log(path, topics, make_batch, n=50):
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        log.append(make_batch(topics, n))
    return path.stat().st_size


def test_new_file_gets_a_header(tmp_path):
    report = recover(tmp_path / "sub" / "events.bin", 448)
    assert report.created and report.records == 0 and report.dropped_bytes == 0
    assert (tmp_path / "sub" / "events.bin").stat().st_size == fmt.FILE_HEADER_BYTES


def test_torn_header_is_rewritten(tmp_path):
    path = tmp_path / "events.bin"
    path.write_bytes(fmt.FILE_MAGIC[:5])
    report = recover(path, 448)
    assert report.created and report.dropped_bytes == 5 and report.problem == "torn file header"
    assert EventLogReader(path).count() == 0


@pytest.mark.parametrize("cut", [1, 23, 24, 300, ENTRY - 1])
def test_torn_tail_is_truncated(tmp_path, topics, make_batch, cut):
    path = tmp_path / "events.bin"
    size = write_log(path, topics, make_batch)
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        r = log.recovery
        assert r.records == 49 and r.dropped_records == 1
        assert r.valid_bytes == size - ENTRY and r.dropped_bytes == ENTRY - cut
        assert "torn" in r.problem
        log.append(make_batch(topics, 10, start_seq=100))
    got = EventLogReader(path).read()
    assert got.records["seq"].tolist() == list(range(49)) + list(range(100, 110))


def test_corrupt_last_record_is_truncated(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    size = write_log(path, topics, make_batch)
    with open(path, "r+b") as f:
        f.seek(size - 100)
        b = f.read(1)
        f.seek(size - 100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = recover(path, 448)
    assert r.records == 49 and r.dropped_bytes == ENTRY and "CRC mismatch" in r.problem
    assert path.stat().st_size == size - ENTRY


def test_garbage_tail_is_truncated(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    size = write_log(path, topics, make_batch)
    with open(path, "ab") as f:
        f.write(os.urandom(1000))
    r = recover(path, 448)
    assert r.records == 50 and r.dropped_bytes == 1000 and r.dropped_records == 2
    assert EventLogReader(path).count() == 50 and path.stat().st_size == size


def test_intact_log_is_untouched(tmp_path, topics, make_batch):
    path = tmp_path / "events.bin"
    size = write_log(path, topics, make_batch)
    r = recover(path, 448)
    assert (r.records, r.dropped_bytes, r.problem, r.created) == (50, 0, None, False)
    assert path.stat().st_size == size


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from eventstream.core import records as rec
    from eventstream.core.topics import TopicTable
    from eventstream.storage import EventLog
    topics = TopicTable()
    tid = topics.intern("kill.test")
    log = EventLog(sys.argv[1], dtype=rec.EVENT_DTYPE, topics=topics, flush_events=1, fsync="none", flusher=False)
    seq = 0
    while True:
        b = rec.empty(37)
        b["seq"] = np.arange(seq, seq + 37)
        b["topic_id"] = tid
        log.append(b)  # flush_events=1: every append is written before it returns
        seq += 37
        print(seq, flush=True)
""")


def test_sigkill_mid_stream_recovers_every_written_record(tmp_path):
    path = tmp_path / "events.bin"
    env = dict(os.environ, PYTHON_GIL="0")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        written = 0
        for line in proc.stdout:  # wait for real progress, then kill without warning
            written = int(line)
            if written >= 37 * 200:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    r = recover(path, 448)
    assert r.records >= written
    seqs = EventLogReader(path).read(topic="kill.test").records["seq"]
    assert seqs.tolist() == list(range(len(seqs)))  # a gapless prefix: nothing lost, nothing duplicated

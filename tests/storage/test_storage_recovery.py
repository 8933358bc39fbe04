"""Recovery on open: torn and corrupt tails are cut, counted and logged; a SIGKILLed writer recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from eventstream.core import records as rec
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt

ENTRY = fmt.ENTRY_HEADER_BYTES + rec.EVENT_DTYPE.itemsize


@pytest.fixture(autouse=True)
def _old_format(v1_writer):
    """These tests pin the geometry of version 1 logs (one entry per record): old logs still read,
    recover and rotate as they did. tests/storage/test_batch_entries.py covers version 2."""


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
    # garbage is not a torn write: its bytes were copied aside before the cut
    assert r.saved_tail is not None and len(open(r.saved_tail, "rb").read()) == 1000


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


# ---------------------------------------------------------------------------------- damage in the middle
# Hardening issue #11 item 5: one flipped byte in the middle of events.bin made a restart truncate the
# 50,001 valid records after it. Damage is now skipped in place and reported; only a torn tail is cut.

from structlog.testing import capture_logs  # noqa: E402

from eventstream.cli.main import main as cli_main  # noqa: E402
from eventstream.storage.scan import CorruptLogWarning  # noqa: E402

N_BIG = 50_000


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    """A 50,000-record log (3 topic entries first, then record entries): bytes and where entry k starts."""
    from eventstream.core.topics import TopicTable

    def batch(topics, n):
        b = rec.empty(n)
        b["seq"] = np.arange(n, dtype=np.uint64)
        b["event_id"] = b["seq"] + 1
        b["priority"] = b["seq"] % 5
        b["topic_id"] = np.array([topics.intern(t) for t in ("a", "b", "c")], dtype=np.uint32)[b["seq"] % 3]
        b["payload_len"] = 448
        b["payload"] = np.frombuffer(np.random.default_rng(5).bytes(n * 448), dtype=np.uint8).reshape(n, 448)
        return b

    path = tmp_path_factory.mktemp("big") / "events.bin"
    with pytest.MonkeyPatch.context() as mp:  # a version 1 log, as _old_format makes for every test
        mp.setattr(fmt, "record_entries", fmt.record_entries_v1)
        mp.setattr(fmt, "FILE_VERSION", 1)
        write_log(path, TopicTable(), batch, n=N_BIG)
    data = path.read_bytes()
    first = len(data) - N_BIG * ENTRY
    return data, first


def record_offset(first: int, k: int) -> int:
    return first + k * ENTRY


def damaged_copy(tmp_path, big_log, edits) -> tuple:
    data, first = big_log
    buf = bytearray(data)
    for off, new in edits:
        buf[off:off + len(new)] = new
    path = tmp_path / "events.bin"
    path.write_bytes(bytes(buf))
    return path, bytes(buf), first


def flip(data: bytes, off: int) -> tuple[int, bytes]:
    return off, bytes([data[off] ^ 0x5A])


def seqs_of(path) -> list[int]:
    return EventLogReader(path).read().records["seq"].tolist()


def test_one_corrupt_byte_in_the_middle_keeps_every_other_record(tmp_path, big_log, topics, make_batch):
    data, first = big_log
    k = N_BIG // 2
    at = record_offset(first, k) + 300  # inside record k's payload
    path, damaged, _ = damaged_copy(tmp_path, big_log, [flip(data, at)])
    with capture_logs() as logs:
        with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
            r = log.recovery
            assert r.records == N_BIG - 1 and r.skipped_records == 1
            assert [(c.start, c.end) for c in r.corrupt] == [(record_offset(first, k), record_offset(first, k + 1))]
            assert "CRC mismatch" in r.corrupt[0].reason and str(record_offset(first, k)) in r.problem
            assert r.dropped_bytes == 0 and r.saved_tail is None
            assert path.read_bytes() == damaged  # nothing rewritten, nothing cut
            log.append(make_batch(topics, 10, start_seq=100_000))
    warn = [e for e in logs if e["event"] == "log_corrupt_regions_skipped"]
    assert warn and warn[0]["log_level"] == "warning" and warn[0]["regions"] == 1
    assert warn[0]["first"][0]["start"] == record_offset(first, k)
    assert not [e for e in logs if e["event"] == "log_tail_truncated"]
    expected = [s for s in range(N_BIG) if s != k] + list(range(100_000, 100_010))
    with pytest.warns(CorruptLogWarning, match=str(record_offset(first, k))):
        assert seqs_of(path) == expected
    # and the next restart finds the same damage, still skips it, still keeps everything
    r2 = recover(path, 448)
    assert r2.records == N_BIG - 1 + 10 and len(r2.corrupt) == 1 and r2.dropped_bytes == 0


def test_several_corrupt_regions(tmp_path, big_log):
    data, first = big_log
    a, b, c = 100, 20_000, 40_000
    edits = [
        flip(data, record_offset(first, a) + 100),  # a byte in a record's header (its seq): CRC
        (record_offset(first, b), b"\x00\x00\x00\x00"),  # an entry magic zeroed
        (record_offset(first, c) + 200, bytes(range(256)) * 3),  # 768 bytes of garbage over c and c+1
    ]
    path, damaged, _ = damaged_copy(tmp_path, big_log, edits)
    r = recover(path, 448)
    lost = {a, b, c, c + 1}
    assert r.records == N_BIG - len(lost) and r.skipped_records == len(lost)
    assert [(x.start, x.end) for x in r.corrupt] == [
        (record_offset(first, a), record_offset(first, a + 1)),
        (record_offset(first, b), record_offset(first, b + 1)),
        (record_offset(first, c), record_offset(first, c + 2)),
    ]
    assert "bad entry magic" in r.corrupt[1].reason
    assert path.read_bytes() == damaged and r.dropped_bytes == 0
    with pytest.warns(CorruptLogWarning):
        assert seqs_of(path) == [s for s in range(N_BIG) if s not in lost]


def test_a_length_field_claiming_a_huge_length_is_not_trusted(tmp_path, big_log):
    data, first = big_log
    k = 31_337
    path, damaged, _ = damaged_copy(tmp_path, big_log, [(record_offset(first, k) + 4, b"\xf0\xff\xff\xff")])
    r = recover(path, 448)
    assert r.records == N_BIG - 1 and len(r.corrupt) == 1
    assert (r.corrupt[0].start, r.corrupt[0].end) == (record_offset(first, k), record_offset(first, k + 1))
    assert "length 4294967280" in r.corrupt[0].reason
    assert path.read_bytes() == damaged
    with pytest.warns(CorruptLogWarning):
        assert seqs_of(path) == [s for s in range(N_BIG) if s != k]


def test_corrupt_middle_and_torn_tail_together(tmp_path, big_log):
    data, first = big_log
    k = 7
    path, damaged, _ = damaged_copy(tmp_path, big_log, [flip(data, record_offset(first, k) + 64)])
    with open(path, "r+b") as f:
        f.truncate(len(data) - 100)  # the last entry torn
    r = recover(path, 448)
    assert r.records == N_BIG - 2 and len(r.corrupt) == 1 and r.corrupt[0].start == record_offset(first, k)
    assert r.dropped_bytes == ENTRY - 100 and r.dropped_records == 1 and r.saved_tail is None
    assert path.stat().st_size == len(data) - ENTRY  # only the torn tail was cut
    assert path.read_bytes() == damaged[:len(data) - ENTRY]
    with pytest.warns(CorruptLogWarning):
        assert seqs_of(path) == [s for s in range(N_BIG - 1) if s != k]


def test_a_corrupt_complete_tail_is_copied_aside_before_it_is_cut(tmp_path, big_log):
    """The last entry is whole but its length field is damaged: not a torn write, so its bytes are
    kept in events.bin.corrupt-<ts> before the cut (appends must not follow garbage)."""
    data, first = big_log
    last = record_offset(first, N_BIG - 1)
    path, damaged, _ = damaged_copy(tmp_path, big_log, [(last + 4, b"\xf0\xff\xff\xff")])
    r = recover(path, 448)
    assert r.records == N_BIG - 1 and r.corrupt == [] and r.dropped_bytes == ENTRY
    assert r.saved_tail is not None and ".corrupt-" in r.saved_tail
    saved = tmp_path / r.saved_tail.rsplit("/", 1)[1]
    assert saved.read_bytes() == damaged[last:]
    assert path.read_bytes() == damaged[:last]


def test_dump_skips_and_reports_the_corrupt_region(tmp_path, big_log, capsys):
    data, first = big_log
    k = 12_345
    path, _damaged, _ = damaged_copy(tmp_path, big_log, [flip(data, record_offset(first, k) + 500)])
    with pytest.warns(CorruptLogWarning):
        assert cli_main(["dump", str(path), "--count"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(N_BIG - 1)
    assert "corrupt region" in err and str(record_offset(first, k)) in err


def test_an_entry_forged_inside_a_damaged_record_payload_is_not_adopted(tmp_path, topics):
    """A client controls payload bytes: a payload holding a well-formed topic entry must not become
    part of the log when the record around it is damaged (the resync tries the record's own end first)."""
    forged = fmt.topic_entry(1, b"forged.topic", 0)
    b = rec.empty(20)
    b["seq"] = np.arange(20)
    b["topic_id"] = topics.intern("real.topic")
    for i in range(20):
        rec.set_payload(b[i:i + 1][0], b"x" * 16 + forged + b"y" * 16)
    path = tmp_path / "events.bin"
    with EventLog(path, dtype=rec.EVENT_DTYPE, topics=topics, flusher=False) as log:
        log.append(b)
    data = path.read_bytes()
    first = len(data) - 20 * ENTRY
    k = 9
    buf = bytearray(data)
    buf[first + k * ENTRY + fmt.ENTRY_HEADER_BYTES + 64 + 5] ^= 1  # a payload byte before the forged entry
    path.write_bytes(bytes(buf))
    r = recover(path, 448)
    assert r.topics == {1: "real.topic"} and r.records == 19
    assert [(c.start, c.end) for c in r.corrupt] == [(first + k * ENTRY, first + (k + 1) * ENTRY)]
    with pytest.warns(CorruptLogWarning):
        got = EventLogReader(path).read()
    assert set(got.topic_names()) == {"real.topic"} and len(got) == 19

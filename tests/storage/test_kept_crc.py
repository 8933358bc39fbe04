"""A large payload passes zlib.crc32 once: the decoder keeps its CRC (core/payloads.py) and the log
writer derives the entry's CRC from it (core/crc.py). The entries are the same bytes as without it,
damaged frames are still refused, and 1 MiB payloads sent over real sockets (single and BATCH frames)
are stored, dumped and replayed whole."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.core import records as rec
from eventstream.core.crc import COMBINE_MIN_BYTES
from eventstream.core.payloads import CRC_KEPT, PayloadArena, payload_list, release_records
from eventstream.core.topics import TopicTable
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import encode_batch, encode_v2
from eventstream.service import Service
from eventstream.storage import EventLog, EventLogReader, recover
from eventstream.storage import format as fmt

MIB = 1 << 20
_DATA = np.random.default_rng(3).bytes(2 * MIB)


def pay(n: int, salt: int) -> bytes:
    at = (salt * 7919) % (len(_DATA) - n + 1)
    return _DATA[at : at + n]


@pytest.fixture(scope="module")
def arena():
    a = PayloadArena(32 * MIB, MIB, min_payload=448, name="test.kept_crc")
    yield a
    a.close()


def stripped(records: np.ndarray) -> np.ndarray:
    """The records as a decoder without kept CRCs makes them (marker and inline bytes zero)."""
    out = records.copy()
    raw = out.view(np.uint8).reshape(len(out), out.dtype.itemsize)
    kept = raw[:, 63] == CRC_KEPT
    raw[kept, 63] = 0
    raw[kept, 64:72] = 0
    return out


sizes_st = st.lists(
    st.one_of(st.integers(0, 600), st.integers(COMBINE_MIN_BYTES - 2, COMBINE_MIN_BYTES + 2), st.integers(0, 300_000)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sizes=sizes_st, batch=st.booleans(), salt=st.integers(0, 1000))
def test_entries_are_the_same_bytes_with_and_without_kept_crcs(tmp_path_factory, arena, sizes, batch, salt):
    topics = TopicTable()
    events = [(f"t{i % 3}", pay(n, salt + i), 2, i + 1) for i, n in enumerate(sizes)]
    if batch:
        data = encode_batch(events)
    else:
        data = b"".join(encode_v2(t, p, pr, e) for t, p, pr, e in events)
    dec = FrameDecoder(topics, max_frame_bytes=2 * MIB, payload_bytes=448, payloads=arena)
    records, errors = dec.feed(data)
    assert errors == [] and len(records) == len(sizes)
    try:
        lens = records["payload_len"]
        marked = records.view(np.uint8).reshape(len(records), -1)[:, 63] == CRC_KEPT
        assert marked.tolist() == (lens >= COMBINE_MIN_BYTES).tolist()  # every large one, no other
        fids = np.arange(1, len(records) + 1, dtype=np.uint32)
        with_kept = fmt.record_entries(records, fids, 1234)
        without = fmt.record_entries(stripped(records), fids, 1234)
        assert with_kept == without
        path = tmp_path_factory.mktemp("kept") / "events.bin"
        with EventLog(path, dtype=records.dtype, topics=topics, flusher=False) as log:
            log.append(records)
        got = EventLogReader(path).read()
        assert got.payloads() == [e[1] for e in events]  # every entry's CRC checked on read
        report = recover(path, 448)
        assert report.corrupt == [] and report.dropped_records == 0
    finally:
        release_records(records)


@pytest.mark.parametrize("batch", [False, True])
def test_a_damaged_large_payload_is_still_refused(arena, batch):
    topics = TopicTable()
    big = pay(100_000, 1)
    if batch:
        data = bytearray(encode_batch([("a", b"x", 2, 1), ("a", big, 2, 2), ("a", b"y", 2, 3)]))
    else:
        data = bytearray(encode_v2("a", b"x", 2, 1) + encode_v2("a", big, 2, 2) + encode_v2("a", b"y", 2, 3))
    data[len(data) // 2] ^= 0x40  # inside the large payload
    dec = FrameDecoder(topics, max_frame_bytes=2 * MIB, payload_bytes=448, payloads=arena)
    records, errors = dec.feed(bytes(data))
    release_records(records)
    if batch:  # the batch's one CRC covers all three
        assert len(records) == 0 and [e.error_class for e in errors] == ["crc"] * 3
    else:
        assert records["event_id"].tolist() == [1, 3] and [(e.index, e.error_class) for e in errors] == [(2, "crc")]


def test_no_arena_or_no_room_inline_keeps_nothing(arena):
    topics = TopicTable()
    frames = encode_v2("a", pay(50_000, 2), 2, 1) + encode_batch([("a", pay(40_000, 3), 2, 2)])
    dec = FrameDecoder(topics, max_frame_bytes=2 * MIB, payload_bytes=4, payloads=arena)  # < 8 inline bytes
    records, errors = dec.feed(frames)
    assert errors == [] and len(records) == 2
    assert (records.view(np.uint8).reshape(2, -1)[:, 63] == 0).all()
    assert payload_list(records) == [pay(50_000, 2), pay(40_000, 3)]
    release_records(records)


def _cfg(data):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
            "storage.data_dir": str(data), "storage.fsync": "none"}
    return load_config(environ={}, overrides=over)


def test_one_mib_payloads_through_sockets_are_stored_dumped_and_replayed_whole(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # 1 MiB payloads as large as the default server.tcp.max_frame_bytes (1 MiB) lets them be, which
    # `eventstream replay` (a client with the default limit) must send again
    pays = {i + 1: pay(MIB - 40 - (i % 3), i) for i in range(6)}
    seen: list[tuple[int, int, bool]] = []

    def handler(batch):
        raw = batch.records.view(np.uint8).reshape(len(batch), -1)
        for i, v in enumerate(batch.payloads()):
            seen.append((int(batch.records["event_id"][i]), int(raw[i, 63]), v.readonly))

    with Service(_cfg(a), handlers={"transactional": handler}) as svc:
        for frame, ids in (("single", [1, 2, 3]), ("batch", [4, 5, 6])):
            with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=60, frame=frame) as c:
                for eid in ids:
                    c.send("big.one", pays[eid], priority=2, event_id=eid)
                c.flush()
                assert c.wait_acked(60) and c.nacked == 0
    # the writer had every payload's CRC from the decoder (and handlers could not change the bytes)
    assert sorted(seen) == [(eid, CRC_KEPT, True) for eid in sorted(pays)]
    stored = EventLogReader(a / "events.bin").read()
    assert dict(zip(stored.records["event_id"].tolist(), stored.payloads(), strict=True)) == pays
    env = dict(os.environ, PYTHON_GIL="0")
    r = subprocess.run([sys.executable, "-m", "eventstream", "dump", str(a / "events.bin"), "--format", "jsonl"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    dumped = {}
    for line in r.stdout.splitlines():
        d = json.loads(line)
        dumped[d["event_id"]] = d["payload"].encode() if "payload" in d else base64.b64decode(d["payload_b64"])
    assert dumped == pays
    with Service(_cfg(b)) as svc:
        r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(a / "events.bin"),
                            "--port", str(svc.tcp.address[1])], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
    back = EventLogReader(b / "events.bin").read()
    assert dict(zip(back.records["event_id"].tolist(), back.payloads(), strict=True)) == pays
    assert recover(a / "events.bin", 448).corrupt == [] and recover(b / "events.bin", 448).corrupt == []

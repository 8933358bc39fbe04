"""Payloads of every size up to max_frame_bytes through the real service over real TCP: handled
(zero-copy views), stored in events.bin, dead-lettered, dumped and replayed exactly; a full payload
arena pushes the client back and loses nothing."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.core.payloads import chunk_bytes_for
from eventstream.engine.dlq_reader import read_dlq
from eventstream.service import Service
from eventstream.storage import EventLogReader

MIB = 1 << 20
TOPIC_LEN = 7  # "p000001"
MAX_PAYLOAD = MIB - 26 - TOPIC_LEN  # a v2 frame of exactly max_frame_bytes
INLINE = 448


def boundaries() -> list[int]:
    out = {0, 1, INLINE - 1, INLINE, INLINE + 1, MAX_PAYLOAD - 1, MAX_PAYLOAD}
    size = 512
    while size <= chunk_bytes_for(MAX_PAYLOAD):  # every size class of the arena, +-1
        out |= {size - 1, size, size + 1}
        size *= 2
    return sorted(s for s in out if 0 <= s <= MAX_PAYLOAD)


BOUNDARIES = boundaries()


def payload_for(n: int, salt: int) -> bytes:
    return np.random.default_rng(n * 7919 + salt).bytes(n)


def cfg_for(data, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "storage.fsync": "none"}
    over.update(extra)
    return load_config(environ={}, overrides=over)


class Checker:
    """Transactional handler: checks every payload it sees against the frame's crc32 (topic +
    payload), through the zero-copy views; the realtime handler fails (its events go to the DLQ)."""

    def __init__(self, topics_of):
        self.topics_of = topics_of
        self.bad: list[str] = []
        self.seen = 0
        self.views_ok = True

    def transactional(self, batch):
        names = batch.topic_names()
        crcs = batch.records["crc32"].tolist()
        for i, view in enumerate(batch.payloads()):
            if not isinstance(view, memoryview):
                self.views_ok = False
            if zlib.crc32(view, zlib.crc32(names[i].encode())) != crcs[i]:
                self.bad.append(f"{names[i]}#{i}: {len(view)} bytes differ from what was sent")
        self.seen += len(batch)

    @staticmethod
    def realtime(batch):
        raise RuntimeError("realtime handler refuses (test: send these to the DLQ)")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    data = tmp_path_factory.mktemp("large") / "data"
    checker = Checker(None)
    svc = Service(cfg_for(data), handlers={"transactional": checker.transactional, "realtime": checker.realtime})
    svc.start()
    try:
        yield svc, data, checker
    finally:
        svc.stop()


_counter = itertools.count(1)
sizes_st = st.lists(st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, MAX_PAYLOAD), st.integers(0, 20_000)),
                    min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sizes=sizes_st, to_dlq=st.lists(st.booleans(), min_size=6, max_size=6))
def test_every_size_round_trips_through_the_service(engine, sizes, to_dlq):
    svc, data, checker = engine
    k = next(_counter)
    topic = f"p{k:06d}"
    sent = {}
    # single frames: each record then carries its frame's crc32, which the handler checks (a BATCH
    # frame's events carry 0: the batch's one CRC covered them)
    with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=60, frame="single") as c:
        for i, n in enumerate(sizes):
            payload = payload_for(n, k)
            prio = 3 if to_dlq[i] else 2  # HIGH: the realtime handler fails it -> DLQ; MEDIUM: stored
            eid = k * 100 + i + 1
            c.send(topic, payload, priority=prio, event_id=eid)
            sent[eid] = (payload, to_dlq[i])
        c.flush()
        assert c.wait_acked(60), "not every event was ACKed"
        assert c.nacked == 0, c.nacks
    stored = EventLogReader(data / "events.bin").read(topic=topic)
    got = dict(zip(stored.records["event_id"].tolist(), stored.payloads()))
    dlq = {e.event_id: e.payload for e in read_dlq(data / "dlq_log.txt") if e.topic == topic}
    for eid, (payload, dead) in sent.items():
        where = dlq if dead else got
        assert eid in where, f"event {eid} ({len(payload)} bytes) missing from {'DLQ' if dead else 'events.bin'}"
        assert where[eid] == payload, f"event {eid}: {len(payload)} bytes not stored exactly"
    assert checker.bad == [] and checker.views_ok
    assert svc.engine.payloads.statistics()["bad_release"] == 0


def test_arena_is_empty_after_the_traffic(engine):
    svc, _data, _checker = engine
    # every payload stored or dead-lettered gave its slot back (the processors release them)
    deadline = time.monotonic() + 10
    while svc.engine.payloads.statistics()["used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.01)
    st_ = svc.engine.payloads.statistics()
    assert st_["used_bytes"] == 0 and st_["claimed"] == st_["released"], st_


def test_frame_over_max_frame_is_still_a_framing_error(engine):
    svc, _data, _checker = engine
    with pytest.raises(ValueError, match=r"allowed: payloads of 0\.\.1048543 bytes with this topic"):
        with TcpClient("127.0.0.1", svc.tcp.address[1]) as c:
            c.send("p999999", b"x" * (MAX_PAYLOAD + 1))
    # sent raw, the server closes the connection with a framing NACK naming the limit
    import socket

    from eventstream.protocol.frames import encode_v2, split_control_frames

    frame = encode_v2("p999999", b"x" * (MAX_PAYLOAD + 1), 2, 7, 0)
    with socket.create_connection(("127.0.0.1", svc.tcp.address[1]), timeout=30) as s:
        s.sendall(frame[:64])
        buf = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    frames = split_control_frames(buf)
    assert any(kind == 3 and b"exceeds max_frame_bytes" in payload for kind, _v, payload in frames), frames


def test_dump_and_replay_round_trip_every_boundary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sizes = BOUNDARIES
    pays = {i + 1: payload_for(n, 99) for i, n in enumerate(sizes)}
    with Service(cfg_for(a)) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=60) as c:
            for eid, p in pays.items():
                c.send("b000001", p, priority=2, event_id=eid)
            c.flush()
            assert c.wait_acked(60) and c.nacked == 0
    env = dict(os.environ, PYTHON_GIL="0")
    r = subprocess.run([sys.executable, "-m", "eventstream", "dump", str(a / "events.bin"), "--format", "jsonl"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    dumped = {}
    for line in r.stdout.splitlines():
        d = json.loads(line)
        dumped[d["event_id"]] = d["payload"].encode() if "payload" in d else base64.b64decode(d["payload_b64"])
    assert dumped == pays
    with Service(cfg_for(b)) as svc:
        r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(a / "events.bin"),
                            "--port", str(svc.tcp.address[1])], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
    back = EventLogReader(b / "events.bin").read()
    assert dict(zip(back.records["event_id"].tolist(), back.payloads())) == pays


def test_full_arena_pushes_the_client_back_and_loses_nothing(tmp_path):
    """An arena of two 1 MiB chunks and a handler that waits: the reader stops reading (pushback)
    instead of dropping or growing; once the handler goes on, every event is stored exactly."""
    gate = threading.Event()
    entered = threading.Event()

    def slow(batch):
        entered.set()
        assert gate.wait(60), "the test never opened the gate"

    cfg = cfg_for(tmp_path / "data", **{"payloads.arena_bytes": 2 * MIB})
    pays = {i + 1: payload_for(600_000 + i, 5) for i in range(12)}  # each takes a whole 1 MiB slot
    with Service(cfg, handlers={"transactional": slow}) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=60, batch_size=1) as c:
            sent = threading.Event()

            def send_all():  # its own thread: pushback may block it in sendall until the gate opens
                for eid, p in pays.items():
                    c.send("full.t", p, priority=2, event_id=eid)
                c.flush()
                sent.set()

            sender = threading.Thread(target=send_all)
            sender.start()
            assert entered.wait(30)
            deadline = time.monotonic() + 30
            while svc.engine.payloads.statistics()["full"] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)  # waiting for the reader to hit the full arena (bounded)
            st_ = svc.engine.payloads.statistics()
            assert st_["full"] >= 1 and st_["bytes"] == 2 * MIB and st_["used_bytes"] <= 2 * MIB
            assert c.acked < len(pays)
            gate.set()
            sender.join(60)
            assert sent.is_set() and not sender.is_alive()
            assert c.wait_acked(60) and c.nacked == 0
        stats = svc.tcp.statistics()
        text = svc.metrics.render().decode()
        full = [ln for ln in text.splitlines() if ln.startswith("payload_arena_full_total ")]
        assert full and float(full[0].split()[1]) >= 1, text[:2000]
        assert "payload_arena_used_bytes " in text
    assert stats["holds"] >= 1
    got = EventLogReader(tmp_path / "data" / "events.bin").read()
    assert dict(zip(got.records["event_id"].tolist(), got.payloads())) == pays
    assert not (tmp_path / "data" / "dlq_log.txt").exists() or not list(read_dlq(tmp_path / "data" / "dlq_log.txt"))


def test_arena_config_errors_name_the_key(tmp_path):
    from eventstream.config import ConfigError

    with pytest.raises(ConfigError, match=r"payloads\.arena_bytes: 1048576 is not allowed; allowed: at least 2097152"):
        cfg_for(tmp_path, **{"payloads.arena_bytes": MIB})
    with pytest.raises(ConfigError, match=r"payloads\.arena_bytes.*allowed: an integer"):
        cfg_for(tmp_path, **{"payloads.arena_bytes": "lots"})

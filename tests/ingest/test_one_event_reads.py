"""Reads of exactly one v2 frame (the round trip at low load: send one event, wait for its reply) go
the short way (the decoder's one-frame path, the bus's one-record route, the lane on the reader,
Delivery's all-placed return). Every rule still holds there: NACKs, duplicates, admission, synced
ACKs, held records. Real Service, real sockets; each frame is sent only after the reply to the one
before it, so each is one read."""

from __future__ import annotations

import socket
import time

from eventstream.config import load_config
from eventstream.core.records import ACK_SYNCED
from eventstream.engine.control import Level
from eventstream.engine.levels import LevelActions
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2, split_control_frames
from eventstream.service import Service
from eventstream.storage import EventLogReader


def cfg(data, **extra):
    over = {"server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
            "server.subscribe.enabled": False, "storage.data_dir": str(data), "storage.fsync": "none"}
    over.update(extra)
    return load_config(environ={}, overrides=over)


class Conn:
    def __init__(self, svc: Service):
        self.sock = socket.create_connection(svc.tcp.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.frames: list[tuple[int, int, bytes]] = []

    def reply(self, frame: bytes, timeout: float = 30.0) -> tuple[int, int, bytes]:
        """Send one frame, return the next control frame (ACK or NACK)."""
        have = len(self.frames)
        self.sock.sendall(frame)
        return self.next(have, timeout)

    def next(self, have: int, timeout: float = 30.0) -> tuple[int, int, bytes]:
        deadline = time.monotonic() + timeout
        while len(self.frames) <= have:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply within {timeout} s: {self.frames}"
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            assert data, "server closed the connection"
            self.buf += data
            self.frames += split_control_frames(self.buf)
        return self.frames[have]

    def silent_for(self, seconds: float) -> bool:
        """Nothing arrives within `seconds` (the event is held: no reply can come)."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buf += data
        self.frames += split_control_frames(self.buf)
        return False

    def close(self) -> None:
        self.sock.close()


def stored(data) -> list[int]:
    path = data / "events.bin"
    return EventLogReader(path).read().records["event_id"].tolist() if path.exists() else []


def corrupt(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[-1] ^= 0xFF  # a payload byte: the frame's crc32 no longer matches
    return bytes(b)


def test_a_one_event_read_with_a_bad_crc_is_nacked_and_the_next_ones_are_acked(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        assert c.reply(encode_v2("t", b"a" * 64, 2, 1))[:2] == (KIND_ACK, 1)
        kind, index, reason = c.reply(corrupt(encode_v2("t", b"b" * 64, 2, 2)))
        assert (kind, index) == (KIND_NACK, 2) and b"crc" in reason.lower()
        assert c.reply(encode_v2("t", b"c" * 64, 2, 3))[:2] == (KIND_ACK, 2)  # events accepted so far
        c.close()
    finally:
        svc.stop()
    assert stored(tmp_path / "data") == [1, 3]


def test_a_duplicate_sent_alone_is_acked_and_stored_once(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        for n in (1, 2, 3):
            assert c.reply(encode_v2("t", b"x", 2, 7))[:2] == (KIND_ACK, n)
        assert svc.metrics.dedup_hits_total() == 2
        assert c.reply(encode_v2("u", b"x", 2, 7))[:2] == (KIND_ACK, 4)  # another topic: another key
        c.close()
    finally:
        svc.stop()
    assert stored(tmp_path / "data") == [7, 7]


def test_at_emergency_a_one_event_read_is_held_until_admitted_and_critical_goes_on(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    levels = LevelActions(svc.engine)
    try:
        c, rt = Conn(svc), Conn(svc)
        assert c.reply(encode_v2("t", b"x", 2, 1))[:2] == (KIND_ACK, 1)
        levels.on_level(Level.EMERGENCY, Level.HEALTHY)  # only CRITICAL admitted
        have = len(c.frames)
        c.sock.sendall(encode_v2("t", b"x", 2, 2))  # MEDIUM: held by the reader, not stored, not ACKed
        assert c.silent_for(0.3)
        assert rt.reply(encode_v2("r", b"x", 4, 9))[:2] == (KIND_ACK, 1)  # CRITICAL (4) still goes in
        assert 2 not in stored(tmp_path / "data")
        levels.on_level(Level.HEALTHY, Level.EMERGENCY)
        assert c.next(have)[:2] == (KIND_ACK, 2)
        c.close()
        rt.close()
    finally:
        svc.stop()
    assert sorted(stored(tmp_path / "data")) == [1, 2, 9]


def test_a_synced_one_event_read_is_acked_after_its_fsync(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        assert c.reply(encode_v2("t", b"x", 2, 1))[:2] == (KIND_ACK, 1)
        before = svc.engine.event_log.statistics()["synced_records"]
        assert before == 0  # storage.fsync none: nothing fsynced for `stored` ACKs
        assert c.reply(encode_v2("t", b"x", 2, 2, flags=ACK_SYNCED))[:2] == (KIND_ACK, 2)
        assert svc.engine.event_log.statistics()["synced_records"] >= 2  # the fsync covered it before the ACK
        c.close()
    finally:
        svc.stop()

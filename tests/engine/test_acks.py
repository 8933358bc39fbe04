"""What an ACK promises, per mode, against a real Service over real sockets (docs/protocol.md).

* accepted: the ACK may leave while the handler still holds the event;
* stored (default): never before the event is in events.bin (written to the OS);
* synced: never before an fsync that covers it;
and ACKs are watermarks: they leave when their events are complete, without further traffic, and a
realtime event does not wait behind blocked bulk traffic.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from eventstream.config import load_config
from eventstream.core.records import ACK_ACCEPTED, ACK_SYNCED
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2, split_control_frames
from eventstream.service import Service
from eventstream.storage import EventLogReader


def cfg(data, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "storage.fsync": "none"}
    over.update(extra)
    return load_config(environ={}, overrides=over)


class Conn:
    """A raw v2 connection that collects ACK/NACK frames."""

    def __init__(self, svc: Service):
        self.sock = socket.create_connection(svc.tcp.address)
        self.sock.settimeout(30)
        self.buf = bytearray()
        self.frames: list[tuple[int, int, bytes]] = []

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def poll(self, timeout: float) -> list:
        """Frames that arrive within `timeout` seconds (none is fine)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        finally:
            self.sock.settimeout(30)
        assert data, "server closed the connection"
        self.buf += data
        new = split_control_frames(self.buf)
        self.frames += new
        return new

    def wait_ack(self, count: int) -> float:
        """Block until ACK(>= count); returns time.monotonic() when it arrived."""
        deadline = time.monotonic() + 30
        while not any(k == KIND_ACK and v >= count for k, v, _ in self.frames):
            assert time.monotonic() < deadline, f"no ACK({count}) within 30 s: {self.frames}"
            self.poll(1.0)
        return time.monotonic()

    def close(self) -> None:
        self.sock.close()


def stored_ids(data) -> list[int]:
    path = data / "events.bin"
    return EventLogReader(path).read().records["event_id"].tolist() if path.exists() else []


@pytest.fixture
def gated(tmp_path):
    """A service whose transactional handler blocks until `gate` is set."""
    gate, entered = threading.Event(), threading.Event()

    def handler(batch):
        entered.set()
        gate.wait(60)

    started = []

    def make(**extra):
        svc = Service(cfg(tmp_path / "data", **extra), handlers={"transactional": handler}).start()
        started.append(svc)
        return svc

    yield make, gate, entered
    gate.set()
    for svc in started:
        svc.stop()


def test_stored_ack_waits_for_the_event_log(gated, tmp_path):
    make, gate, entered = gated
    svc = make()
    c = Conn(svc)
    c.send(encode_v2("orders", b"a", 2, 1))
    assert entered.wait(30)
    assert c.poll(0.3) == []  # the handler holds the event: not stored, so no ACK
    assert stored_ids(tmp_path / "data") == []
    gate.set()
    c.wait_ack(1)
    assert stored_ids(tmp_path / "data") == [1]  # in events.bin when its ACK arrived
    c.close()


def test_accepted_ack_leaves_while_the_handler_holds_the_event(gated):
    make, gate, entered = gated
    svc = make(**{"server.ack": "accepted"})
    c = Conn(svc)
    c.send(encode_v2("orders", b"a", 2, 1), encode_v2("orders", b"b", 2, 2))
    assert entered.wait(30)
    c.wait_ack(2)
    assert not gate.is_set()
    c.close()


def test_a_frame_may_ask_for_accepted_on_a_stored_server(gated):
    make, gate, entered = gated
    svc = make()
    c = Conn(svc)
    c.send(encode_v2("orders", b"a", 2, 1, flags=ACK_ACCEPTED))
    assert entered.wait(30)
    c.wait_ack(1)
    assert not gate.is_set()
    c.close()


def test_realtime_is_not_held_behind_blocked_bulk_events(gated):
    make, gate, entered = gated
    svc = make()
    bulk = Conn(svc)
    bulk.send(*(encode_v2(f"bulk.{i % 7}", b"x", 2, 100 + i) for i in range(500)))
    assert entered.wait(30)
    rt = Conn(svc)
    rt.send(encode_v2("alert", b"!", 4, 1))
    rt.wait_ack(1)  # stored and ACKed while every MEDIUM event is still waiting
    assert not gate.is_set() and not any(k == KIND_ACK for k, _, _ in bulk.frames)
    bulk.close()
    rt.close()


def test_synced_ack_never_precedes_the_fsync(tmp_path):
    svc = Service(cfg(tmp_path / "data", **{"server.ack": "synced"})).start()
    try:
        c = Conn(svc)
        sent = 0
        for round_ in range(50):
            n = 1 + round_ % 7
            c.send(*(encode_v2("s", b"x", round_ % 5, sent + i + 1) for i in range(n)))
            sent += n
            while not any(k == KIND_ACK and v >= sent for k, v, _ in c.frames):
                for k, v, _ in c.poll(5.0):
                    if k == KIND_ACK:
                        # at the moment ACK(v) is read, an fsync covering at least v records finished
                        assert svc.engine.event_log.statistics()["synced_records"] >= v
        assert svc.engine.event_log.statistics()["group_syncs"] >= 1
        c.close()
    finally:
        svc.stop()


def test_per_frame_synced_on_a_stored_server_is_fsynced(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        c.send(encode_v2("s", b"x", 3, 1, flags=ACK_SYNCED))
        c.wait_ack(1)
        assert svc.engine.event_log.statistics()["synced_records"] >= 1
        c.close()
    finally:
        svc.stop()


def test_nacks_and_acks_stay_in_frame_order(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        bad = bytearray(encode_v2("o", b"payload", 2, 2))
        bad[-1] ^= 0xFF  # CRC mismatch: only this frame is rejected
        c.send(encode_v2("o", b"a", 2, 1), bytes(bad), encode_v2("o", b"c", 4, 3))
        c.wait_ack(2)
        kinds = [(k, v) for k, v, _ in c.frames]
        assert kinds[0] == (KIND_NACK, 2)  # the NACK comes before the ACK that counts a later frame
        assert kinds[-1] == (KIND_ACK, 2)
        assert sorted(stored_ids(tmp_path / "data")) == [1, 3]
        c.close()
    finally:
        svc.stop()


@pytest.mark.parametrize("segment_bytes", [0, 600], ids=["one-file", "segments"])
def test_a_resend_after_a_restart_is_stored_once(tmp_path, segment_bytes):
    """The keys come back from the closed segments (read at start) and from the active file (read
    while its recovery verifies it)."""
    data = tmp_path / "data"
    frames = [encode_v2(f"t{p}", b"x%d" % i, p, 1000 + i) for i, p in enumerate([0, 1, 2, 3, 4] * 4)]
    conf = cfg(data, **{"storage.events_max_bytes": segment_bytes})
    svc = Service(conf).start()
    c = Conn(svc)
    for f in frames:  # one at a time: several entries, so the log rotates into segments
        c.send(f)
    c.wait_ack(len(frames))
    c.close()
    svc.stop()
    if segment_bytes:
        assert len(list(data.glob("events.bin.*"))) >= 2
    svc = Service(conf).start()  # a new run: the dedup tables are rebuilt from events.bin
    try:
        c = Conn(svc)
        c.send(*frames, encode_v2("t2", b"new", 2, 5000))
        c.wait_ack(len(frames) + 1)  # duplicates are ACKed: their first copy is stored
        c.close()
        assert svc.metrics.dedup_hits_total() == len(frames)
    finally:
        svc.stop()
    ids = stored_ids(data)
    assert sorted(ids) == sorted([1000 + i for i in range(len(frames))] + [5000])


def test_ack_mode_in_the_frame_flags_reaches_the_record(tmp_path):
    from eventstream.core.records import FLAG_ACK_MASK, FLAG_ACK_SHIFT
    from eventstream.core.topics import TopicTable
    from eventstream.protocol.decoder import FrameDecoder

    dec = FrameDecoder(TopicTable(), ack_default=2)
    for small in (True, False):  # the struct path (few frames) and the vectorized path
        n = 3 if small else 40
        recs, errs = dec.feed(b"".join(encode_v2("f", b"", 2, i + 1, flags=i % 4) for i in range(n)))
        assert not errs
        modes = ((recs["flags"] & FLAG_ACK_MASK) >> FLAG_ACK_SHIFT).tolist()
        assert modes == [(i % 4) or 2 for i in range(n)]  # 0 = the connection's default


def test_every_stage_of_an_events_way_is_measured(tmp_path):
    svc = Service(cfg(tmp_path / "data")).start()
    try:
        c = Conn(svc)
        c.send(*(encode_v2(f"s{p}", b"x", p, i + 1) for i, p in enumerate([0, 1, 2, 3, 4] * 2)))
        c.wait_ack(10)
        c.close()

        def count(stage):
            return int(svc.metrics.stages[stage].snapshot()[0].sum())

        deadline = time.monotonic() + 30
        while min(count(st) for st in ("queued", "handled", "stored", "acked")) < 10 and time.monotonic() < deadline:
            time.sleep(0.001)  # recorded after the release that let the ACK go (small ACKs': when the reader idles)
        assert [count(st) for st in ("queued", "handled", "stored", "acked")] == [10, 10, 10, 10]
        p = svc.metrics.stage_percentiles("acked")
        assert 0 < p["p50_recent"] <= p["p99_recent"]
    finally:
        svc.stop()


def test_a_full_queue_pushes_back_without_busy_retries_and_loses_nothing(gated, tmp_path):
    make, gate, entered = gated
    svc = make(**{"queues.transactional.capacity": 64, "queues.max_batch": 8})
    c = Conn(svc)
    c.send(*(encode_v2("one.topic", b"x", 2, i + 1) for i in range(1000)))
    assert entered.wait(30)
    stats = svc.tcp.statistics
    deadline = time.monotonic() + 30
    while stats()["holds"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    first = stats()["holds"]
    assert first >= 1  # the queue is full: the reader holds the rest and stops reading
    threading.Event().wait(0.3)  # a while with the queue still full (the handler is blocked) ...
    assert stats()["holds"] == first  # ... and no re-offer in a loop: it waits until there is room
    assert c.poll(0.01) == []  # nothing ACKed, nothing NACKed
    gate.set()
    c.wait_ack(1000)
    assert not any(k == KIND_NACK for k, _, _ in c.frames)
    assert sorted(stored_ids(tmp_path / "data")) == list(range(1, 1001))
    c.close()

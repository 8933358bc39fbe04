"""The control plane acting on a running service: overload raises the level, actions apply,
the level comes back down, and nothing is lost."""

from __future__ import annotations

import time

from eventstream.client import TcpClient, UdpSender
from eventstream.config import load_config
from eventstream.engine.control import Level
from eventstream.engine.levels import LevelActions
from eventstream.service import Service
from eventstream.storage import EventLogReader


def slow_handler(batch):
    time.sleep(0.003)


def test_overload_escalates_adds_worker_pauses_and_recovers_without_loss(tmp_path):
    data = tmp_path / "data"
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
        "records.payload_bytes": 32, "queues.max_batch": 8,
        "backpressure.max_queue_depth": 200, "backpressure.min_events_for_evaluation": 50,
        "backpressure.interval_ms": 10,
        # CRITICAL/EMERGENCY would drop by policy; keep them out of reach so the outcome is exact
        "backpressure.critical.depth": 90.0, "backpressure.emergency.depth": 100.0,
    })
    with Service(cfg, handlers={"transactional": slow_handler}) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=120) as c:
            for i in range(1, 4001):
                c.send(f"t{i % 4}", b"x", priority=2, event_id=i)
            assert c.wait_acked(120)
            assert c.nacked == 0
        deadline = time.monotonic() + 60  # let the queues drain and the level step back down (bounded)
        while (svc.engine.bus.depth or svc.backpressure.level != Level.HEALTHY) and time.monotonic() < deadline:
            time.sleep(0.02)
        transitions = list(svc.backpressure.transitions)  # (previous, level) pairs
        workers = svc.engine.manager.worker_counts()
        final_level = svc.backpressure.level
        paused_after = svc.engine.admission.paused
    ups = [(a, b) for a, b in transitions if b > a]
    downs = [(a, b) for a, b in transitions if b < a]
    assert ups and max(b for _, b in ups) == Level.DEGRADED
    assert downs and final_level == Level.HEALTHY and not paused_after
    assert workers["transactional"] == 2  # ELEVATED added one (max_workers 2)
    ids = sorted(EventLogReader(data / "events.bin").read().records["event_id"].tolist())
    assert ids == list(range(1, 4001))  # paused, never dropped
    assert svc.summary()["dropped"] == 0


class FakeEngine:
    def __init__(self):
        from eventstream.ingest.admission import Admission

        self.admission = Admission()
        self.added = []
        self.states = []
        self.manager = type("M", (), {"add_worker": lambda _self, tier: self.added.append(tier) or True})()
        self.metrics = type("R", (), {"set_state": lambda _self, *a: self.states.append(a)})()


def test_level_actions_are_cumulative_and_undone_on_the_way_down():
    engine = FakeEngine()
    act = LevelActions(engine)
    act.on_level(Level.ELEVATED, Level.HEALTHY)
    assert engine.added == ["transactional", "batch"] and engine.admission.min_priority == 0
    act.on_level(Level.DEGRADED, Level.ELEVATED)
    assert engine.admission.min_priority == 1  # BATCH priority not admitted
    act.on_level(Level.CRITICAL, Level.DEGRADED)
    assert engine.admission.min_priority == 2  # LOW and BATCH not admitted
    act.on_level(Level.EMERGENCY, Level.CRITICAL)
    assert engine.admission.min_priority == 4  # only CRITICAL admitted
    act.on_level(Level.CRITICAL, Level.EMERGENCY)
    assert engine.admission.min_priority == 2
    act.on_level(Level.DEGRADED, Level.CRITICAL)
    act.on_level(Level.ELEVATED, Level.DEGRADED)
    act.on_level(Level.HEALTHY, Level.ELEVATED)
    assert engine.admission.min_priority == 0 and not engine.admission.paused
    assert engine.added == ["transactional", "batch"]  # workers are added once per climb out of HEALTHY
    assert engine.states[-1][1] == "HEALTHY"


def test_malformed_frames_and_own_shedding_do_not_count_as_overload(tmp_path):
    import socket

    from eventstream.protocol.frames import encode_v2

    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(tmp_path / "d"),
        "records.payload_bytes": 32})
    with Service(cfg) as svc:
        svc.control.stop()  # sample by hand
        svc.engine.sample()
        bad = bytearray(encode_v2("t", b"payload", 2, 1, 1))
        bad[-1] ^= 0xFF  # CRC mismatch: a content error, only that frame is rejected
        with socket.create_connection(svc.tcp.address) as s:
            s.sendall(bytes(bad) * 500)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)
            while s.recv(65536):
                pass  # NACKs, then the server closes after our half-close
        svc.engine.admission.min_priority = 4  # the control plane's own shedding (EMERGENCY): UDP sheds
        with UdpSender("127.0.0.1", svc.udp.address[1]) as u:
            for i in range(1, 101):
                u.send("t", b"x", priority=1, event_id=i)
            u.flush()
        deadline = time.monotonic() + 30
        while svc.metrics.dropped_total() < 600 and time.monotonic() < deadline:
            time.sleep(0.005)  # until the UDP reader has counted the 100 shed events
        sample = svc.engine.sample()
        assert svc.metrics.dropped_total() == 600
        assert svc.metrics.dropped_by_reason().get("backpressure") == 100
    assert sample.drop_rate == 0.0


def test_emergency_admits_critical_and_holds_the_rest_without_dropping(tmp_path):
    import socket

    from eventstream.protocol.frames import KIND_ACK, encode_v2, split_control_frames

    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(tmp_path / "d"),
        "records.payload_bytes": 32})

    def acked(sock, buf, want, timeout):
        sock.settimeout(timeout)
        try:
            while True:
                data = sock.recv(4096)
                assert data
                buf += data
                if any(k == KIND_ACK and v >= want for k, v, _ in split_control_frames(buf)):
                    return True
        except TimeoutError:
            return False

    with Service(cfg) as svc:
        svc.control.stop()  # drive the level's action by hand
        LevelActions(svc.engine).on_level(Level.EMERGENCY, Level.CRITICAL)
        bulk = socket.create_connection(svc.tcp.address)
        crit = socket.create_connection(svc.tcp.address)
        bulk.sendall(b"".join(encode_v2("bulk", b"b", p, 100 + i) for i, p in enumerate([2, 3, 1, 0] * 25)))
        crit.sendall(b"".join(encode_v2("alarm", b"c", 4, 1 + i) for i in range(10)))
        assert acked(crit, bytearray(), 10, 30)  # CRITICAL goes through at EMERGENCY
        assert not acked(bulk, bytearray(), 1, 0.3)  # the rest is held: no ACK, nothing dropped
        assert svc.tcp.statistics()["holds"] >= 1
        LevelActions(svc.engine).on_level(Level.CRITICAL, Level.EMERGENCY)
        LevelActions(svc.engine).on_level(Level.DEGRADED, Level.CRITICAL)
        LevelActions(svc.engine).on_level(Level.ELEVATED, Level.DEGRADED)
        assert acked(bulk, bytearray(), 100, 30)
        bulk.close()
        crit.close()
        assert svc.metrics.dropped_total() == 0
    ids = EventLogReader(tmp_path / "d" / "events.bin").read().records["event_id"].tolist()
    assert sorted(ids) == list(range(1, 11)) + list(range(100, 200))

"""`eventstream replay`: stored events re-sent to a running server keep id, topic, priority, payload."""

from __future__ import annotations

import os
import subprocess
import sys

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.service import Service
from eventstream.storage import EventLogReader

def cfg_for(data):
    return load_config(environ={}, overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
                                              "storage.data_dir": str(data), "records.payload_bytes": 64})

def test_replay_into_a_second_engine(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with Service(cfg_for(a)) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1]) as c:
            for i in range(1, 301):
                c.send(f"orders.{i % 3}", b"payload-%d" % i, priority=i % 5, event_id=1000 + i)
            assert c.wait_acked(30)
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=1) as c:
            c.send("legacy", b"no-id", priority=2)
            c.flush()
    with Service(cfg_for(b)) as svc:
        env = dict(os.environ, PYTHON_GIL="0")
        r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(a / "events.bin"),
                            "--port", str(svc.tcp.address[1]), "--topic", "orders.*"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert "replayed 300 events" in r.stdout
    src = EventLogReader(a / "events.bin").read(topic="orders.*")
    dst = EventLogReader(b / "events.bin").read()

    def rows(batch):
        r = batch.records
        names = batch.topic_names()
        return sorted((int(r["event_id"][i]), names[i], int(r["priority"][i]),
                       r["payload"][i, : r["payload_len"][i]].tobytes()) for i in range(len(r)))

    assert len(dst.records) == 300
    assert rows(src) == rows(dst)

def test_replay_errors_are_clear(tmp_path):
    env = dict(os.environ, PYTHON_GIL="0")
    r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(tmp_path / "none.bin")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "no such event log" in r.stderr
    r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(tmp_path / "none.bin"), "--port", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "allowed: 1..65535" in r.stderr


def test_replay_payloads_larger_than_the_default_frame_limit(tmp_path):
    """A log written by a server with server.tcp.max_frame_bytes above the default holds payloads whose
    frames the default client limit refuses: replay says which were not sent (exit 1) instead of a
    traceback, and with --max-frame-bytes it sends them whole."""
    big = {"server.tcp.max_frame_bytes": 4 << 20, "payloads.arena_bytes": 64 << 20}
    a, b, c2 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    payloads = {1: os.urandom(1536 << 10), 2: b"small"}

    def cfg(data):
        return load_config(environ={}, overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0,
                                                  "server.subscribe.port": 0, "storage.data_dir": str(data), **big})

    with Service(cfg(a)) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], max_frame_bytes=4 << 20, timeout=60) as c:
            for eid, p in payloads.items():
                c.send("big", p, priority=2, event_id=eid)
            assert c.wait_acked(60) and c.acked == 2
    env = dict(os.environ, PYTHON_GIL="0")
    for data, extra, rc in ((b, [], 1), (c2, ["--max-frame-bytes", str(4 << 20)], 0)):
        with Service(cfg(data)) as svc:
            r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(a / "events.bin"),
                                "--port", str(svc.tcp.address[1]), *extra],
                               capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == rc, r.stderr
        back = EventLogReader(data / "events.bin").read()
        got = dict(zip(back.records["event_id"].tolist(), back.payloads()))
        if rc:
            assert "not sent: seq" in r.stderr and "max_frame_bytes=1048576" in r.stderr, r.stderr
            assert "not sent (larger than --max-frame-bytes) 1" in r.stdout
            assert got == {2: b"small"}
        else:
            assert got == payloads
    r = subprocess.run([sys.executable, "-m", "eventstream", "replay", str(a / "events.bin"), "--max-frame-bytes", "10"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "--max-frame-bytes 10 is not allowed; allowed: 64..67108864" in r.stderr

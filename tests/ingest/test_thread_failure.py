"""A worker thread that dies is fatal and visible (hardening issue #11 item 1): failures() names it,
/healthz answers 503 with it, the threads_failed gauge counts it, the acceptor stops handing new
connections to a dead reader, and `eventstream serve` exits 1.

The fault is real but injected: a topic table whose intern() raises for one topic name, so the
thread that decodes a frame naming it dies of an uncaught error, as the reader did on the topic
table's OverflowError before the table was bounded.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from ingest_helpers import read_until_closed, wait_until
from serve_process import ServeProcess
from eventstream.config import load_config
from eventstream.core.topics import TopicTable
from eventstream.protocol.frames import KIND_ACK, encode_v2
from eventstream.service import Service

BAD = "inject.crash"


class CrashingTopics(TopicTable):
    def intern(self, name):
        if (name.encode() if isinstance(name, str) else bytes(name)) == BAD.encode():
            raise RuntimeError(f"injected fault: interning {BAD}")
        return super().intern(name)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def service(tmp_path):
    cfg = load_config(overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
                                 "server.tcp.readers": 2, "storage.data_dir": str(tmp_path / "data"),
                                 "storage.fsync": "none", "logging.level": "warning"}, environ={})
    svc = Service(cfg)
    svc.engine.topics = CrashingTopics(cfg.server.max_topics)
    svc.start()
    yield svc
    svc.stop(drain=False, timeout=10)


def _send_and_ack(address, n: int, first_id: int) -> int:
    s = socket.create_connection(address, timeout=10)
    s.sendall(b"".join(encode_v2("ok.topic", b"p", 2, first_id + i) for i in range(n)))
    s.shutdown(socket.SHUT_WR)
    acks = [i for k, i, _ in read_until_closed(s) if k == KIND_ACK]
    s.close()
    return acks[-1] if acks else 0


def test_dead_tcp_reader_is_unhealthy_and_gets_no_new_connections(service):
    svc = service
    base = f"http://127.0.0.1:{svc.exporter.address[1]}"
    assert get(base + "/healthz") == (200, "ok\n")
    s = socket.create_connection(svc.tcp.address, timeout=10)
    s.sendall(encode_v2(BAD, b"boom", 2, 1))
    wait_until(lambda: svc.failures(), 10, "the reader's failure")
    s.close()
    (failure,) = svc.failures()
    assert failure.startswith("es-tcp-reader-") and "injected fault" in failure
    status, body = get(base + "/healthz")
    assert status == 503 and "injected fault" in body
    status, body = get(base + "/readyz")
    assert status == 503 and body.startswith("thread failed: es-tcp-reader-")
    _, text = get(base + "/metrics")
    assert "threads_failed 1.0" in text
    # every new connection goes to the reader still running: each is served (a dead reader would
    # leave half of them unanswered, and read_until_closed would time out)
    for k in range(6):
        assert _send_and_ack(svc.tcp.address, 10, 1000 * (k + 1)) == 10


def test_dead_udp_reader_is_a_failure(service):
    svc = service
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(encode_v2(BAD, b"boom", 2, 1), svc.udp.address)
    u.close()
    wait_until(lambda: svc.failures(), 10, "the UDP reader's failure")
    assert svc.failures()[0].startswith("es-udp: RuntimeError('injected fault")
    status, body = get(f"http://127.0.0.1:{svc.exporter.address[1]}/healthz")
    assert status == 503 and "es-udp" in body


def _events(log_text: str) -> list[dict]:
    out = []
    for line in log_text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_serve_exits_1_when_an_ingest_thread_dies(tmp_path, transport):
    srv = ServeProcess(tmp_path, inject_topic=BAD)
    try:
        if transport == "tcp":
            s = socket.create_connection(srv.tcp, timeout=10)
            s.sendall(encode_v2(BAD, b"boom", 2, 1))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(encode_v2(BAD, b"boom", 2, 1), srv.udp)
        code = srv.wait(60)
        s.close()
    finally:
        srv.kill()
    assert code == 1, srv.log_text()
    names = [e.get("event") for e in _events(srv.log_text())]
    assert ("reader_crashed" if transport == "tcp" else "udp_reader_crashed") in names
    assert "thread_failed" in names

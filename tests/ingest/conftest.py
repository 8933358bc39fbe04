"""Ingest fixtures: servers on 127.0.0.1 ephemeral ports with a collecting sink, stopped at teardown."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from eventstream.config import TcpConfig, UdpConfig
from eventstream.core.topics import TopicTable
from eventstream.ingest.admission import Admission
from eventstream.ingest.sinks import CollectingSink
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.udp import UdpServer
from eventstream.protocol.frames import split_control_frames


class Rejects:
    """on_reject callback that records (records, reason, rejections) calls."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, records, reason, rejections):
        with self.lock:
            self.calls.append((None if records is None else records.copy(), reason, list(rejections)))

    def rejections(self):
        with self.lock:
            return [r for _rec, _reason, rs in self.calls for r in rs]

    def dropped(self):
        with self.lock:
            return [(len(rec), reason) for rec, reason, _rs in self.calls if rec is not None]


@pytest.fixture
def tcp_server():
    servers = []

    def make(sink=None, *, admission=None, payload_bytes=448, **cfg):
        cfg.setdefault("port", 0)
        cfg.setdefault("readers", 2)
        rejects = Rejects()
        sink = sink if sink is not None else CollectingSink()
        srv = TcpServer(TcpConfig(**cfg), sink, TopicTable(), admission=admission or Admission(),
                        on_reject=rejects, payload_bytes=payload_bytes).start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(drain=False, timeout=5.0)


@pytest.fixture
def udp_server():
    servers = []

    def make(sink=None, *, admission=None, use_recvmmsg=True, **cfg):
        cfg.setdefault("port", 0)
        rejects = Rejects()
        sink = sink if sink is not None else CollectingSink()
        srv = UdpServer(UdpConfig(**cfg), sink, TopicTable(), admission=admission or Admission(),
                        on_reject=rejects, use_recvmmsg=use_recvmmsg).start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(timeout=5.0)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> list[tuple[int, int, bytes]]:
    """Every ACK/NACK frame the server sends until it closes the connection (fails on timeout)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return split_control_frames(buf)
        buf += data


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a server-side counter (no event to wait on) with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)

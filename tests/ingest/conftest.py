"""Ingest fixtures: servers on 127.0.0.1 ephemeral ports with a collecting sink, stopped at teardown."""

from __future__ import annotations

import pytest

from eventstream.config import TcpConfig, UdpConfig
from eventstream.core.topics import TopicTable
from eventstream.ingest.admission import Admission
from doubles import CollectingSink
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.udp import UdpServer
from ingest_helpers import Rejects


@pytest.fixture
def tcp_server():
    servers = []

    def make(sink=None, *, admission=None, payload_bytes=448, cpus=None, reader_cpus=None, payloads=None, **cfg):
        cfg.setdefault("port", 0)
        cfg.setdefault("readers", 2)
        rejects = Rejects()
        sink = sink if sink is not None else CollectingSink()
        srv = TcpServer(TcpConfig(**cfg), sink, TopicTable(), admission=admission or Admission(),
                        on_reject=rejects, payload_bytes=payload_bytes, cpus=cpus,
                        reader_cpus=reader_cpus, payloads=payloads).start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(drain=False, timeout=5.0)


@pytest.fixture
def udp_server():
    servers = []

    def make(sink=None, *, admission=None, use_recvmmsg=True, payloads=None, **cfg):
        cfg.setdefault("port", 0)
        rejects = Rejects()
        sink = sink if sink is not None else CollectingSink()
        srv = UdpServer(UdpConfig(**cfg), sink, TopicTable(), admission=admission or Admission(),
                        on_reject=rejects, use_recvmmsg=use_recvmmsg, payloads=payloads).start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(timeout=5.0)

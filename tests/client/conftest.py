"""Client fixtures: a real TcpServer/UdpServer on an ephemeral port with a collecting sink."""

from __future__ import annotations

import pytest

from eventstream.config import TcpConfig, UdpConfig
from eventstream.core.topics import TopicTable
from eventstream.ingest.admission import Admission
from doubles import CollectingSink
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.udp import UdpServer


@pytest.fixture
def servers():
    made = []

    def tcp(admission=None, sink=None, payloads=None, **cfg):
        cfg.setdefault("port", 0)
        srv = TcpServer(TcpConfig(**cfg), sink or CollectingSink(), TopicTable(), admission=admission or Admission(),
                        payloads=payloads)
        srv.test_sink = srv.sink
        made.append(srv)
        return srv.start()

    def udp(**cfg):
        cfg.setdefault("port", 0)
        srv = UdpServer(UdpConfig(**cfg), CollectingSink(), TopicTable())
        srv.test_sink = srv.delivery.sink
        made.append(srv)
        return srv.start()

    yield tcp, udp
    for s in made:
        s.stop(drain=False)

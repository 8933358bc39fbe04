"""Client fixtures: a real TcpServer/UdpServer on an ephemeral port offering to a real engine
(engine_sink.py); servers stop first, then their engines."""

from __future__ import annotations

import pytest

from engine_sink import EngineSink
from eventstream.config import TcpConfig, UdpConfig
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.udp import UdpServer


@pytest.fixture
def servers(tmp_path):
    made, sinks = [], []

    def engine_sink(sink, **kw) -> EngineSink:
        if sink is None:
            sink = EngineSink(tmp_path, **kw)
        sinks.append(sink)
        return sink

    def tcp(sink=None, arena=True, **cfg):
        """`arena=False`: no payload arena (payloads over records.payload_bytes are refused)."""
        cfg.setdefault("port", 0)
        sink = engine_sink(sink)
        e = sink.engine
        srv = TcpServer(TcpConfig(**cfg), e, e.topics, payloads=e.payloads if arena else None)
        sink.follow(srv)
        srv.test_sink = sink
        made.append(srv)
        return srv.start()

    def udp(**cfg):
        cfg.setdefault("port", 0)
        sink = engine_sink(None)
        e = sink.engine
        srv = UdpServer(UdpConfig(**cfg), e, e.topics, payloads=e.payloads)
        srv.test_sink = sink
        made.append(srv)
        return srv.start()

    yield tcp, udp
    for s in made:
        s.stop(drain=False)
    for sink in sinks:
        sink.close()

"""Ingest fixtures: servers on 127.0.0.1 ephemeral ports offering to a real engine (engine_sink.py),
stopped at teardown (servers first, then their engines)."""

from __future__ import annotations

import pytest

from engine_sink import EngineSink
from eventstream.config import TcpConfig, UdpConfig
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.udp import UdpServer
from ingest_helpers import Rejects


@pytest.fixture
def engine_sinks(tmp_path):
    """make(**EngineSink options) -> an EngineSink closed at teardown."""
    made: list[EngineSink] = []

    def make(**kw) -> EngineSink:
        sink = EngineSink(tmp_path, **kw)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def tcp_server(engine_sinks):
    servers = []

    def make(sink=None, *, payload_bytes=448, cpus=None, reader_cpus=None, **cfg):
        cfg.setdefault("port", 0)
        cfg.setdefault("readers", 2)
        rejects = Rejects()
        if sink is None:
            keys = {"server.tcp.max_frame_bytes": cfg["max_frame_bytes"]} if "max_frame_bytes" in cfg else {}
            sink = engine_sinks(payload_bytes=payload_bytes, **keys)
        engine = sink.engine
        srv = TcpServer(TcpConfig(**cfg), engine, engine.topics, on_reject=rejects,
                        payload_bytes=sink.cfg.records.payload_bytes, cpus=cpus, reader_cpus=reader_cpus,
                        payloads=engine.payloads)
        sink.follow(srv)
        srv.start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(drain=False, timeout=5.0)


@pytest.fixture
def udp_server(engine_sinks):
    servers = []

    def make(sink=None, *, use_recvmmsg=True, **cfg):
        cfg.setdefault("port", 0)
        rejects = Rejects()
        sink = sink if sink is not None else engine_sinks()
        engine = sink.engine
        srv = UdpServer(UdpConfig(**cfg), engine, engine.topics, on_reject=rejects, use_recvmmsg=use_recvmmsg,
                        payload_bytes=sink.cfg.records.payload_bytes, payloads=engine.payloads).start()
        srv.test_sink, srv.test_rejects = sink, rejects
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop(timeout=5.0)

"""Issue 22 item 5: UDP sources together are one tenant for new topics, so a UDP flood of new topic
names cannot fill the topic table for TCP clients (real UDP and TCP sockets)."""

from __future__ import annotations

import socket
import time

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.protocol.frames import encode_v2
from eventstream.service import Service


def test_udp_new_topics_are_bounded_as_one_tenant(tmp_path):
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.enabled": False, "server.subscribe.enabled": False,
        "storage.data_dir": str(tmp_path / "data"), "server.tenants.max_new_topics": 10})
    with Service(cfg) as svc:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(30):
            u.sendto(encode_v2(f"udp.{i}", b"x", 2, i + 1), svc.udp.address)
        u.close()
        deadline = time.monotonic() + 30
        while svc.udp.stats.datagrams < 30:
            assert time.monotonic() < deadline, svc.udp.statistics()
            time.sleep(0.01)
        assert len(svc.engine.topics) == 10 and svc.tenants.refused["topics"] == 20
        assert svc.udp.statistics()["frames_rejected"].get("too_many_topics") == 20
        with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:  # another tenant: its own quota
            for i in range(5):
                c.send(f"tcp.{i}", b"y", 2, 100 + i)
            assert c.wait_acked(30) and c.acked == 5 and not c.nacks

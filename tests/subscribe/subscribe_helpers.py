"""Subscribe test helpers: config of a service with the subscribe listener, sending with ACKs."""

from __future__ import annotations

from pathlib import Path

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.service import Service


def sub_cfg(data: Path, **extra):
    over = {"server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
            "storage.data_dir": str(data), "records.payload_bytes": 64,
            "server.subscribe.enabled": True, "server.subscribe.port": 0}
    over.update(extra)
    return load_config(environ={}, overrides=over)


def send(svc: Service, topic_payloads, *, start_id: int = 1) -> list[int]:
    """Send (topic, payload) pairs over TCP and wait until the server ACKed them as stored."""
    ids = []
    with TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30) as c:
        for i, (topic, payload) in enumerate(topic_payloads):
            ids.append(c.send(topic, payload, event_id=start_id + i))
        assert c.wait_acked(30), "events not ACKed within 30 s"
        assert c.nacked == 0
    return ids


def sub_port(svc: Service) -> int:
    return svc.subscribe.address[1]

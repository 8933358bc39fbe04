"""Repeated rejects per connection (hardening issue #11 item 5): past max_rejects_per_s within a
second, rejected frames are still counted and NACKed but not each written to the DLQ (one summary
line stands for them), and a connection that sends nothing valid is closed."""

from __future__ import annotations

import json
import socket

from ingest_helpers import read_until_closed, wait_until
from eventstream.config import load_config
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2
from eventstream.service import Service


def bad(i: int) -> bytes:
    f = bytearray(encode_v2("junk", b"payload", 2, 1000 + i))
    f[-1] ^= 0xFF  # crc mismatch: a content error, the stream stays in sync
    return bytes(f)


def send_all(address, data: bytes):
    s = socket.create_connection(address, timeout=10)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = read_until_closed(s)
    s.close()
    return got


def summaries(rejects):
    return [r for r in rejects.rejections() if r.reason.startswith("rejects_limited:")]


def test_a_connection_sending_only_rejected_frames_is_closed_and_summarised(tcp_server):
    srv = tcp_server(max_rejects_per_s=10)
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"".join(bad(i) for i in range(100)))
    got = read_until_closed(s)  # the server closes without waiting for our half-close
    s.close()
    assert [i for k, i, _ in got if k == KIND_NACK] == list(range(1, 101))  # every reject is still NACKed
    wait_until(lambda: srv.statistics()["connections_open"] == 0, what="the connection closed")
    stats = srv.statistics()
    assert stats["frames_rejected"] == {"crc": 100}
    assert stats["connections_limited"] == {"too_many_rejects": 1}
    individual = [r for r in srv.test_rejects.rejections() if not r.reason.startswith("rejects_limited:")]
    assert [r.index for r in individual] == list(range(1, 11))
    (summary,) = summaries(srv.test_rejects)
    assert summary.count == 90 and "server.tcp.max_rejects_per_s=10" in summary.reason


def test_a_connection_with_good_frames_is_kept_and_its_rejects_summarised(tcp_server):
    srv = tcp_server(max_rejects_per_s=10)
    data = b"".join(encode_v2("good", b"%d" % i, 2, 1 + i) + bad(i) for i in range(50))
    got = send_all(srv.address, data)
    assert len([k for k, _, _ in got if k == KIND_NACK]) == 50
    assert [i for k, i, _ in got if k == KIND_ACK][-1] == 50
    assert len(srv.test_sink.records()) == 50
    assert srv.statistics()["connections_limited"] == {}
    individual = [r for r in srv.test_rejects.rejections() if not r.reason.startswith("rejects_limited:")]
    assert len(individual) == 10
    (summary,) = summaries(srv.test_rejects)
    assert summary.count == 40


def test_udp_rejects_past_the_limit_are_summarised(udp_server):
    srv = udp_server(max_rejects_per_s=5)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(50):
        u.sendto(bad(i), srv.address)
    u.close()
    wait_until(lambda: srv.statistics()["datagrams_received"] == 50, what="50 datagrams")
    srv.stop()
    rejections = srv.test_rejects.rejections()
    individual = [r for r in rejections if not r.reason.startswith("rejects_limited:")]
    assert len(individual) >= 5 and len(summaries(srv.test_rejects)) >= 1  # windows depend on timing
    assert len(individual) + sum(r.count for r in summaries(srv.test_rejects)) == 50


def test_service_writes_one_summary_line_and_counts_every_reject(tmp_path):
    cfg = load_config(overrides={"server.tcp.port": 0, "server.udp.port": 0, "metrics.enabled": False,
                                 "server.subscribe.port": 0, "server.tcp.max_rejects_per_s": 10, "storage.data_dir": str(tmp_path / "d"),
                                 "storage.fsync": "none", "logging.level": "warning"}, environ={})
    svc = Service(cfg).start()
    try:
        s = socket.create_connection(svc.tcp.address, timeout=10)
        s.sendall(b"".join(bad(i) for i in range(200)))
        read_until_closed(s)
        s.close()
        wait_until(lambda: svc.metrics.dropped_by_reason().get("rejects_limited") == 190, what="the summary counted")
        assert svc.metrics.dropped_by_reason() == {"crc": 10, "rejects_limited": 190}
    finally:
        svc.stop()
    lines = [json.loads(x) for x in (tmp_path / "d" / "dlq_log.txt").read_text().splitlines()]
    assert len(lines) == 11
    assert all(x["reason"].startswith("crc32 mismatch") for x in lines[:10])
    assert lines[-1]["reason"].startswith("rejects_limited: 190 more rejected frames from connection")

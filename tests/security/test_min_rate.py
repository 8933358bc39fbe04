"""Issue 22 item 5: a connection that delivers less than server.tcp.min_bytes_per_s over
min_rate_window_s is closed (min_rate); one that keeps sending at the rate stays. Real sockets."""

from __future__ import annotations

import socket
import time

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.protocol.frames import encode_v2
from eventstream.service import Service


def test_slow_senders_are_closed_and_steady_ones_stay(tmp_path):
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
        "server.subscribe.enabled": False, "storage.data_dir": str(tmp_path / "data"),
        "server.tcp.min_bytes_per_s": 200.0, "server.tcp.min_rate_window_s": 1.0})
    with Service(cfg) as svc:
        slow = socket.create_connection(svc.tcp.address, timeout=30)
        slow.sendall(encode_v2("slow", b"s", 2, 1))  # ~40 bytes, then nothing: under 200 B/s
        steady = TcpClient("127.0.0.1", svc.tcp.address[1], timeout=30).connect()
        deadline = time.monotonic() + 30
        i = 0
        while svc.tcp.statistics()["connections_limited"].get("min_rate", 0) < 1:
            assert time.monotonic() < deadline, svc.tcp.statistics()
            steady.send("steady", b"x" * 100, 2, 100 + i)  # ~140 bytes every 0.1 s: well over 200 B/s
            steady.flush()
            i += 1
            time.sleep(0.1)  # pacing: this client's rate, not a wait for the server
        slow.settimeout(10)
        while slow.recv(4096):  # its ACK, then EOF: the server closed it (a timeout here fails the test)
            pass
        steady.send("steady", b"last", 2, 99_999)
        assert steady.wait_acked(30) and steady.acked == i + 1 and not steady.nacks
        assert svc.tcp.statistics()["connections_limited"]["min_rate"] == 1
        steady.close()
        slow.close()

"""The UDP port is bound exclusively: no other local socket can share it (issue #11 item 4).

With SO_REUSEADDR on the server socket, any other process setting SO_REUSEADDR could bind the same
port, and the kernel would deliver the datagrams to it instead.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eventstream.config import load_config
from eventstream.protocol.frames import encode_v2
from eventstream.errors import StartupError
from eventstream.service import Service

REPO = Path(__file__).resolve().parents[2]


def foreign_socket(host: str = "127.0.0.1", port: int = 0, *, reuseport: bool = False) -> socket.socket:
    """A UDP socket as a hostile local process would open it: every sharing option set."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def cfg_for(tmp_path: Path, udp_port: int):
    return load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.port": udp_port, "metrics.enabled": False, "server.subscribe.port": 0,
        "storage.data_dir": str(tmp_path / "data"), "records.payload_bytes": 64})


def test_service_refuses_a_udp_port_already_bound_with_reuseaddr(tmp_path):
    with foreign_socket() as other:
        port = other.getsockname()[1]
        svc = Service(cfg_for(tmp_path, port))
        with pytest.raises(StartupError, match=r"server\.udp\.port") as err:
            svc.start()
        assert f"127.0.0.1:{port}" in str(err.value) and "in use" in str(err.value)
        assert not svc.started


def test_serve_exits_2_naming_server_udp_port(tmp_path):
    with foreign_socket() as other:
        port = other.getsockname()[1]
        env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", str(port), "--subscribe-port", "0",
             "--data-dir", str(tmp_path / "data"), "--set", "metrics.enabled=false"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "server.udp.port" in proc.stderr and f":{port}" in proc.stderr


@pytest.mark.parametrize("host,reuseport", [("127.0.0.1", False), ("127.0.0.1", True), ("0.0.0.0", True)],
                         ids=["same-addr-reuseaddr", "same-addr-reuseaddr+reuseport", "wildcard-reuseaddr+reuseport"])
def test_no_foreign_socket_can_bind_the_port_while_the_server_holds_it(udp_server, host, reuseport):
    srv = udp_server(host="127.0.0.1")
    sink = srv.test_sink
    port = srv.address[1]
    with pytest.raises(OSError) as err:
        foreign_socket(host, port, reuseport=reuseport).close()
    assert err.value.errno == errno.EADDRINUSE
    # and the traffic still reaches the server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(encode_v2("bind.test", b"mine", 2, 1), ("127.0.0.1", port))
    assert sink.wait_for(1, 10)


def test_server_socket_sets_no_sharing_option(udp_server):
    srv = udp_server(host="127.0.0.1")
    sock = srv._sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0

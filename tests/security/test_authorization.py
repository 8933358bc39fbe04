"""Issue 22 item 4: authorization. Tokens map to principals with produce and consume rights by topic
glob; a refused produce is a NACK naming the topic and the principal (and the topic never enters the
shared table), a refused subscribe is a SUB_ERROR; a principal's consumer groups are its own; token
values come from a file or the environment and are never logged. Real sockets, TLS with the
certificate conftest makes, real `eventstream serve` processes for the logging checks."""

from __future__ import annotations

import json
import urllib.request

import pytest
from conftest import TOKEN, client_context
from serve_process import ServeProcess

from eventstream.client import TcpClient
from eventstream.client.subscriber import SubscribeError, Subscription
from eventstream.config import ConfigError, load_config
from eventstream.ingest.auth import Principal, TokenError, TokenSet

ORDERS_TOKEN = "orders-team-token-7f3a"
BILLING_TOKEN = "billing-team-token-c91e"


def principals(tmp_path, monkeypatch) -> list[dict]:
    """`orders` with its token in a file, `billing` with its token in the environment."""
    f = tmp_path / "orders.token"
    f.write_text("# the orders team\n" + ORDERS_TOKEN + "\n")
    monkeypatch.setenv("ES_TEST_BILLING_TOKEN", BILLING_TOKEN)
    return [{"name": "orders", "token_file": str(f), "produce": ["orders.*"], "consume": ["orders.*"]},
            {"name": "billing", "token_env": "ES_TEST_BILLING_TOKEN", "produce": ["billing.*"],
             "consume": ["billing.*", "orders.paid"]}]


def send(svc, cert, token, events) -> TcpClient:
    c = TcpClient("127.0.0.1", svc.tcp.address[1], token=token, ssl_context=client_context(cert), timeout=30)
    c.connect()
    for i, topic in enumerate(events):
        c.send(topic, b"p%d" % i, 2, 100 + i)
    assert c.wait_acked(30), "not every event was answered"
    c.close()
    return c


def read_all(svc, cert, token, glob, **kw) -> list:
    with Subscription("127.0.0.1", svc.subscribe.address[1], glob, token=token, ssl_context=client_context(cert),
                      follow=False, **kw) as s:
        return list(s)


def test_produce_rights_nack_naming_topic_and_principal(secure_service, cert, tmp_path, monkeypatch):
    svc = secure_service(**{"server.auth.principals": principals(tmp_path, monkeypatch)})
    c = send(svc, cert, ORDERS_TOKEN, ["orders.new", "billing.invoice", "orders.paid", "secret.x"])
    assert c.acked == 2 and c.nacked == 2
    reasons = dict(c.nacks)
    assert reasons[101].startswith("forbidden: principal 'orders' may not produce to topic 'billing.invoice'")
    assert "allowed: topics matching orders.*" in reasons[101]
    assert "'secret.x'" in reasons[103]
    # a refused topic never enters the shared topic table (no lock-out by names one may not use)
    assert {svc.engine.topics.name(i) for i in range(1, len(svc.engine.topics) + 1)} == {"orders.new", "orders.paid"}
    c = send(svc, cert, BILLING_TOKEN, ["billing.invoice", "orders.new"])
    assert c.acked == 1 and "principal 'billing'" in dict(c.nacks)[101]
    c = send(svc, cert, TOKEN, ["anything.at.all"])  # the shared token may do everything
    assert c.acked == 1 and c.nacked == 0
    assert svc.metrics.dropped_by_reason().get("forbidden") == 3


def test_consume_rights_sub_error_and_filtered_reads(secure_service, cert, tmp_path, monkeypatch):
    svc = secure_service(**{"server.auth.principals": principals(tmp_path, monkeypatch)})
    send(svc, cert, TOKEN, ["orders.new", "orders.paid", "billing.invoice", "secret.x"])
    assert sorted(e.topic for e in read_all(svc, cert, ORDERS_TOKEN, "orders.*")) == ["orders.new", "orders.paid"]
    assert [e.topic for e in read_all(svc, cert, BILLING_TOKEN, "orders.paid")] == ["orders.paid"]
    assert [e.topic for e in read_all(svc, cert, BILLING_TOKEN, "billing.in*")] == ["billing.invoice"]
    for token, glob, who in ((ORDERS_TOKEN, "*", "orders"), (ORDERS_TOKEN, "billing.*", "orders"),
                             (BILLING_TOKEN, "orders.*", "billing"), (BILLING_TOKEN, "*.paid", "billing")):
        with pytest.raises(SubscribeError, match=f"forbidden: principal '{who}' may not consume topic glob"):
            read_all(svc, cert, token, glob)
    assert sorted(e.topic for e in read_all(svc, cert, TOKEN, "*")) == ["billing.invoice", "orders.new",
                                                                        "orders.paid", "secret.x"]


def test_a_principals_groups_are_its_own(secure_service, cert, tmp_path, monkeypatch):
    svc = secure_service(**{"server.auth.principals": principals(tmp_path, monkeypatch)})
    send(svc, cert, TOKEN, ["orders.paid"] * 5)
    with Subscription("127.0.0.1", svc.subscribe.address[1], "orders.paid", token=ORDERS_TOKEN, group="g",
                      ssl_context=client_context(cert), credit=10) as s:
        for _ in range(5):
            assert s.poll(20) is not None
        assert s.commit() == 5
    # billing's group "g" is another group: it starts from the beginning, orders' commit is untouched
    with Subscription("127.0.0.1", svc.subscribe.address[1], "orders.paid", token=BILLING_TOKEN, group="g",
                      ssl_context=client_context(cert), credit=10) as s:
        got = [s.poll(20) for _ in range(5)]
        assert [e.offset for e in got] == [0, 1, 2, 3, 4]
    offsets = svc.subscribe.groups.store.offsets()
    assert offsets == {"orders:g": 5}


def test_metrics_accept_a_principals_token(secure_service, cert, tmp_path, monkeypatch):
    svc = secure_service(**{"server.auth.principals": principals(tmp_path, monkeypatch)})
    req = urllib.request.Request(f"https://127.0.0.1:{svc.exporter.port}/metrics",
                                 headers={"Authorization": f"Bearer {BILLING_TOKEN}"})
    with urllib.request.urlopen(req, timeout=10, context=client_context(cert)) as r:
        assert r.status == 200 and b'events_dropped_total{reason="forbidden"}' in r.read()


def test_subscribe_glob_coverage_is_sound():
    p = Principal(1, "p", ("orders.*",), ("orders.*", "audit.log", "x?y"))
    assert p.may_subscribe("orders.*") and p.may_subscribe("orders.eu.*") and p.may_subscribe("orders.new")
    assert p.may_subscribe("orders.[ab]") and p.may_subscribe("audit.log") and p.may_subscribe("x?y")
    assert p.may_subscribe("xzy")
    for glob in ("*", "order*", "orders", "*.new", "audit.*", "?rders.x", "x*"):
        assert not p.may_subscribe(glob), glob


def test_principal_config_errors_name_the_key_never_the_token(tmp_path, monkeypatch):
    base = {"server.auth.principals": [{"name": "a", "token_env": "ES_TEST_NOPE", "produce": ["x"]}]}
    monkeypatch.delenv("ES_TEST_NOPE", raising=False)
    cfg = load_config(environ={}, overrides=base)
    with pytest.raises(TokenError, match=r"principals\[0\] \(a\)\.token_env: environment variable ES_TEST_NOPE"):
        TokenSet.from_config(cfg.server.auth)
    monkeypatch.setenv("ES_TEST_NOPE", TOKEN)  # the same value as a shared token
    cfg = load_config(environ={}, overrides={**base, "server.auth.tokens": [TOKEN]})
    with pytest.raises(TokenError) as err:
        TokenSet.from_config(cfg.server.auth)
    assert TOKEN not in str(err.value) and "a token of its own" in str(err.value)
    for bad, match in (([{"name": "a b", "token_env": "X"}], "name"),
                       ([{"name": "a", "token_env": "X", "token_file": "f"}], "exactly one of token_env"),
                       ([{"name": "a"}], "exactly one of token_env"),
                       ([{"name": "a", "token_env": "X"}, {"name": "a", "token_env": "Y"}], "no other principal"),
                       ([{"name": "a", "token_env": "X", "token": "inline"}], "unknown key"),
                       ([{"name": "a", "token_env": "X", "produce": [""]}], "topic glob")):
        with pytest.raises(ConfigError, match=match):
            load_config(environ={}, overrides={"server.auth.principals": bad})


def test_serve_never_logs_token_values(tmp_path):
    tok = tmp_path / "t.token"
    tok.write_text(ORDERS_TOKEN + "\n")
    spec = json.dumps([{"name": "orders", "token_file": str(tok), "produce": ["orders.*"], "consume": ["orders.*"]}])
    srv = ServeProcess(tmp_path, f"server.auth.principals={spec}", "logging.level=debug")
    try:
        c = TcpClient(*srv.tcp, token=ORDERS_TOKEN, timeout=30).connect()
        c.send("orders.x", b"1", 2, 1)
        c.send("other.x", b"2", 2, 2)
        assert c.wait_acked(30) and c.acked == 1 and c.nacked == 1
        c.close()
        bad = TcpClient(*srv.tcp, token="guess-" + ORDERS_TOKEN, timeout=30).connect()
        # The refusal may arrive before or after the send: either call may raise it.
        with pytest.raises(Exception):  # noqa: B017 - AuthError or a closed connection
            bad.send("orders.x", b"1", 2, 1)
            bad.wait_acked(10)
        bad.close()
        with pytest.raises(SubscribeError, match="forbidden"):
            with Subscription(*srv.subscribe, "other.*", token=ORDERS_TOKEN) as s:
                s.poll(10)
        assert srv.terminate() == 0
    finally:
        srv.kill()
    log = srv.log_text()
    assert "forbidden" in log or "connection" in log
    assert ORDERS_TOKEN not in log

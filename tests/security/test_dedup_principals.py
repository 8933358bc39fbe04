"""Issue 22 item 1: with authorization on, the principal is part of the dedup key. Two principals that
may both write one topic: one sends a run of event ids first, the other then sends the same ids on
the same topic; every event of the second is stored (nothing is taken for a duplicate of another
principal's event), before and after a restart that rebuilds the tables from the log. The same
principal resending its ids is still deduplicated (the control). Real sockets, TLS, tokens."""

from __future__ import annotations

import zlib

import pytest
from conftest import client_context

from eventstream.client import TcpClient
from eventstream.config import load_config
from eventstream.core import records as rec
from eventstream.core.payloads import payload_of
from eventstream.ingest.auth import principal_keys
from eventstream.service import Service
from eventstream.storage.reader import EventLogReader

ALICE, MALLORY = "alice-token-2b8e", "mallory-token-94d1"
IDS = list(range(1000, 1040))


def principals(monkeypatch) -> list[dict]:
    monkeypatch.setenv("ES_TEST_ALICE", ALICE)
    monkeypatch.setenv("ES_TEST_MALLORY", MALLORY)
    return [{"name": "alice", "token_env": "ES_TEST_ALICE", "produce": ["shared.*"], "consume": ["shared.*"]},
            {"name": "mallory", "token_env": "ES_TEST_MALLORY", "produce": ["shared.*"], "consume": []}]


def send(svc, cert, token, payload: bytes, priority: int) -> TcpClient:
    c = TcpClient("127.0.0.1", svc.tcp.address[1], token=token, ssl_context=client_context(cert), timeout=30,
                  version=2)
    c.connect()
    for i in IDS:
        c.send("shared.orders", payload, priority, i)
    assert c.wait_acked(30), "not every event was answered"
    c.close()
    return c


def stored(data) -> list[tuple[int, bytes, int]]:
    r = EventLogReader(data / "events.bin").read().records
    return sorted((int(x["event_id"]), payload_of(x), int(x["principal"])) for x in r)


@pytest.mark.parametrize("priority", [4, 2, 0], ids=["realtime", "transactional", "batch"])
def test_ids_sent_first_by_another_principal_do_not_suppress_a_principals_events(cert, tmp_path, monkeypatch,
                                                                                  priority):
    data = tmp_path / "data"
    cfg = load_config(environ={}, overrides={
        "server.tcp.port": 0, "server.udp.enabled": False, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(data), "records.payload_bytes": 64, "server.tls.cert_file": cert[0],
        "server.tls.key_file": cert[1], "server.auth.principals": principals(monkeypatch),
        "processors.transactional.max_workers": 1, "processors.batch.max_workers": 1})
    keys = principal_keys(["alice", "mallory"])
    with Service(cfg) as svc:
        m = send(svc, cert, MALLORY, b"forged", priority)
        a = send(svc, cert, ALICE, b"mine", priority)
        assert m.acked == a.acked == len(IDS) and m.nacked == a.nacked == 0
        assert svc.summary()["dedup_hits"] == 0
        again = send(svc, cert, ALICE, b"resent", priority)  # control: the same principal's resend is a duplicate
        assert again.acked == len(IDS) and svc.summary()["dedup_hits"] == len(IDS)
    want = sorted([(i, b"forged", keys["mallory"]) for i in IDS] + [(i, b"mine", keys["alice"]) for i in IDS])
    assert stored(data) == want

    # after a restart the tables come back from the log with the principals apart
    with Service(cfg) as svc:
        a2 = send(svc, cert, ALICE, b"after", priority)
        m2 = send(svc, cert, MALLORY, b"after", priority)
        assert a2.acked == m2.acked == len(IDS)
        assert svc.summary()["dedup_hits"] == 2 * len(IDS)  # both principals' resends recognised
    assert stored(data) == want


def test_principal_keys_are_stable_distinct_and_never_zero():
    names = [f"team-{i}" for i in range(3000)]
    keys = principal_keys(names)
    assert len(set(keys.values())) == len(names) and 0 not in keys.values()
    assert principal_keys(list(reversed(names))) == keys  # the configuration's order changes nothing
    h = zlib.crc32(b"alice")  # the documented formula: a key depends on the name alone
    assert principal_keys(["alice", "bob"])["alice"] == (((h >> 16) ^ h) & 0xFFFF or 1)

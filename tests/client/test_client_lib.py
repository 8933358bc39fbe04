"""eventstream.client against real servers: ACKs, NACKs, v1, resend on reconnect, UDP batching."""

from __future__ import annotations

import time

import pytest

from engine_sink import EngineSink
from eventstream.client import ClientError, TcpClient, UdpSender


def test_v2_client_gets_every_event_acknowledged(servers):
    tcp, _ = servers
    srv = tcp()
    with TcpClient(*srv.address, batch_size=64) as c:
        ids = [c.send("orders", b"payload-%d" % i, i % 5) for i in range(500)]
        assert c.wait_acked(20)
        assert (c.sent, c.acked, c.nacked) == (500, 500, 0)
        assert len(c.ack_latencies_ns) == 500 and min(c.ack_latencies_ns) > 0
    assert len(set(ids)) == 500 and 0 not in ids
    stored = srv.test_sink.stored()
    got = stored.records["event_id"].tolist()
    assert sorted(got) == sorted(ids)
    for p in range(5):  # in order within each queue (priority)
        assert [i for i in got if (i in ids[p::5])] == ids[p::5]
    by_id = dict(zip(got, stored.payloads(), strict=True))
    assert [by_id[ids[0]], by_id[ids[1]]] == [b"payload-0", b"payload-1"]


def test_payloads_of_any_size_up_to_the_max_frame(servers):
    """With a payload arena (as the service has) every size is accepted; only a frame over
    max_frame_bytes is refused, by the client itself, with the limit in the message."""
    tcp, _ = servers
    srv = tcp()
    sizes = [10, 449, 0, 1000, 448, 300_000, (1 << 20) - 26 - 1]
    with TcpClient(*srv.address) as c:
        for i, n in enumerate(sizes):
            c.send("q", bytes([i]) * n, 2, event_id=1000 + i)
        with pytest.raises(ValueError, match=r"max_frame_bytes=1048576"):
            c.send("q", b"x" * (1 << 20), 2)
        assert c.wait_acked(20)
    assert (c.acked, c.nacked) == (len(sizes), 0)
    assert srv.test_sink.payloads() == [bytes([i]) * n for i, n in enumerate(sizes)]


def test_nacks_are_reported_with_event_id_and_reason(servers):
    tcp, _ = servers
    srv = tcp(arena=False)  # an ingest server without a payload arena: payloads over 448 bytes are refused
    with TcpClient(*srv.address) as c:
        sizes = {1000: 10, 1001: 449, 1002: 0, 1003: 1000, 1004: 448}  # this server's limit: 448 bytes
        for eid, size in sizes.items():
            c.send("q", b"x" * size, 2, event_id=eid)
        assert c.wait_acked(20)
    assert (c.acked, c.nacked) == (3, 2)
    assert sorted(eid for eid, _ in c.nacks) == [1001, 1003]
    assert all("payload" in reason and "448" in reason for _, reason in c.nacks)
    assert srv.test_sink.records()["event_id"].tolist() == [1000, 1002, 1004]


def test_unacknowledged_events_are_resent_with_the_same_ids_after_reconnect(servers, tmp_path):
    tcp, _ = servers
    first = tcp(sink=EngineSink(tmp_path, gated=True))  # takes events but does not store them yet: no ACK
    port = first.address[1]
    c = TcpClient("127.0.0.1", port, timeout=20).connect()
    ids = [c.send("r", b"%d" % i) for i in range(10)]
    c.flush()
    deadline = time.monotonic() + 10  # a server-side counter: nothing to wait on
    while first.statistics()["frames_accepted"] < 10:
        assert time.monotonic() < deadline, "10 events not accepted within 10 s"
        time.sleep(0.005)
    first.stop(drain=False)  # the connection dies before any ACK
    first.test_sink.release.set()  # the first engine stores them after all
    assert first.test_sink.wait_for(10, 10)
    second = tcp(port=port)
    assert c.wait_acked(20)
    c.close()
    assert c.reconnects >= 1 and c.acked == 10
    assert first.test_sink.records()["event_id"].tolist() == ids
    assert second.test_sink.records()["event_id"].tolist() == ids  # same ids: the engine dedups


def test_v1_client_sends_without_acknowledgements(servers):
    tcp, _ = servers
    srv = tcp()
    with TcpClient(*srv.address, version=1) as c:
        for i in range(20):
            assert c.send("legacy", b"%d" % i, 1) == 0
        assert c.wait_acked(5)
        assert c.acked == 0
    assert srv.test_sink.wait_for(20, 10)
    assert (srv.test_sink.records()["event_id"] == 0).all()


def test_connect_failure_is_a_clear_error():
    with pytest.raises(ClientError, match="cannot connect to 127.0.0.1:1"):
        TcpClient("127.0.0.1", 1, timeout=0.2).connect()


def test_udp_sender_packs_frames_into_datagrams(servers):
    _, udp = servers
    srv = udp()
    with UdpSender(*srv.address, max_datagram_bytes=400) as s:
        for i in range(100):
            s.queue("u", b"x" * 20, 3)
        s.send("u", b"single")
    assert srv.test_sink.wait_for(101, 10)
    assert s.datagrams < 50 and s.sent == 101
    assert srv.statistics()["datagrams_bad"] == 0


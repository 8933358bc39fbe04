"""TCP ingest over real sockets on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import random
import socket
import threading
import time

import numpy as np
import pytest

from ingest_helpers import read_until_closed, wait_until
from eventstream.core.payloads import payload_list as payloads
from eventstream.ingest.admission import dead_letter_lines
from eventstream.ingest.tcp import BindError, TcpServer
from eventstream.config import TcpConfig
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v1, encode_v2, split_control_frames

ACK, NACK = KIND_ACK, KIND_NACK


def connect(srv) -> socket.socket:
    s = socket.create_connection(srv.address, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def last_ack(frames) -> int:
    acks = [v for k, v, _ in frames if k == ACK]
    assert acks, f"no ACK in {frames}"
    return acks[-1]


def test_ack_counts_accepted_and_nack_names_the_bad_frame(tcp_server):
    srv = tcp_server()
    good = [encode_v2("orders", b"p%d" % i, 2, 100 + i, 5) for i in range(5)]
    bad = bytearray(good[2])
    bad[-1] ^= 0xFF  # payload changed, crc no longer matches
    s = connect(srv)
    s.sendall(good[0] + good[1] + bytes(bad) + good[3] + good[4])
    s.shutdown(socket.SHUT_WR)
    frames = read_until_closed(s)
    nacks = [(v, p.decode()) for k, v, p in frames if k == NACK]
    assert nacks == [(3, "crc32 mismatch (zlib.crc32 of topic bytes then payload bytes)")]
    assert last_ack(frames) == 4
    # the NACK comes before the ACK that covers later frames
    assert [k for k, _, _ in frames].index(NACK) < len(frames) - 1
    recs = srv.test_sink.records()
    assert sorted(recs["event_id"].tolist()) == [100, 101, 103, 104]
    (rej,) = srv.test_rejects.rejections()
    assert (rej.index, rej.event_id, rej.topic, rej.priority, rej.fatal) == (3, 102, "orders", 2, False)
    stats = srv.statistics()
    assert stats["frames_accepted"] == 4 and stats["frames_rejected"] == {"crc": 1}
    lines = dead_letter_lines(None, "", srv.test_rejects.rejections(), srv.topics.names)
    assert lines == ["id=102 topic=orders priority=2 reason=crc32 mismatch (zlib.crc32 of topic bytes then payload bytes)"]


def _client(srv, conn_no: int, n: int, results: dict, rng: random.Random) -> None:
    stream = b"".join(encode_v2(f"t{conn_no % 3}", b"%d:%d" % (conn_no, i), i % 5, conn_no * 1_000_000 + i + 1)
                      for i in range(n))
    s = connect(srv)
    pos = 0
    while pos < len(stream):  # partial writes of random sizes, 1 byte included
        k = rng.choice([1, 7, 100, 1000, 5000])
        s.sendall(stream[pos:pos + k])
        pos += k
    s.shutdown(socket.SHUT_WR)
    results[conn_no] = read_until_closed(s)
    s.close()


def test_many_concurrent_connections_with_partial_writes(tcp_server):
    srv = tcp_server(readers=2)
    conns, per_conn = 40, 150
    results: dict[int, list] = {}
    threads = [threading.Thread(target=_client, args=(srv, c, per_conn, results, random.Random(c)))
               for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "client thread did not finish within 60 s"
    assert len(results) == conns
    assert all(last_ack(f) == per_conn and not [x for x in f if x[0] == NACK] for f in results.values())
    recs = srv.test_sink.records()
    ids = recs["event_id"]
    assert len(ids) == conns * per_conn and len(np.unique(ids)) == len(ids)
    prio = recs["priority"]
    for c in range(conns):  # each connection's events are stored in order within their queue (priority)
        for p in range(5):
            mine = ids[((ids // 1_000_000) == c) & (prio == p)]
            assert mine.tolist() == [c * 1_000_000 + i + 1 for i in range(per_conn) if i % 5 == p]
    assert len(np.unique(recs["conn_id"])) == conns
    assert payloads(recs[:1])[0].startswith(b"%d:" % (recs["event_id"][0] // 1_000_000))
    wait_until(lambda: srv.statistics()["connections_open"] == 0, what="all connections closed")
    assert srv.statistics()["connections_total"] == conns


def test_garbage_client_is_closed_and_others_keep_working(tcp_server):
    srv = tcp_server()
    bad = connect(srv)
    bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_until_closed(bad) == []  # not a v2 stream: closed without a NACK
    good = connect(srv)
    good.sendall(encode_v2("a", b"1", 2, 1))
    good.shutdown(socket.SHUT_WR)
    assert last_ack(read_until_closed(good)) == 1
    assert srv.statistics()["frames_rejected"] == {"framing": 1}
    (rej,) = srv.test_rejects.rejections()
    assert rej.fatal and "max_frame_bytes" in rej.reason


def test_v2_framing_error_gets_a_nack_then_close(tcp_server):
    srv = tcp_server()
    s = connect(srv)
    s.sendall(encode_v2("a", b"1", 2, 1) + b"\x00\x00\x00\x05\xe5abcd" + encode_v2("a", b"2", 2, 2))
    frames = read_until_closed(s)
    assert frames[0][0] == NACK and frames[0][1] == 2 and b"too short" in frames[0][2]
    assert last_ack(frames) == 1
    assert srv.test_sink.records()["event_id"].tolist() == [1]


def test_disconnect_mid_frame_keeps_complete_frames(tcp_server):
    srv = tcp_server()
    s = connect(srv)
    f = encode_v1("a", b"complete") + encode_v1("a", b"cut off")
    s.sendall(f[:-4])
    s.close()
    assert srv.test_sink.wait_for(1, 10)
    wait_until(lambda: srv.statistics()["connections_open"] == 0, what="connection closed")
    assert payloads(srv.test_sink.records()) == [b"complete"]
    s2 = connect(srv)  # service still running
    s2.sendall(encode_v1("a", b"next"))
    s2.close()
    assert srv.test_sink.wait_for(2, 10)


def test_v1_connection_gets_no_acknowledgements(tcp_server):
    srv = tcp_server()
    s = connect(srv)
    s.sendall(b"".join(encode_v1("legacy", b"x" * i, i % 5) for i in range(50)))
    s.shutdown(socket.SHUT_WR)
    assert read_until_closed(s) == []
    assert srv.test_sink.wait_for(50, 10)  # no ACK to wait for: the stored count
    recs = srv.test_sink.records()
    assert len(recs) == 50 and (recs["event_id"] == 0).all() and (recs["flags"] == 0).all()


def test_connection_limit_closes_one_more_and_keeps_serving(tcp_server):
    srv = tcp_server(max_connections=3)
    held = [connect(srv) for _ in range(3)]
    for i, s in enumerate(held):  # make sure all three are registered before the fourth
        s.sendall(encode_v1("a", b"%d" % i))
    assert srv.test_sink.wait_for(3, 10)
    extra = connect(srv)
    try:
        assert extra.recv(10) == b""
    except ConnectionResetError:
        pass
    assert srv.statistics()["connections_refused"] == 1
    held[0].sendall(encode_v1("a", b"after"))
    assert srv.test_sink.wait_for(4, 10)
    for s in held:
        s.close()


def test_pause_holds_events_and_pushes_back(tcp_server):
    srv = tcp_server()
    adm = srv.test_sink.admission  # the engine's, set by the control plane
    adm.paused = True
    s = connect(srv)
    s.settimeout(0.5)
    frame = encode_v2("p", b"x" * 400, 2, 1)
    sent = 0
    with pytest.raises(TimeoutError):
        for k in range(200):  # at most ~86 MB; the kernel buffers are far smaller
            chunk = b"".join(encode_v2("p", b"x" * 400, 2, k * 1000 + i + 1) for i in range(1000))  # ids: no dedup
            s.sendall(chunk)
            sent += len(chunk)
    # the first read's events are held (MEDIUM is not admitted while paused); nothing more is read
    assert srv.test_sink.count == 0
    assert 0 < srv.statistics()["bytes_received"] <= srv.config.recv_bytes
    assert srv.statistics()["holds"] >= 1
    adm.paused = False
    s.settimeout(10)
    assert srv.test_sink.wait_for(sent // len(frame), 20)
    assert srv.statistics()["backpressure_drops"] == 0


def test_pause_still_admits_critical(tcp_server):
    srv = tcp_server()
    srv.test_sink.admission.paused = True
    s = connect(srv)
    s.sendall(b"".join(encode_v2("c", b"", 4, i + 1) for i in range(20)))
    assert srv.test_sink.wait_for(20, 10)
    s.shutdown(socket.SHUT_WR)
    assert last_ack(read_until_closed(s)) == 20


def test_events_below_min_priority_are_held_not_shed(tcp_server):
    srv = tcp_server()
    adm = srv.test_sink.admission
    adm.tcp_min_priority = adm.min_priority = 3  # min_priority alone is UDP's
    s = connect(srv)
    s.sendall(b"".join(encode_v2("q", b"", p, 10 + p) for p in range(5)))
    wait_until(lambda: srv.statistics()["holds"] >= 1, what="events held")
    assert srv.test_sink.count == 0  # held from the first one not admitted: the order is kept
    adm.tcp_min_priority = 0
    s.shutdown(socket.SHUT_WR)
    frames = read_until_closed(s)
    assert [f for f in frames if f[0] == NACK] == []
    assert last_ack(frames) == 5
    assert srv.statistics()["backpressure_drops"] == 0
    assert sorted(srv.test_sink.records()["priority"].tolist()) == [0, 1, 2, 3, 4]


def test_a_full_queue_holds_the_rest_until_there_is_room(tcp_server, engine_sinks):
    # the handler waits until released: the 4-slot ring of MEDIUM events fills and stays full
    srv = tcp_server(engine_sinks(capacity=4, gated=True))
    s = connect(srv)
    s.sendall(b"".join(encode_v2("q", b"", 2, i + 1) for i in range(8)))
    wait_until(lambda: srv.statistics()["holds"] >= 1, what="events held")
    assert srv.statistics()["frames_accepted"] == 4 and srv.test_sink.count == 0
    srv.test_sink.release.set()
    s.shutdown(socket.SHUT_WR)
    frames = read_until_closed(s)
    assert [f for f in frames if f[0] == NACK] == []
    assert last_ack(frames) == 8
    assert srv.test_sink.records()["event_id"].tolist() == list(range(1, 9))
    assert srv.statistics()["backpressure_drops"] == 0


def test_ack_arrives_without_further_traffic(tcp_server):
    srv = tcp_server()
    s = connect(srv)
    s.settimeout(10)
    s.sendall(b"".join(encode_v2("a", b"", 2, i + 1) for i in range(10)))
    buf = bytearray()
    frames = []
    while not frames or frames[-1][:2] != (ACK, 10):
        data = s.recv(100)
        assert data, "connection closed before the ACK"
        buf += data
        frames += split_control_frames(buf)
    s.close()


def test_stop_with_drain_sends_the_final_ack(tcp_server):
    srv = tcp_server()
    s = connect(srv)
    s.sendall(b"".join(encode_v2("a", b"", 2, i + 1) for i in range(10)))
    assert srv.test_sink.wait_for(10, 10)
    srv.stop(drain=True)
    assert last_ack(read_until_closed(s)) == 10


def test_idle_connections_are_closed(tcp_server):
    srv = tcp_server(idle_timeout_s=0.2)
    s = connect(srv)
    s.settimeout(10)
    assert s.recv(10) == b""
    wait_until(lambda: srv.statistics()["connections_open"] == 0, what="idle connection closed")


def test_rate_limit_delays_but_keeps_every_event(tcp_server):
    srv = tcp_server(rate_limit_events_per_s=2000.0)
    s = connect(srv)
    t0 = time.monotonic()
    s.sendall(b"".join(encode_v1("r", b"") for _ in range(1000)))
    s.shutdown(socket.SHUT_WR)
    read_until_closed(s)
    assert srv.test_sink.wait_for(1000, 10)
    assert time.monotonic() - t0 >= 0.3  # 1000 events at 2000/s with a 200-event burst: >= 0.4 s


def test_port_in_use_is_a_clear_error(tcp_server):
    srv = tcp_server()
    other = TcpServer(TcpConfig(port=srv.address[1]), srv.test_sink.engine, srv.test_sink.engine.topics)
    with pytest.raises(BindError, match=r"already in use.*server\.tcp\.port"):
        other.start()

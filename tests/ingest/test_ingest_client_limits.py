"""Per-client limits of the TCP ingest (hardening issue #11 item 2): connections per IP, the
frame-progress timeout (slowloris), and the bound on bytes held in partial frames."""

from __future__ import annotations

import socket
import threading

import pytest

from ingest_helpers import read_until_closed, wait_until
from eventstream.config import ConfigError, load_config
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v2


def connect(srv, source_ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((source_ip, 0))
    s.connect(srv.address)
    return s


def closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server closed `s` (EOF or reset); fails after `timeout` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def acked(s: socket.socket, frames: bytes) -> list[tuple[int, int]]:
    s.sendall(frames)
    s.shutdown(socket.SHUT_WR)
    return [(k, i) for k, i, _ in read_until_closed(s)]


def test_connections_per_ip_are_bounded_and_other_addresses_still_get_in(tcp_server):
    srv = tcp_server(max_connections_per_ip=3)
    mine = [connect(srv) for _ in range(3)]
    extra = connect(srv)
    assert closed_by_server(extra)
    assert srv.statistics()["connections_limited"] == {"max_connections_per_ip": 1}
    other = connect(srv, "127.0.0.2")  # another client address on loopback
    assert acked(other, encode_v2("t", b"x", 2, 1)) == [(KIND_ACK, 1)]
    mine[0].close()
    wait_until(lambda: srv.peer_limit.open_from("127.0.0.1") == 2, what="the closed connection's slot freed")
    again = connect(srv)
    assert acked(again, encode_v2("t", b"y", 2, 2)) == [(KIND_ACK, 1)]
    for s in mine[1:] + [extra, other, again]:
        s.close()


def test_a_stalled_partial_frame_closes_its_connection(tcp_server):
    srv = tcp_server(frame_timeout_s=0.3)
    frame = encode_v2("slow", b"p" * 40, 2, 7)
    slow = connect(srv)
    slow.sendall(frame[:12])
    assert closed_by_server(slow)
    assert srv.statistics()["connections_limited"] == {"frame_timeout": 1}
    assert srv.budget.total() == 0
    # a connection that completes its frames is not touched, even sent in pieces
    ok = connect(srv)
    ok.sendall(frame[:12])
    ok.sendall(frame[12:] + encode_v2("slow", b"q", 2, 8))
    assert acked(ok, b"") == [(KIND_ACK, 2)]


def test_a_held_connection_is_not_timed_out_for_its_partial_frame(tcp_server):
    srv = tcp_server(frame_timeout_s=0.3, readers=1)
    adm = srv.test_sink.admission
    adm.paused = True  # only CRITICAL is admitted: MEDIUM events are held, the connection is not read
    frames = [encode_v2("held", b"%d" % i, 2, 100 + i) for i in range(3)]
    held = connect(srv)
    held.sendall(frames[0] + frames[1] + frames[2][:10])  # one read: two records held + a partial frame
    wait_until(lambda: srv.statistics()["holds"] >= 1 and srv.budget.total() == 10, what="records held")
    # a control connection whose partial frame starts later: once it is timed out, the held one's
    # deadline has passed too
    control = connect(srv)
    control.sendall(frames[0][:10])
    wait_until(lambda: srv.budget.total() == 20, what="the control connection's partial frame read")
    assert closed_by_server(control)
    wait_until(lambda: srv.statistics()["connections_open"] <= 1, what="the control connection counted closed")
    # the held connection's deadline passed before the control's: it would be closed by now
    assert srv.statistics()["connections_open"] == 1
    assert srv.statistics()["connections_limited"] == {"frame_timeout": 1}
    adm.paused = False
    got = acked(held, frames[2][10:])  # ACKs as the held records went in, then the last frame's
    assert got[-1] == (KIND_ACK, 3) and KIND_NACK not in [k for k, _ in got]
    assert sorted(srv.test_sink.records()["event_id"].tolist()) == [100, 101, 102]


@pytest.mark.parametrize("largest", ["same_reader", "other_reader"])
def test_partial_bytes_over_the_bound_close_the_largest_partial_frame(tcp_server, largest):
    srv = tcp_server(readers=2, max_frame_bytes=64 << 10, max_partial_bytes=100_000, payload_bytes=64 << 10)
    frames = [encode_v2("big", bytes(60_000), 2, 1 + i) for i in range(3)]
    # round robin: a -> reader 0, b -> reader 1, c -> reader 0; c's bytes push the total over
    sizes = {"same_reader": (45_000, 40_000, 30_000), "other_reader": (40_000, 45_000, 30_000)}[largest]
    socks, total = [], 0
    for frame, size in zip(frames, sizes):
        s = connect(srv)
        socks.append(s)
        s.sendall(frame[:size])
        total += size
        if total <= 100_000:
            wait_until(lambda t=total: srv.budget.total() == t, what=f"{total} partial bytes")
    victim = sizes.index(45_000)
    assert closed_by_server(socks[victim])
    wait_until(lambda: srv.budget.total() == 70_000, what="the largest partial frame released")
    assert srv.statistics()["connections_limited"] == {"max_partial_bytes": 1}
    for k, s in enumerate(socks):
        if k != victim:
            assert acked(s, frames[k][sizes[k]:]) == [(KIND_ACK, 1)]
        s.close()
    assert srv.budget.total() == 0


def test_limit_keys_are_validated_by_name():
    cfg = load_config(overrides={"server.tcp.max_connections_per_ip": 5, "server.tcp.frame_timeout_s": 2.5},
                      environ={})
    assert (cfg.server.tcp.max_connections_per_ip, cfg.server.tcp.frame_timeout_s) == (5, 2.5)
    with pytest.raises(ConfigError, match="server.tcp.max_connections_per_ip"):
        load_config(overrides={"server.tcp.max_connections_per_ip": 0}, environ={})
    with pytest.raises(ConfigError, match="server.tcp.max_partial_bytes.*server.tcp.max_frame_bytes"):
        load_config(overrides={"server.tcp.max_partial_bytes": 1000}, environ={})
    with pytest.raises(ConfigError, match="server.max_topics"):
        load_config(overrides={"server.max_topics": 0}, environ={})


def test_the_readers_own_stall_is_not_charged_to_a_partial_frame(tcp_server, engine_sinks):
    """A realtime handler runs on the reader (the inline lane): while it takes 2.5 s nobody is read, so
    a client whose partial frame started just before is not timed out (frame_timeout_s 1.0) for it; a
    client that stalls on its own while the reader is free still is."""
    never = threading.Event()

    def slow(batch):
        never.wait(2.5)  # the reader is stuck here for 2.5 s, well past frame_timeout_s

    sink = engine_sinks(handlers={"realtime": slow})
    srv = tcp_server(sink, frame_timeout_s=1.0, readers=1)
    frame = encode_v2("part", b"p" * 40, 2, 7)
    partial = connect(srv)
    partial.sendall(frame[:12])
    wait_until(lambda: srv.budget.total() == 12, what="the partial frame read")
    blocker = connect(srv)
    # CRITICAL: handled on the one reader, which is then stalled 2.5 s; its ACK comes after the stall
    assert acked(blocker, encode_v2("rt", b"x", 4, 1)) == [(KIND_ACK, 1)]
    # the partial frame's clock did not run while the reader was stalled: it is still open and completes
    assert acked(partial, frame[12:]) == [(KIND_ACK, 1)]
    assert srv.statistics()["connections_limited"] == {}
    slow_client = connect(srv)
    slow_client.sendall(frame[:12])
    assert closed_by_server(slow_client)
    assert srv.statistics()["connections_limited"] == {"frame_timeout": 1}


def test_a_stall_shorter_than_stall_credit_s_is_charged_to_a_partial_frame(tcp_server, engine_sinks):
    """`server.tcp.stall_credit_s` decides what counts as the reader's own stall: set above the 2.5 s
    the handler holds the reader, that turn is charged like any other, so the partial frame that
    started before it has been open 2.5 s > frame_timeout_s when the reader looks again."""
    never = threading.Event()

    def slow(batch):
        never.wait(2.5)

    sink = engine_sinks(handlers={"realtime": slow})
    srv = tcp_server(sink, frame_timeout_s=1.0, readers=1, stall_credit_s=5.0)
    frame = encode_v2("part", b"p" * 40, 2, 7)
    partial = connect(srv)
    partial.sendall(frame[:12])
    wait_until(lambda: srv.budget.total() == 12, what="the partial frame read")
    blocker = connect(srv)
    assert acked(blocker, encode_v2("rt", b"x", 4, 1)) == [(KIND_ACK, 1)]
    assert closed_by_server(partial)
    assert srv.statistics()["connections_limited"] == {"frame_timeout": 1}


def test_stall_credit_s_is_range_checked():
    with pytest.raises(ConfigError, match=r"server.tcp.stall_credit_s.*0.01"):
        load_config(overrides={"server.tcp.stall_credit_s": 0}, environ={})

"""A draining stop that cannot place held records (here the engine never admits them: below the
level the control plane admits) dead-letters them and NACKs them to a v2 client after the ACK of
everything before them: nothing valid vanishes."""

from __future__ import annotations

import socket

from ingest_helpers import read_until_closed, wait_until
from eventstream.ingest import reader
from eventstream.ingest.connection import REASON_HELD_AT_STOP
from eventstream.metrics.reasons import category
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v1, encode_v2


def test_held_records_are_dead_lettered_and_nacked_at_stop(tcp_server, monkeypatch):
    monkeypatch.setattr(reader, "STOP_BUDGET_S", 0.3)
    srv = tcp_server(readers=1)
    srv.test_sink.admission.tcp_min_priority = 3  # HIGH and CRITICAL only
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"".join(encode_v2("q", b"v%d" % i, 3 if i < 5 else 2, i + 1) for i in range(8)))
    wait_until(lambda: srv.statistics()["holds"] >= 1, what="events held")
    srv.stop(drain=True)  # never admitted: frames 6..8 stay held past the stop budget
    frames = read_until_closed(s)
    acks = [v for k, v, _ in frames if k == KIND_ACK]
    nacks = [(v, reason) for k, v, reason in frames if k == KIND_NACK]
    assert acks and acks[-1] == 5
    assert [v for v, _ in nacks] == [6, 7, 8]
    assert all(r.decode() == REASON_HELD_AT_STOP for _, r in nacks)
    # as for any read: its NACKs, in frame-index order, then the ACK (the count stays 5)
    assert frames[-1][0] == KIND_ACK and frames[-1][1] == 5
    dead = [(recs, reason) for recs, reason, _rej in srv.test_rejects.calls if recs is not None]
    assert len(dead) == 1
    recs, reason = dead[0]
    assert reason == REASON_HELD_AT_STOP and category(reason) == "shutdown"
    assert recs["event_id"].tolist() == [6, 7, 8]
    assert srv.test_sink.records()["event_id"].tolist() == [1, 2, 3, 4, 5]
    assert srv.statistics()["frames_rejected"] == {REASON_HELD_AT_STOP: 3}


def test_v1_held_records_are_dead_lettered_at_stop(tcp_server, monkeypatch):
    monkeypatch.setattr(reader, "STOP_BUDGET_S", 0.3)
    srv = tcp_server(readers=1)
    srv.test_sink.admission.tcp_min_priority = 3
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"".join(encode_v1("q", b"w%d" % i, 3 if i < 2 else 1) for i in range(4)))
    wait_until(lambda: srv.statistics()["holds"] >= 1, what="events held")
    srv.stop(drain=True)
    assert read_until_closed(s) == []  # v1: no ACKs, no NACKs
    dead = [recs for recs, _reason, _rej in srv.test_rejects.calls if recs is not None]
    assert sum(len(r) for r in dead) == 2
    assert srv.test_sink.wait_for(2, 10) and srv.test_sink.count == 2

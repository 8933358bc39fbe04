"""The topic table's bound (server.max_topics): past it a frame naming a new topic is rejected with
reason class too_many_topics; the reader threads (TCP and UDP) keep running and keep serving known
topics (hardening issue #11 item 1: the table's OverflowError used to kill the reader)."""

from __future__ import annotations

import socket

from ingest_helpers import read_until_closed, wait_until
from eventstream.core.topics import TopicLimitError, TopicTable
from eventstream.metrics.reasons import category
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v1, encode_v2

import pytest


def test_table_refuses_past_its_bound_and_keeps_known_topics():
    t = TopicTable(3)
    ids = [t.intern(f"t{i}") for i in range(3)]
    assert ids == [1, 2, 3] and len(t) == 3
    with pytest.raises(TopicLimitError) as err:
        t.intern("t3")
    assert str(err.value).startswith("too_many_topics:") and "server.max_topics" in str(err.value)
    assert category(str(err.value)) == "too_many_topics"
    assert t.intern("t1") == 2 and len(t) == 3


def test_decoder_rejects_new_topics_past_the_bound_in_both_paths():
    dec = FrameDecoder(TopicTable(2))
    few = encode_v2("a", b"1", 2, 1) + encode_v2("b", b"2", 2, 2) + encode_v2("c", b"3", 2, 3)
    many = b"".join(encode_v2(("a", "b", "d")[i % 3], b"x", 2, 10 + i) for i in range(300))  # vectorized path
    recs, idx, errors = dec.feed_indexed(few + many)
    assert [(e.index, e.error_class, e.fatal) for e in errors] == \
        [(3, "too_many_topics", False)] + [(3 + i + 1, "too_many_topics", False) for i in range(2, 300, 3)]
    assert len(recs) == 2 + 200 and 0 not in recs["topic_id"].tolist()
    assert set(recs["topic_id"].tolist()) == {1, 2}
    single = FrameDecoder(dec.topics).feed_indexed(b"".join(encode_v1("zz", b"p") for _ in range(100)))
    assert len(single[0]) == 0 and {e.error_class for e in single[2]} == {"too_many_topics"}


def test_tcp_reader_survives_the_topic_bound_and_nacks_new_topics(tcp_server, engine_sinks):
    sink = engine_sinks(**{"server.max_topics": 4})
    srv = tcp_server(sink, readers=1)
    rejects = srv.test_rejects
    frames = [encode_v2(f"topic.{i}", b"p", 2, 100 + i) for i in range(6)]
    frames.append(encode_v1("topic.0", b"v1 on a known topic"))
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"".join(frames))
    s.shutdown(socket.SHUT_WR)
    got = read_until_closed(s)
    s.close()
    nacks = [(i, p.decode()) for k, i, p in got if k == KIND_NACK]
    assert [i for i, _ in nacks] == [5, 6]
    assert all(r.startswith("too_many_topics:") and "server.max_topics" in r for _, r in nacks)
    assert [i for k, i, _ in got if k == KIND_ACK][-1] == 5
    assert srv.failures() == [] and all(t.is_alive() for t in srv.threads())
    # the same reader takes a new connection and keeps serving known topics
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(encode_v2("topic.3", b"again", 2, 200))
    s.shutdown(socket.SHUT_WR)
    assert [(k, i) for k, i, _ in read_until_closed(s)] == [(KIND_ACK, 1)]
    s.close()
    assert sink.wait_for(6, 10)  # the v1 event has no ACK to wait for
    assert sorted(sink.records()["event_id"].tolist()) == [0, 100, 101, 102, 103, 200]
    assert [r.reason.split(":")[0] for r in rejects.rejections()] == ["too_many_topics"] * 2
    assert srv.statistics()["frames_rejected"] == {"too_many_topics": 2}


def test_udp_reader_survives_the_topic_bound(udp_server, engine_sinks):
    sink = engine_sinks(**{"server.max_topics": 2})
    srv = udp_server(sink)
    rejects = srv.test_rejects
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(5):
        u.sendto(encode_v2(f"u.{i}", b"x", 2, 1 + i), srv.address)
    wait_until(lambda: srv.statistics()["datagrams_received"] == 5, 10, "5 datagrams")
    u.sendto(encode_v2("u.1", b"known", 2, 50), srv.address)
    wait_until(lambda: srv.statistics()["datagrams_received"] == 6, 10, "the 6th datagram")
    u.close()
    assert srv.failures() == [] and srv.threads()[0].is_alive()
    assert sink.wait_for(3, 10)
    assert sorted(sink.records()["event_id"].tolist()) == [1, 2, 50]
    assert [r.index for r in rejects.rejections()] == [3, 4, 5]
    assert srv.statistics()["frames_rejected"] == {"too_many_topics": 3}

"""Subscribers over the wire against a real service: starts, globs, live follow, credit, groups, restarts,
a stalled subscriber that must not stall ingest, bad frames and too many subscribers."""

from __future__ import annotations

import socket
import time

import pytest

from eventstream.client import SubscribeError, subscribe
from eventstream.protocol import subscribe as sp
from eventstream.runtime import gil

from subscribe_helpers import send, sub_port

T = 20.0  # bound of every wait


def take(sub, n, timeout=T):
    """n events from a subscription, within `timeout` overall."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ev = sub.poll(max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"got {len(out)} of {n} events within {timeout} s"
        out.append(ev)
    return out


def test_gil_stays_off_with_the_subscribe_path(service):
    svc = service()
    send(svc, [("a", b"x")])
    with subscribe("127.0.0.1", sub_port(svc), "*", follow=False) as s:
        assert [e.payload for e in s] == [b"x"]
    assert not gil.gil_enabled() or gil.gil_allowed_by_env()


def test_earliest_reads_everything_stored_with_offsets_then_end(service):
    svc = service()
    send(svc, [("orders.eu", b"o%d" % i) for i in range(50)])
    with subscribe("127.0.0.1", sub_port(svc), "orders.*", follow=False) as s:
        evs = list(s)
        assert s.end_offset == 50
    assert [e.offset for e in evs] == list(range(50))
    assert [e.payload for e in evs] == [b"o%d" % i for i in range(50)]  # one topic: stored in send order
    assert [e.event_id for e in evs] == list(range(1, 51))
    assert all(e.topic == "orders.eu" and e.priority == 2 and e.stored_ns > 0 for e in evs)


def test_glob_selects_topics_and_offsets_stay_log_positions(service):
    svc = service()
    send(svc, [("orders.eu", b"o1"), ("users.x", b"u1"), ("orders.us", b"o2"), ("users.y", b"u2")])
    with subscribe("127.0.0.1", sub_port(svc), "orders.*", follow=False) as s:
        got = list(s)
    assert sorted(e.payload for e in got) == [b"o1", b"o2"]
    with subscribe("127.0.0.1", sub_port(svc), "*", follow=False) as s:
        every = {e.offset: e.payload for e in s}
    assert sorted(every) == [0, 1, 2, 3]
    assert all(every[e.offset] == e.payload for e in got)


def test_offset_latest_and_time_starts(service):
    svc = service()
    send(svc, [("t", b"a%d" % i) for i in range(10)])
    with subscribe("127.0.0.1", sub_port(svc), "t", follow=False) as s:
        first = list(s)
    with subscribe("127.0.0.1", sub_port(svc), "t", start=7, follow=False) as s:
        assert [e.offset for e in s] == [7, 8, 9]
    with subscribe("127.0.0.1", sub_port(svc), "t", start=10, follow=False) as s:
        assert list(s) == [] and s.end_offset == 10
    # time: the first event stored at or after T, and everything after it
    t_mid = first[4].stored_ns
    with subscribe("127.0.0.1", sub_port(svc), "t", start=f"{t_mid}ns", follow=False) as s:
        got = [e.offset for e in s]
    assert got[0] == min(e.offset for e in first if e.stored_ns >= t_mid) and got[-1] == 9
    # latest: only what is stored after the subscription
    with subscribe("127.0.0.1", sub_port(svc), "t", start="latest") as s:
        assert s.poll(0.2) is None
        send(svc, [("t", b"new")], start_id=100)
        ev = take(s, 1)[0]
    assert (ev.offset, ev.payload) == (10, b"new")


def test_live_follow_delivers_new_events_as_they_are_stored(service):
    svc = service()
    with subscribe("127.0.0.1", sub_port(svc), "live.*") as s:
        for k in range(5):
            send(svc, [("live.a", b"%d-%d" % (k, i)) for i in range(20)], start_id=1 + 20 * k)
            got = take(s, 20)
            assert [e.payload for e in got] == [b"%d-%d" % (k, i) for i in range(20)]
        assert s.poll(0.05) is None


def test_server_never_sends_beyond_credit(service):
    svc = service()
    send(svc, [("c", b"%d" % i) for i in range(30)])
    s = socket.create_connection(("127.0.0.1", sub_port(svc)), timeout=T)
    dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 20)
    s.sendall(sp.encode_subscribe("c", credit=5))

    def recv_delivers(n):
        got = []
        while len(got) < n:
            got += [f for f in dec.feed(s.recv(65536)) if f.kind == sp.KIND_DELIVER]
        return got

    assert len(recv_delivers(5)) == 5
    sess = next(iter(svc.subscribe.sessions.values()))
    # the session's sender has spent its credit and waits for more: nothing else is sent
    assert sess.credit == 0 and sess.sent == 5
    s.sendall(sp.encode_credit(3))
    assert [sp.parse_deliver(f).offset for f in recv_delivers(3)] == [5, 6, 7]
    assert sess.sent == 8 and sess.credit == 0
    assert not dec.buf, "bytes beyond the granted credit arrived"
    s.close()


def test_credit_is_granted_by_the_client_as_it_consumes(service):
    svc = service()
    send(svc, [("c", b"%d" % i) for i in range(300)])
    with subscribe("127.0.0.1", sub_port(svc), "c", credit=10, follow=False) as s:
        got = []
        for ev in s:
            got.append(ev)
            sess = next(iter(svc.subscribe.sessions.values()), None)
            # never more than the credit in flight: received by us and not yet taken
            assert s.buffered() <= 10
            if sess is not None:
                assert sess.credit >= 0
    assert [e.offset for e in got] == list(range(300))


def test_group_resumes_after_a_server_restart_without_loss(service, tmp_path):
    data = tmp_path / "data"
    svc = service(data)
    send(svc, [("g", b"%d" % i) for i in range(100)])
    seen = []
    with subscribe("127.0.0.1", sub_port(svc), "g", group="billing", credit=20) as s:
        seen += take(s, 40)
        assert s.commit() == 40  # durable: the group resumes at 40
        seen += take(s, 10)  # taken, never committed: may come again
    svc.stop()
    assert (data / "subscribe" / "groups" / "billing.json").exists()
    svc2 = service(data)  # a new process would see the same files
    send(svc2, [("g", b"after-%d" % i) for i in range(30)], start_id=1000)
    with subscribe("127.0.0.1", sub_port(svc2), "g", group="billing", start="latest", credit=50) as s:
        again = take(s, 90)  # 40..99 (the group's offset beats start=latest) and the 30 new ones
        assert s.commit() == 130
        assert s.poll(0.05) is None
    assert again[0].offset == 40
    offsets = [e.offset for e in seen + again]
    assert set(offsets) == set(range(130))  # nothing lost
    dups = sorted(o for o in set(offsets) if offsets.count(o) > 1)
    assert dups == list(range(40, 50))  # duplicates only of what was taken and not committed
    assert [e.payload for e in again[-30:]] == [b"after-%d" % i for i in range(30)]


def test_two_group_members_share_the_events(service):
    svc = service()
    send(svc, [("shared", b"%d" % i) for i in range(200)])
    a = subscribe("127.0.0.1", sub_port(svc), "shared", group="workers", credit=10)
    b = subscribe("127.0.0.1", sub_port(svc), "shared", group="workers", credit=10)
    got = {"a": [], "b": []}
    deadline = time.monotonic() + T
    with a, b:
        while len(got["a"]) + len(got["b"]) < 200:
            assert time.monotonic() < deadline, f"only {len(got['a']) + len(got['b'])} of 200 events"
            for name, m in (("a", a), ("b", b)):
                ev = m.poll(0.05)
                if ev is not None:
                    got[name].append(ev.offset)
                    m.commit()
        assert a.poll(0.05) is None and b.poll(0.05) is None
    assert got["a"] and got["b"], "one member got everything"
    assert not set(got["a"]) & set(got["b"])  # no member left: each event went to one member
    assert sorted(got["a"] + got["b"]) == list(range(200))


def test_a_leaving_member_hands_its_events_to_the_other(service):
    svc = service()
    send(svc, [("h", b"%d" % i) for i in range(40)])
    b = subscribe("127.0.0.1", sub_port(svc), "h", group="hand", credit=5)
    with subscribe("127.0.0.1", sub_port(svc), "h", group="hand", credit=5) as a:
        first = take(a, 1)
    # a left without committing: whatever it held goes to b; b ends up with every event
    with b:
        seen = set()
        deadline = time.monotonic() + T
        while len(seen) < 40:
            assert time.monotonic() < deadline, f"b got {len(seen)} of 40"
            ev = b.poll(0.1)
            if ev is not None:
                seen.add(ev.offset)
        assert b.commit() == 40
    assert first[0].offset in seen


def test_a_stalled_subscriber_does_not_stall_ingest(service):
    svc = service(**{"queues.transactional.capacity": 1024})
    stalled = socket.create_connection(("127.0.0.1", sub_port(svc)), timeout=T)
    stalled.sendall(sp.encode_subscribe("*", credit=0))  # never grants credit, never reads
    with subscribe("127.0.0.1", sub_port(svc), "*", credit=1) as one:
        n = 20_000  # far more than the queue holds: ingest has to go on storing
        send(svc, [("bulk", b"%d" % i) for i in range(n)])
        assert svc.engine.event_log.statistics()["records"] == n
        assert take(one, 1)[0].offset == 0
        zero = [s for s in svc.subscribe.sessions.values() if s.sub is not None and s.sub.credit == 0]
        assert len(zero) == 1 and zero[0].sent == 0 and zero[0].credit == 0  # it got nothing, ingest went on
    stalled.close()


def _raw_error(port: int, data: bytes) -> str:
    s = socket.create_connection(("127.0.0.1", port), timeout=T)
    s.sendall(data)
    dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 20)
    frames = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        frames += dec.feed(chunk)
    s.close()
    errs = [f.payload.decode() for f in frames if f.kind == sp.KIND_SUB_ERROR]
    assert len(errs) == 1, frames
    return errs[0]


@pytest.mark.parametrize("data, expect", [
    (b"\x00\x00\x00\x20GARBAGE-GARBAGE-GARBAGE-GARBAGE!", "magic 0x47 is not allowed"),
    (b"\xff\xff\xff\xff\xe5\x05", "frame length 4294967295 exceeds"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b"x" * 255, payload=b"g" * 2000), "exceeds the limit"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b"x", payload=b"g" * 129), "group name of 129 bytes is not allowed"),
    (sp._frame(sp.KIND_SUBSCRIBE, flags=0x40, topic=b"t"), "SUBSCRIBE flags 0x40 is not allowed"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b""), "topic glob of 0 bytes is not allowed"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b"t", payload=b"bad name"), "group name 'bad name' is not allowed"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b"t", timestamp_ns=1 << 40), "credit 1099511627776 is not allowed"),
    (sp._frame(sp.KIND_CREDIT, event_id=5), "allowed: 5 SUBSCRIBE"),
    (sp._frame(sp.KIND_DELIVER, topic=b"t"), "kind 7 is not allowed here"),
    (sp._frame(sp.KIND_SUBSCRIBE, topic=b"t")[:-1] + b"u", "crc32"),
    (sp.encode_subscribe("t") + sp.encode_credit(1 << 20), "CREDIT 1048576 is not allowed"),
    (sp.encode_subscribe("t") + sp.encode_commit(3), "COMMIT is not allowed without a group"),
    (sp.encode_subscribe("t", group="g") + sp.encode_commit(3), "COMMIT 3 is not allowed; allowed: 0..0"),
])
def test_bad_frames_get_a_sub_error_naming_the_field(service, data, expect):
    svc = service()
    reason = _raw_error(sub_port(svc), data)
    assert expect in reason and "allowed" in reason, reason
    assert svc.subscribe.statistics()["subscribers"] <= 1  # the listener goes on
    with subscribe("127.0.0.1", sub_port(svc), "*", follow=False) as s:
        assert list(s) == []


def test_a_second_glob_in_one_group_is_refused(service):
    svc = service()
    send(svc, [("a.x", b"1")])
    with subscribe("127.0.0.1", sub_port(svc), "a.*", group="g1") as a:
        take(a, 1)  # a has joined: the group follows "a.*"
        with subscribe("127.0.0.1", sub_port(svc), "b.*", group="g1") as s, \
                pytest.raises(SubscribeError, match="follows topic glob 'a.\\*'"):
            s.poll(T)


def test_subscribers_over_the_limit_are_refused_with_a_clear_error(service):
    svc = service(**{"server.subscribe.max_subscribers": 2})
    port = sub_port(svc)
    a = subscribe("127.0.0.1", port, "*")
    b = subscribe("127.0.0.1", port, "*")
    with a, b:
        assert a.poll(0.05) is None and b.poll(0.05) is None  # both are served
        # both handshakes done (a connection still in its handshake would be evicted to make room)
        deadline = time.monotonic() + T
        while svc.subscribe.sessions_by_kind()["solo"] < 2:
            assert time.monotonic() < deadline, svc.subscribe.sessions_by_kind()
            time.sleep(0.01)
        with subscribe("127.0.0.1", port, "*") as c, pytest.raises(SubscribeError) as err:
            c.poll(T)
        assert "too many subscribers" in str(err.value) and "max_subscribers=2" in str(err.value)
        assert svc.subscribe.statistics()["refused"] == 1
        text = svc.metrics.render().decode()
        assert "subscribers 2" in text and "subscribe_delivered_total 0" in text


def test_tokens_are_required_when_configured(service):
    svc = service(**{"server.auth.tokens": ["s3cret"]})
    port = sub_port(svc)
    with subscribe("127.0.0.1", port, "*") as s, pytest.raises(SubscribeError, match="auth: .*HELLO"):
        s.poll(T)
    with subscribe("127.0.0.1", port, "*", token="wrong") as s, pytest.raises(SubscribeError, match="auth: token"):
        s.poll(T)
    send_ok = subscribe("127.0.0.1", port, "*", token="s3cret", follow=False)
    with send_ok as s:
        assert list(s) == []


def test_a_selective_glob_reads_past_chunks_without_a_match(service):
    svc = service()
    # about 3 MiB of log (3 tail chunks) of another topic, then one match: a chunk without a match is not
    # the end of the log (an END there would end this no-follow subscription early)
    send(svc, [("noise", b"n" * 60) for _ in range(20_000)])
    send(svc, [("wanted", b"w")], start_id=50_000)
    with subscribe("127.0.0.1", sub_port(svc), "wanted", follow=False) as s:
        got = list(s)
        assert s.end_offset == 20_001
    assert [(e.payload, e.offset) for e in got] == [(b"w", 20_000)]


def test_a_silent_connection_is_refused_after_the_handshake_timeout(service):
    svc = service(**{"server.subscribe.handshake_timeout_s": 0.2})
    reason = _raw_error(sub_port(svc), b"")
    assert "no SUBSCRIBE within 0.2 s" in reason and "handshake_timeout_s" in reason


def test_payloads_of_every_size_reach_subscribers_whole(service):
    """payloads.arena_bytes: payloads over records.payload_bytes (64 here) are stored with their
    record and delivered to subscribers exactly, up to the largest a frame can carry."""
    svc = service()
    sizes = [0, 64, 65, 4096, 70_000, (1 << 20) - 26 - len("big")]
    pays = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    send(svc, [("big", p) for p in pays])
    with subscribe("127.0.0.1", sub_port(svc), "big", follow=False) as s:
        got = list(s)
    assert [e.payload for e in got] == pays

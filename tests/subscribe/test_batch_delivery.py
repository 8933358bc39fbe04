"""Batch delivery (issue 20 item 5): a subscription that asks for it (SUBSCRIBE flags bit 3, the bundled
clients' default) receives many events per DELIVER_BATCH frame, credit still counts events, and the
events are the same as one DELIVER frame each would carry."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subscribe_helpers import send, sub_port

from eventstream.client import subscribe
from eventstream.protocol import subscribe as sp


def take(sub, n, timeout=30.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ev = sub.poll(max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"got {len(out)} of {n} events within {timeout} s"
        out.append(ev)
    return out


def test_batch_and_single_delivery_carry_the_same_events(service):
    svc = service()
    pairs = [(f"bd.{i % 3}", bytes([i % 256]) * (i * 37 % 700)) for i in range(500)]
    send(svc, pairs)
    with subscribe("127.0.0.1", sub_port(svc), "bd.*", credit=2000, follow=False) as a:
        batched = take(a, 500)
    with subscribe("127.0.0.1", sub_port(svc), "bd.*", credit=2000, follow=False, batch=False) as b:
        single = take(b, 500)
    assert batched == single
    for t in ("bd.0", "bd.1", "bd.2"):  # storage order: each topic's events in the order sent
        assert [e.payload for e in batched if e.topic == t] == [p for topic, p in pairs if topic == t]
    assert [e.offset for e in batched] == list(range(500))


def _frames(sock, dec, want_events, timeout=30.0):
    got, events = [], 0
    sock.settimeout(timeout)
    while events < want_events:
        data = sock.recv(1 << 20)
        assert data, "closed"
        for f in dec.feed(data):
            got.append(f)
            events += f.event_id if f.kind == sp.KIND_DELIVER_BATCH else (f.kind == sp.KIND_DELIVER)
    return got, events


def test_credit_counts_events_not_frames(service):
    svc = service()
    send(svc, [("cr.t", b"%d" % i) for i in range(300)])
    with socket.create_connection(("127.0.0.1", sub_port(svc)), timeout=30) as s:
        s.sendall(sp.encode_subscribe("cr.*", credit=120, batch=True))
        dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 30)
        frames, events = _frames(s, dec, 120)
        assert events == 120 and all(f.kind == sp.KIND_DELIVER_BATCH for f in frames)
        assert len(frames) < 120  # many events per frame
        s.settimeout(0.3)  # no more without credit (bounded wait: nothing may arrive)
        with pytest.raises(TimeoutError):
            more = s.recv(1 << 16)
            assert not more
        s.sendall(sp.encode_credit(180))
        frames, events = _frames(s, dec, 180)
        evs = [e for f in frames for e in sp.parse_deliver_batch(f)]
        assert [e.offset for e in evs] == list(range(120, 300))


event_st = st.builds(lambda o, t, p, e, pr, pt, sn: SimpleNamespace(offset=o, topic=t, payload=p, event_id=e,
                                                                    priority=pr, producer_ts=pt, stored_ns=sn),
                     st.integers(0, 2**64 - 1), st.sampled_from(["a", "b.c", "ü", "t" * 255]),
                     st.binary(max_size=3000), st.integers(0, 2**64 - 1), st.integers(0, 4),
                     st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(event_st, min_size=1, max_size=40), st.lists(st.integers(0, 200_000), max_size=8))
def test_deliver_batch_round_trip_any_split(events, cuts):
    data = sp.encode_deliver_batches(events)
    dec = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 30)
    frames = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        frames += dec.feed(data[a:b])
    got = [e for f in frames for e in sp.parse_deliver_batch(f)]
    assert [(e.offset, e.topic, e.payload, e.event_id, e.priority, e.producer_ts, e.stored_ns) for e in got] == [
        (e.offset, e.topic, e.payload, e.event_id, e.priority, e.producer_ts, e.stored_ns) for e in events]


def test_large_events_split_frames_and_garbage_is_refused():
    big = [SimpleNamespace(offset=i, topic="t", payload=b"x" * 100_000, event_id=0, priority=0, producer_ts=0,
                           stored_ns=0) for i in range(6)]
    frames = sp.SubscribeDecoder(sp.SERVER_KINDS, 1 << 30).feed(sp.encode_deliver_batches(big))
    assert len(frames) == 3 and [f.event_id for f in frames] == [2, 2, 2]
    bad = sp.Frame(sp.KIND_DELIVER_BATCH, event_id=5, payload=b"\x00\x01\x01t" + b"\x00" * 10)
    with pytest.raises(sp.SubscribeProtocolError, match="DELIVER_BATCH"):
        sp.parse_deliver_batch(bad)

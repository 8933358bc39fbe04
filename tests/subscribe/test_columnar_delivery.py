"""Columnar delivery over real sockets: Subscription.batches() / poll_batch() and the asyncio client's
batches get every stored event exactly once with exact offsets, across DELIVER_BATCH frames and credit
boundaries; consumer groups hand out, commit (also in the middle of a batch) and hand back batches."""

from __future__ import annotations

import asyncio
import random

import numpy as np
from subscribe_helpers import send, sub_port

from eventstream.client import subscribe
from eventstream.client.aio import aio_subscribe


def stored(n: int, seed: int = 7):
    rng = random.Random(seed)
    # payloads up to 700 bytes: past records.payload_bytes (64 in these tests), so large-payload entries too
    return [(f"cd.{rng.randrange(5)}", rng.randbytes(rng.choice([0, 1, 63, 64, 65, 300, 700]))) for _ in range(n)]


def per_topic(pairs) -> dict[str, list[bytes]]:
    """Payloads by topic, in order (storage keeps each topic's events in the order sent)."""
    out: dict[str, list[bytes]] = {}
    for t, p in pairs:
        out.setdefault(t, []).append(p)
    return out


def columns(batches):
    offsets, topics, payloads = [], [], []
    for b in batches:
        assert len(b) == len(b.offsets) == len(b.event_ids) == len(b.payload_lens)
        offsets += b.offsets.tolist()
        topics += b.topic_names()
        payloads += b.payloads()
        assert bytes(b.payload_block()) == b"".join(b.payloads())
    return offsets, topics, payloads


def test_batches_carry_every_event_once_with_exact_offsets_across_credit(service):
    svc = service()
    pairs = stored(1500)
    send(svc, pairs)
    for credit in (1, 37, 1000, 5000):
        with subscribe("127.0.0.1", sub_port(svc), "cd.*", credit=credit, follow=False) as s:
            got = list(s.batches())
            assert s.ended and s.end_offset == 1500 and s.taken == 1500 and s.next_offset == 1500
        assert all(len(b) <= credit for b in got)  # never more than the credit in one go
        offsets, topics, payloads = columns(got)
        assert offsets == list(range(1500)), credit
        assert per_topic(zip(topics, payloads, strict=True)) == per_topic(pairs)


def test_a_glob_selects_and_per_event_and_batch_takes_mix(service):
    svc = service()
    pairs = stored(600)
    send(svc, pairs)
    with subscribe("127.0.0.1", sub_port(svc), "cd.*", credit=1000, follow=False) as s:
        every = [(e.offset, e.topic, e.payload) for e in s]
    want = [e for e in every if e[1] in ("cd.1", "cd.3")]
    assert per_topic(e[1:] for e in every) == per_topic(pairs)
    with subscribe("127.0.0.1", sub_port(svc), "cd.[13]", credit=50, follow=False) as s:
        got = []
        while True:
            ev = s.poll(10)  # one event, then the rest of its batch as columns
            if ev is None:
                break
            got.append((ev.offset, ev.topic, ev.payload))
            b = s.poll_batch(10)
            if b is None:
                break
            got += list(zip(b.offsets.tolist(), b.topic_names(), b.payloads(), strict=True))
    assert got == want


def test_single_delivery_comes_as_batches_too(service):
    svc = service()
    pairs = stored(200)
    send(svc, pairs)
    with subscribe("127.0.0.1", sub_port(svc), "cd.*", credit=64, follow=False, batch=False) as s:
        offsets, topics, payloads = columns(s.batches())
    assert offsets == list(range(200)) and per_topic(zip(topics, payloads, strict=True)) == per_topic(pairs)


def test_a_group_commits_in_the_middle_of_a_batch_and_the_next_member_resumes_there(service):
    svc = service()
    pairs = stored(400)
    send(svc, pairs)
    port = sub_port(svc)
    with subscribe("127.0.0.1", port, "cd.*", credit=1000, follow=False) as s:
        every = [(e.topic, e.payload) for e in s]
    with subscribe("127.0.0.1", port, "cd.*", group="mid", credit=100) as a:
        first = [a.poll(10) for _ in range(37)]  # 37 events of a batch of up to 100
        assert [e.offset for e in first] == list(range(37))
        assert a.commit() == 37  # the rest of the batch is still in flight: the group is at 37
    with subscribe("127.0.0.1", port, "cd.*", group="mid", credit=64, follow=False) as b:
        batches = []
        while (got := b.poll_batch(10)) is not None:
            batches.append(got)
            b.commit()
        assert b.committed == 400
    offsets, topics, payloads = columns(batches)
    assert offsets == list(range(37, 400))  # nothing committed again, nothing lost
    assert list(zip(topics, payloads, strict=True)) == every[37:]


def test_two_members_share_batches_without_loss_or_duplicates(service):
    svc = service()
    pairs = stored(3000)
    send(svc, pairs)
    port = sub_port(svc)
    seen: list[int] = []
    with (
        subscribe("127.0.0.1", port, "cd.*", group="two", credit=200) as a,
        subscribe("127.0.0.1", port, "cd.*", group="two", credit=300) as b,
    ):
        idle = 0
        while len(seen) < 3000 and idle < 3:
            idle += 1
            for m in (a, b):
                got = m.poll_batch(0.5)
                if got is not None:
                    idle = 0
                    seen += got.offsets.tolist()
                    m.commit()
        assert a.committed is not None and b.committed is not None
    assert sorted(seen) == list(range(3000))  # every event once: no member left, nothing handed back


def test_a_member_leaving_hands_its_uncommitted_batch_slices_back(service):
    svc = service()
    pairs = stored(500)
    send(svc, pairs)
    port = sub_port(svc)
    with subscribe("127.0.0.1", port, "cd.*", group="back", credit=120) as stay:
        with subscribe("127.0.0.1", port, "cd.*", group="back", credit=120) as leave:
            b = leave.poll_batch(10)
            assert b is not None and len(b) > 10  # taken, never committed
            took = b.offsets.tolist()
        seen = []
        while len(set(seen)) < 500:
            got = stay.poll_batch(10)
            assert got is not None, f"{len(set(seen))} of 500"
            seen += got.offsets.tolist()
            stay.commit()
    assert set(seen) == set(range(500)) and set(took) <= set(seen)  # what `leave` held came back


def test_asyncio_batches(service):
    svc = service()
    pairs = stored(700)
    send(svc, pairs)

    async def run():
        s = await aio_subscribe("127.0.0.1", sub_port(svc), "cd.*", credit=90, follow=False)
        try:
            return [b async for b in s.batches()]
        finally:
            await s.close()

    got = asyncio.run(run())
    offsets, topics, payloads = columns(got)
    assert offsets == list(range(700)) and per_topic(zip(topics, payloads, strict=True)) == per_topic(pairs)
    assert all(b.event_ids.dtype == np.uint64 for b in got)

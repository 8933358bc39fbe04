"""BATCH frames through real sockets into the whole service: every event of random batches (sizes,
topics, payload lengths, priorities) is ACKed and stored as sent; a refused event of a batch is
NACKed by its own index while the rest is stored; the asyncio sender and `eventstream load` batch by
default."""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstream.cli.load import run_load
from eventstream.client import TcpClient
from eventstream.client.aio import AsyncSender
from eventstream.config import load_config
from eventstream.protocol.frames import (
    BATCH_HEAD, BATCH_RECORD_DTYPE, KIND_ACK, EncodeError, KIND_NACK, encode_batch, encode_v2, split_control_frames,
)
from eventstream.service import Service
from eventstream.storage import EventLogReader


def service_cfg(data: Path, **extra):
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
            "storage.data_dir": str(data), "records.payload_bytes": 64,
            "processors.transactional.retry_backoff_ms": 1.0}
    over.update(extra)
    return load_config(environ={}, overrides=over)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("batch") / "data"
    with Service(service_cfg(data)) as svc:
        yield svc, data


def stored_by_id(data: Path, ids: set[int]) -> dict[int, tuple[str, bytes, int]]:
    batch = EventLogReader(data / "events.bin").read()
    names = batch.topic_names()
    out = {}
    for i, eid in enumerate(batch.records["event_id"].tolist()):
        if eid in ids:
            out[eid] = (names[i], batch.payload(i), int(batch.records["priority"][i]))
    return out


_next_id = iter(range(10_000_000, 1 << 40))

event_st = st.tuples(st.sampled_from(["a", "orders.eu", "ü", "t" * 200]), st.integers(0, 3000), st.integers(0, 4))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(event_st, min_size=1, max_size=60), min_size=1, max_size=4), st.integers(200, 40_000))
def test_random_batches_are_acked_and_stored_as_sent(service, groups, batch_bytes):
    svc, data = service
    want = {}
    with TcpClient(*svc.tcp.address, batch_bytes=batch_bytes) as c:
        for g in groups:
            evs = []
            for topic, size, prio in g:
                eid = next(_next_id)
                payload = bytes([eid % 251]) * size
                want[eid] = (topic, payload, prio)
                evs.append((topic, payload, prio, eid))
            c.send_many(evs)
        assert c.wait_acked(30)
    assert (c.acked, c.nacked) == (len(want), 0)
    assert stored_by_id(data, set(want)) == want


def _raw_connect(svc) -> socket.socket:
    s = socket.create_connection(svc.tcp.address, timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_until_ack(s: socket.socket, count: int) -> list[tuple[int, int, bytes]]:
    buf, got = bytearray(), []
    while not any(k == KIND_ACK and v >= count for k, v, _ in got):
        data = s.recv(65536)
        assert data, f"closed before ACK({count}): {got}"
        buf += data
        got += split_control_frames(buf)
    return got


def test_a_refused_event_is_nacked_by_index_and_the_rest_stored(service):
    svc, data = service
    ids = [next(_next_id) for _ in range(6)]
    frame = bytearray(encode_batch([("rf", b"p%d" % i, 2, eid) for i, eid in enumerate(ids)]))
    _l, _m, _k, _r, _f, count, _tc, tbytes, _z, _crc = BATCH_HEAD.unpack_from(frame, 0)
    rows = np.frombuffer(frame, dtype=BATCH_RECORD_DTYPE, count=count, offset=30 + tbytes).copy()
    rows["priority"][3] = 7  # event 4 of the batch, frame index 2 + 3 = 5 on this connection
    frame[30 + tbytes:30 + tbytes + rows.nbytes] = rows.tobytes()
    struct.pack_into(">I", frame, 26, zlib.crc32(bytes(frame[30:])))
    first = next(_next_id)
    with _raw_connect(svc) as s:
        s.sendall(encode_v2("rf", b"single", 2, first) + bytes(frame))
        got = _read_until_ack(s, 6)
    nacks = [(v, r.decode()) for k, v, r in got if k == KIND_NACK]
    assert len(nacks) == 1 and nacks[0][0] == 5 and nacks[0][1].startswith("priority 7")
    assert max(v for k, v, _ in got if k == KIND_ACK) == 6  # the ACK counts events: 1 + 5 accepted
    kept = [first] + ids[:3] + ids[4:]
    assert sorted(stored_by_id(data, set(ids) | {first})) == sorted(kept)


def test_asyncio_sender_batches_by_default(service):
    svc, data = service

    async def go():
        sender = await AsyncSender.connect(*svc.tcp.address)
        ids = [await sender.send("aio", b"x%d" % i, event_id=next(_next_id)) for i in range(300)]
        await sender.flush()
        await sender.close()
        return sender, ids

    sender, ids = asyncio.run(go())
    assert sender.sent == 300 and sender.acked == 300 and sender.nacks == []
    assert len(stored_by_id(data, set(ids))) == 300


def test_asyncio_sender_draws_distinct_ids_and_names_a_bad_field(service):
    svc, data = service

    async def go():
        sender = await AsyncSender.connect(*svc.tcp.address)
        ids = [await sender.send("aio.ids", b"%d" % i) for i in range(50)]
        with pytest.raises(EncodeError, match=r"priority 9 is not allowed; allowed: 0\.\.4"):
            await sender.send("aio.ids", b"x", priority=9)
        with pytest.raises(EncodeError, match=r"topic of 0 bytes is not allowed"):
            await sender.send("", b"x")
        await sender.flush()
        await sender.close()
        return sender, ids

    sender, ids = asyncio.run(go())
    # one connection's ids: a random odd start, then +1 (never 0, never repeated)
    assert ids[0] % 2 == 1 and ids == list(range(ids[0], ids[0] + 50))
    assert sender.sent == 50 and sender.acked == 50 and sender.nacks == []
    assert len(stored_by_id(data, set(ids))) == 50


def test_load_single_and_batch_frames_with_a_payload_range(service):
    svc, data = service
    for frame in ("single", "batch"):
        res = run_load(*svc.tcp.address, events=3000, connections=2, payload_bytes="16:2000", frame=frame,
                       topic=f"load-{frame}", batch=100, timeout=30)
        assert res["errors"] == [] and res["acked"] == 3000 and res["frame"] == frame
        assert res["payload_bytes"] == "16:2000"
    sizes = [len(p) for p in EventLogReader(data / "events.bin").read(topic="load-batch").payloads()]
    assert len(sizes) == 3000 and 16 <= min(sizes) and max(sizes) <= 2000 and len(set(sizes)) > 500

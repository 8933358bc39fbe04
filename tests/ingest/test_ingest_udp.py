"""UDP ingest over real sockets: batches (recvmmsg and the recvmsg_into fallback), bad datagrams, pause."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from ingest_helpers import wait_until
from eventstream.ingest.udp import _RECVMMSG
from eventstream.protocol.frames import encode_v1, encode_v2


def sender() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


@pytest.mark.parametrize("use_recvmmsg", [True, False], ids=["recvmmsg", "recvmsg_into"])
def test_batches_of_datagrams_with_several_frames(udp_server, use_recvmmsg):
    srv = udp_server(use_recvmmsg=use_recvmmsg)
    expected_mode = "recvmmsg" if use_recvmmsg and _RECVMMSG is not None else "recvmsg_into"
    assert srv.statistics()["recv_mode"] == expected_mode
    s = sender()
    n = 300
    for i in range(n):
        s.sendto(encode_v2("u", b"%d" % i, 2, 3 * i + 1) + encode_v1("u", b"v1") + encode_v2("w", b"", 4, 3 * i + 2),
                 srv.address)
    assert srv.test_sink.wait_for(3 * n, 20), srv.statistics()
    recs = srv.test_sink.records()
    v2 = recs[recs["event_id"] != 0]
    assert len(np.unique(v2["event_id"])) == 2 * n
    assert sorted(srv.test_sink.payloads()).count(b"v1") == n
    # the datagram count is raised after a batch's events are delivered: wait for it, do not race it
    wait_until(lambda: srv.statistics()["datagrams_received"] == n, what=f"{n} datagrams counted")
    st = srv.statistics()
    assert st["datagrams_received"] == n and st["datagrams_bad"] == 0 and st["frames_accepted"] == 3 * n


def test_bad_datagrams_are_counted_and_the_socket_keeps_working(udp_server):
    srv = udp_server()
    s = sender()
    good = encode_v2("g", b"ok", 2, 1)
    bad_crc = bytearray(encode_v2("g", b"xx", 2, 2))
    bad_crc[-1] ^= 1
    s.sendto(good[:-3], srv.address)  # ends inside a frame
    s.sendto(encode_v1("g", b"before") + b"garbage!", srv.address)  # framing error after one good frame
    s.sendto(bytes(bad_crc) + encode_v2("g", b"after", 2, 3), srv.address)  # content error
    s.sendto(good, srv.address)
    assert srv.test_sink.wait_for(3, 10)
    wait_until(lambda: srv.statistics()["datagrams_received"] == 4, what="4 datagrams")
    st = srv.statistics()
    assert st["datagrams_bad"] == 2 and st["frames_rejected"] == {"crc": 1}
    assert sorted(srv.test_sink.payloads()) == [b"after", b"before", b"ok"]
    assert [r.event_id for r in srv.test_rejects.rejections()] == [2]


def test_paused_udp_keeps_reading_and_rejects_visibly(udp_server):
    srv = udp_server()
    adm = srv.test_sink.admission  # the engine's, set by the control plane
    adm.paused = True
    s = sender()
    for i in range(10):
        s.sendto(encode_v2("p", b"", 2, i + 1), srv.address)
    wait_until(lambda: srv.statistics()["backpressure_drops"] == 10, what="10 paused drops")
    assert srv.test_sink.count == 0
    assert sum(n for n, reason in srv.test_rejects.dropped() if reason == "paused") == 10
    adm.paused = False
    s.sendto(encode_v2("p", b"", 2, 99), srv.address)
    assert srv.test_sink.wait_for(1, 10)


def test_large_datagram_payloads_use_the_arena_and_a_full_arena_sheds_visibly(udp_server, engine_sinks):
    """UDP has no flow control: a payload the full payload arena cannot take is shed with reason
    overflow:payloads (counted, on_reject); the others arrive whole."""
    from eventstream.metrics.reasons import category

    # the handler holds the first batches (their arena slots stay claimed): 2 chunks of 64 KiB
    sink = engine_sinks(gated=True, **{"payloads.arena_bytes": 128 << 10, "server.tcp.max_frame_bytes": 65535})
    srv = udp_server(sink)
    s = sender()
    pays = [bytes([i]) * 40_000 for i in range(3)]  # each takes a whole 64 KiB slot
    for i, p in enumerate(pays):
        s.sendto(encode_v2("big", p, 2, i + 1), srv.address)
        # one at a time: the order of arrival is the order of the claims
        wait_until(lambda i=i: srv.statistics()["datagrams_received"] == i + 1, 10, "datagram")
    sink.release.set()
    s.sendto(encode_v2("big", b"small", 2, 9), srv.address)
    wait_until(lambda: srv.test_sink.count == 3, 10, "3 records")
    assert srv.test_sink.payloads() == pays[:2] + [b"small"]
    st = srv.statistics()
    (reason,) = [r for r in st["frames_rejected"] if r.startswith("overflow:payloads")]
    assert st["frames_rejected"][reason] == 1 and category(reason) == "overflow"
    assert [r.reason for r in srv.test_rejects.rejections()] == [reason]


def test_batch_frames_over_udp_number_every_event(udp_server):
    """A BATCH frame in a datagram: every event arrives; indices count events (a refused event of a
    batch is reported with its own index, the frames after the batch with theirs)."""
    import struct
    import zlib

    from eventstream.protocol.frames import BATCH_HEAD, BATCH_RECORD_DTYPE, encode_batch

    srv = udp_server()
    s = sender()
    frame = bytearray(encode_batch([("ub", b"e%d" % i, 2, i + 1) for i in range(20)]))
    tbytes = BATCH_HEAD.unpack_from(frame, 0)[7]
    rows = np.frombuffer(frame, dtype=BATCH_RECORD_DTYPE, count=20, offset=30 + tbytes).copy()
    rows["priority"][4] = 9  # event 5 of the batch: index 1 + 5 = 6 in this datagram stream
    frame[30 + tbytes:30 + tbytes + rows.nbytes] = rows.tobytes()
    struct.pack_into(">I", frame, 26, zlib.crc32(bytes(frame[30:])))
    bad_after = bytearray(encode_v2("ub", b"after", 2, 99))
    bad_after[6] = 9  # priority 9: refused, index 22
    s.sendto(encode_v2("ub", b"before", 2, 100) + bytes(frame) + bytes(bad_after), srv.address)
    wait_until(lambda: srv.test_sink.count == 20, 10, "20 records")
    assert sorted(srv.test_sink.payloads()) == sorted([b"before"] + [b"e%d" % i for i in range(20) if i != 4])
    wait_until(lambda: len(srv.test_rejects.rejections()) == 2, 10, "2 rejections")
    assert sorted(r.index for r in srv.test_rejects.rejections()) == [6, 22]
    s.sendto(bytes(bad_after), srv.address)  # a later datagram goes on from there: 23, not 4
    wait_until(lambda: len(srv.test_rejects.rejections()) == 3, 10, "3 rejections")
    assert sorted(r.index for r in srv.test_rejects.rejections()) == [6, 22, 23]

"""UDP ingest over real sockets: batches (recvmmsg and the recvmsg_into fallback), bad datagrams, pause."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from ingest_helpers import wait_until
from eventstream.core.records import payloads
from eventstream.ingest.admission import Admission
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
    assert sorted(payloads(recs)).count(b"v1") == n
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
    assert sorted(payloads(srv.test_sink.records())) == [b"after", b"before", b"ok"]
    assert [r.event_id for r in srv.test_rejects.rejections()] == [2]


def test_paused_udp_keeps_reading_and_rejects_visibly(udp_server):
    adm = Admission(paused=True)
    srv = udp_server(admission=adm)
    s = sender()
    for i in range(10):
        s.sendto(encode_v2("p", b"", 2, i + 1), srv.address)
    wait_until(lambda: srv.statistics()["backpressure_drops"] == 10, what="10 paused drops")
    assert srv.test_sink.count == 0
    assert sum(n for n, reason in srv.test_rejects.dropped() if reason == "paused") == 10
    adm.paused = False
    s.sendto(encode_v2("p", b"", 2, 99), srv.address)
    assert srv.test_sink.wait_for(1, 10)

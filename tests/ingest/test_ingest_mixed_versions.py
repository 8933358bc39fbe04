"""v1 and rejected v2 frames in one read (hardening issue #11 item 3): the connection becomes a v2
connection from the rejected v2 frame too, so its NACK is sent, whatever else the read carried."""

from __future__ import annotations

import socket

import pytest

from ingest_helpers import read_until_closed
from eventstream.protocol.frames import KIND_ACK, KIND_NACK, encode_v1, encode_v2


def bad_crc(frame: bytes) -> bytes:
    b = bytearray(frame)
    b[-1] ^= 0xFF
    return bytes(b)


V1 = encode_v1("mix", b"one")
V2_OK = encode_v2("mix", b"two", 2, 22)
V2_BAD_CRC = bad_crc(encode_v2("mix", b"bad", 2, 33))
V2_BAD_PRIO = encode_v2("mix", b"p", 2, 44)[:6] + b"\x09" + encode_v2("mix", b"p", 2, 44)[7:]
V2_BAD_KIND = encode_v2("mix", b"k", 2, 55, kind=2)

CASES = {
    "v1_then_bad_crc": ([V1, V2_BAD_CRC], [2], 1),
    "bad_crc_then_v1": ([V2_BAD_CRC, V1], [1], 1),
    "v1_bad_priority_v1": ([V1, V2_BAD_PRIO, V1], [2], 2),
    "v1_bad_kind": ([V1, V2_BAD_KIND], [2], 1),
    "v1_bad_crc_then_good_v2": ([V1, V2_BAD_CRC, V2_OK], [2], 2),
    "only_bad_v2": ([V2_BAD_CRC], [1], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_v2_frame_next_to_v1_frames_in_one_read_gets_its_nack(tcp_server, case):
    frames, nacked, accepted = CASES[case]
    srv = tcp_server(readers=1)
    s = socket.create_connection(srv.address, timeout=10)
    s.sendall(b"".join(frames))  # one sendall: the server reads them in one recv
    s.shutdown(socket.SHUT_WR)
    got = read_until_closed(s)
    s.close()
    assert [i for k, i, _ in got if k == KIND_NACK] == nacked
    acks = [i for k, i, _ in got if k == KIND_ACK]
    assert (acks[-1] if acks else 0) == accepted
    assert srv.test_sink.wait_for(accepted, 10) and srv.test_sink.count == accepted  # v1 events get no ACK

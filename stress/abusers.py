"""Hostile clients for stress/test_abuse.py, each run as its own process:

    python stress/abusers.py KIND HOST PORT SECONDS [SOURCE_IP]

KIND: garbage (random bytes, reconnecting when closed), badframes (v2 frames with a wrong CRC),
slowloris (a frame header one byte at a time), idle (as many idle connections as the server lets
in), topics (v2 events on ever new topics), halfframes (1 MiB frames sent but for their last byte),
udpflood (garbage and new-topic datagrams). Each stops after SECONDS and prints one JSON line of
what it did. Nothing it sends is a valid event on the topic `good` (the well-behaved client's).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time

from eventstream.protocol.frames import encode_v2

HALF = 1 << 20  # the server's default max_frame_bytes


def connect(host, port, source):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def bad_crc(i: int) -> bytes:
    f = bytearray(encode_v2("junk", b"x" * 16, 2, 1 + i))
    f[-1] ^= 0xFF
    return bytes(f)


def run(kind: str, host: str, port: int, seconds: float, source: str) -> dict:
    end = time.monotonic() + seconds
    rng = random.Random(os.getpid())
    stats = {"kind": kind, "connections": 0, "refused_or_closed": 0, "bytes": 0}
    socks: list[socket.socket] = []

    def open_one():
        try:
            s = connect(host, port, source)
        except OSError:
            stats["refused_or_closed"] += 1
            return None
        stats["connections"] += 1
        return s

    if kind == "udpflood":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        i = 0
        while time.monotonic() < end:
            for _ in range(200):
                i += 1
                # random bytes after 0xff: a length over max_frame_bytes, never a valid frame by chance
                data = b"\xff" + rng.randbytes(rng.randrange(1, 1400)) if i % 2 else encode_v2(f"udp.{i}", b"u", 2, i)
                try:
                    u.sendto(data, (host, port))
                    stats["bytes"] += len(data)
                except OSError:
                    pass
        return stats
    if kind in ("garbage", "badframes", "topics"):
        s, i = None, 0
        while time.monotonic() < end:
            if s is None:
                s = open_one()
                if s is None:
                    time.sleep(0.01)
                    continue
            i += 1
            if kind == "garbage":
                data = b"\xff" + rng.randbytes(4095)  # a framing error from the first byte on
            elif kind == "badframes":
                data = b"".join(bad_crc(i * 100 + k) for k in range(100))
            else:
                data = b"".join(encode_v2(f"flood.{i}.{k}", b"t", 2, 1 + i * 100 + k) for k in range(100))
            try:
                s.sendall(data)
                stats["bytes"] += len(data)
            except OSError:
                stats["refused_or_closed"] += 1
                s.close()
                s = None
        return stats
    if kind in ("slowloris", "idle", "halfframes"):
        slow = encode_v2("junk", b"z" * 400, 2, 1)  # sent one byte per round: never completes in time
        pos: dict[socket.socket, int] = {}
        while time.monotonic() < end:
            if len(socks) < (300 if kind != "halfframes" else 200):
                s = open_one()
                if s is not None:
                    socks.append(s)
                    pos[s] = 0
                    if kind == "halfframes":  # a v1 frame of max_frame_bytes, all but its last byte
                        head = struct.pack(">IBH", HALF - 4, 2, 4) + b"junk"
                        try:
                            s.sendall(head + bytes(HALF - 4 - 7 - 1))
                            stats["bytes"] += HALF - 4
                        except OSError:
                            stats["refused_or_closed"] += 1
            elif kind != "slowloris":
                time.sleep(0.05)
            if kind == "slowloris":
                for s in list(socks):
                    try:
                        s.send(slow[pos[s]:pos[s] + 1])
                        pos[s] += 1
                        stats["bytes"] += 1
                    except OSError:
                        stats["refused_or_closed"] += 1
                        socks.remove(s)
                        s.close()
                time.sleep(0.1)
        for s in socks:
            s.close()
        return stats
    raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    kind, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    source = sys.argv[5] if len(sys.argv) > 5 else ""
    print(json.dumps(run(kind, host, port, seconds, source)), flush=True)

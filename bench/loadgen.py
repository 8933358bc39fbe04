"""Load generator for the end-to-end benchmarks, run as its OWN PROCESS pinned to its own CPUs.

    python bench/loadgen.py '<json spec>'      # prints one JSON object with the results

The engine under test runs in the parent (bench/pipeline.py, bench/latency.py), pinned to other CPUs,
so the generator's Python never competes with the engine's threads for a core. Modes:

* ``blast``: ``n`` pre-encoded v2 frames over ``connections`` sockets (one thread each) as fast as
  ``sendall`` takes them (``repeat`` times: only for the sink baseline), then half-close and read
  until the server closes. ACKs are drained by a reader thread per connection (a sink that sends
  nothing just closes).
* ``paced``: ``rate`` events/s in total for ``seconds``, open loop: every ~0.5 ms each connection
  sends what is due. Each burst's frames carry ``time.monotonic_ns()`` taken just before the
  ``sendall`` in payload bytes 0..8 (little-endian) and a tag in byte 8, so a handler in the engine
  process can compute send -> handled per event (CLOCK_MONOTONIC is one clock for the whole machine).
* ``pingpong``: for each ACK mode in ``modes``, a new connection sends one CRITICAL event every
  ``interval_ms``, stamped the same way, and waits for the ACK that covers it: ACK round trip per
  event (from the stamp to the return of the recv that delivered the ACK).

Frames: topic ``pipe.q<priority>`` (7 bytes), 64-byte payload, priorities from ``priorities`` round
robin, unique event ids, flags byte = the ACK mode (0 default, 1 accepted, 2 stored, 3 synced). Only
the stamp changes per burst, so the CRC is patched with CRC-32's linearity instead of recomputed per
frame (one zlib.crc32 per burst).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.protocol.frames import KIND_ACK, encode_v2, split_control_frames  # noqa: E402

PAYLOAD_BYTES = 64
TOPIC_BYTES = 7
STAMP_OFF = 30 + TOPIC_BYTES  # first payload byte in the frame
CRC_OFF = 26
ACK_MODES = {"default": 0, "accepted": 1, "stored": 2, "synced": 3}


def template_payload(tag: int) -> bytes:
    """64 bytes: stamp 0 (bytes 0..8), the tag (byte 8), then a fixed pattern."""
    return bytes(8) + bytes([tag & 0xFF]) + bytes(range(9, PAYLOAD_BYTES))


_ZERO_MSG = bytes(TOPIC_BYTES + PAYLOAD_BYTES)
_ZERO_CRC = zlib.crc32(_ZERO_MSG)


def stamp_delta(stamp: int) -> int:
    """crc32(msg with stamp) == crc32(msg with zero stamp) ^ stamp_delta(stamp) (same length)."""
    z = bytearray(_ZERO_MSG)
    z[TOPIC_BYTES:TOPIC_BYTES + 8] = stamp.to_bytes(8, "little")
    return zlib.crc32(z) ^ _ZERO_CRC


class Frames:
    """n frames as one uint8 matrix; ids start..; priorities round robin; flags = ack mode."""

    def __init__(self, n: int, start_id: int, priorities, flags: int, tag: int):
        prios = list(priorities)
        tmpl = np.stack([np.frombuffer(encode_v2(f"pipe.q{p}", template_payload(tag), p, 1, 0, flags=flags),
                                       dtype=np.uint8) for p in prios])
        self.width = tmpl.shape[1]
        rows = np.arange(n) % len(prios)
        self.arr = tmpl[rows].copy()
        ids = np.arange(start_id, start_id + n, dtype=np.uint64).astype(">u8")
        self.arr[:, 8:16] = ids.view(np.uint8).reshape(n, 8)
        self.base_crc = self.arr[:, CRC_OFF:CRC_OFF + 4].copy().view(">u4").ravel().astype(np.uint32)
        self.n = n

    def stamp(self, a: int, b: int, stamp: int) -> memoryview:
        """Put `stamp` into rows a..b (payload bytes 0..8, CRC patched); their bytes."""
        rows = self.arr[a:b]
        rows[:, STAMP_OFF:STAMP_OFF + 8] = np.frombuffer(stamp.to_bytes(8, "little"), dtype=np.uint8)
        crc = (self.base_crc[a:b] ^ np.uint32(stamp_delta(stamp))).astype(">u4")
        rows[:, CRC_OFF:CRC_OFF + 4] = crc.view(np.uint8).reshape(-1, 4)
        return memoryview(self.arr[a:b]).cast("B")

    def data(self) -> memoryview:
        return memoryview(self.arr).cast("B")


class MixedFrames:
    """n v2 frames with random payload sizes in [lo, hi] bytes (seeded), ids start..; priorities round
    robin; flags = ack mode. No send stamp (throughput only)."""

    def __init__(self, n: int, start_id: int, priorities, flags: int, seed: int, lo: int, hi: int):
        prios = list(priorities)
        rng = np.random.default_rng(seed)
        sizes = rng.integers(lo, hi + 1, n)
        blob = rng.bytes(hi)
        self.buf = b"".join(encode_v2(f"pipe.q{prios[i % len(prios)]}", blob[:int(sizes[i])], prios[i % len(prios)],
                                      start_id + i, 0, flags=flags) for i in range(n))
        self.n = n
        self.payload_bytes = int(sizes.sum())
        self.width = len(self.buf) / n

    def data(self) -> memoryview:
        return memoryview(self.buf)


def _drain(sock: socket.socket, out: dict) -> None:
    buf = bytearray()
    try:
        while d := sock.recv(1 << 16):
            buf += d
    except OSError as exc:
        out["error"] = repr(exc)
    out["t_eof_ns"] = time.monotonic_ns()
    try:
        acks = [v for k, v, _ in split_control_frames(buf) if k == KIND_ACK]
        out["final_ack"] = acks[-1] if acks else 0
        out["ack_frames"] = len(acks)
    except ValueError as exc:
        out["error"] = f"bad control frames: {exc}"


def _run_senders(send, conns: int, readers, socks, outs, spec: dict, errors: list) -> None:
    """Run send(c) for every connection in its own thread, then wait for the ACK readers, close the
    sockets and collect the readers' errors into `errors`."""
    senders = [threading.Thread(target=send, args=(c,)) for c in range(conns)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    for r in readers:
        r.join(spec.get("timeout", 300))
    for s in socks:
        s.close()
    errors += [o["error"] for o in outs if "error" in o]


def blast(spec: dict) -> dict:
    addr = tuple(spec["address"])
    n, conns = spec["n"], spec["connections"]
    per = n // conns
    repeat = spec.get("repeat", 1)  # send the same frames this many times (sink baseline only: ids repeat)
    mixed = spec.get("mixed")  # [lo, hi]: random payload sizes instead of 64 bytes
    if mixed:
        frames = [MixedFrames(per, 1 + c * per, spec["priorities"], spec["flags"], c, *mixed) for c in range(conns)]
    else:
        frames = [Frames(per, 1 + c * per, spec["priorities"], spec["flags"], 0) for c in range(conns)]
    socks = [socket.create_connection(addr, timeout=120) for _ in range(conns)]
    outs = [{} for _ in range(conns)]
    readers = [threading.Thread(target=_drain, args=(s, o), daemon=True) for s, o in zip(socks, outs)]
    for r in readers:
        r.start()
    barrier = threading.Barrier(conns)
    t_first = [0] * conns
    t_sent = [0] * conns
    errors: list[str] = []

    def send(c: int) -> None:
        try:
            mv = frames[c].data()
            barrier.wait(60)
            t_first[c] = time.monotonic_ns()
            step = 256 << 10
            for _ in range(repeat):
                for k in range(0, len(mv), step):
                    socks[c].sendall(mv[k:k + step])
            t_sent[c] = time.monotonic_ns()
            socks[c].shutdown(socket.SHUT_WR)
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(repr(exc))

    _run_senders(send, conns, readers, socks, outs, spec, errors)
    return {"mode": "blast", "events": per * conns * repeat,
            "bytes": int(sum(len(f.data()) for f in frames) * repeat),
            "payload_bytes": int(sum(getattr(f, "payload_bytes", per * PAYLOAD_BYTES) for f in frames) * repeat),
            "t_first_send_ns": min(t_first), "t_last_sent_ns": max(t_sent),
            "t_eof_ns": max(o.get("t_eof_ns", 0) for o in outs),
            "acked": sum(o.get("final_ack", 0) for o in outs), "errors": errors}


def paced(spec: dict) -> dict:
    addr = tuple(spec["address"])
    conns, rate, seconds = spec["connections"], spec["rate"], spec["seconds"]
    rate_c = rate / conns
    per = max(1, int(rate_c * seconds))
    frames = [Frames(per, 1 + c * per, spec["priorities"], spec["flags"], spec.get("tag", 0)) for c in range(conns)]
    socks = [socket.create_connection(addr, timeout=120) for _ in range(conns)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    outs = [{} for _ in range(conns)]
    readers = [threading.Thread(target=_drain, args=(s, o), daemon=True) for s, o in zip(socks, outs)]
    for r in readers:
        r.start()
    barrier = threading.Barrier(conns)
    res = [None] * conns
    errors: list[str] = []
    tick = spec.get("tick_s", 0.0005)

    def send(c: int) -> None:
        try:
            f, s = frames[c], socks[c]
            barrier.wait(60)
            sent = bursts = 0
            t0 = time.perf_counter()
            while sent < per:
                due = min(per, int((time.perf_counter() - t0) * rate_c) + 1)
                if due > sent:
                    st = time.monotonic_ns()
                    s.sendall(f.stamp(sent, due, st))
                    sent = due
                    bursts += 1
                else:
                    time.sleep(tick)
            res[c] = (sent, time.perf_counter() - t0, bursts)
            s.shutdown(socket.SHUT_WR)
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(repr(exc))

    _run_senders(send, conns, readers, socks, outs, spec, errors)
    done = [r for r in res if r]
    sent = sum(r[0] for r in done)
    secs = max((r[1] for r in done), default=0.0)
    return {"mode": "paced", "events": sent, "offered_per_s": rate, "achieved_per_s": sent / secs if secs else 0.0,
            "bursts": sum(r[2] for r in done), "acked": sum(o.get("final_ack", 0) for o in outs), "errors": errors}


def pingpong(spec: dict) -> dict:
    """One CRITICAL event per interval, wait for its ACK; per ACK mode. Returns the round trips (ns)."""
    addr = tuple(spec["address"])
    interval = spec.get("interval_ms", 1.0) / 1e3
    out = {"mode": "pingpong", "interval_ms": interval * 1e3, "modes": {}, "errors": []}
    for k, name in enumerate(spec["modes"]):
        flags, tag = ACK_MODES[name], spec.get("tags", {}).get(name, ACK_MODES[name])
        count = max(1, int(spec["seconds"] / interval))
        # ids unique across the modes: the engine stores an id once per topic (a repeat is a duplicate,
        # ACKed without being handled or stored again, which would measure nothing)
        f = Frames(count + spec.get("warmup", 50), 1 + k * 1_000_000_000, [4], flags, tag)
        s = socket.create_connection(addr, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = np.zeros(count, dtype=np.int64)
        buf = bytearray()
        acked = 0
        late = 0
        try:
            t0 = time.perf_counter()
            for i in range(f.n):
                wait = t0 + i * interval - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                else:
                    late += 1
                st = time.monotonic_ns()
                s.sendall(f.stamp(i, i + 1, st))
                while acked < i + 1:
                    d = s.recv(4096)
                    if not d:
                        raise ConnectionError("server closed the connection")
                    buf += d
                    for kind, value, _ in split_control_frames(buf):
                        if kind == KIND_ACK:
                            acked = value
                        else:
                            raise ConnectionError(f"NACK or unexpected frame kind {kind}")
                j = i - (f.n - count)
                if j >= 0:
                    rtts[j] = time.monotonic_ns() - st
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except Exception as exc:  # noqa: BLE001 - reported
            out["errors"].append(f"{name}: {exc!r}")
        finally:
            s.close()
        out["modes"][name] = {"rtt_ns": rtts.tolist(), "events": int(f.n), "late_ticks": late, "flags": flags,
                              "tag": tag}
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    cpus = spec.get("cpus") or []
    if cpus:
        os.sched_setaffinity(0, cpus)  # before any thread exists: every thread of this process inherits it
    fn = {"blast": blast, "paced": paced, "pingpong": pingpong}[spec["mode"]]
    res = fn(spec)
    res["cpus"] = sorted(os.sched_getaffinity(0))
    res["pid"] = os.getpid()
    print(json.dumps(res))


if __name__ == "__main__":
    main()

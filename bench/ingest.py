"""Ingest throughput: the vectorized codec vs a plain struct-per-frame loop, and TCP ingest end to end.

Rows:
* codec       - FrameDecoder.feed over a stream of 64-byte-payload frames in 256 KiB chunks (as a TCP
                reader sees them), producing record batches.
* struct-loop - the same stream decoded the plain way: one struct.unpack_from per frame header, one
                record row assigned per frame (what the codec avoids).
* tcp         - TcpServer with 1, 2 and 4 client connections sending pre-encoded frames as fast as the
                socket takes them, to a counting sink; clock from the first byte until the sink has
                every frame (v2 also waits for the final ACK).
* reader      - the reader's CPU per event without a socket: Connection.receive + take_due (decode,
                Engine.offer into the queues, ACK bookkeeping) over the bytes bench/peers.py sends
                (64-byte events on one topic, priority 2; `single` v2 frames or `batch` frames of 1000
                events), fed in 256 KiB reads (server.tcp.recv_bytes) to a real Engine whose processors
                are not started; the bench drains the queues between reads (not timed). Thread CPU
                time (time.thread_time), so a loaded machine inflates it less than a wall clock;
                frames_per_s here is events per CPU second, ns_per_event CPU ns per event.

Each for protocol v1 and v2 (reader: v2). frames_per_s is the median of the measured runs.

    python bench/ingest.py [--quick] [--json] [--repeats N] [--save] [--reader]   (--reader: only those rows)
"""

from __future__ import annotations

import argparse
import itertools
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.runtime import gil  # noqa: E402

gil.reexec_without_gil()

import numpy as np  # noqa: E402
from harness import Bench  # noqa: E402

from eventstream.config import TcpConfig, load_config  # noqa: E402
from eventstream.core.records import ACK_STORED, FLAG_V2, record_dtype  # noqa: E402
from eventstream.core.topics import TopicTable  # noqa: E402
from eventstream.engine.bus import Offer  # noqa: E402
from eventstream.engine.engine import Engine  # noqa: E402
from eventstream.ingest.admission import Admission  # noqa: E402
from eventstream.ingest.connection import Connection  # noqa: E402
from eventstream.ingest.delivery import Delivery, IngestStats  # noqa: E402
from eventstream.ingest.limits import RejectMeter  # noqa: E402
from eventstream.ingest.tcp import TcpServer  # noqa: E402
from eventstream.metrics.registry import MetricsRegistry  # noqa: E402
from eventstream.protocol.decoder import FrameDecoder  # noqa: E402
from eventstream.protocol.frames import encode_v1, encode_v2, split_control_frames  # noqa: E402

PAYLOAD = bytes(range(64))
CHUNK = 256 << 10
COLUMNS = ["case", "version", "connections", "frames_per_s", "ns_per_event", "spread_pct", "runs"]


class CountingSink:
    """Stands where the engine stands (`offer` and `admission`, see ingest/delivery.py) and counts the
    records it is offered, then drops them (ingest without the engine): no copy, no lock beyond one
    add per batch; every offer is placed whole and complete at once (no completion marks)."""

    def __init__(self):
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.admission = Admission()
        self._lock = threading.Lock()

    def offer(self, records: np.ndarray, *, stamp: bool = True, shed_all: bool = False) -> Offer:
        now = time.perf_counter_ns()
        with self._lock:
            if not self.count:
                self.first_ns = now
            self.count += len(records)
            self.last_ns = now
        off = Offer()
        off.placed = len(records)
        return off


def frames(version: int, n: int, topics: int = 4) -> bytes:
    if version == 1:
        return b"".join(encode_v1(f"topic.{i % topics}", PAYLOAD, i % 5) for i in range(n))
    return b"".join(encode_v2(f"topic.{i % topics}", PAYLOAD, i % 5, i + 1, 1) for i in range(n))


def run_codec(stream: bytes, n: int) -> tuple[int, float]:
    dec = FrameDecoder(TopicTable())
    mv = memoryview(stream)
    got = 0
    t0 = time.perf_counter()
    for k in range(0, len(stream), CHUNK):
        recs, errs = dec.feed(mv[k:k + CHUNK])
        got += len(recs)
    elapsed = time.perf_counter() - t0
    assert got == n, (got, n)
    return n, elapsed


V1_HEAD = struct.Struct(">IBH")
V2_HEAD = struct.Struct(">IBBBBQQHI")


def run_struct_loop(stream: bytes, n: int) -> tuple[int, float]:
    """Baseline: header struct per frame, Python checks, one record row assigned per frame."""
    topics = TopicTable()
    rec = np.zeros(n, dtype=record_dtype(448))
    t0 = time.perf_counter()
    ingest = time.monotonic_ns()
    pos, i, end = 0, 0, len(stream)
    buf = stream
    while pos + 4 <= end:
        first = buf[pos + 4]
        if first == 0xE5:
            length, _m, kind, prio, flags, eid, ts, tlen, crc = V2_HEAD.unpack_from(buf, pos)
            start = pos + 30
            topic = buf[start:start + tlen]
            payload = buf[start + tlen:pos + 4 + length]
            if zlib.crc32(payload, zlib.crc32(topic)) != crc:
                raise ValueError("crc")
            fl = FLAG_V2
        else:
            length, prio, tlen = V1_HEAD.unpack_from(buf, pos)
            start = pos + 7
            topic = buf[start:start + tlen]
            payload = buf[start + tlen:pos + 4 + length]
            eid = ts = crc = fl = 0
        topic.decode("utf-8")
        tid = topics.intern(topic)
        row = rec[i]
        row["event_id"], row["producer_ts"], row["ingest_ts"] = eid, ts, ingest
        row["topic_id"], row["payload_len"], row["crc32"], row["priority"], row["flags"] = (
            tid, len(payload), crc, prio, fl)
        row["payload"][:len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        i += 1
        pos += 4 + length
    elapsed = time.perf_counter() - t0
    assert i == n
    return n, elapsed


def _tcp_client(address, data: bytes, version: int, n: int, errors: list, barrier: threading.Barrier) -> None:
    try:
        s = socket.create_connection(address, timeout=60)
        barrier.wait(30)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        if version == 2:
            acks = [v for k, v, _ in split_control_frames(buf) if k == 2]
            if not acks or acks[-1] != n:
                errors.append(f"final ACK {acks[-1] if acks else None}, expected {n}")
        s.close()
    except Exception as exc:  # noqa: BLE001 - reported below
        errors.append(repr(exc))


def run_tcp(version: int, connections: int, per_conn: int, data: bytes) -> tuple[int, float]:
    sink = CountingSink()
    srv = TcpServer(TcpConfig(port=0, readers=2), sink, TopicTable()).start()
    errors: list[str] = []
    barrier = threading.Barrier(connections + 1)
    threads = [threading.Thread(target=_tcp_client, args=(srv.address, data, version, per_conn, errors, barrier))
               for _ in range(connections)]
    try:
        for t in threads:
            t.start()
        barrier.wait(30)
        t0 = time.perf_counter()
        for t in threads:
            t.join(300)
        total = connections * per_conn
        deadline = time.monotonic() + 60
        while sink.count < total and time.monotonic() < deadline:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
    finally:
        srv.stop(drain=False)
    if errors or sink.count != total:
        raise RuntimeError(f"tcp run lost frames: sink {sink.count}/{total}, errors {errors[:3]}")
    return total, elapsed


def main(argv=None) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__.split("\n")[0])
    parser.add_argument("--reader", action="store_true", help="only the reader rows (CPU per event, no socket)")
    bench = Bench("ingest", argv, parser=parser)
    n = 20_000 if bench.quick else 100_000
    reader_rows(bench, n)
    if bench.args.reader:
        bench.finish(COLUMNS + ["frame"], notes=READER_NOTES)
        return
    for version in (1, 2):
        stream = frames(version, n)
        for case, fn in (("codec", run_codec), ("struct-loop", run_struct_loop)):
            stats = bench.measure(lambda fn=fn: fn(stream, n))
            bench.add_row({"case": case, "version": version, "connections": 0, "frames_per_s": stats.median}, stats)
    per_conn_total = 40_000 if bench.quick else 200_000
    for version in (1, 2):
        for conns in (1, 2, 4):
            per_conn = per_conn_total // conns
            data = frames(version, per_conn)
            stats = bench.measure(lambda v=version, c=conns, p=per_conn, d=data: run_tcp(v, c, p, d))
            bench.add_row({"case": "tcp", "version": version, "connections": conns, "frames_per_s": stats.median},
                          stats)
    bench.finish(COLUMNS + ["frame"], notes=[
        "codec / struct-loop: decode only (one thread); tcp: acceptor + 2 reader threads, clients in-process",
        "64-byte payloads, 4 topics, priorities 0..4 round robin",
        *READER_NOTES,
    ])


READER_NOTES = ["reader: Connection + real Engine (processors not started), 256 KiB reads; ns_per_event = thread CPU"]


def reader_rows(bench: Bench, n: int) -> None:
    from peers import es_frames

    with tempfile.TemporaryDirectory() as tmp:
        cap = 1 << 14  # a read holds at most ~2,700 events: the queues are drained after each
        keys = {"storage.data_dir": tmp, "metrics.enabled": False, "queues.realtime.capacity": cap,
                "queues.transactional.capacity": cap, "queues.batch.capacity": cap}
        engine = Engine(load_config(environ={}, overrides=keys), MetricsRegistry())
        engine.open()
        try:
            for frame in ("batch", "single"):
                data = es_frames(np.full(n, len(PAYLOAD)), frame, 1000, 1)
                reads = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
                conns = itertools.count(1)
                stats = bench.measure(lambda r=reads, ids=conns: run_reader(engine, r, n, next(ids)))
                bench.add_row({"case": "reader", "version": 2, "connections": 1, "frame": frame,
                               "frames_per_s": stats.median}, stats)
        finally:
            engine.close()


def run_reader(engine: Engine, reads: list[bytes], n: int, conn_id: int) -> tuple[int, float]:
    """One connection's reads through Connection.receive and take_due: (events, thread CPU seconds)."""
    cfg = engine.cfg
    dec = FrameDecoder(engine.topics, payload_bytes=cfg.records.payload_bytes, conn_id=conn_id,
                       ack_default=ACK_STORED, payloads=engine.payloads)
    c = Connection(None, conn_id, ("127.0.0.1", 0), dec, 0.0, 1.0,
                   delivery=Delivery(engine, None, IngestStats()), meter=RejectMeter(1000, 0.0))
    assert engine.bus is not None  # opened
    rings = [r for q in engine.bus.queues for r in q.rings]
    cpu = 0.0
    for data in reads:
        t0 = time.thread_time()
        c.receive(memoryview(data), 0.0)
        c.take_due()
        cpu += time.thread_time() - t0
        for r in rings:  # the processors' side (not the reader's cost): release what was queued
            views = r.poll(r.capacity)
            if views:
                r.release(sum(len(v) for v in views))
        t0 = time.thread_time()
        c.take_due()  # the ACK of what was just completed
        cpu += time.thread_time() - t0
    if c.accepted != n or c.acked != n:
        raise RuntimeError(f"reader: {c.accepted} events accepted and {c.acked} ACKed of {n}")
    return n, cpu



if __name__ == "__main__":
    main()

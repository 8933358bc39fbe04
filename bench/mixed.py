"""Where a 16 B-16 KB event's server CPU goes, stage by stage, on one thread (issue 20: the mixed row).

Builds the BATCH frames bench/peers.py sends for its mixed figure (payload sizes uniform in LO..HI,
seeded; at most 256 KiB per frame), then runs the server's per-byte stages in this one thread and
reports the thread CPU (time.thread_time) per MB of payload of each:

* `decode`: FrameDecoder.feed_indexed over reads of --read-bytes (server.tcp.recv_bytes, default
  256 KiB) as the TCP reader sees them (a memoryview of one reused buffer), with a PayloadArena for
  payloads over records.payload_bytes (448): frame CRC, record table, arena claim and copy;
* `entries`: storage.format.record_entries of each decoded batch (the log writer's encoding: one
  KIND_RECORD_EXT entry per arena payload, its CRC);
* `write`: os.write (or os.writev of the pieces, as the writer does) of those entries to a file
  (page cache; storage.fsync none);
* `release`: payloads.release_records of each batch (the arena slots back).

No engine threads (no rings, processors, dedup): those are per batch, not per byte. Repeated
--repeats times; the best (least disturbed) run is reported. `--json`: one JSON object.

    python bench/mixed.py [--events N] [--bytes LO:HI] [--read-bytes N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eventstream.core.atomic  # noqa: E402,F401 - loads cffi as the engine does (core/crc.py then may use ISA-L)
from eventstream.core import crc  # noqa: E402
from eventstream.core.payloads import PayloadArena, release_records  # noqa: E402
from eventstream.core.topics import TopicTable  # noqa: E402
from eventstream.protocol.decoder import FrameDecoder  # noqa: E402
from eventstream.protocol.frames import encode_batch_columns  # noqa: E402
from eventstream.storage import format as fmt  # noqa: E402

TOPIC = "bench.t"
STAGES = ("decode", "entries", "write", "release")


def frames(sizes: np.ndarray, batch: int = 1000, limit: int = 256 << 10) -> bytes:
    """BATCH frames of the events of `sizes` (as bench/peers.py's es_frames builds them)."""
    pattern = bytes(range(256)) * (int(sizes.max()) // 256 + 1)
    out = []
    i, n = 0, len(sizes)
    while i < n:
        j, size = i, 0
        while j < n and j - i < batch and (size + int(sizes[j]) + 24 <= limit or j == i):
            size += int(sizes[j]) + 24
            j += 1
        lens = sizes[i:j]
        out.append(
            encode_batch_columns(
                [TOPIC],
                np.zeros(j - i, dtype=np.int64),
                lens,
                b"".join(pattern[:s] for s in lens.tolist()),
                2,
                np.arange(1 + i, 1 + j, dtype=np.uint64),
                1,
            )
        )
        i = j
    return b"".join(out)


def entries(records: np.ndarray, fids: np.ndarray, wall_ns: int):
    """The log writer's encoding of one batch (pieces for writev where the writer gathers them)."""
    try:
        return fmt.record_entries(records, fids, wall_ns, gather=True)
    except TypeError:  # an engine from before gathered writes (A/B runs)
        return fmt.record_entries(records, fids, wall_ns)


def run_once(wire: bytes, read_bytes: int, payload_bytes: int, path: str) -> dict[str, float]:
    """Thread CPU seconds of each stage over the whole of `wire`."""
    arena = PayloadArena(256 << 20, 1 << 20, min_payload=payload_bytes)
    dec = FrameDecoder(TopicTable(), payload_bytes=payload_bytes, payloads=arena, max_frame_bytes=1 << 20)
    buf = bytearray(read_bytes)
    t = dict.fromkeys(STAGES, 0.0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    events = 0
    try:
        mv_wire = memoryview(wire)
        for at in range(0, len(wire), read_bytes):
            n = min(read_bytes, len(wire) - at)
            buf[:n] = mv_wire[at : at + n]  # the kernel's copy into the reader's buffer (not timed)
            t0 = time.thread_time()
            records, _idx, errors = dec.feed_indexed(memoryview(buf)[:n])
            t1 = time.thread_time()
            if errors:
                raise RuntimeError(f"decode errors: {errors[:3]}")
            if not len(records):
                t["decode"] += t1 - t0
                continue
            fids = np.ones(len(records), dtype=np.uint32)
            data = entries(records, fids, time.time_ns())
            t2 = time.thread_time()
            if isinstance(data, list):  # as the log writer does: writev of the pieces
                for at in range(0, len(data), 1024):
                    os.writev(fd, data[at : at + 1024])  # (a regular file: no short writes here)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            t3 = time.thread_time()
            release_records(records)
            t4 = time.thread_time()
            t["decode"] += t1 - t0
            t["entries"] += t2 - t1
            t["write"] += t3 - t2
            t["release"] += t4 - t3
            events += len(records)
    finally:
        os.close(fd)
        arena.close()
    t["events"] = events
    return t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench/mixed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20_000, help="events per run (default 20000)")
    p.add_argument("--bytes", default="16:16384", help="payload sizes LO:HI (uniform, seeded; default 16:16384)")
    p.add_argument("--read-bytes", type=int, default=256 << 10, help="bytes per read (default 256 KiB)")
    p.add_argument("--payload-bytes", type=int, default=448, help="records.payload_bytes (default 448)")
    p.add_argument("--repeats", type=int, default=3, help="runs; the best is reported (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    lo, _, hi = args.bytes.partition(":")
    if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
        raise SystemExit(f"--bytes {args.bytes!r}: allowed: LO:HI, two byte counts with LO <= HI")
    rng = np.random.default_rng(7)
    sizes = rng.integers(int(lo), int(hi) + 1, size=args.events)
    wire = frames(sizes)
    mb = float(sizes.sum()) / 1e6
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        for _ in range(args.repeats):
            runs.append(run_once(wire, args.read_bytes, args.payload_bytes, os.path.join(tmp, "events.bin")))
    best = min(runs, key=lambda r: sum(r[s] for s in STAGES))
    ms_per_mb = {s: round(best[s] / mb * 1e3, 3) for s in STAGES}
    ms_per_mb["total"] = round(sum(best[s] for s in STAGES) / mb * 1e3, 3)
    us_per_event = round(sum(best[s] for s in STAGES) / args.events * 1e6, 2)
    out = {
        "events": args.events,
        "payload_MB": round(mb, 2),
        "read_bytes": args.read_bytes,
        "ms_cpu_per_MB": ms_per_mb,
        "us_cpu_per_event": us_per_event,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "crc": crc.IMPL,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"# {args.events} events, {mb:.1f} MB of payload ({args.bytes} B), reads of {args.read_bytes} B, "
          f"best of {args.repeats}; load {out['load_avg_1m']}; CRC-32 by {out['crc']}")
    print(f"{'stage':>8}  {'ms CPU / MB':>11}")
    for s in (*STAGES, "total"):
        print(f"{s:>8}  {ms_per_mb[s]:>11.3f}")
    print(f"{'':>8}  {us_per_event:>11.2f} µs / event")


if __name__ == "__main__":
    main()

"""CRC-32 shift vs a second zlib.crc32 pass: where core/crc.py's COMBINE_MIN_BYTES comes from, and
what the log writer saves on large payloads.

For each payload size: the time of zlib.crc32 over the bytes (what a second pass costs) and of
core.crc.recrc (the same CRC under another initial value, from the first pass's result), averaged
over lengths near the size (recrc's cost grows with the set bits of the length). The crossover is
the smallest size from which recrc is cheaper.

Then `entries`: storage.format.record_entries (the log writer's encoding) of 16 records whose
payloads of --entry-bytes (default 1048000) are in a payload arena, decoded from real v2 frames:
with the CRCs the decoder kept, and with them stripped (the writer reads every payload again), in
thread CPU ms per entry (same bytes either way).

    python bench/crc.py [--entry-bytes N] [--json]
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.core import crc  # noqa: E402

SIZES = [1 << k for k in range(8, 23)]  # 256 B .. 4 MiB


def _per_call(fn, k: int) -> float:
    t = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t) / k


def entries(n_bytes: int, rounds: int = 5) -> dict:
    import numpy as np

    from eventstream.core.payloads import PayloadArena, release_records
    from eventstream.core.topics import TopicTable
    from eventstream.protocol.decoder import FrameDecoder
    from eventstream.protocol.frames import encode_v2
    from eventstream.storage import format as fmt

    k = 16
    payload = np.random.default_rng(1).bytes(n_bytes)
    frames = b"".join(encode_v2("big.one", payload, 2, i + 1) for i in range(k))
    limit = n_bytes + 64
    with PayloadArena(max(2 * k * limit, 4 * limit), limit, min_payload=448) as arena:
        dec = FrameDecoder(TopicTable(), max_frame_bytes=limit, payload_bytes=448, payloads=arena)
        kept, errors = dec.feed(frames)
        assert not errors and len(kept) == k, errors
        plain = kept.copy()
        raw = plain.view(np.uint8).reshape(k, plain.dtype.itemsize)
        raw[:, 63] = 0  # the marker and the kept (seed, crc) (core/payloads.py)
        raw[:, 64:72] = 0
        ids = np.ones(k, dtype=np.uint32)
        assert fmt.record_entries(kept, ids, 1) == fmt.record_entries(plain, ids, 1)
        out = {}
        for name, recs in (("kept_ms", kept), ("plain_ms", plain)):
            best = float("inf")
            for _ in range(rounds):
                t = time.thread_time()
                fmt.record_entries(recs, ids, 1)
                best = min(best, (time.thread_time() - t) / k * 1e3)
            out[name] = round(best, 3)
        release_records(kept)
    return {"entry_payload_bytes": n_bytes, **out}


def main() -> None:
    rnd = random.Random(1)
    data = os.urandom(max(SIZES) * 2)
    rows = []
    for size in SIZES:
        lens = [rnd.randrange(size, 2 * size) for _ in range(16)]
        views = [memoryview(data)[:n] for n in lens]
        k = max(3, (4 << 20) // size)
        z = sum(_per_call(lambda v=v: zlib.crc32(v, 7), k) for v in views) / len(views)
        s = sum(_per_call(lambda n=n: crc.recrc(123, 7, n, 99), 200) for n in lens) / len(lens)
        rows.append({"bytes": size, "zlib_us": round(z * 1e6, 2), "recrc_us": round(s * 1e6, 2)})
    cross = next((r["bytes"] for r in rows if r["recrc_us"] < r["zlib_us"]), None)
    n_bytes = int(sys.argv[sys.argv.index("--entry-bytes") + 1]) if "--entry-bytes" in sys.argv else 1048000
    ent = entries(n_bytes)
    if "--json" in sys.argv:
        print(json.dumps({"rows": rows, "crossover_bytes": cross, "combine_min_bytes": crc.COMBINE_MIN_BYTES,
                          "entries": ent}))
        return
    print(f"{'bytes (n..2n)':>14} {'zlib.crc32 us':>14} {'recrc us':>10}")
    for r in rows:
        print(f"{r['bytes']:>14} {r['zlib_us']:>14} {r['recrc_us']:>10}")
    print(f"recrc is cheaper from {cross} bytes on; COMBINE_MIN_BYTES = {crc.COMBINE_MIN_BYTES}")
    print(f"log writer, {n_bytes}-byte arena payloads: {ent['kept_ms']} ms/entry with the decoder's CRC, "
          f"{ent['plain_ms']} ms/entry reading the payload again")


if __name__ == "__main__":
    main()

"""CRC-32 shift vs a second zlib.crc32 pass: where core/crc.py's COMBINE_MIN_BYTES comes from.

For each payload size: the time of zlib.crc32 over the bytes (what a second pass costs) and of
core.crc.recrc (the same CRC under another initial value, from the first pass's result), averaged
over lengths near the size (recrc's cost grows with the set bits of the length). The crossover is
the smallest size from which recrc is cheaper.

    python bench/crc.py [--json]
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
    if "--json" in sys.argv:
        print(json.dumps({"rows": rows, "crossover_bytes": cross, "combine_min_bytes": crc.COMBINE_MIN_BYTES}))
        return
    print(f"{'bytes (n..2n)':>14} {'zlib.crc32 us':>14} {'recrc us':>10}")
    for r in rows:
        print(f"{r['bytes']:>14} {r['zlib_us']:>14} {r['recrc_us']:>10}")
    print(f"recrc is cheaper from {cross} bytes on; COMBINE_MIN_BYTES = {crc.COMBINE_MIN_BYTES}")


if __name__ == "__main__":
    main()

"""Ring throughput: MpscRing (1 and 2 producers) vs queue.Queue and collections.deque.

Producers are pinned to the first allowed CPU, the consumer to the last one. Each row moves a fixed
number of 512-byte records (the default EVENT_DTYPE) from the producers to one consumer: producers
call try_put with `batch` records (offering again what did not fit), the consumer polls views of up to 4096 records and releases them
(no copy). The baselines move the same rows as Python objects one by one (queue.Queue.put/get) or
with deque.extend/popleft. The rings are measured again with the GIL on, in a child process of the
same interpreter (PYTHON_GIL=1 EVENTSTREAM_ALLOW_GIL=1).

    python bench/rings.py [--quick] [--json] [--repeats N] [--save]
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.runtime import gil  # noqa: E402

gil.reexec_without_gil()

import numpy as np  # noqa: E402
from harness import Bench  # noqa: E402

from eventstream import log as eslog  # noqa: E402
from eventstream.core.records import DEFAULT_PAYLOAD_BYTES, record_dtype  # noqa: E402
from eventstream.core.ring import MpscRing  # noqa: E402
from eventstream.runtime.affinity import pin_current_thread  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
PRODUCER_CPU, CONSUMER_CPU = CPUS[0], CPUS[-1]
BATCHES = (1, 16, 256, 4096)
RING_EVENTS = {1: 40_000, 16: 400_000, 256: 2_000_000, 4096: 4_000_000}
BASELINE_EVENTS = 100_000
DTYPE = record_dtype(DEFAULT_PAYLOAD_BYTES)
COLUMNS = ["structure", "producers", "batch", "gil", "record_bytes", "events_per_s", "ns_per_event", "spread_pct",
           "producer_cpu_ns", "consumer_cpu_ns", "events"]


def _run_threads(producers: list, consumer) -> float:
    """Start pinned threads behind a barrier; seconds from the barrier until all have finished."""
    barrier = threading.Barrier(len(producers) + 2)
    errors: list[BaseException] = []

    def wrap(fn, cpu, role):
        def run():
            pin_current_thread([cpu], role)
            barrier.wait()
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        return threading.Thread(target=run, name=role, daemon=True)

    threads = [wrap(p, PRODUCER_CPU, f"producer-{i}") for i, p in enumerate(producers)]
    threads.append(wrap(consumer, CONSUMER_CPU, "consumer"))
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(300)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError("benchmark threads did not finish within 300 s")
    return elapsed


def ring_transfer(producers: int, batch: int, total: int, dtype=None):
    per = total // producers
    total = per * producers
    dtype = DTYPE if dtype is None else dtype
    ring = MpscRing(dtype=dtype, wait="yield")
    src = np.zeros(batch, dtype=dtype)

    cpu = {"producers": 0.0, "consumer": 0.0}

    def produce():
        c0 = time.thread_time()
        sent = 0
        while sent < per:
            n = min(batch, per - sent)
            k, _end = ring.try_put(src if n == batch else src[:n])
            if k < n:
                os.sched_yield()  # full: offer the rest again once the consumer made room
            sent += k
        cpu["producers"] += time.thread_time() - c0

    def consume():
        c0 = time.thread_time()
        got = 0
        deadline = time.monotonic() + 300
        while got < total and time.monotonic() < deadline:
            views = ring.poll(4096)
            if views:
                k = len(views[0]) + (len(views[1]) if len(views) > 1 else 0)
                got += k
                ring.release(k)
            else:
                os.sched_yield()
        cpu["consumer"] = time.thread_time() - c0

    try:
        elapsed = _run_threads([produce] * producers, consume)
        assert ring.completed() == total
    finally:
        ring.close()
    # CPU time per event: the work each side does, independent of how busy the machine was
    return total, elapsed, {"producer_cpu_ns": cpu["producers"] / total * 1e9,
                            "consumer_cpu_ns": cpu["consumer"] / total * 1e9}


def queue_transfer(batch: int, total: int):
    q: queue.Queue = queue.Queue()
    items = list(np.zeros(batch, dtype=DTYPE))

    def produce():
        sent = 0
        while sent < total:
            for it in items:
                q.put(it)
            sent += batch

    n = (total // batch) * batch

    def consume():
        for _ in range(n):
            q.get()

    total = n
    return total, _run_threads([produce], consume)


def deque_transfer(batch: int, total: int):
    dq: collections.deque = collections.deque()
    items = list(np.zeros(batch, dtype=DTYPE))
    n = (total // batch) * batch

    def produce():
        for _ in range(n // batch):
            dq.extend(items)

    def consume():
        got = 0
        pop = dq.popleft
        while got < n:
            try:
                pop()
                got += 1
            except IndexError:
                os.sched_yield()

    return n, _run_threads([produce], consume)


def ring_rows(bench: Bench, gil_on: bool) -> None:
    scale = 10 if bench.quick else 1
    for structure, producers in (("mpsc", 1), ("mpsc", 2)):
        for batch in BATCHES:
            total = max(RING_EVENTS[batch] // scale, batch * producers * 4)
            stats = bench.measure(lambda: ring_transfer(producers, batch, total))
            bench.add_row({"structure": structure, "producers": producers, "batch": batch, "gil": gil_on,
                           "record_bytes": DTYPE.itemsize}, stats)


def gil_child_rows(bench: Bench) -> list[dict]:
    env = dict(os.environ, PYTHON_GIL="1", EVENTSTREAM_ALLOW_GIL="1", EVENTSTREAM_NO_REEXEC="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--gil-child", "--json",
           "--payload-bytes", str(bench.args.payload_bytes),
           "--repeats", str(bench.args.repeats), "--warmup", str(bench.args.warmup)]
    if bench.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"GIL-on child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="bench/rings.py", description=__doc__.splitlines()[0])
    parser.add_argument("--gil-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--payload-bytes", type=int, default=DEFAULT_PAYLOAD_BYTES,
                        help="inline payload per record (default %(default)s: 512-byte records)")
    parser.add_argument("--no-gil-run", action="store_true", help="skip the GIL-on comparison rows")
    bench = Bench("rings", argv, parser=parser)
    eslog.configure("warning", stream=sys.stderr)
    global DTYPE
    DTYPE = record_dtype(bench.args.payload_bytes)
    if bench.args.gil_child:
        ring_rows(bench, gil.gil_enabled())
        bench.finish(COLUMNS)
        return
    gil.require_gil_off(what="bench/rings.py")
    ring_rows(bench, False)
    total = BASELINE_EVENTS // (5 if bench.quick else 1)
    for batch in (1, 256):
        bench.add_row({"structure": "queue.Queue", "producers": 1, "batch": batch, "gil": False,
                       "record_bytes": DTYPE.itemsize},
                      bench.measure(lambda: queue_transfer(batch, total)))
        bench.add_row({"structure": "deque", "producers": 1, "batch": batch, "gil": False,
                       "record_bytes": DTYPE.itemsize},
                      bench.measure(lambda: deque_transfer(batch, total)))
    if not bench.args.no_gil_run:
        for row in gil_child_rows(bench):
            bench.rows.append(row)
    q = next((r for r in bench.rows if r["structure"] == "queue.Queue" and r["batch"] == 1), None)
    notes = []
    for r in bench.rows:
        if r["structure"] in ("spsc", "mpsc") and r["batch"] == 256 and not r["gil"] and q:
            notes.append(f"{r['structure']} batch 256: {r['ns_per_event']:.1f} ns/event, "
                         f"{r['events_per_s'] / q['events_per_s']:.1f}x queue.Queue (target <= 50 ns, >= 20x)")
    bench.finish(COLUMNS, notes)


if __name__ == "__main__":
    main()

"""Dataflow throughput (issue 21): the flow executor on partition threads, GIL off, with a baseline.

Input (seeded): N events (default 1 M) with 64-byte payloads (a numpy layout: key u4, pad u4, time i8,
48 bytes more), keys drawn uniformly from 10,000, event times 1 ms apart, fed in batches of --batch
events, the way the engine feeds a flow from its log (the same Executor and PartitionThreads as
eventstream/flow/runtime.py; reading the log is not measured here: bench/pipeline.py measures the engine).

    batch_aggregate    Dtype serde, key_by(field=...), 1-minute tumbling event-time window, Count()
                       (whole-batch numpy: no Python per event)
    python_window      the same window with a per-event Python key function and Fold aggregate
    python_map_reduce  per-event Python map (key from the payload bytes), key_by, reduce (emit="final")
    baseline           the windowed count as a plain single-threaded Python loop over a dict (no flow)

Each flow runs on 1 and 2 partition threads with the GIL off; python_window also runs on 1 and 2 threads
in a child process with the GIL on (PYTHON_GIL=1), the control for the scaling claim.
Every run's results are checked against numpy (the window counts must be exact).

    python bench/flows.py [--events N] [--keys K] [--batch B] [--quick] [--json]
    python bench/flows.py --log-input [--events N] [--json]

--log-input measures what the flows runtime does before the operators instead: the N events (and
N/10 of a topic the flow does not read) stored in an events.bin by EventLog, then read back by a
flow's LogTail in 1 MiB chunks and turned into Batches (FlowRunner._batch: topic test, event time,
offsets, payloads), events/s of the flow's topic; then the same with the batch_aggregate flow run
over each Batch on 1 partition thread (its Dtype serde decodes the payloads).

`--json` prints one object with batch_aggregate_events_per_s, python_window_events_per_s,
python_map_reduce_events_per_s (2 threads, GIL off), scaling_2v1_gil_off, scaling_2v1_gil_on and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.runtime import gil  # noqa: E402

if os.environ.get("EVENTSTREAM_BENCH_CHILD") != "1":
    gil.reexec_without_gil()

import numpy as np  # noqa: E402

from eventstream.flow import Count, Dtype, Flow, Fold, Tumbling  # noqa: E402
from eventstream.flow.batch import Batch  # noqa: E402
from eventstream.flow.plan import Executor  # noqa: E402
from eventstream.flow.runtime import PartitionThreads  # noqa: E402

LAYOUT = np.dtype([("key", "<u4"), ("pad", "<u4"), ("ts", "<i8"), ("rest", "V48")])
assert LAYOUT.itemsize == 64
T0 = 1_700_000_000_000_000_000
MINUTE = 60_000_000_000
# Bytewax 0.21.1, one worker, CPython 3.11 (GIL), TestingSource batches of 1,024, 10,000 keys: measured
# on this machine for the issue (not re-measured here)
BYTEWAX = {"window_count_events_per_s": 7_100, "map_reduce_events_per_s": 380_000}


def make_input(n: int, keys: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, dtype=LAYOUT)
    arr["key"] = rng.integers(0, keys, n)
    arr["ts"] = T0 + np.arange(n, dtype=np.int64) * 1_000_000
    raw = arr.tobytes()
    batches = []
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        seq = np.arange(lo, hi, dtype=np.int64)
        payloads = [raw[i * 64:(i + 1) * 64] for i in range(lo, hi)]
        batches.append(Batch(payloads, arr["ts"][lo:hi].copy(), seq, seq.astype(np.uint64)))
    return arr, batches


def key_of(p: bytes) -> int:
    return int.from_bytes(p[:4], "little")


def flow_batch_aggregate(sink):
    flow = Flow("batch_aggregate", "bench", serde=Dtype(LAYOUT))
    flow.key_by(field="key").window(Tumbling(60), Count()).to(sink)
    return flow


def flow_python_window(sink):
    flow = Flow("python_window", "bench", serde="bytes")
    flow.key_by(key_of).window(Tumbling(60), Fold(int, lambda acc, _v: acc + 1)).to(sink)
    return flow


def flow_python_map_reduce(sink):
    flow = Flow("python_map_reduce", "bench", serde="bytes")
    flow.map(key_of).key_by(lambda k: k).map(lambda _k: 1).reduce(lambda a, b: a + b, emit="final").to(sink)
    return flow


FLOWS = {"batch_aggregate": flow_batch_aggregate, "python_window": flow_python_window,
         "python_map_reduce": flow_python_map_reduce}


def run_flow(name: str, batches, threads: int) -> tuple[float, list]:
    """Seconds to push every batch through the flow on `threads` partitions (then end the input)."""
    out: list = []
    flow = FLOWS[name](lambda v: None)
    ex = Executor(flow, threads)
    parts = PartitionThreads(ex, f"bench-{name}").start()
    try:
        t0 = time.perf_counter()
        for b in batches:
            emitted, dead = parts.step(b)
            assert not dead, dead[:1]
            out += emitted
        ex.set_final(True)
        emitted, _ = parts.step(Batch.empty())
        out += emitted
        secs = time.perf_counter() - t0
    finally:
        parts.stop()
    return secs, [v for _, b in out for v in b.values]


def check(name: str, arr: np.ndarray, results: list) -> None:
    """Exact results: per (key, minute) counts for windows, per key counts for the reduce."""
    if name == "python_map_reduce":
        want = np.bincount(arr["key"])
        assert len(results) == int((want > 0).sum()), (len(results), int((want > 0).sum()))
        assert sum(results) == len(arr)
        return
    minute = (arr["ts"] - (arr["ts"] % MINUTE) - T0) // MINUTE
    pairs, counts = np.unique(np.stack([arr["key"].astype(np.int64), minute]), axis=1, return_counts=True)
    want = {(int(k), int(m)): int(c) for k, m, c in zip(pairs[0].tolist(), pairs[1].tolist(), counts.tolist())}
    got = {(int(r.key), (r.start - T0) // MINUTE): int(r.value) for r in results}
    assert got == want, f"{name}: {len(got)} results, {len(want)} expected"


def baseline(arr: np.ndarray) -> float:
    """The windowed count as plain single-threaded Python over the same payloads: seconds."""
    raw = arr.tobytes()
    payloads = [raw[i * 64:(i + 1) * 64] for i in range(len(arr))]
    ts = arr["ts"].tolist()
    t0 = time.perf_counter()
    counts: dict = {}
    for p, t in zip(payloads, ts):
        k = (int.from_bytes(p[:4], "little"), t - t % MINUTE)
        counts[k] = counts.get(k, 0) + 1
    return time.perf_counter() - t0


def log_input(args) -> dict:
    """--log-input: the runtime's reading of the log into Batches (see the module doc)."""
    import tempfile

    from eventstream.core.records import record_dtype
    from eventstream.core.topics import TopicTable
    from eventstream.flow.runtime import FlowRunner, Ports
    from eventstream.storage import EventLog
    from eventstream.storage.tail import LogTail, SegmentIndex

    arr, _ = make_input(args.events, args.keys, args.events)
    raw = arr.tobytes()
    dtype = record_dtype(448)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.bin"
        topics = TopicTable()
        mine, other = topics.intern("bench"), topics.intern("other")
        with EventLog(path, dtype=dtype, topics=topics, flusher=False, flush_events=1, fsync="none") as elog:
            for lo in range(0, args.events, 1000):
                hi = min(args.events, lo + 1000)
                recs = np.zeros(hi - lo + (hi - lo) // 10, dtype=dtype)
                k = hi - lo
                recs["topic_id"][:k] = mine
                recs["topic_id"][k:] = other
                recs["producer_ts"][:k] = arr["ts"][lo:hi]
                recs["payload_len"] = 64
                recs["payload"][:k, :64] = np.frombuffer(raw, np.uint8)[lo * 64 : hi * 64].reshape(k, 64)
                elog.append(recs)
        index = SegmentIndex(path, Path(tmp) / "segments.json", dtype)
        ports = Ports(path, dtype, topics, lambda r: None, lambda *a: None, Path(tmp), index)
        runner = FlowRunner(flow_batch_aggregate(lambda v: None), ports)
        rates = {}
        for name in ("log_input", "log_to_batch_aggregate"):
            parts = PartitionThreads(Executor(runner.flow, 1), "bench-log").start() if name != "log_input" else None
            tail = LogTail(path, dtype, index, chunk_bytes=1 << 20)
            t0 = time.perf_counter()
            n = 0
            while (got := tail.read_batch()) is not None:
                b = runner._batch(got)
                n += len(b)
                if parts is not None:
                    _, dead = parts.step(b)
                    assert not dead, dead[:1]
            secs = time.perf_counter() - t0
            tail.close()
            if parts is not None:
                parts.stop()
            assert n == args.events, (n, args.events)
            rates[f"{name}_events_per_s"] = round(n / secs)
    return {"events": args.events, **rates}


def child(args) -> dict:
    """python_window on 1 and 2 threads in this process (the parent runs it with the GIL on)."""
    arr, batches = make_input(args.events, args.keys, args.batch)
    out = {}
    for threads in (1, 2):
        secs, res = run_flow("python_window", batches, threads)
        check("python_window", arr, res)
        out[threads] = args.events / secs
    return {"gil": gil.gil_enabled(), "one": out[1], "two": out[2]}


def gil_on_control(args) -> dict:
    env = dict(os.environ, PYTHON_GIL="1", EVENTSTREAM_ALLOW_GIL="1", EVENTSTREAM_BENCH_CHILD="1")
    cmd = [sys.executable, "-X", "gil=1", __file__, "--child", "--events", str(args.events), "--keys", str(args.keys),
           "--batch", str(args.batch)]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if got.returncode != 0:
        raise RuntimeError(f"GIL-on child failed: {got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=8192, help="events per step (the engine reads ~1 MiB of log)")
    ap.add_argument("--quick", action="store_true", help="200,000 events")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--log-input", action="store_true", help="measure the runtime's reading of the log instead")
    args = ap.parse_args()
    if args.quick:
        args.events = 200_000
    if args.events < 1 or args.keys < 1 or args.batch < 1:
        ap.error("--events, --keys and --batch must be >= 1")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.log_input:
        r = log_input(args)
        print(json.dumps(r) if args.json else f"flows log input: {r['log_input_events_per_s']:,} events/s "
              f"({args.events:,} events of 64 bytes read from events.bin into Batches); with the batch_aggregate "
              f"flow on 1 thread: {r['log_to_batch_aggregate_events_per_s']:,} events/s")
        return 0
    arr, batches = make_input(args.events, args.keys, args.batch)
    rates: dict[str, dict[int, float]] = {}
    for name in FLOWS:
        rates[name] = {}
        for threads in (1, 2):
            secs, res = run_flow(name, batches, threads)
            check(name, arr, res)
            rates[name][threads] = args.events / secs
    base = args.events / baseline(arr)
    ctl = gil_on_control(args)
    r = {
        "events": args.events, "keys": args.keys, "batch": args.batch, "cpus": len(os.sched_getaffinity(0)),
        "batch_aggregate_events_per_s": round(rates["batch_aggregate"][2]),
        "python_window_events_per_s": round(rates["python_window"][2]),
        "python_map_reduce_events_per_s": round(rates["python_map_reduce"][2]),
        "batch_aggregate_1_thread_events_per_s": round(rates["batch_aggregate"][1]),
        "python_window_1_thread_events_per_s": round(rates["python_window"][1]),
        "python_map_reduce_1_thread_events_per_s": round(rates["python_map_reduce"][1]),
        "scaling_2v1_gil_off": round(rates["python_window"][2] / rates["python_window"][1], 2),
        "scaling_2v1_gil_on": round(ctl["two"] / ctl["one"], 2),
        "python_window_gil_on_1_thread_events_per_s": round(ctl["one"]),
        "python_window_gil_on_2_threads_events_per_s": round(ctl["two"]),
        "baseline_python_loop_events_per_s": round(base),
        "bytewax_reference": BYTEWAX,
        "goals": {"batch_aggregate >= 1M/s": rates["batch_aggregate"][2] >= 1_000_000,
                  "python_window >= 200k/s": rates["python_window"][2] >= 200_000,
                  "python_map_reduce >= 500k/s": rates["python_map_reduce"][2] >= 500_000},
    }
    r["goals"]["scaling_2v1_gil_off >= 1.7"] = r["scaling_2v1_gil_off"] >= 1.7
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"flows bench: {args.events:,} events, {args.keys:,} keys, 1-minute tumbling event-time windows, "
          f"batches of {args.batch:,}; {r['cpus']} CPUs (shared)")
    print(f"{'flow':<22} {'1 thread ev/s':>14} {'2 threads ev/s':>15} {'2 vs 1':>7}  goal (2 threads)")
    goals = {"batch_aggregate": 1_000_000, "python_window": 200_000, "python_map_reduce": 500_000}
    for name in FLOWS:
        one, two = rates[name][1], rates[name][2]
        print(f"{name:<22} {one:>14,.0f} {two:>15,.0f} {two / one:>6.2f}x  >= {goals[name]:,}: "
              f"{'met' if two >= goals[name] else 'NOT met'}")
    print(f"{'python_window GIL on':<22} {ctl['one']:>14,.0f} {ctl['two']:>15,.0f} {ctl['two'] / ctl['one']:>6.2f}x  "
          f"(control: about 1x expected)")
    print(f"{'baseline python loop':<22} {base:>14,.0f} {'-':>15}          (hand-written dict count, no flow)")
    print(f"Bytewax 0.21.1 reference (issue 21, same machine, not re-measured): window count "
          f"{BYTEWAX['window_count_events_per_s']:,}/s, map+reduce_final {BYTEWAX['map_reduce_events_per_s']:,}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Processor thread scaling per NUMA node: the engine pipeline vs GIL on vs a queue.Queue baseline.

For each NUMA node (libnuma: nodes, their CPUs, distances), for threads = 1..k:
* gil-off         the real processor pipeline (EventBusMulti partitions + TransactionalProcessor
                  threads from ProcessManager), rings allocated on that node, threads pinned to its
                  CPUs. The queue is pre-filled with N records (64-byte payloads, 64 topics) and the
                  clock runs from starting the processors until all N are handled.
* gil-on          the same, in a child process of the same interpreter with PYTHON_GIL=1
                  (EVENTSTREAM_ALLOW_GIL=1): what the GIL does to the same code.
* queue-baseline  a queue.Queue per priority (realtime / transactional / batch), pre-filled with the
                  same records as Python objects; k threads get() them one by one into batches of up
                  to 256 and run the same handler on np.array(batch).
The handler's work is chosen with --work: "python" (default; a few Python integer steps per event,
1-2 µs, the code the GIL serializes), "numpy" (48 vectorized hash rounds over every payload word,
about 1 µs per event; numpy releases the GIL, so this scales with the GIL on too), or "none" (the
transport alone: rings and processors vs queue.Queue).

    python bench/scaling.py [--quick] [--json] [--work python|numpy|none] [--simulate-nodes N]
                            [--max-threads K] [--repeats R]

Outputs: a table (stdout), and bench/results/scaling.{csv,json,png}. With --simulate-nodes the CPUs
are split into pretend nodes (memory still comes from the real node of those CPUs); every row then
carries simulated=true and the header says SIMULATED.
"""

from __future__ import annotations

import argparse
import csv
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

from eventstream.config import Config  # noqa: E402
from eventstream.core.records import Priority, record_dtype  # noqa: E402
from eventstream.core.topics import TopicTable  # noqa: E402
from eventstream.engine.bus import EventBusMulti  # noqa: E402
from eventstream.engine.manager import ProcessManager  # noqa: E402
from eventstream.engine.processors import Sinks  # noqa: E402
from eventstream.runtime import topology  # noqa: E402
from eventstream.runtime.affinity import pin_current_thread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = 64
DTYPE = record_dtype(PAYLOAD)
TOPICS = 64
COLUMNS = ["node", "cpus", "threads", "mode", "events_per_s", "ns_per_event", "speedup", "spread_pct", "simulated"]
MODES = ("gil-off", "gil-on", "queue-baseline")
_MIX = np.uint64(0x9E3779B97F4A7C15)


WORK_ROUNDS = 48  # hash rounds per payload word: about 1 µs of numpy work per event on a 2-core EPYC


def work(records: np.ndarray) -> int:
    """The handler's numpy work: WORK_ROUNDS rounds of a multiplicative hash over every 8-byte word of
    every payload (vectorized over the batch; the cost is proportional to the events, not per call)."""
    h = np.ascontiguousarray(records["payload"]).view(np.uint64).copy()
    for _ in range(WORK_ROUNDS):
        h *= _MIX
        h ^= h >> np.uint64(29)
    return int(np.bitwise_xor.reduce(h, axis=None)) if h.size else 0


PY_ROUNDS = 6  # Python-level steps per event in the "python" workload: about 1-2 µs per event


def python_work(records: np.ndarray) -> int:
    """A handler written in plain Python: a few integer steps per event over its fields (the kind of
    code the GIL serializes and free-threading runs in parallel)."""
    acc = 0
    for plen, tid, seq in zip(records["payload_len"].tolist(), records["topic_id"].tolist(),
                              records["seq"].tolist()):
        for _ in range(PY_ROUNDS):
            acc = (acc * 31 + plen + tid + seq) & 0xFFFFFFFF
    return acc


WORKLOADS = {"python": python_work, "numpy": work, "none": lambda records: 0}
WORKLOAD = "python"  # set from --work in main()


def handler(batch) -> None:
    WORKLOADS[WORKLOAD](batch.records)


def make_records(n: int, topics: TopicTable) -> np.ndarray:
    r = np.zeros(n, DTYPE)
    ids = np.array([topics.intern(f"scale.{i}") for i in range(TOPICS)], dtype=np.uint32)
    r["topic_id"] = ids[np.arange(n) % TOPICS]
    r["priority"] = Priority.MEDIUM
    r["payload_len"] = PAYLOAD
    r["payload"] = np.random.default_rng(1).integers(0, 256, size=(n, PAYLOAD), dtype=np.uint8)
    r["seq"] = np.arange(1, n + 1)
    return r


def ring_capacity(n: int, partitions: int) -> int:
    per = -(-n // partitions) + 1
    return 1 << max(10, (per - 1).bit_length())


class Counter:
    """Events handled, summed over threads without a shared mutable int (list.append is atomic)."""

    def __init__(self):
        self.parts: list[int] = []

    def add(self, n: int) -> None:
        self.parts.append(n)

    @property
    def total(self) -> int:
        return sum(self.parts)


def run_pipeline(records: np.ndarray, topics: TopicTable, threads: int, cpus: list[int], mem_node: int):
    """Pre-fill the transactional partitions, start `threads` pinned processors, time until all handled."""
    n = len(records)
    cfg = Config()
    cfg.numa.node = mem_node
    cfg.queues.wait_strategy = "sleep"  # idle tiers must not spin on the CPUs being measured
    cfg.queues.transactional.capacity = ring_capacity(n, threads)
    cfg.queues.transactional.overflow = "DROP_NEW"
    cfg.queues.realtime.capacity = 1024
    cfg.queues.batch.capacity = 1024
    p = cfg.processors
    p.transactional.workers = p.transactional.max_workers = threads
    p.batch.workers = p.batch.max_workers = 1
    for role in ("realtime", "transactional", "batch"):
        setattr(cfg.affinity, role, list(cpus))
    handled, dropped = Counter(), Counter()
    sinks = Sinks(topics, store=lambda r: None, drop=lambda r, reason: dropped.add(len(r)),
                  processed=lambda q, r, t=None: handled.add(len(r)))
    bus = EventBusMulti(cfg, DTYPE)
    try:
        off = bus.offer(records, stamp=False)
        if off.held is not None or off.refused:
            raise RuntimeError(f"pre-fill did not place {len(records) - off.placed} records")
        mgr = ProcessManager(cfg, bus, sinks, handlers={"transactional": handler})
        t0 = time.perf_counter()
        mgr.start()
        deadline = time.monotonic() + 300
        while handled.total + dropped.total < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipeline handled {handled.total} of {n} within 300 s")
            time.sleep(0.0005)
        elapsed = time.perf_counter() - t0
        if not mgr.stop(30):
            raise RuntimeError("processors did not stop")
        if dropped.total:
            raise RuntimeError(f"pipeline dropped {dropped.total} records")
    finally:
        bus.close()
    return n, elapsed


def run_queue_baseline(records: np.ndarray, threads: int, cpus: list[int]):
    """queue.Queue per priority; `threads` workers get() events one by one into batches of <= 256."""
    n = len(records)
    queues = {name: queue.Queue() for name in ("realtime", "transactional", "batch")}
    q = queues["transactional"]
    for row in records:  # Python objects, one per event, as a queue.Queue pipeline would carry them
        q.put(row)
    handled = Counter()
    done = threading.Event()

    def worker():
        pin_current_thread(cpus, "baseline")
        get = q.get_nowait
        while not done.is_set():
            items = []
            try:
                for _ in range(256):
                    items.append(get())
            except queue.Empty:
                pass
            if items:
                WORKLOADS[WORKLOAD](np.array(items, dtype=DTYPE))
                handled.add(len(items))
            elif handled.total >= n:
                return
            else:
                time.sleep(0.0005)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    elapsed = time.perf_counter() - t0
    done.set()
    if handled.total != n:
        raise RuntimeError(f"baseline handled {handled.total} of {n}")
    return n, elapsed


def node_plan(args) -> tuple[topology.Topology, topology.Topology]:
    real = topology.detect()
    topo = topology.simulate(args.simulate_nodes) if args.simulate_nodes else real
    return real, topo


def describe(real: topology.Topology, topo: topology.Topology) -> list[str]:
    lines = [f"topology source: {real.source}; nodes: {len(real.nodes)}"]
    for nd in real.nodes:
        lines.append(f"  node {nd.id}: cpus {list(nd.cpus)}, memory {nd.memory_bytes / 2**30:.1f} GiB")
    ids = [nd.id for nd in real.nodes]
    lines.append("  distances: " + "; ".join(
        f"{a}->{b}={real.distances.get((a, b), '?')}" for a in ids for b in ids))
    if topo.simulated:
        lines.append(f"SIMULATED: {len(topo.nodes)} pretend nodes split from the allowed CPUs "
                     f"({', '.join(f'node {nd.id}: {list(nd.cpus)}' for nd in topo.nodes)}); memory comes "
                     "from the real node of each CPU")
    return lines


def thread_counts(args, cpus: tuple[int, ...]) -> list[int]:
    k = args.max_threads or max(2, len(cpus))
    return list(range(1, k + 1))


def rows_for(bench: Bench, args, modes: tuple[str, ...], progress=None) -> None:
    real, topo = node_plan(args)
    n = args.events or (200_000 if bench.quick else 600_000)
    topics = TopicTable()
    records = make_records(n, topics)
    for nd in topo.nodes:
        mem_node = real.node_of_cpu(nd.cpus[0]) if topo.simulated else nd.id
        for threads in thread_counts(args, nd.cpus):
            for mode in modes:
                if mode == "queue-baseline":
                    nb = max(10_000, n // 4)  # the baseline is ~50x slower: fewer events, same work each
                    stats = bench.measure(lambda: run_queue_baseline(records[:nb], threads, list(nd.cpus)))
                else:
                    stats = bench.measure(lambda: run_pipeline(records, topics, threads, list(nd.cpus), mem_node))
                bench.add_row({"node": nd.id, "cpus": ",".join(map(str, nd.cpus)), "threads": threads,
                               "mode": mode if mode != "gil-off" or not gil.gil_enabled() else "gil-on",
                               "simulated": topo.simulated}, stats)
                if progress is not None:
                    progress.update(1)


def gil_child_rows(args, bench: Bench) -> list[dict]:
    env = dict(os.environ, PYTHON_GIL="1", EVENTSTREAM_ALLOW_GIL="1", EVENTSTREAM_NO_REEXEC="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--gil-child", "--json",
           "--repeats", str(bench.args.repeats), "--warmup", str(bench.args.warmup)]
    for flag, value in (("--simulate-nodes", args.simulate_nodes), ("--max-threads", args.max_threads),
                        ("--events", args.events), ("--work", args.work)):
        if value:
            cmd += [flag, str(value)]
    if bench.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"GIL-on child failed ({out.returncode}): {out.stderr[-2000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        r["mode"] = "gil-on"
    return rows


def add_speedups(rows: list[dict]) -> None:
    base = {(r["node"], r["mode"]): r["events_per_s"] for r in rows if r["threads"] == 1}
    for r in rows:
        b = base.get((r["node"], r["mode"]))
        r["speedup"] = r["events_per_s"] / b if b else float("nan")


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, reported (never asserted)."""
    notes = []
    for node in sorted({r["node"] for r in rows}):
        def rate(mode, t):
            return next((r["events_per_s"] for r in rows if r["node"] == node and r["mode"] == mode
                         and r["threads"] == t), None)
        off1, off2, on1, on2 = rate("gil-off", 1), rate("gil-off", 2), rate("gil-on", 1), rate("gil-on", 2)
        q1 = rate("queue-baseline", 1)
        if off1 and off2:
            notes.append(f"node {node}: gil-off 2 vs 1 threads = {off2 / off1:.2f}x (target >= 1.8x)")
        if on1 and on2:
            notes.append(f"node {node}: gil-on  2 vs 1 threads = {on2 / on1:.2f}x (target <= 1.2x)")
        if off1 and q1:
            notes.append(f"node {node}: pipeline vs queue.Queue baseline (1 thread) = {off1 / q1:.1f}x (target >= 10x)")
    return notes


def write_outputs(bench: Bench, header: list[str], notes: list[str]) -> list[Path]:
    RESULTS.mkdir(exist_ok=True)
    rows = bench.rows
    paths = [RESULTS / "scaling.json", RESULTS / "scaling.csv", RESULTS / "scaling.png"]
    paths[0].write_text(json.dumps({"facts": bench.facts, "topology": header, "targets": notes, "rows": rows},
                                   indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing (EVENTSTREAM_EXTRAS=bench bash tools/bootstrap.sh): no PNG", file=sys.stderr)
        return paths[:2]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (node, mode) in sorted({(r["node"], r["mode"]) for r in rows}):
        pts = sorted((r["threads"], r["events_per_s"]) for r in rows if r["node"] == node and r["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"node {node} {mode}")
    sim = " (SIMULATED nodes)" if any(r.get("simulated") for r in rows) else ""
    ax.set_title(f"Processor scaling per NUMA node{sim}")
    ax.set_xticks(sorted({r["threads"] for r in rows}))
    ax.set_xlabel("processor threads")
    ax.set_ylabel("events/s")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="bench/scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--simulate-nodes", type=int, default=0, metavar="N",
                        help="split the allowed CPUs into N pretend nodes (one-node machines)")
    parser.add_argument("--max-threads", type=int, default=0, help="threads 1..K (default: the node's CPUs, >= 2)")
    parser.add_argument("--events", type=int, default=0, help="events per run (default 600k, quick 200k)")
    parser.add_argument("--work", choices=sorted(WORKLOADS), default="python",
                        help="handler workload per batch: python (per-event Python, default: what the GIL "
                             "serializes), numpy (vectorized hash rounds), none (transport only)")
    parser.add_argument("--no-gil-run", action="store_true", help="skip the GIL-on child")
    parser.add_argument("--gil-child", action="store_true", help=argparse.SUPPRESS)
    bench = Bench("scaling", argv, parser=parser)
    args = bench.args
    global WORKLOAD
    WORKLOAD = args.work
    if args.gil_child:
        rows_for(bench, args, ("gil-off",))
        bench.finish(COLUMNS)
        return
    gil.require_gil_off(what="bench/scaling.py")
    real, topo = node_plan(args)
    header = describe(real, topo)
    for line in header:
        print(f"# {line}", file=sys.stderr, flush=True)
    local_modes = ("gil-off", "queue-baseline")
    total = sum(len(thread_counts(args, nd.cpus)) for nd in topo.nodes) * len(local_modes)
    try:
        from tqdm import tqdm

        progress = tqdm(total=total, desc="scaling", unit="row", file=sys.stderr)
    except ImportError:
        progress = None
    rows_for(bench, args, local_modes, progress)
    if progress is not None:
        progress.close()
    if not args.no_gil_run:
        print("# running the same workload with PYTHON_GIL=1 in a child process ...", file=sys.stderr, flush=True)
        bench.rows.extend(gil_child_rows(args, bench))
    order = {m: i for i, m in enumerate(MODES)}
    bench.rows.sort(key=lambda r: (r["node"], order.get(r["mode"], 9), r["threads"]))
    add_speedups(bench.rows)
    notes = targets(bench.rows)
    paths = write_outputs(bench, header, notes)
    if not args.json:
        for line in header:
            print(f"# {line}")
    notes = notes + [f"wrote {', '.join(str(p.relative_to(RESULTS.parent.parent)) for p in paths)}",
                     f"{len(bench.rows[0]['cpus'].split(','))} CPU(s) per node; events per run: "
                     f"{bench.rows[0]['events']} (queue-baseline: {max(10_000, bench.rows[0]['events'] // 4)})"]
    bench.finish(COLUMNS, notes)


if __name__ == "__main__":
    main()

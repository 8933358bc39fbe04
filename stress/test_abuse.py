"""Abuse suite: hostile clients against a real `eventstream serve`, each in its own process, while a
well-behaved client streams events (hardening issue #11 item 6).

Each test starts a server with tight per-client limits, runs one kind of abuser (stress/abusers.py)
for a bounded time while the good client sends, and checks: the server stays up and /healthz says
ok throughout, no thread failed, every good event is ACKed and stored exactly once, nothing the
abusers sent was stored unless it was a valid event (topic floods, valid UDP frames), the limit that
should have acted did (its counter on /metrics), and the server drains and exits 0 on SIGTERM.
Abusers bind 127.0.0.3 as their source address, the good client connects from 127.0.0.1: per-IP
limits must shut out the abuser, not its neighbours.

The second half (issue 22 item 5) runs each attack FIRST and lets the good client arrive after it,
from another address and from the same one (there the two are different principals): a topic flood
(also across a restart), slow senders filling the connection table, subscriber slots taken by
finished and by never-finished handshakes, one tenant's events/s over many connections, a UDP flood
from one source. The good client must get every event through.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stress_helpers import FACTOR, scaled, service_config, wait_until
from verify import Store, event_id, payload

from eventstream.client import TcpClient, subscribe
from eventstream.config import _ENV_NOT_CONFIG
from eventstream.protocol import subscribe as sp
from eventstream.protocol.frames import encode_hello, encode_v2
from eventstream.service import Service

HERE = Path(__file__).resolve().parent
ABUSE_S = 2.5 if FACTOR < 1 else 8.0  # long enough for the 1 s frame timeout to act several times
ABUSER_IP = "127.0.0.3"
LIMITS = {
    "server.tcp.frame_timeout_s": 1.0,
    "server.tcp.max_connections_per_ip": 32,
    "server.tcp.max_partial_bytes": 16 << 20,
    "server.tcp.max_rejects_per_s": 50,
    "server.udp.max_rejects_per_s": 50,
    "server.max_topics": 500,
}


class AbuseServer:
    """One `eventstream serve` child with LIMITS, on ephemeral ports, JSON logs in a file."""

    def __init__(self, tmp: Path):
        self.data = tmp / "data"
        self.log_path = tmp / "serve.log"
        ready = tmp / "ready"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTREAM_") or k in _ENV_NOT_CONFIG}
        env.update(PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
        sets = {"storage.fsync": "none", "logging.level": "warning", "logging.format": "json", **LIMITS}
        args = [sys.executable, "-X", "gil=0", "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0",
                "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(self.data), "--ready-file", str(ready)]
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode} before ready: {self.log_path}"
            assert time.monotonic() < deadline, "serve not ready within 90 s"
            time.sleep(0.02)
        self.tcp_port, self.udp_port, self.metrics_port, self.subscribe_port = map(int, ready.read_text().split())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels) -> float:
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in self.get("/metrics")[1].splitlines():
            if line.split(" ")[0] == want:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{want} not on /metrics")

    def healthy(self) -> None:
        assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}"
        status, body = self.get("/healthz")
        assert status == 200, f"/healthz {status}: {body}"

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
            self.log.close()


def start_abusers(kind: str, srv: AbuseServer, count: int) -> list[subprocess.Popen]:
    port = srv.udp_port if kind == "udpflood" else srv.tcp_port
    env = dict(os.environ, PYTHON_GIL="0", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return [subprocess.Popen([sys.executable, "-X", "gil=0", str(HERE / "abusers.py"), kind, "127.0.0.1", str(port),
                              str(ABUSE_S), ABUSER_IP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for _ in range(count)]


# kind -> (abuser processes, the limit counter that must have acted: (metric, labels) or None)
ABUSES = {
    "garbage": (2, None),
    "badframes": (2, ("connections_limited_total", {"reason": "too_many_rejects"})),
    "slowloris": (1, ("connections_limited_total", {"reason": "frame_timeout"})),
    "idle": (1, ("connections_limited_total", {"reason": "max_connections_per_ip"})),
    "halfframes": (1, ("connections_limited_total", {"reason": "max_partial_bytes"})),
    "topics": (1, ("events_dropped_total", {"reason": "too_many_topics"})),
    "udpflood": (2, None),
}


@pytest.mark.parametrize("kind", list(ABUSES))
def test_abuse_keeps_the_server_healthy_and_the_good_client_whole(tmp_path, tally, kind):
    n_abusers, acted = ABUSES[kind]
    n_good = scaled(6_000, 600)
    srv = AbuseServer(tmp_path)
    abusers: list[subprocess.Popen] = []
    try:
        good = TcpClient("127.0.0.1", srv.tcp_port, version=2, batch_size=50, timeout=60).connect()
        good.send("good", payload(0), event_id=event_id(1, 0))
        assert good.wait_acked(30), "the good topic is known before the abuse starts"
        abusers = start_abusers(kind, srv, n_abusers)
        sent = 1
        while any(a.poll() is None for a in abusers):  # the good client streams while they run
            for _ in range(50):
                if sent < n_good:
                    good.send("good", payload(sent), event_id=event_id(1, sent))
                    sent += 1
            good.flush()
            srv.healthy()
            time.sleep(ABUSE_S / 50)  # pacing, not synchronisation: spread the good events over the abuse
        while sent < n_good:
            good.send("good", payload(sent), event_id=event_id(1, sent))
            sent += 1
        assert good.wait_acked(60), f"{good.unacknowledged} good events unacknowledged"
        good.close()
        reports = []
        for a in abusers:
            out, err = a.communicate(timeout=60)
            assert a.returncode == 0, f"abuser {kind} failed: {err.decode()[-2000:]}"
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
        srv.healthy()
        assert srv.metric("threads_failed") == 0
        if acted is not None:
            name, labels = acted
            assert srv.metric(name, **labels) > 0, f"{name}{labels} never acted: {reports}"
        if kind == "halfframes":
            assert srv.metric("partial_frame_bytes") <= LIMITS["server.tcp.max_partial_bytes"]
        if kind == "topics":
            assert srv.metric("topics") == LIMITS["server.max_topics"]
        nacks = list(good.nacks)
    finally:
        for a in abusers:
            if a.poll() is None:
                a.kill()
                a.communicate(timeout=30)
        code = srv.stop()
    assert code == 0, f"serve exited {code} after SIGTERM: {srv.log_path}"
    assert good.acked == n_good and not nacks, f"good client: {good.acked} ACKed of {n_good}, NACKs {nacks[:3]}"
    store = Store(srv.data)
    tags = sorted(store.stored_tags("good").tolist())
    lost = n_good - len(set(tags))
    assert tags == list(range(n_good)), f"good events stored: {len(tags)} of {n_good} (duplicates: " \
                                        f"{store.duplicates('good')})"
    others = set(store.tags) - {"good"}
    if kind == "topics":
        assert all(t.startswith("flood.") for t in others) and len(others) < LIMITS["server.max_topics"]
    elif kind == "udpflood":  # valid frames on new topics may be stored; random bytes never
        assert all(t.startswith("udp.") for t in others) and len(others) < LIMITS["server.max_topics"]
    else:
        assert not others, f"abuse traffic was stored under {sorted(others)[:5]}"
    tally.add(moved=n_good, lost=lost, abusers=n_abusers, abuse_bytes=sum(r["bytes"] for r in reports),
              dlq_lines=store.dlq_total)


# ---------------------------------------------------------------------------------------------------
# Issue 22 item 5: every attack first, the good client AFTER it, from another address and from the
# same one (there told apart by principals: a tenant is a principal, else an address). In-process
# services (real sockets, threads), bounded waits on the server's own counters, no sleeps as sync.

GOOD_TOKEN, EVIL_TOKEN = "alice-token-5b1d", "mallory-token-93e0"
ADDRESSES = {"other_address": ABUSER_IP, "same_address": "127.0.0.1"}


def raw(port: int, source: str):
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def tenant_config(tmp_path: Path, where: str, **extra):
    """Same address: alice and mallory are principals (tenants told apart by their tokens)."""
    over = {"server.udp.enabled": False, **extra}
    if where == "same_address":
        for name, tok in (("alice", GOOD_TOKEN), ("mallory", EVIL_TOKEN)):
            (tmp_path / f"{name}.token").write_text(tok)
        over["server.auth.principals"] = [
            {"name": n, "token_file": str(tmp_path / f"{n}.token"), "produce": ["*"], "consume": ["*"]}
            for n in ("alice", "mallory")]
    return service_config(tmp_path / "data", **over)


def hello(where: str, token: str) -> bytes:
    return encode_hello(token) if where == "same_address" else b""


def good_client(svc, where: str, topics: list[str], n: int) -> TcpClient:
    """The good client arrives: n events over `topics`, every one ACKed, none NACKed."""
    c = TcpClient("127.0.0.1", svc.tcp.address[1], token=GOOD_TOKEN if where == "same_address" else None,
                  timeout=60).connect()
    for i in range(n):
        c.send(topics[i % len(topics)], payload(i), event_id=event_id(7, i))
    assert c.wait_acked(60), f"{c.unacknowledged} good events unacknowledged"
    c.close()
    assert c.acked == n and not c.nacks, f"good client: {c.acked} of {n} ACKed, NACKs {c.nacks[:3]}"
    return c


@pytest.mark.parametrize("where", list(ADDRESSES))
def test_topic_flood_first_then_a_new_tenant_still_gets_new_topics_also_after_a_restart(tmp_path, tally, where):
    cfg = tenant_config(tmp_path, where, **{"server.max_topics": 400, "server.tenants.max_new_topics": 100})
    svc = Service(cfg).start()
    try:
        s = raw(svc.tcp.address[1], ADDRESSES[where])
        s.sendall(hello(where, EVIL_TOKEN) + b"".join(encode_v2(f"flood.{i}", b"t", 2, i + 1) for i in range(1000)))
        wait_until(lambda: svc.tenants.refused["topics"] >= 900, 30, "the flood to hit its tenant's quota")
        s.close()
        assert len(svc.engine.topics) == 100  # one tenant could not fill the table for the others
        good_client(svc, where, [f"good.{k}" for k in range(20)], scaled(2000, 200))
    finally:
        svc.stop()
    svc = Service(cfg).start()  # the table is rebuilt from the log; the tenants' counts are not
    try:
        c = good_client(svc, where, [f"after.{k}" for k in range(20)], 100)
        s = raw(svc.tcp.address[1], ADDRESSES[where])  # nor is the attacker itself locked out for good
        s.sendall(hello(where, EVIL_TOKEN) + encode_v2("flood.new", b"t", 2, 5000))
        wait_until(lambda: "flood.new" in {svc.engine.topics.name(i) for i in range(1, len(svc.engine.topics) + 1)}, 30,
                   "a new topic of the attacker after the restart")
        s.close()
    finally:
        svc.stop()
    tally.add(moved=c.acked, lost=0)


@pytest.mark.parametrize("where", list(ADDRESSES))
def test_slow_senders_fill_the_connection_table_first_then_the_idlest_make_room(tmp_path, tally, where):
    cfg = tenant_config(tmp_path, where, **{"server.tcp.max_connections": 20, "server.tcp.evict_idle_s": 0.0,
                                            "server.tcp.max_connections_per_ip": 64})
    svc = Service(cfg).start()
    socks = []
    try:
        for i in range(20):  # valid but slow: one event each, then nothing
            s = raw(svc.tcp.address[1], ADDRESSES[where])
            s.sendall(hello(where, EVIL_TOKEN) + encode_v2("slow", b"s", 2, i + 1))
            socks.append(s)
        wait_until(lambda: svc.tcp.statistics()["frames_accepted"] == 20, 30, "the 20 slow events")
        wait_until(lambda: svc.tcp.statistics()["connections_open"] == 20, 30, "20 open connections")
        c = good_client(svc, where, ["good"], scaled(3000, 300))
        assert svc.tcp.statistics()["connections_limited"].get("evicted_idle", 0) >= 1
        assert svc.tcp.statistics()["connections_open"] <= 20
    finally:
        for s in socks:
            s.close()
        svc.stop()
    tally.add(moved=c.acked, lost=0)


@pytest.mark.parametrize("where", list(ADDRESSES))
def test_subscriber_slots_taken_first_then_a_new_subscriber_is_served(tmp_path, tally, where):
    import psutil

    cfg = tenant_config(tmp_path, where, **{"server.subscribe.max_subscribers": 8,
                                            "server.tenants.max_subscribers": 4})
    svc = Service(cfg).start()
    proc = psutil.Process()
    base = proc.num_threads()
    port = svc.subscribe.address[1]
    socks = []
    try:
        good_client(svc, where, ["feed"], 50)
        # the attacker: 4 finished subscriptions (its tenant's share; a 5th is refused), then 30
        # connections that never finish their handshake (a SUBSCRIBE trickled one byte at a time)
        first = hello(where, EVIL_TOKEN) + sp.encode_subscribe("feed", credit=1)
        for _ in range(4):
            s = raw(port, ADDRESSES[where])
            s.sendall(first)
            socks.append(s)
        wait_until(lambda: svc.subscribe.sessions_by_kind()["solo"] == 4, 30, "4 attacker subscriptions")
        over = raw(port, ADDRESSES[where])
        over.sendall(first)
        assert b"server.tenants.max_subscribers=4" in over.recv(4096)
        over.close()
        first = hello(where, EVIL_TOKEN) + sp.encode_subscribe("feed")
        for _ in range(30):
            s = raw(port, ADDRESSES[where])
            s.sendall(first[:1])
            socks.append(s)
        wait_until(lambda: svc.subscribe.statistics()["accepted"] >= 35, 30, "the trickling connections")
        threads = proc.num_threads()
        assert threads <= base + 2 * 8 + 4, f"{threads} threads (before: {base}) with 35 attacker connections"
        # the good subscriber arrives last and reads everything
        with subscribe("127.0.0.1", port, "feed", token=GOOD_TOKEN if where == "same_address" else None,
                       follow=False) as s:
            got = list(s)
        assert len(got) == 50
        assert svc.subscribe.statistics()["evicted"] >= 1
    finally:
        for s in socks:
            s.close()
        svc.stop()
    tally.add(moved=len(got), lost=50 - len(got))


@pytest.mark.parametrize("where", list(ADDRESSES))
def test_a_tenants_events_per_s_hold_across_its_connections_and_a_later_client_gets_through(tmp_path, tally,
                                                                                             where):
    import threading

    cfg = tenant_config(tmp_path, where, **{"server.tenants.max_events_per_s": 2000.0})
    svc = Service(cfg).start()
    stop = threading.Event()
    socks = [raw(svc.tcp.address[1], ADDRESSES[where]) for _ in range(8)]
    frames = b"".join(encode_v2("blast", b"b", 2, 0) for _ in range(500))

    def blast(s):
        try:
            s.sendall(hello(where, EVIL_TOKEN))
            while not stop.is_set():
                s.sendall(frames)
        except OSError:
            pass

    threads = [threading.Thread(target=blast, args=(s,), daemon=True) for s in socks]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: svc.tenants.throttled > 0, 30, "the attacker's tenant to be throttled")
        t0 = time.monotonic()
        before = svc.tcp.statistics()["frames_accepted"]
        n = scaled(3000, 300)
        c = good_client(svc, where, ["good"], n)  # its own tenant: its own budget
        elapsed = time.monotonic() - t0
        attacker = svc.tcp.statistics()["frames_accepted"] - before - n
        # 8 connections, one budget: at most its rate over the time, plus one read per connection
        assert attacker <= 2000 * elapsed + 8 * 6600 + 200, (attacker, elapsed)
    finally:
        stop.set()
        for s in socks:
            s.close()
        for t in threads:
            t.join(10)
        svc.stop()
    tally.add(moved=c.acked, lost=0)


def test_udp_flood_is_limited_per_source_and_exported(tmp_path, tally):
    import socket

    cfg = service_config(tmp_path / "data", **{"server.udp.max_datagrams_per_s_per_source": 200.0})
    svc = Service(cfg).start()
    try:
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind((ABUSER_IP, 0))
        for i in range(3000):
            flood.sendto(b"\xff" + bytes(200), svc.udp.address)  # garbage: never a frame
        flood.close()
        wait_until(lambda: svc.udp.stats.datagrams + svc.udp.kernel_drops() >= 3000, 30, "the flood read")
        st = svc.udp.statistics()
        assert st["datagrams_rate_limited"] >= 2000 and st["datagrams_bad"] >= 1
        assert st["datagrams_bad"] + st["datagrams_rate_limited"] + st["kernel_drops"] == 3000
        good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # arrives after, from 127.0.0.1: its own
        for i in range(15):  # budget (a burst of 20 at 200/s) is untouched by the flood
            good.sendto(encode_v2("udp.good", payload(i), 2, event_id(9, i)), svc.udp.address)
        good.close()
        wait_until(lambda: svc.metrics.processed_total() >= 15, 30, "the good datagrams")
        assert svc.udp.statistics()["datagrams_rate_limited"] == st["datagrams_rate_limited"]
        text = svc.metrics.render().decode()
        for name in ("udp_datagrams_bad_total", "udp_kernel_drops_total", "udp_datagrams_rate_limited_total"):
            assert name in text
    finally:
        svc.stop()
    tally.add(moved=15, lost=0)

"""Abuse suite: hostile clients against a real `eventstream serve`, each in its own process, while a
well-behaved client streams events (hardening issue #11 item 6).

Each test starts a server with tight per-client limits, runs one kind of abuser (stress/abusers.py)
for a bounded time while the good client sends, and checks: the server stays up and /healthz says
ok throughout, no thread failed, every good event is ACKed and stored exactly once, nothing the
abusers sent was stored unless it was a valid event (topic floods, valid UDP frames), the limit that
should have acted did (its counter on /metrics), and the server drains and exits 0 on SIGTERM.
Abusers bind 127.0.0.3 as their source address, the good client connects from 127.0.0.1: per-IP
limits must shut out the abuser, not its neighbours.
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

from stress_helpers import FACTOR, scaled, wait_until
from verify import Store, event_id, payload

from eventstream.client import TcpClient
from eventstream.config import _ENV_NOT_CONFIG

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

"""Exactly-once windowed results across kill -9: a real `eventstream serve` child process (TCP, the
real log, the flow from YAML) is killed repeatedly while a windowed count runs over a known input;
every (key, window) result must be stored exactly once, with exactly the right count."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from flow_helpers import S, stored, wait_until

from eventstream.client import TcpClient

T0 = 1_700_000_000 * S
WINDOW_MS = 100
N_EVENTS = 6000
KEYS = 8
CHUNK = 400
KILLS = 5

BUILDER = f'''
from eventstream.flow import Count, Flow, Json, Tumbling

def build():
    flow = Flow("wcount", ["clicks"], serde=Json())
    (flow.key_by(lambda v: v["k"])
         .window(Tumbling({WINDOW_MS / 1000}), Count())
         .map(lambda r: {{"k": r.key, "start": r.start, "n": r.value}})
         .to("counts"))
    return flow
'''


class Server:
    """`eventstream serve` in a child process on ephemeral ports, running the flow from YAML."""

    def __init__(self, tmp: Path, n: int):
        self.ready = tmp / f"ready-{n}"
        self.log_path = tmp / f"serve-{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTREAM_")}
        env.update(PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1", PYTHONPATH=str(tmp))
        args = [sys.executable, "-X", "gil=0", "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0",
                "--metrics-port", "0", "--data-dir", str(tmp / "data"), "--ready-file", str(self.ready)]
        for s in ("storage.fsync=none", "logging.format=json", "records.payload_bytes=64", "server.subscribe.port=0",
                  'flows.builders=["wcount_flow:build"]', "flows.parallelism=2", "flows.snapshot_interval_s=0.5"):
            args += ["--set", s]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, 60, "the server to be ready")
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
        self.port = int(self.ready.read_text().split()[0])

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no flush, no snapshot, no goodbye
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(60)
        self.log.close()
        return rc


def send(port: int, events) -> None:
    with TcpClient("127.0.0.1", port, version=2, timeout=30) as c:
        for eid, k, ts in events:
            c.send("clicks", json.dumps({"k": k}).encode(), priority=2, event_id=eid, timestamp_ns=ts)
        assert c.wait_acked(60), "not every event was ACKed (stored)"


def test_windowed_count_is_exactly_once_across_repeated_kill_9(tmp_path):
    (tmp_path / "wcount_flow.py").write_text(BUILDER)
    rng = np.random.default_rng(21)
    keys = rng.integers(0, KEYS, N_EVENTS).tolist()
    events = [(i + 1, k, T0 + i * 1_000_000) for i, k in enumerate(keys)]  # 1 ms apart, in order
    # one event per key far after the input: every partition's watermark passes every input window
    flush = [(N_EVENTS + 1 + k, k, T0 + (N_EVENTS + 10 * WINDOW_MS) * 1_000_000) for k in range(KEYS)]
    expected = Counter((k, (ts - T0) // (WINDOW_MS * 1_000_000)) for _, k, ts in events)

    chunks = [events[i:i + CHUNK] for i in range(0, len(events), CHUNK)] + [flush]
    kill_after = set(random.Random(5).sample(range(1, len(chunks)), KILLS))
    pause = random.Random(6)
    server = Server(tmp_path, 0)
    restarts = 0
    try:
        for i, chunk in enumerate(chunks):
            send(server.port, chunk)
            if i in kill_after:
                time.sleep(pause.uniform(0.05, 0.4))  # after outputs are stored, often before the next snapshot
                server.kill()
                restarts += 1
                server = Server(tmp_path, restarts)
                send(server.port, chunk)  # a resend after a crash: stored once (same ids)
                if pause.random() < 0.5:  # and sometimes killed again while it replays from its snapshot
                    time.sleep(pause.uniform(0.0, 0.1))
                    server.kill()
                    restarts += 1
                    server = Server(tmp_path, restarts)
        data = tmp_path / "data"
        wait_until(lambda: len(stored(data, "counts")) >= len(expected), 120, "every window's result")
    finally:
        rc = server.stop()
    assert rc == 0, server.log_path.read_text(errors="replace")[-3000:]
    assert restarts >= KILLS
    out = stored(data, "counts")
    inputs = stored(data, "clicks")
    assert len(inputs) == N_EVENTS + KEYS  # the input itself: each event once
    results = [json.loads(p) for _, p in out]
    seen = Counter((r["k"], (r["start"] - T0) // (WINDOW_MS * 1_000_000)) for r in results)
    dupes = {kw: n for kw, n in seen.items() if n > 1}
    assert not dupes, f"windows stored more than once: {list(dupes.items())[:5]}"
    assert set(seen) == set(expected)
    wrong = {(r["k"], (r["start"] - T0) // (WINDOW_MS * 1_000_000)): r["n"] for r in results
             if r["n"] != expected[(r["k"], (r["start"] - T0) // (WINDOW_MS * 1_000_000))]}
    assert not wrong, f"wrong counts: {list(wrong.items())[:5]}"
    ids = [eid for eid, _ in out]
    assert len(set(ids)) == len(ids)

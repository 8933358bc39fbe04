"""bench/flows.py: a tiny run prints one JSON object with the keys issue 21 names (the bench checks
every flow's results against numpy itself, so a run that completes computed them exactly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("batch_aggregate_events_per_s", "python_window_events_per_s", "python_map_reduce_events_per_s",
        "scaling_2v1_gil_off", "scaling_2v1_gil_on")


def test_bench_flows_json_has_the_named_keys():
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
    cmd = [sys.executable, "-X", "gil=0", "-m", "eventstream", "bench", "flows", "--json", "--events", "20000",
           "--keys", "500", "--batch", "2048"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for k in KEYS:
        assert isinstance(r[k], (int, float)) and r[k] > 0, k
    assert r["events"] == 20000 and r["keys"] == 500
    assert set(r["goals"]) == {"batch_aggregate >= 1M/s", "python_window >= 200k/s", "python_map_reduce >= 500k/s",
                               "scaling_2v1_gil_off >= 1.7"}

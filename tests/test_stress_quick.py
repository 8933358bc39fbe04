"""The stress suite's quick variant inside `make test`: every stress test once, with little work each.

It runs in its own pytest process (the stress suite has its own conftest and starts `eventstream
serve` children), with STRESS_SCALE=quick so each test moves a few thousand events; `make stress`
runs the same tests at full scale, repeated, in several processes at once. The results file gives the
moved/lost totals, so a loss shows up here as a clear count, not only as a failing assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stress_suite_quick_variant_passes_and_loses_nothing(tmp_path):
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1", STRESS_SCALE="quick",
               STRESS_RESULTS=str(results))
    cmd = [sys.executable, "-X", "gil=0", "-m", "pytest", str(ROOT / "stress"), "-q", "-x", "-p", "no:cacheprovider",
           "-o", "addopts=", f"--basetemp={tmp_path / 'stress-tmp'}", "--timeout=240"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"stress suite (quick) failed with exit {proc.returncode}:\n{tail}"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) >= 10, f"only {len(rows)} stress tests reported their counts:\n{tail}"
    assert sum(r["lost"] for r in rows) == 0, [r for r in rows if r["lost"]]
    assert sum(r["moved"] for r in rows) > 0

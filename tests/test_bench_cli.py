"""`eventstream bench`: finds the scripts in bench/, passes arguments through, and the scaling
benchmark's --json rows carry the documented fields (a tiny run on simulated nodes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eventstream.cli import bench as bench_cli
from eventstream.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_bench_command_is_registered_and_finds_the_scripts():
    args = build_parser().parse_args(["bench", "scaling", "--quick", "--json"])
    assert args.name == "scaling" and args.args == ["--quick", "--json"]
    where = bench_cli.bench_dir()
    assert where == ROOT / "bench"
    for name in bench_cli.BENCHMARKS:
        assert (where / f"{name}.py").exists(), name


def test_scaling_json_rows_on_simulated_nodes(tmp_path):
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
    cmd = [sys.executable, "-X", "gil=0", "-m", "eventstream", "bench", "scaling", "--json", "--quick",
           "--simulate-nodes", "2", "--max-threads", "1", "--events", "4000", "--repeats", "1", "--warmup", "0",
           "--no-gil-run"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["node"], r["mode"]) for r in rows} == {(0, "gil-off"), (1, "gil-off"),
                                                       (0, "queue-baseline"), (1, "queue-baseline")}
    for r in rows:
        assert r["simulated"] is True and r["threads"] == 1 and r["events_per_s"] > 0
    assert "SIMULATED" in out.stderr

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


def test_peers_variants_of_one_server_send_distinct_event_ids():
    """bench/peers.py's single and BATCH variants share one eventstream server: their event ids must
    not repeat, or the server's dedup skips the second variant's events (ACKed, never stored)."""
    import importlib.util

    import numpy as np

    from eventstream.core.topics import TopicTable
    from eventstream.protocol.decoder import FrameDecoder

    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)

    class OneServer:  # what System reads of a server: where the ids it handed out end
        sent = 0

    server = OneServer()
    dec = FrameDecoder(TopicTable())
    ids = []
    for frame in ("single", "batch", "single", "batch"):
        data = peers.System(frame, server, frame, 7).encode(np.full(20, 16))
        records, errors = dec.feed(data)
        assert not errors and len(records) == 20
        ids += records["event_id"].tolist()
    assert len(set(ids)) == len(ids) == 80

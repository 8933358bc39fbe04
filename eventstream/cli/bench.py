"""`eventstream bench NAME [ARGS...]`: run one of the benchmark scripts in bench/ of the source tree.

The benchmarks live next to the package (bench/*.py, sharing bench/harness.py), not inside it: they are
scripts with their own command lines (--quick, --json, --repeats ...), so this command only finds the
script and runs it with the same interpreter, passing every further argument through. The exit code
is the script's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from eventstream.cli.main import EXIT_USAGE

BENCHMARKS = {
    "scaling": "processor thread scaling per NUMA node: GIL off vs GIL on vs a queue.Queue baseline",
    "pipeline": "TCP -> processed -> stored throughput per ACK mode, realtime latency at 25..100% load, ACK round trip",
    "latency": "idle case: 1 CRITICAL event per ms, realtime latency and ACK round trip per ACK mode",
    "rings": "SPSC/MPSC ring throughput vs queue.Queue and deque",
    "ingest": "frame codec and TCP ingest throughput",
    "flows": "dataflows: keyed window count (numpy, per-event Python), map + reduce; 1 vs 2 threads, GIL off and on",
    "peers": (
        "eventstream vs Redis Streams and NATS JetStream: same client shape, same CPU pinning, single and batch frames"
    ),
}


def bench_dir() -> Path | None:
    """bench/ of the source tree this package was imported from (editable installs, checkouts)."""
    here = Path(__file__).resolve().parent.parent.parent / "bench"
    return here if (here / "harness.py").exists() else None


def register(sub) -> None:
    lines = "\n".join(f"  {k:<9} {v}" for k, v in BENCHMARKS.items())
    p = sub.add_parser(
        "bench",
        help="run a benchmark (scaling, pipeline, latency, rings, ingest)",
        description=f"Run a benchmark script from bench/ with this interpreter.\n\n{lines}\n\n"
        "Further arguments go to the script, e.g. `eventstream bench scaling --quick "
        "--json`; `eventstream bench scaling --help` shows its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=run)


def run(args) -> int:
    where = bench_dir()
    if where is None:
        print(
            "eventstream: error: bench/ not found next to the eventstream package; allowed: run from a source "
            "checkout (pip install -e .), where bench/harness.py exists",
            file=sys.stderr,
        )
        return EXIT_USAGE
    script = where / f"{args.name}.py"
    if not script.exists():
        print(f"eventstream: error: {script} does not exist; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return EXIT_USAGE
    env = dict(os.environ)
    cmd = [sys.executable, str(script), *args.args]
    try:
        return subprocess.run(cmd, env=env, cwd=where.parent).returncode
    except KeyboardInterrupt:
        return 130

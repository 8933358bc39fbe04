"""`make stress` / `make soak`: the stress suite, repeated, in several pytest processes at once.

    python stress/run.py [--count N] [--procs P] [--scale quick|full|heavy] [-k EXPR]
    python stress/run.py --soak 30m [--procs P]

Why several processes: "concurrent pytest runs" must really be concurrent, so P pytest processes run
side by side, each with its own temporary directory (--basetemp) and every server on port 0, each
repeating the suite N times (pytest-repeat --count). They compete for the same 2 cores, which is the
point: timing-dependent bugs show up under contention.

Soak: rounds of P processes (count 1 each) until DURATION (e.g. 90s, 30m, 2h) has passed; a round
that starts always finishes.

Every test appends {"moved", "lost", ...} to a shared results file (STRESS_RESULTS); at the end the
runner prints: rounds, pytest runs, test runs, failures, events moved, events lost (must be 0).
Exit status 1 when any test failed, any process failed, or any event was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_COUNT = 3  # ~10 minutes at full scale on 2 cores (a round is ~3 minutes)
DEFAULT_PROCS = 3


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r} is not allowed; allowed: a number with s, m or h "
                                         "(e.g. 90s, 30m, 2h)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def pytest_command(args, junit: Path, basetemp: Path, count: int) -> list[str]:
    cmd = [sys.executable, "-X", "gil=0", "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
           f"--count={count}", f"--basetemp={basetemp}", f"--junitxml={junit}", f"--timeout={args.timeout}",
           "-o", "addopts=", "-rfE"]
    if args.k:
        cmd += ["-k", args.k]
    if args.exitfirst:
        cmd.append("-x")
    return cmd


def junit_counts(path: Path) -> tuple[int, int]:
    """(test runs, failures + errors) from a junit xml; (0, 1) if it is missing (pytest crashed)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return 0, 1
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    return tests, bad


def run_round(args, work: Path, results: Path, round_no: int, count: int) -> list[dict]:
    """P pytest processes at once; returns one dict per process."""
    env = dict(os.environ, PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1", STRESS_RESULTS=str(results),
               STRESS_SCALE=args.scale)
    procs = []
    for p in range(args.procs):
        tag = f"r{round_no}-p{p}"
        log = open(work / f"{tag}.log", "wb")  # noqa: SIM115 - closed below
        junit = work / f"{tag}.xml"
        cmd = pytest_command(args, junit, work / f"tmp-{tag}", count)
        procs.append((tag, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, junit))
    out = []
    for tag, proc, log, junit in procs:
        try:
            rc = proc.wait(args.timeout * count * 20 + 600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        tests, bad = junit_counts(junit)
        out.append({"tag": tag, "rc": rc, "tests": tests, "failures": bad, "log": str(work / f"{tag}.log")})
        state = "ok" if rc == 0 and bad == 0 else f"FAILED (exit {rc}, {bad} failing)"
        print(f"  [{tag}] {tests} test runs: {state}", flush=True)
    return out


def summarize(results: Path) -> dict:
    moved = lost = 0
    extra: dict[str, int] = {}
    lines = results.read_text().splitlines() if results.exists() else []
    for line in lines:
        r = json.loads(line)
        moved += r.get("moved", 0)
        lost += r.get("lost", 0)
        for k in ("acked_in_flight_lost", "valid_refused_by_backpressure", "dropped", "refused"):
            if isinstance(r.get(k), int):
                extra[k] = extra.get(k, 0) + r[k]
    return {"reported": len(lines), "moved": moved, "lost": lost, **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stress/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"pytest-repeat count per process "
                   f"(default {DEFAULT_COUNT})")
    p.add_argument("--procs", type=int, default=DEFAULT_PROCS, help=f"pytest processes side by side "
                   f"(default {DEFAULT_PROCS})")
    p.add_argument("--soak", type=parse_duration, metavar="DURATION",
                   help="repeat rounds until DURATION has passed (e.g. 30m); overrides --count")
    p.add_argument("--scale", choices=("quick", "full", "heavy"), default="full", help="work per test")
    p.add_argument("-k", help="only tests matching this pytest -k expression")
    p.add_argument("-x", "--exitfirst", action="store_true", help="stop each process at its first failure")
    p.add_argument("--timeout", type=int, default=600, help="per-test timeout in seconds (pytest-timeout)")
    p.add_argument("--keep", action="store_true", help="keep logs and data dirs even when everything passed")
    args = p.parse_args(argv)
    if args.count < 1 or args.procs < 1:
        p.error("--count and --procs must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="eventstream-stress-"))
    results = work / "results.jsonl"
    mode = f"soak {args.soak:.0f}s" if args.soak else f"--count {args.count}"
    print(f"stress: {args.procs} pytest processes side by side, {mode}, scale {args.scale}; logs in {work}",
          flush=True)
    t0 = time.monotonic()
    runs: list[dict] = []
    rounds = 0
    while True:
        rounds += 1
        runs += run_round(args, work, results, rounds, 1 if args.soak else args.count)
        if not args.soak or time.monotonic() - t0 >= args.soak:
            break
        if args.exitfirst and any(r["rc"] or r["failures"] for r in runs):
            break
    s = summarize(results)
    failed_procs = [r for r in runs if r["rc"] != 0 or r["failures"]]
    tests = sum(r["tests"] for r in runs)
    failures = sum(r["failures"] for r in runs)
    ok = not failed_procs and s["lost"] == 0
    print("")
    print("stress summary")
    print(f"  wall time        {time.monotonic() - t0:,.0f} s")
    print(f"  rounds           {rounds}")
    print(f"  pytest runs      {len(runs)} ({args.procs} at a time)")
    print(f"  test runs        {tests}")
    print(f"  failures         {failures}")
    print(f"  events moved     {s['moved']:,}")
    print(f"  events lost      {s['lost']:,}  (must be 0)")
    for k, text in (("dropped", "dropped by policy (in the DLQ)"),
                    ("valid_refused_by_backpressure", "valid frames refused under backpressure (NACKed, in the DLQ)"),
                    ("acked_in_flight_lost", "ACKed but unwritten at kill -9 (not durable by design)"),
                    ("refused", "connections refused past max_connections")):
        if k in s:
            print(f"  {text:<62} {s[k]:,}")
    for r in failed_procs:
        print(f"  FAILED: {r['tag']} exit {r['rc']}, {r['failures']} failing test runs; log {r['log']}")
    print(f"  result           {'PASS' if ok else 'FAIL'}")
    if ok and not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The idle case: one CRITICAL event per ms; realtime latency and ACK round trip per ACK mode, exact.

A real Service runs in this process pinned to the engine CPUs (2 cores: CPU 0); the client
(bench/loadgen.py, pingpong mode) runs in a separate process pinned to another CPU (CPU 1). For each
ACK mode (accepted, stored, synced: the v2 frame's flags) a new connection sends one CRITICAL event
(64-byte payload) every --interval-ms, waits for the ACK that covers it, and sends the next at the
next tick. Per event:

* ACK round trip: the client's time.monotonic_ns() just before the send -> the return of the recv
  that delivered the ACK;
* send -> handled: that same stamp (carried in the payload) -> monotonic_ns() when the bench's realtime
  handler is called (one machine, one CLOCK_MONOTONIC: the engine cannot fake it);
* ingest -> handled: the record's ingest_ts (taken by the engine when it decoded the frame) -> the
  handler call (what the engine's own latency metric measures).

Quantiles are exact over every event (the first 50 of each mode are warm-up and not counted).

    python bench/latency.py [--quick] [--json] [--seconds S] [--interval-ms MS] [--modes accepted,stored,synced]

Outputs: a table (stdout) and bench/results/latency.json. Targets (issue #14): ingest -> handled
p50 <= 60 us, p99 <= 150 us; ACK round trip in mode stored p50 <= 150 us, p99 <= 500 us.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eventstream.runtime import gil  # noqa: E402

gil.reexec_without_gil()

from harness import Bench, format_facts, format_table  # noqa: E402

import e2e  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    parser = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds per ACK mode (default 10, quick 3)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="one event every this many ms (default 1)")
    parser.add_argument("--modes", default=",".join(e2e.ACK_MODES), help="ACK modes, comma separated")
    bench = Bench("latency", argv, parser=parser)
    gil.require_gil_off(what="bench/latency.py")
    args = bench.args
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in e2e.ACK_MODES]
    if bad:
        parser.error(f"--modes {bad} not allowed; allowed: {', '.join(e2e.ACK_MODES)}")
    placement = e2e.Placement()
    placement.pin_engine_process()
    seconds = args.seconds or (3.0 if bench.quick else 10.0)
    facts = {**bench.facts, **placement.facts()}
    t0 = time.monotonic()
    base = e2e.pingpong_baseline(placement, seconds, args.interval_ms)
    res = e2e.pingpong_engine(placement, seconds, modes, args.interval_ms)
    rows = [{"ack_mode": "baseline: ACK echo, no engine", **{k: v for k, v in base.items() if k != "errors"},
             "load_avg_1m": round(os.getloadavg()[0], 2)}]
    rows += [{"ack_mode": m, **v, "load_avg_1m": res["load_avg_1m"]} for m, v in res["modes"].items()]
    out = {"facts": facts, "seconds_per_mode": seconds,
           **{k: v for k, v in res.items() if k.startswith("engine_cpu")}, "interval_ms": args.interval_ms, "rows": rows,
           "dropped": res["dropped"], "errors": res["errors"] + base["errors"], "wall_s": round(time.monotonic() - t0, 1),
           "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out))
        return
    print(format_facts(facts))
    print(format_table(rows, ["ack_mode", "ack_rtt_n", "ack_rtt_p50_us", "ack_rtt_p99_us", "ack_rtt_p999_us",
                              "e2e_p50_us", "e2e_p99_us", "e2e_p999_us", "ingest_p50_us", "ingest_p99_us",
                              "ingest_p999_us", "ingest_max_us", "late_ticks"]))
    print(f"# {seconds} s per mode, one CRITICAL event per {args.interval_ms} ms, waiting for each ACK; "
          f"dropped {res['dropped']}; errors {res['errors'] + base['errors'] or 'none'}; load average at end {out['load_avg_end']}")
    print(f"# engine CPU busy {res['engine_cpu_busy_pct']} % during the run, of which other processes "
          f"{res['engine_cpu_used_by_others_pct']} %")
    print("# targets: ingest->handled p50 <= 60 us, p99 <= 150 us; ACK round trip (stored) p50 <= 150 us, "
          "p99 <= 500 us")
    print("# baseline: the same client against a Python server that ACKs each frame as soon as it is read "
          "(on the engine CPU): the socket wake-ups and sends alone")
    print("# late_ticks: sends that started after their 1 ms tick because the previous ACK came late")


if __name__ == "__main__":
    main()

"""Shared benchmark harness: warm-up, repeated runs, median + spread, machine facts, table / JSON.

Every benchmark in bench/ uses it the same way::

    from harness import Bench            # when run as `python bench/x.py`
    bench = Bench("rings", argv)         # parses --json --quick --repeats --warmup --save
    stats = bench.measure(run_once)      # run_once() -> events (timed here) or (events, seconds)
    bench.add_row({"structure": "spsc", ...}, stats)
    bench.finish(columns=[...])          # prints the facts header + table, or one JSON list

Why the median of several runs: the machines we run on are small and shared, so a single run mostly
measures the neighbours; the median with the min..max spread shows both the typical value and how
noisy it was. Warm-up runs are discarded (page faults on fresh memory, numpy dispatch caches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numa_nodes() -> int:
    try:
        from eventstream.core import numa

        if numa.available():
            return numa.max_node() + 1
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    base = Path("/sys/devices/system/node")
    return max(1, len(list(base.glob("node[0-9]*")))) if base.exists() else 1


def gil_enabled() -> bool:
    check = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def machine_facts() -> dict:
    """What a reader needs to judge the numbers: CPU, cores, NUMA, interpreter, GIL, load."""
    try:
        import numpy

        np_version = numpy.__version__
    except ImportError:  # pragma: no cover
        np_version = "-"
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "numa_nodes": numa_nodes(),
        "python": platform.python_version(),
        "python_build": "free-threaded" if sysconfig.get_config_var("Py_GIL_DISABLED") else "default (GIL)",
        "gil_enabled": gil_enabled(),
        "numpy": np_version,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


@dataclass
class Stats:
    """Per-run rates of one measurement; all rates in events per second."""

    events: int
    rates: list[float]
    extras: dict[str, list[float]] | None = None  # other per-run numbers (median reported)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def low(self) -> float:
        return min(self.rates)

    @property
    def high(self) -> float:
        return max(self.rates)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        return 100.0 * (self.high - self.low) / self.median if self.median else 0.0

    def row(self) -> dict:
        med = self.median
        return {
            "events_per_s": med,
            "ns_per_event": 1e9 / med if med else float("inf"),
            "events_per_s_min": self.low,
            "events_per_s_max": self.high,
            "spread_pct": self.spread_pct,
            "runs": len(self.rates),
            "events": self.events,
            **{k: statistics.median(v) for k, v in (self.extras or {}).items() if v},
        }


def measure(run_once: Callable[[], int | tuple], *, warmup: int = 1, repeats: int = 5) -> Stats:
    """Call `run_once` warmup + repeats times.

    It returns events, or (events, seconds it measured), or (events, seconds, {name: number}) for
    extra per-run numbers (e.g. CPU ns per event) whose medians join the row.
    """
    rates: list[float] = []
    extras: dict[str, list[float]] = {}
    events = 0
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out = run_once()
        elapsed = time.perf_counter() - t0
        more: dict = {}
        if isinstance(out, tuple):
            events, elapsed, *rest = out
            more = rest[0] if rest else {}
        else:
            events = out
        if i >= warmup:
            rates.append(events / elapsed if elapsed > 0 else float("inf"))
            for k, v in more.items():
                extras.setdefault(k, []).append(float(v))
    return Stats(events, rates, extras)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        if v >= 1e6:
            return f"{v / 1e6:,.2f} M"
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def format_facts(facts: dict) -> str:
    return "\n".join(f"# {k}: {v}" for k, v in facts.items())


class Bench:
    """Command line, measurements and output of one benchmark script."""

    def __init__(self, name: str, argv: Sequence[str] | None = None, *, description: str = "",
                 parser: argparse.ArgumentParser | None = None):
        self.name = name
        p = parser or argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
        p.add_argument("--json", action="store_true", help="print one JSON list of rows instead of a table")
        p.add_argument("--quick", action="store_true", help="short run: fewer events and repeats")
        p.add_argument("--repeats", type=int, default=None, help="measured runs per row (median reported)")
        p.add_argument("--warmup", type=int, default=1, help="discarded runs before measuring")
        p.add_argument("--save", action="store_true", help="also write bench/results/<name>.json")
        self.args = p.parse_args(argv)
        if self.args.repeats is None:
            self.args.repeats = 3 if self.args.quick else 5
        self.rows: list[dict] = []
        self.facts = machine_facts()

    @property
    def quick(self) -> bool:
        return self.args.quick

    def measure(self, run_once: Callable[[], int | tuple[int, float]]) -> Stats:
        return measure(run_once, warmup=self.args.warmup, repeats=self.args.repeats)

    def add_row(self, fields: dict, stats: Stats | None = None) -> dict:
        row = dict(fields)
        if stats is not None:
            row.update(stats.row())
        self.rows.append(row)
        if not self.args.json:
            print(f"  ... {', '.join(f'{k}={_fmt(v)}' for k, v in fields.items())}: "
                  f"{_fmt(row.get('ns_per_event', 0.0))} ns/event", file=sys.stderr, flush=True)
        return row

    def finish(self, columns: Sequence[str], notes: Sequence[str] = ()) -> None:
        if self.args.save:
            out = Path(__file__).resolve().parent / "results"
            out.mkdir(exist_ok=True)
            (out / f"{self.name}.json").write_text(json.dumps({"facts": self.facts, "rows": self.rows}, indent=1))
        if self.args.json:
            print(json.dumps(self.rows))
            return
        print(format_facts(self.facts))
        print(format_table(self.rows, columns))
        for n in notes:
            print(f"# {n}")

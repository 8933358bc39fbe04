"""`eventstream flows`: the dataflows of a data directory, with their lag, watermark and state size.

    eventstream flows [--data-dir D] [-c FILE] [--json]

Reads what each running (or stopped) flow publishes in `<flows.state_dir>/<flow>.status.json` (written
with every snapshot) and the end of the event log, and prints one row per flow: its input offset, lag
(events in the log it has not processed), watermark (event time, UTC), state keys, snapshot size, and
per-operator counters with --json. Exit codes: 0 ok, 1 no flows found, 2 usage.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from eventstream.cli.config import load_or_report
from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "flows",
        help="list the dataflows with their lag, watermark and state size",
        description="List the dataflows of a data directory (docs/flows.md).",
    )
    add_config_args(p)
    p.add_argument("--data-dir", help="data directory (default: storage.data_dir of the configuration)")
    p.add_argument("--json", action="store_true", help="one JSON object per flow, with per-operator counters")
    p.set_defaults(func=run)


def log_end(data: Path, cfg, state_dir: Path) -> int | None:
    """The offset the next event stored will have (None: no log)."""
    from eventstream.core.records import record_dtype
    from eventstream.storage.tail import LogTail, SegmentIndex, payload_capacity_of

    path = data / cfg.storage.events_file
    if not path.exists():
        return None
    dtype = record_dtype(payload_capacity_of(path))
    tail = LogTail(path, dtype, SegmentIndex(path, state_dir / "segments.json", dtype))
    try:
        return tail.seek_end()
    finally:
        tail.close()


def _when(ns) -> str:
    if ns is None:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def run(args) -> int:
    if args.data_dir is not None:
        args.overrides.append(f"storage.data_dir={args.data_dir}")
    cfg = load_or_report(args)
    if cfg is None:
        return EXIT_USAGE
    data = Path(cfg.storage.data_dir)
    state_dir = Path(cfg.flows.state_dir) if cfg.flows.state_dir else data / "flows"
    files = sorted(state_dir.glob("*.status.json")) if state_dir.is_dir() else []
    if not files:
        print(
            f"eventstream flows: no flows in {state_dir} (a flow writes its status there with its first "
            "snapshot; allowed: --data-dir of an engine that runs flows)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    end = log_end(data, cfg, state_dir)
    rows = []
    for f in files:
        try:
            st = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"eventstream flows: {f}: unreadable ({exc})", file=sys.stderr)
            continue
        st["log_end"] = end
        st["lag"] = None if end is None else max(0, end - int(st.get("offset", 0)))
        rows.append(st)
    if args.json:
        for st in rows:
            print(json.dumps(st))
        return 0
    head = (
        f"{'flow':<20} {'par':>3} {'offset':>10} {'lag':>10} {'watermark (UTC)':<23} {'state keys':>10} "
        f"{'snapshot':>10} {'outputs':>10}  error"
    )
    print(head)
    for st in rows:
        lag = "-" if st["lag"] is None else str(st["lag"])
        print(
            f"{st['flow']:<20} {st.get('parallelism', 1):>3} {st.get('offset', 0):>10} {lag:>10} "
            f"{_when(st.get('watermark_ns')):<23} {st.get('state_keys', 0):>10} {st.get('snapshot_bytes', 0):>10} "
            f"{st.get('outputs', 0):>10}  {st.get('error') or ''}"
        )
    return 0

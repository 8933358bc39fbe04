"""`eventstream dump`: print (or count) the records stored in events.bin, with filters."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import re
import sys
from pathlib import Path

from eventstream.cli.config import load_or_report
from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_config_args
from eventstream.core import records as rec
from eventstream.storage import EventLogReader, LogFormatError


def register(sub) -> None:
    p = sub.add_parser("dump", help="print stored events from events.bin (filters: topic, priority, time)")
    p.add_argument("path", nargs="?", help="log file (default: <storage.data_dir>/<storage.events_file>)")
    add_config_args(p)
    p.add_argument("--data-dir", help="data directory holding events.bin (shortcut for --set storage.data_dir=DIR)")
    p.add_argument("--topic", help="topic glob, e.g. 'orders.*'")
    p.add_argument("--priority", help="comma list of priorities: names (CRITICAL,HIGH) or numbers 0-4")
    p.add_argument("--since", help="only records at or after this time: ISO-8601 (naive = UTC) or epoch seconds")
    p.add_argument("--until", help="only records before this time: ISO-8601 (naive = UTC) or epoch seconds")
    p.add_argument(
        "--time-field",
        choices=("stored", "producer"),
        default="stored",
        help="time the range applies to: when stored (default) or the producer timestamp",
    )
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl", help="output format (default jsonl)")
    p.add_argument("--count", action="store_true", help="print only the number of matching records")
    p.add_argument("--limit", type=int, default=0, help="print at most N records (0 = all)")
    p.set_defaults(func=run)


def parse_time(text: str, flag: str) -> int:
    """ns since the epoch from epoch seconds or ISO-8601 text; ValueError naming the flag otherwise."""
    try:
        return int(decimal.Decimal(text.strip()) * 1_000_000_000)  # exact to the ns, unlike float
    except (decimal.InvalidOperation, ValueError, OverflowError):
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{flag} {text!r} is not allowed; allowed: ISO-8601 such as 2026-01-31T12:00:00Z "
            "or epoch seconds such as 1769860800"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1_000_000) * 1000


def iso_ns(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def resolve_path(args) -> Path | None:
    if args.path:
        return Path(args.path)
    if args.data_dir is not None:
        args.overrides.append(f"storage.data_dir={args.data_dir}")
    cfg = load_or_report(args)
    if cfg is None:
        return None
    return Path(cfg.storage.data_dir) / cfg.storage.events_file


def record_dict(r, topic: str, stored_ns: int, payload: bytes | None = None) -> dict:
    """One stored record as a dict; `payload`: its whole payload (StoredBatch.payload), else the
    record's inline bytes."""
    if payload is None:
        payload = r["payload"][: int(r["payload_len"])].tobytes() if "payload" in r.dtype.names else b""
    out = {
        "stored_at": iso_ns(stored_ns),
        "seq": int(r["seq"]),
        "event_id": int(r["event_id"]),
        "topic": topic,
        "priority": int(r["priority"]),
        "priority_name": rec.PRIORITY_NAMES[int(r["priority"])] if int(r["priority"]) < 5 else "?",
        "producer_ts": int(r["producer_ts"]),
        "conn_id": int(r["conn_id"]),
        "flags": int(r["flags"]),
        "attempts": int(r["attempts"]),
    }
    return put_payload(out, payload)


def put_payload(out: dict, payload: bytes) -> dict:
    """`payload` as text when it is UTF-8, else `payload_b64` (the jsonl form of dump and tail)."""
    try:
        out["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(payload).decode("ascii")
    return out


# what a terminal could act on: C0/C1 controls (ESC starts cursor moves, colours, title changes), DEL,
# line/paragraph separators and the bidirectional overrides that reorder what is shown
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape_text(text: str) -> str:
    """`text` for one terminal line: controls as \\n, \\r, \\t, \\xNN or \\uNNNN, backslash doubled
    (so an event's bytes can neither move the cursor, recolour, nor fake another line)."""

    def one(m: re.Match) -> str:
        c = m.group(0)
        return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _UNSAFE.sub(one, text)


def preview(d: dict) -> str:
    """The payload column of the table form: text on one line with controls escaped, at most 40 characters."""
    text = escape_text(d["payload"]) if "payload" in d else "<binary>"
    return text if len(text) <= 40 else text[:37] + "..."


def run(args) -> int:
    path = resolve_path(args)
    if path is None:
        return EXIT_USAGE
    try:
        since = parse_time(args.since, "--since") if args.since else None
        until = parse_time(args.until, "--until") if args.until else None
        prios = [p for p in args.priority.split(",") if p.strip()] if args.priority else None
        if args.limit < 0:
            raise ValueError(f"--limit {args.limit} is not allowed; allowed: 0 (all) or a positive count")
        if not path.exists():
            print(
                f"eventstream: error: {path}: no such event log (allowed: a path to events.bin, or --data-dir "
                "of a server that has stored events)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        reader = EventLogReader(path)
        batches = reader.batches(
            topic=args.topic, priorities=prios, since_ns=since, until_ns=until, time_field=args.time_field
        )
        if args.count:
            print(sum(len(b) for b in batches))
            code = 0
        else:
            code = _print(batches, args.format, args.limit)
        scan = reader.last_scan
        if scan is not None and scan.problem and not args.limit:
            print(
                f"eventstream: warning: {path}: read stopped at byte {scan.valid_bytes} of {scan.file_bytes}: "
                f"{scan.problem} (a torn tail while a server writes, or damage; the server cuts it on start)",
                file=sys.stderr,
            )
        return code
    except ValueError as exc:  # bad filter values (LogFormatError is one too, but a failure, not usage)
        if isinstance(exc, LogFormatError):
            print(f"eventstream: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


def _print(batches, fmt: str, limit: int) -> int:
    out = sys.stdout
    shown = 0
    if fmt == "table":
        out.write(f"{'stored_at':27} {'seq':>20} {'event_id':>20} {'prio':8} {'topic':24} payload\n")
    for b in batches:
        names = b.topic_names()
        for i in range(len(b)):
            if limit and shown >= limit:
                return 0
            d = record_dict(b.records[i], names[i], int(b.stored_ns[i]), b.payload(i))
            if fmt == "jsonl":
                out.write(json.dumps(d, ensure_ascii=False) + "\n")
            else:
                out.write(
                    f"{d['stored_at']:27} {d['seq']:>20} {d['event_id']:>20} {d['priority_name']:8} "
                    f"{escape_text(d['topic'])[:24]:24} {preview(d)}\n"
                )
            shown += 1
    return 0

"""`eventstream dlq`: list the dead-letter log, or replay its events (with their payloads) to a server.

    eventstream dlq list   [--data-dir D | --file F] [--reason GLOB | --category C] [--topic GLOB] [--json] [--count]
    eventstream dlq replay [--data-dir D | --file F] [--host H] [--port P] [--reason GLOB | --category C]
                           [--topic GLOB] [--dry-run] [--timeout S]

Both read every segment of the DLQ (oldest first) as it is when the command starts (docs/dlq.md).
Replay sends each selected entry that has a payload as a v2 frame with its original event_id (0 stays
0: no id), priority, producer timestamp, topic and payload, waits for the ACKs and prints how many were
sent, acked, nacked and skipped (entries without payload: old text lines and frames that failed to
decode). Exit codes: 0 ok, 1 failure (no DLQ, server unreachable, NACKs or missing ACKs), 2 usage.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

from eventstream.cli.config import load_or_report
from eventstream.cli.main import (
    EXIT_FAILURE,
    EXIT_USAGE,
    add_client_security_args,
    add_config_args,
    add_frame_limit_arg,
    frame_limit_error,
    replay_client,
)
from eventstream.core.records import PRIORITY_NAMES

ACTIONS = ("list", "replay")


def register(sub) -> None:
    p = sub.add_parser(
        "dlq",
        help="list the dead-letter log or replay its events to a server",
        description="List the dead-letter log, or replay its events with their payloads.",
    )
    p.set_defaults(func=_no_action)
    acts = p.add_subparsers(dest="action", metavar="ACTION")

    lp = acts.add_parser("list", help="print DLQ entries (table, or JSON lines with --json)")
    _common(lp)
    lp.add_argument("--json", action="store_true", help="one JSON object per entry, as stored (payload in base64)")
    lp.add_argument("--count", action="store_true", help="print only the number of matching entries")
    lp.set_defaults(func=run_list)

    rp = acts.add_parser("replay", help="re-send DLQ entries with payload to a running server (v2, waits for ACKs)")
    _common(rp)
    rp.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    rp.add_argument("--port", type=int, default=9000, help="server TCP port (default 9000)")
    rp.add_argument("--dry-run", action="store_true", help="only count what would be sent and skipped")
    rp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all ACKs (default 60)")
    add_client_security_args(rp)
    add_frame_limit_arg(rp)
    rp.set_defaults(func=run_replay)


def _common(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--data-dir", help="data directory holding the DLQ (file name: storage.dlq_file)")
    p.add_argument("--file", help="DLQ file (its segments <file>.<n> are read too)")
    p.add_argument("--reason", metavar="GLOB", help="reason glob, e.g. 'handler_error: *ValueError*'")
    p.add_argument(
        "--category",
        metavar="C",
        help="reason category (text before the first colon), or a comma list, e.g. retries_exhausted,overflow",
    )
    p.add_argument("--topic", metavar="GLOB", help="topic glob, e.g. 'orders.*'")


def _usage(action: str, msg: str) -> int:
    print(f"eventstream dlq {action}: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _no_action(args) -> int:
    print(
        f"eventstream dlq: an action is required; allowed: {', '.join(ACTIONS)} (see eventstream dlq --help)",
        file=sys.stderr,
    )
    return EXIT_USAGE


def resolve(args) -> Path | None:
    """The DLQ path from --file, or --data-dir / config; None (reported) on a usage error."""
    if args.file and args.data_dir:
        _usage(
            args.action,
            f"--file {args.file} and --data-dir {args.data_dir} together are not allowed; "
            "allowed: one of them (or neither: the configured storage.data_dir)",
        )
        return None
    if args.file:
        return Path(args.file)
    if args.data_dir is not None:
        args.overrides.append(f"storage.data_dir={args.data_dir}")
    cfg = load_or_report(args)
    if cfg is None:
        return None
    return Path(cfg.storage.data_dir) / cfg.storage.dlq_file


def make_filter(args):
    """A predicate on DLQ entries from --reason/--category/--topic; ValueError naming a bad flag."""
    if args.reason is not None and args.category is not None:
        raise ValueError(
            f"--reason {args.reason!r} and --category {args.category!r} together are not allowed; "
            "allowed: one of them (the category is the reason's text before the first colon)"
        )
    cats = None
    if args.category is not None:
        cats = {c.strip() for c in args.category.split(",") if c.strip()}
        if not cats:
            raise ValueError(
                f"--category {args.category!r} is not allowed; allowed: a category name such as "
                "retries_exhausted, or a comma list of them"
            )
    for flag, value in (("--reason", args.reason), ("--topic", args.topic)):
        if value is not None and not value:
            raise ValueError(f"{flag} '' is not allowed; allowed: a glob such as 'orders.*' ('*' matches all)")
    reason, topic = args.reason, args.topic

    def keep(e) -> bool:
        return (
            (cats is None or e.category in cats)
            and (reason is None or fnmatch.fnmatchcase(e.reason, reason))
            and (topic is None or fnmatch.fnmatchcase(e.topic, topic))
        )

    return keep


def printable(text: str) -> str:
    """Text safe for a terminal: every non-printable character (controls, ESC, bidi...) as an escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _prio(p: int) -> str:
    return PRIORITY_NAMES[p] if 0 <= p < len(PRIORITY_NAMES) else str(p)


def _open(args):
    """(entries iterator, bad-line list) or an exit code."""
    from eventstream.engine.dlq_reader import read_dlq

    path = resolve(args)
    if path is None:
        return EXIT_USAGE
    try:
        keep = make_filter(args)
    except ValueError as exc:
        return _usage(args.action, str(exc))
    bad: list[str] = []
    try:
        entries = read_dlq(path, on_bad_line=lambda f, n, problem: bad.append(f"{f}:{n}: {problem}"))
    except FileNotFoundError:
        print(
            f"eventstream dlq {args.action}: {path}: no such DLQ file (allowed: --file of a DLQ file such as "
            "data/dlq_log.txt, or --data-dir of a server that has run)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except OSError as exc:
        print(f"eventstream dlq {args.action}: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return entries, keep, bad


def _report(args, matched: int, categories: Counter, bad: list[str]) -> None:
    for b in bad[:20]:
        print(f"eventstream dlq {args.action}: warning: skipped a damaged line: {b}", file=sys.stderr)
    if len(bad) > 20:
        print(
            f"eventstream dlq {args.action}: warning: ... {len(bad) - 20} more damaged lines skipped", file=sys.stderr
        )
    if not matched and (args.category or args.reason or args.topic):
        seen = ", ".join(f"{printable(c)} ({n})" for c, n in categories.most_common(20)) or "none"
        print(
            f"eventstream dlq {args.action}: no entry matched the filters; categories in this DLQ: {seen}",
            file=sys.stderr,
        )


def run_list(args) -> int:
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    entries, keep, bad = opened
    out = sys.stdout
    matched = 0
    categories: Counter = Counter()
    try:
        if not args.count and not args.json:
            out.write(f"{'ts':24} {'category':20} {'id':>20} {'topic':24} {'priority':8} {'bytes':>7} reason\n")
        for e in entries:
            categories[e.category] += 1
            if not keep(e):
                continue
            matched += 1
            if args.count:
                continue
            if args.json:
                out.write(json.dumps(e.to_json()) + "\n")
            else:
                size = "-" if e.payload is None else str(len(e.payload))
                out.write(
                    f"{printable(e.ts):24} {_clip(printable(e.category), 20):20} {e.id:>20} "
                    f"{_clip(printable(e.topic), 24):24} {_prio(e.priority):8} {size:>7} "
                    f"{_clip(printable(e.reason), 60)}\n"
                )
        if args.count:
            out.write(f"{matched}\n")
        out.flush()
    except ValueError as exc:  # not raised with on_bad_line; kept for safety
        print(f"eventstream dlq list: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        return 0
    _report(args, matched, categories, bad)
    return 0


def run_replay(args) -> int:

    if not 1 <= args.port <= 65535:
        return _usage("replay", f"--port {args.port} is not allowed; allowed: 1..65535")
    if not args.timeout > 0:
        return _usage("replay", f"--timeout {args.timeout} is not allowed; allowed: seconds > 0")
    if (problem := frame_limit_error(args)) is not None:
        return _usage("replay", problem)
    opened = _open(args)
    if isinstance(opened, int):
        return opened
    entries, keep, bad = opened
    matched = sent = no_payload = invalid = 0
    categories: Counter = Counter()
    client = None
    try:
        if not args.dry_run:
            client = replay_client(args)
        for e in entries:
            categories[e.category] += 1
            if not keep(e):
                continue
            matched += 1
            if e.payload is None:
                no_payload += 1
                continue
            event_id = e.event_id if e.event_id is not None else e.id
            if client is None:  # dry run: check that it would encode
                from eventstream.protocol.frames import encode_v2

                try:
                    frame = encode_v2(e.topic, e.payload, e.priority, event_id, e.producer_ts or 0)
                    if len(frame) - 4 > args.max_frame_bytes:
                        raise ValueError(
                            f"its frame of {len(frame) - 4} bytes is larger than "
                            f"--max-frame-bytes {args.max_frame_bytes}"
                        )
                except ValueError as exc:
                    invalid += 1
                    print(f"eventstream dlq replay: skipped id={e.id} ({e.ts}): {exc}", file=sys.stderr)
                    continue
                sent += 1
                continue
            try:
                client.send(
                    e.topic,
                    e.payload,
                    priority=e.priority,
                    event_id=event_id,
                    timestamp_ns=e.producer_ts if e.producer_ts is not None else 0,
                )
            except ValueError as exc:  # EncodeError, or a frame larger than --max-frame-bytes
                invalid += 1
                print(f"eventstream dlq replay: skipped id={e.id} ({e.ts}): {exc}", file=sys.stderr)
                continue
            sent += 1
        complete = True
        if client is not None:
            complete = client.wait_acked(args.timeout)
    except OSError as exc:  # ClientError is a ConnectionError
        print(
            f"eventstream dlq replay: cannot replay to {args.host}:{args.port}: {exc} (allowed: --host/--port "
            "of a running eventstream server)",
            file=sys.stderr,
        )
        if client is not None:
            _close(client)
        return EXIT_FAILURE
    _report(args, matched, categories, bad)
    skipped = no_payload + invalid
    detail = f"skipped {skipped} (no payload: {no_payload}, not encodable: {invalid})"
    if client is None:
        print(f"dry run: would send {sent}, {detail}")
        return 0
    acked, nacked = client.acked, client.nacked
    nack_reasons = Counter(r.split(":", 1)[0].strip() or "unknown" for _, r in client.nacks)
    _close(client)
    print(f"sent {sent}, acked {acked}, nacked {nacked}, {detail}")
    if nacked:
        why = ", ".join(f"{printable(r)} ({n})" for r, n in nack_reasons.most_common())
        print(f"eventstream dlq replay: {nacked} events were NACKed by {args.host}:{args.port}: {why}", file=sys.stderr)
    if not complete:
        print(
            f"eventstream dlq replay: {sent - acked - nacked} events were not acknowledged within "
            f"{args.timeout}s (allowed: a longer --timeout)",
            file=sys.stderr,
        )
    return 0 if complete and not nacked else EXIT_FAILURE


def _close(client) -> None:
    try:
        client.close()
    except OSError:
        pass

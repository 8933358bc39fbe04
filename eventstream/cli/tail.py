"""`eventstream tail`: print stored events from a running server's subscribe port (server.subscribe).

    eventstream tail 'orders.*'                      # what is stored now, then exit
    eventstream tail -f --from latest 'orders.*'     # follow new events
    eventstream tail -f --group audit '*'            # resume where group "audit" stopped; commits as it prints

One JSON line per event (offset, topic, event_id, priority, producer_ts, stored_at, payload or
payload_b64), or a table with --format table.
"""

from __future__ import annotations

import json
import sys

from eventstream.cli.dump import escape_text, preview
from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_client_security_args, client_security
from eventstream.client.subscriber import SubscribeError, Subscription
from eventstream.core import records as rec
from eventstream.protocol import subscribe as sp


def register(sub) -> None:
    p = sub.add_parser("tail", help="print stored (and with -f, live) events from the subscribe port")
    p.add_argument("glob", metavar="TOPIC_GLOB", help="topic glob, e.g. 'orders.*' ('*' for all)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they are stored")
    p.add_argument(
        "--from",
        dest="start",
        default=None,
        help="where to start: earliest (default without -f), latest (default with -f), an offset "
        "(e.g. 1200), or a time (ISO 8601 such as 2026-12-06T10:00:00Z, or <ns>ns)",
    )
    p.add_argument("--group", help="consumer group: resume from its committed offset, commit what was printed")
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9002, help="subscribe port (server.subscribe.port, default 9002)")
    add_client_security_args(p)
    p.add_argument("--credit", type=int, default=1000, help="events the server may send ahead (default 1000)")
    p.add_argument("--limit", type=int, default=0, help="stop after N events (0 = no limit)")
    p.add_argument("--format", choices=("jsonl", "table"), default="jsonl", help="output format (default jsonl)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server to answer")
    p.set_defaults(func=run)


def event_dict(ev: sp.Delivered) -> dict:
    from eventstream.cli.dump import iso_ns, put_payload

    out = {
        "offset": ev.offset,
        "topic": ev.topic,
        "event_id": ev.event_id,
        "priority": ev.priority,
        "priority_name": rec.PRIORITY_NAMES[ev.priority] if ev.priority < 5 else "?",
        "producer_ts": ev.producer_ts,
        "stored_at": iso_ns(ev.stored_ns),
    }
    return put_payload(out, ev.payload)


def run(args) -> int:
    start = args.start or ("latest" if args.follow else "earliest")
    try:
        mode = sp.parse_start(start)
        if args.limit < 0:
            raise ValueError(f"--limit {args.limit} is not allowed; allowed: 0 (no limit) or a positive count")
        if not 1 <= args.credit <= 1 << 30:
            raise ValueError(
                f"--credit {args.credit} is not allowed; allowed: 1..{1 << 30} (and at most the "
                "server's server.subscribe.max_credit)"
            )
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port {args.port} is not allowed; allowed: 0..65535")
        if not args.glob or len(args.glob.encode("utf-8")) > 255:
            raise ValueError(f"TOPIC_GLOB {args.glob!r} is not allowed; allowed: 1..255 bytes, e.g. 'orders.*'")
        if args.group is not None and not (
            0 < len(args.group.encode()) <= sp.MAX_GROUP_BYTES and all(c.isalnum() or c in "._-" for c in args.group)
        ):
            raise ValueError(
                f"--group {args.group!r} is not allowed; allowed: 1..{sp.MAX_GROUP_BYTES} letters, "
                "digits, '.', '_' or '-'"
            )
    except ValueError as exc:
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    shown = 0
    try:
        sub = Subscription(
            args.host,
            args.port,
            args.glob,
            start=mode,
            group=args.group,
            credit=args.credit,
            follow=args.follow,
            timeout=args.timeout,
            **client_security(args),
        )
    except SubscribeError as exc:
        print(f"eventstream: error: {exc} (is server.subscribe.enabled true on the server?)", file=sys.stderr)
        return EXIT_FAILURE
    if args.format == "table":
        out.write(f"{'offset':>12} {'stored_at':27} {'prio':8} {'topic':24} payload\n")
    try:
        with sub:
            while True:
                ev = sub.poll(None)
                if ev is None:  # END: everything stored when we subscribed was printed (without -f)
                    break
                d = event_dict(ev)
                if args.format == "jsonl":
                    out.write(json.dumps(d, ensure_ascii=False) + "\n")
                else:
                    out.write(
                        f"{d['offset']:>12} {d['stored_at']:27} {d['priority_name']:8} "
                        f"{escape_text(d['topic'])[:24]:24} "
                        f"{preview(d)}\n"
                    )
                shown += 1
                if args.limit and shown >= args.limit:
                    out.flush()
                    if args.group:
                        sub.commit()
                    break
                if not sub.buffered():
                    out.flush()
                    if args.group:
                        sub.commit()  # printed and flushed: the group moves past it
    except SubscribeError as exc:
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        return 0
    return 0

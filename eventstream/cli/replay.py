"""`eventstream replay`: re-send stored events from events.bin to a running server.

Events go out as v2 frames with their original event id (or their server sequence number when they
had none, so a replay into the same engine is deduplicated by the transactional tier), priority,
producer timestamp, topic and payload, and the command waits until the server ACKed all of them.
"""

from __future__ import annotations

import sys
import time

from eventstream.cli.dump import parse_time, resolve_path
from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_config_args


def register(sub) -> None:
    p = sub.add_parser("replay", help="re-send stored events from events.bin to a running server")
    p.add_argument("path", nargs="?", help="log file (default: <storage.data_dir>/<storage.events_file>)")
    add_config_args(p)
    p.add_argument("--data-dir", help="data directory holding events.bin")
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="server TCP port (default 9000)")
    p.add_argument("--topic", help="topic glob, e.g. 'orders.*'")
    p.add_argument("--priority", help="comma list of priorities: names or numbers 0-4")
    p.add_argument("--since", help="ISO-8601 or epoch seconds")
    p.add_argument("--until", help="ISO-8601 or epoch seconds")
    p.add_argument("--keep-ids", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="send the stored event id (default) or let the server treat them as new events")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all ACKs (default 60)")
    p.set_defaults(func=run)


def run(args) -> int:
    from eventstream.client import TcpClient
    from eventstream.storage import EventLogReader

    path = resolve_path(args)
    if path is None:
        return EXIT_USAGE
    if not 1 <= args.port <= 65535:
        print(f"eventstream replay: --port {args.port} is not allowed; allowed: 1..65535", file=sys.stderr)
        return EXIT_USAGE
    try:
        filters = {"topic": args.topic,
                   "priorities": args.priority.split(",") if args.priority else None,
                   "since_ns": parse_time(args.since, "--since") if args.since else None,
                   "until_ns": parse_time(args.until, "--until") if args.until else None}
        reader = EventLogReader(path)
        batches = list(reader.batches(**filters))
    except (ValueError, FileNotFoundError) as exc:
        print(f"eventstream replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sent = 0
    t0 = time.monotonic()
    try:
        with TcpClient(args.host, args.port, version=2, timeout=args.timeout) as client:
            for b in batches:
                r = b.records
                names = b.topic_names()
                ids = r["event_id"].tolist()
                seqs = r["seq"].tolist()
                prios = r["priority"].tolist()
                ts = r["producer_ts"].tolist()
                pays = b.payloads()  # whole payloads, inline or stored after their record
                for i in range(len(r)):
                    eid = (ids[i] or seqs[i]) if args.keep_ids else None
                    client.send(names[i], pays[i], priority=prios[i], event_id=eid, timestamp_ns=ts[i] or None)
                    sent += 1
            client.flush()
            client.wait_acked(args.timeout)
    except OSError as exc:
        print(f"eventstream replay: cannot replay to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    dt = time.monotonic() - t0
    print(f"replayed {sent} events to {args.host}:{args.port} in {dt:.2f}s")
    return 0

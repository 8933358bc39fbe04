"""`eventstream replay`: re-send stored events from events.bin to a running server.

Events go out as v2 frames with their original event id, priority, producer timestamp, topic and
payload, and the command waits until the server ACKed all of them. It exits 1 and says how many when
any was NACKed (with the reasons) or not acknowledged within --timeout.

An event stored without an id (v1, or v2 with id 0) is sent with a deterministic id derived from its
position in the source log: REPLAY_ID_BIT | its server sequence number (unique within the engine that
stored it, across restarts). Replaying the same log again, into any engine, sends the same ids, so the
engine's deduplication (every tier, within dedup.window_s) stores each such event at most once.
"""

from __future__ import annotations

import sys
import time

from eventstream.cli.dump import parse_time, resolve_path
from eventstream.cli.main import (
    EXIT_FAILURE,
    EXIT_USAGE,
    add_client_security_args,
    add_config_args,
    add_frame_limit_arg,
    frame_limit_error,
    replay_client,
)

REPLAY_ID_BIT = 1 << 63  # marks an id derived from a server sequence number (never chosen by our clients)


def replay_id(event_id: int, seq: int) -> int:
    """The id a replayed event is sent with: its own, or for an id-less event one derived from its
    position in the source log (its server sequence number)."""
    return event_id or (REPLAY_ID_BIT | (seq & (REPLAY_ID_BIT - 1)))


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
    p.add_argument(
        "--keep-ids",
        action=__import__("argparse").BooleanOptionalAction,
        default=True,
        help="send the stored event id (default) or let the server treat them as new events",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for all ACKs (default 60)")
    add_client_security_args(p)
    add_frame_limit_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from eventstream.storage import EventLogReader

    path = resolve_path(args)
    if path is None:
        return EXIT_USAGE
    if not 1 <= args.port <= 65535:
        print(f"eventstream replay: --port {args.port} is not allowed; allowed: 1..65535", file=sys.stderr)
        return EXIT_USAGE
    if (problem := frame_limit_error(args)) is not None:
        print(f"eventstream replay: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        filters = {
            "topic": args.topic,
            "priorities": args.priority.split(",") if args.priority else None,
            "since_ns": parse_time(args.since, "--since") if args.since else None,
            "until_ns": parse_time(args.until, "--until") if args.until else None,
        }
        reader = EventLogReader(path)
        batches = list(reader.batches(**filters))
    except (ValueError, FileNotFoundError) as exc:
        print(f"eventstream replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sent = too_large = 0
    t0 = time.monotonic()
    try:
        client = replay_client(args)
        try:
            for b in batches:
                r = b.records
                names = b.topic_names()
                ids = r["event_id"].tolist()
                seqs = r["seq"].tolist()
                prios = r["priority"].tolist()
                ts = r["producer_ts"].tolist()
                pays = b.payloads()  # whole payloads, inline or stored after their record
                for i in range(len(r)):
                    eid = replay_id(ids[i], seqs[i]) if args.keep_ids else None
                    try:
                        client.send(names[i], pays[i], priority=prios[i], event_id=eid, timestamp_ns=ts[i] or None)
                    except ValueError as exc:  # the frame would exceed --max-frame-bytes
                        too_large += 1
                        print(f"eventstream replay: not sent: seq {seqs[i]} on {names[i]!r}: {exc}", file=sys.stderr)
                        continue
                    sent += 1
            complete = client.wait_acked(args.timeout)
        finally:
            try:
                client.close()
            except OSError:
                pass
    except OSError as exc:  # ClientError and AuthError are ConnectionErrors
        print(f"eventstream replay: cannot replay to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    dt = time.monotonic() - t0
    acked, nacked = client.acked, client.nacked
    missing = sent - acked - nacked
    print(
        f"replayed {sent} events to {args.host}:{args.port} in {dt:.2f}s: acked {acked}, nacked {nacked}, "
        f"not acknowledged {missing}" + (f", not sent (larger than --max-frame-bytes) {too_large}" if too_large else "")
    )
    if nacked:
        from collections import Counter

        why = Counter(r.split(";", 1)[0].strip() or "unknown" for _, r in client.nacks)
        print(
            f"eventstream replay: {nacked} events were NACKed by {args.host}:{args.port}: "
            + ", ".join(f"{r} ({n})" for r, n in why.most_common(10)),
            file=sys.stderr,
        )
    if missing or not complete:
        print(
            f"eventstream replay: {missing} events were not acknowledged within {args.timeout}s "
            "(allowed: a longer --timeout)",
            file=sys.stderr,
        )
    return 0 if complete and not nacked and not missing and not too_large else EXIT_FAILURE

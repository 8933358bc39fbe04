"""`eventstream send`: one event from flags, or JSON lines on stdin, to the TCP (default) or UDP port.

JSON lines: {"topic": "orders", "payload": "text", "priority": 2, "event_id": 7}; "payload_hex" may
replace "payload" for binary data; priority and event_id are optional.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from eventstream.cli.main import EXIT_FAILURE, EXIT_USAGE, add_client_security_args, client_security
from eventstream.client import ClientError, TcpClient, UdpSender
from eventstream.protocol.frames import EncodeError


def register(sub) -> None:
    p = sub.add_parser("send", help="send one event (flags) or JSON lines from stdin")
    p.add_argument("--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 9000 TCP, 9001 UDP)")
    p.add_argument("--udp", action="store_true", help="send over UDP (no acknowledgements)")
    p.add_argument("--protocol", type=int, choices=(1, 2), default=2, help="protocol version (default 2)")
    p.add_argument("--topic", help="topic of the one event to send; without it, read JSON lines from stdin")
    p.add_argument("--payload", default="", help="payload as UTF-8 text")
    p.add_argument("--payload-hex", help="payload as hex bytes (instead of --payload)")
    p.add_argument("--priority", type=int, default=2, help="0 BATCH, 1 LOW, 2 MEDIUM (default), 3 HIGH, 4 CRITICAL")
    p.add_argument("--event-id", type=int, help="idempotency key (v2; default: generated)")
    p.add_argument(
        "--frame",
        choices=("batch", "single"),
        default="batch",
        help="v2 over TCP: BATCH frames (default; what is ready leaves together) or one frame per event",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for acknowledgements")
    p.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    add_client_security_args(p)
    p.set_defaults(func=run)


def _events(args):
    if args.topic is not None:
        payload = bytes.fromhex(args.payload_hex) if args.payload_hex else args.payload.encode("utf-8")
        yield 0, {"topic": args.topic, "payload": payload, "priority": args.priority, "event_id": args.event_id}
        return
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("topic"), str):
                raise ValueError('an object with a string "topic"')
            if "payload_hex" in obj:
                payload = bytes.fromhex(obj["payload_hex"])
            else:
                payload = str(obj.get("payload", "")).encode("utf-8")
        except ValueError as exc:
            raise EncodeError(
                f"stdin line {n}: {exc}; allowed: "
                '{"topic": str, "payload": str | "payload_hex": hex, "priority": 0..4, '
                '"event_id": int}'
            ) from None
        yield (
            n,
            {
                "topic": obj["topic"],
                "payload": payload,
                "priority": int(obj.get("priority", 2)),
                "event_id": obj.get("event_id"),
            },
        )


def _ready(events, most: int = 4096):
    """Group events into what is ready: the lines stdin already holds (without waiting for more), at
    most `most` at a time; a flag-given event alone."""
    import select

    chunk = []
    for item in events:
        chunk.append(item)
        if len(chunk) >= most or item[0] == 0 or not _stdin_has_more(select):
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stdin_has_more(select) -> bool:
    """Whether stdin can be read without waiting (bytes in the pipe or file, or its end)."""
    try:
        return bool(select.select([sys.stdin], [], [], 0)[0])
    except (OSError, ValueError, AttributeError):
        return False


def run(args) -> int:
    port = args.port if args.port is not None else (9001 if args.udp else 9000)
    result: dict[str, Any] = {"sent": 0, "acked": 0, "nacked": 0, "nacks": []}
    try:
        if args.udp:
            with UdpSender(args.host, port, version=args.protocol) as s:
                for _n, ev in _events(args):
                    s.send(ev["topic"], ev["payload"], ev["priority"], ev["event_id"])
                result["sent"] = s.sent
        else:
            with TcpClient(
                args.host, port, version=args.protocol, timeout=args.timeout, frame=args.frame, **client_security(args)
            ) as c:
                for chunk in _ready(_events(args)):
                    c.send_many([(ev["topic"], ev["payload"], ev["priority"], ev["event_id"]) for _n, ev in chunk])
                complete = c.wait_acked(args.timeout)
            result.update(
                sent=c.sent, acked=c.acked, nacked=c.nacked, nacks=[{"event_id": e, "reason": r} for e, r in c.nacks]
            )
            if args.protocol == 2 and not complete:
                result["error"] = f"not every event was acknowledged within {args.timeout}s"
    except EncodeError as exc:
        print(f"eventstream send: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ClientError, OSError) as exc:
        print(f"eventstream send: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sent {result['sent']}, acked {result['acked']}, nacked {result['nacked']}")
        for n in result["nacks"]:
            print(f"  nacked id={n['event_id']}: {n['reason']}")
        if "error" in result:
            print(f"  {result['error']}", file=sys.stderr)
    return EXIT_FAILURE if result["nacked"] or "error" in result else 0

"""`eventstream` command: dispatches to one module per command.

Each module in COMMANDS lives at eventstream/cli/<name>.py and defines ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed args; returns the exit code).

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 GIL on and not allowed,
130 interrupted by a second signal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from eventstream.runtime import gil

COMMANDS = ("serve", "config", "send", "load", "dump", "tail", "replay", "dlq", "top", "bench", "flows")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GIL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventstream",
        description="Threaded event-streaming engine for free-threaded CPython 3.13t.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage/config error, 3 GIL on (see --allow-gil), 130 interrupted.",
    )
    from eventstream import __version__

    parser.add_argument("--version", action="version", version=f"eventstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        modname = f"eventstream.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config / --set, shared by every command that loads the configuration."""
    p.add_argument(
        "-c", "--config", metavar="FILE", help="YAML config file (default: embedded defaults, or $EVENTSTREAM_CONFIG)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set server.tcp.port=9005 (repeatable)",
    )


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """--token / --tls / --tls-ca / --tls-no-verify, shared by every command that talks to a server
    (send, load, replay, dlq replay, tail, top)."""
    p.add_argument(
        "--token", help="send this client token in a HELLO frame first (server.auth.tokens); also $EVENTSTREAM_TOKEN"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (server.tls), verifying the server against the system trust store",
    )
    p.add_argument(
        "--tls-ca", metavar="FILE", help="connect with TLS, trusting this CA or self-signed certificate (PEM)"
    )
    p.add_argument(
        "--tls-no-verify", action="store_true", help="connect with TLS without verifying the server (testing only)"
    )


def add_frame_limit_arg(p: argparse.ArgumentParser) -> None:
    """--max-frame-bytes, for the commands that re-send stored events (replay, dlq replay): a log can
    hold payloads as large as the server that wrote it allowed."""
    lo, hi = _frame_range()
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=1 << 20,
        help=f"the target server's server.tcp.max_frame_bytes ({lo}..{hi}, default 1048576): events whose frame "
        "would be larger are reported and not sent",
    )


def _frame_range() -> tuple[int, int]:
    import dataclasses

    from eventstream.config.schema import TcpConfig

    (f,) = [f for f in dataclasses.fields(TcpConfig) if f.name == "max_frame_bytes"]
    return f.metadata["range"]


def frame_limit_error(args) -> str | None:
    """What is wrong with --max-frame-bytes, or None."""
    lo, hi = _frame_range()
    if not lo <= args.max_frame_bytes <= hi:
        return (
            f"--max-frame-bytes {args.max_frame_bytes} is not allowed; allowed: {lo}..{hi} (server.tcp.max_frame_bytes)"
        )
    return None


def replay_client(args):
    """The connected TcpClient that `replay` and `dlq replay` re-send through: --host/--port, --timeout,
    --max-frame-bytes and the security flags."""
    from eventstream.client import TcpClient

    return TcpClient(
        args.host,
        args.port,
        version=2,
        timeout=args.timeout,
        max_frame_bytes=args.max_frame_bytes,
        **client_security(args),
    ).connect()


def client_security(args) -> dict:
    """Client keyword arguments (token=, ssl_context=) from add_client_security_args flags: for
    TcpClient and Subscription alike."""
    import os
    import ssl

    out: dict = {"token": args.token if args.token is not None else os.environ.get("EVENTSTREAM_TOKEN")}
    if args.tls or args.tls_ca or args.tls_no_verify:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_no_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        out["ssl_context"] = ctx
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        gil.reexec_without_gil()
        argv = sys.argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except gil.GilEnabledError as exc:
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_GIL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())

"""`eventstream serve`: run the service until SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import sys
import threading

from eventstream import log as logmod
from eventstream.cli.config import load_or_report
from eventstream.cli.main import EXIT_USAGE, add_config_args
from eventstream.runtime import gil


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the engine (TCP, UDP, processors, storage, metrics)")
    add_config_args(p)
    p.add_argument("--port", type=int, help="TCP port (shortcut for --set server.tcp.port=N)")
    p.add_argument("--udp-port", type=int, help="UDP port (shortcut for --set server.udp.port=N)")
    p.add_argument("--data-dir", help="data directory (shortcut for --set storage.data_dir=DIR)")
    p.add_argument("--allow-gil", action="store_true", help="run even if the GIL is on (comparisons only)")
    p.set_defaults(func=run)


def run(args) -> int:
    for flag, key in (("port", "server.tcp.port"), ("udp_port", "server.udp.port"), ("data_dir", "storage.data_dir")):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg = load_or_report(args)
    if cfg is None:
        return EXIT_USAGE
    logmod.configure(cfg.logging.level, cfg.logging.format, file=cfg.logging.file)
    log = logmod.get_logger("eventstream.serve")
    gil.require_gil_off(args.allow_gil, "eventstream serve")
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    plan = {
        "tcp": f"{cfg.server.tcp.host}:{cfg.server.tcp.port}" if cfg.server.tcp.enabled else "off",
        "udp": f"{cfg.server.udp.host}:{cfg.server.udp.port}" if cfg.server.udp.enabled else "off",
        "threads": {role: cpus or "any" for role, cpus in vars(cfg.affinity).items()},
        "gil_enabled": gil.gil_enabled(),
    }
    log.info("serve_plan", **plan)
    while not stop.wait(0.5):
        pass
    log.info("stopped")
    sys.stderr.flush()
    return 0

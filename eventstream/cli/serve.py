"""`eventstream serve`: run the engine until SIGTERM/SIGINT.

First signal: stop accepting, drain the queues, flush storage and windows, log a summary, exit 0
(exit 1 when the engine workers do not finish within server.drain_timeout_s).
Second signal: exit at once with code 130.
"""

from __future__ import annotations

import faulthandler
import os
import resource
import signal
import sys
import threading
import time

from eventstream import log as logmod
from eventstream.cli.config import load_or_report
from eventstream.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, add_config_args
from eventstream.runtime import gil, notify


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the engine (TCP, UDP, processors, storage, metrics)",
        description="Run the engine until SIGTERM/SIGINT (drains, flushes, exit 0); "
        "a second signal exits at once with code 130.",
    )
    add_config_args(p)
    p.add_argument("--port", type=int, help="TCP port (shortcut for --set server.tcp.port=N)")
    p.add_argument("--udp-port", type=int, help="UDP port (shortcut for --set server.udp.port=N)")
    p.add_argument("--metrics-port", type=int, help="metrics port (shortcut for --set metrics.port=N)")
    p.add_argument("--subscribe-port", type=int, help="subscribe port (shortcut for --set server.subscribe.port=N)")
    p.add_argument("--data-dir", help="data directory (shortcut for --set storage.data_dir=DIR)")
    p.add_argument(
        "--allow-gil",
        action="store_true",
        help="run even if the GIL is on (comparisons only; also EVENTSTREAM_ALLOW_GIL=1)",
    )
    p.add_argument(
        "--ready-file",
        help="write 'tcp_port udp_port metrics_port subscribe_port' here once serving "
        "(0 for a port that is off; for scripts)",
    )
    p.set_defaults(func=run)


def _since_process_start() -> float:
    """Seconds since this process started (the kernel's start time; 0.0 where it is not known)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def run(args) -> int:
    entered = _since_process_start()  # the interpreter and the CLI's imports
    t_run = time.perf_counter()
    for flag, key in (
        ("port", "server.tcp.port"),
        ("udp_port", "server.udp.port"),
        ("metrics_port", "metrics.port"),
        ("subscribe_port", "server.subscribe.port"),
        ("data_dir", "storage.data_dir"),
    ):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"{key}={value}")
    cfg = load_or_report(args)
    if cfg is None:
        return EXIT_USAGE
    logmod.configure(cfg.logging.level, cfg.logging.format, file=cfg.logging.file)
    log = logmod.get_logger("eventstream.serve")
    args.allow_gil = args.allow_gil or gil.gil_allowed_by_env()
    gil.require_gil_off(args.allow_gil, "eventstream serve")

    from eventstream.config.exposure import exposure_warnings
    from eventstream.engine.handlers import HandlerError
    from eventstream.errors import StartupError
    from eventstream.service import Service

    # importing the engine pulled in atomics/cffi: check again
    gil.require_gil_off(args.allow_gil, "eventstream serve")
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum, frame):
        # no logging here: the handler may interrupt a log write that holds the logger's lock
        signals["count"] += 1
        signals["last"] = signum
        if signals["count"] > 1:
            name = signal.Signals(signum).name
            os.write(2, f'{{"event": "second_signal_exit_now", "signal": "{name}", "level": "warning"}}\n'.encode())
            os._exit(EXIT_INTERRUPTED)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` dumps every thread's stack
    t_imports = time.perf_counter()
    svc = Service(cfg, allow_gil=args.allow_gil)
    try:
        svc.start()
    except (StartupError, HandlerError) as exc:
        log.error("startup_failed", error=str(exc))
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        log.exception("startup_failed")
        print(f"eventstream: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    started = time.perf_counter()
    for warning in exposure_warnings(cfg):
        log.warning("exposed_without_protection", detail=warning)
    phases = {"interpreter_and_imports": entered, "config_and_serve_imports": t_imports - t_run}
    phases.update(svc.engine.startup)  # recovery, dedup_*, processors
    phases["edges_and_threads"] = (started - t_imports) - sum(svc.engine.startup.values())
    phases["total"] = entered + (started - t_run)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    phases["cpu"] = usage.ru_utime + usage.ru_stime  # CPU seconds of every thread so far (the load hides less)
    log.info("startup_phases", **{k: round(v, 3) for k, v in phases.items()})
    if args.ready_file:
        ports = [
            svc.tcp.address[1] if svc.tcp else 0,
            svc.udp.address[1] if svc.udp else 0,
            svc.exporter.address[1] if svc.exporter is not None else 0,
            svc.subscribe.address[1] if svc.subscribe is not None else 0,
        ]
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(" ".join(map(str, ports)) + "\n")
        os.replace(tmp, args.ready_file)
    notify.ready("serving")  # systemd Type=notify (no-op without $NOTIFY_SOCKET); see runtime/notify.py
    notify.start_watchdog(lambda: not svc.failures())  # only when systemd set WatchdogSec=
    while not stop.wait(0.2):
        failed = svc.failures()
        if failed:
            log.error("thread_failed", failures=failed)
            notify.stopping("a thread failed: stopping without draining")
            svc.stop(drain=False)
            return EXIT_FAILURE
    notify.stopping("draining")
    log.info("signal_received", signal=signal.Signals(signals["last"]).name, action="draining")
    # drain in a helper thread: the main thread keeps waking up so a second signal is handled at once
    result: dict = {}
    timeout = cfg.server.drain_timeout_s
    stopper = threading.Thread(target=lambda: result.update(svc.stop(timeout=timeout)), name="es-shutdown", daemon=True)
    stopper.start()
    while stopper.is_alive():
        stopper.join(0.1)
    if not result.get("drained", False):
        log.error(
            "drain_timed_out",
            timeout_s=timeout,
            detail="engine workers did not finish within server.drain_timeout_s; events they held are "
            "not stored (the next start recovers the log); exit 1",
        )
        print(
            f"eventstream: error: the drain did not finish within server.drain_timeout_s={timeout:g}; "
            "allowed: a larger server.drain_timeout_s, or handlers that return",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0

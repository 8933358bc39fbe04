"""systemd service notifications (sd_notify) with the standard library only.

Under a unit with ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX datagram socket, a
filesystem path (``/run/systemd/notify``) or an abstract name (written with a leading ``@``). The service
sends newline-separated ``KEY=VALUE`` assignments to it:

    READY=1         start-up finished: systemd considers the unit started (``systemctl start`` returns)
    STOPPING=1      a stop began (drain in progress)
    STATUS=text     a one-line status shown by ``systemctl status``
    WATCHDOG=1      keep-alive, required every ``WatchdogSec`` when the unit sets it

Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op that returns False. Sending never
raises: a notification that cannot be delivered is logged once as a warning, and the service goes on.

Watchdog: with ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the pid it
expects the pings from). `start_watchdog(healthy)` starts a daemon thread that sends ``WATCHDOG=1`` every
``WATCHDOG_USEC / 2`` as long as ``healthy()`` returns True. The first time it returns False (or
raises) the thread stops pinging for good, so systemd declares the unit failed at the next deadline
and, with ``Restart=on-failure``, restarts it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("eventstream.notify")

_warned: set[str] = set()


def _warn_once(key: str, **kw) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(key, **kw)


def socket_address(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The address of $NOTIFY_SOCKET as bytes for sendto (abstract names start with NUL), or None
    when it is unset, empty or not a form this module supports (an absolute path or '@name')."""
    env = os.environ if environ is None else environ
    value = env.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    _warn_once(
        "notify_socket_unsupported",
        notify_socket=value,
        allowed="an absolute path or an abstract name starting with '@'",
    )
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `message` (``KEY=VALUE`` lines) to $NOTIFY_SOCKET. True if it was sent; False when the
    variable is unset (not under systemd) or the datagram could not be sent (logged once)."""
    addr = socket_address(environ)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), addr)
    except OSError as exc:
        _warn_once(
            "notify_failed",
            address=os.fsdecode(addr).replace("\0", "@", 1),
            error=str(exc),
            message=message.split("\n", 1)[0],
        )
        return False
    return True


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: the protocol is newline-separated


def ready(status: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1 (and STATUS=`status` in the same datagram): start-up is complete."""
    return notify("READY=1" + ("\n" + _status_line(status) if status else ""), environ)


def stopping(status: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1 (and STATUS=`status`): a stop began."""
    return notify("STOPPING=1" + ("\n" + _status_line(status) if status else ""), environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=`text`: the one line `systemctl status` shows."""
    return notify(_status_line(text), environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alive pings (WATCHDOG_USEC / 2), or None when the watchdog is not asked
    for this process: WATCHDOG_USEC unset, not a positive integer, or WATCHDOG_PID names another pid."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    if not usec.isdigit() or int(usec) <= 0:
        _warn_once("watchdog_usec_invalid", watchdog_usec=usec, allowed="a positive integer (microseconds)")
        return None
    return int(usec) / 2_000_000


class Watchdog(threading.Thread):
    """Sends WATCHDOG=1 every `interval` seconds while `healthy()`; stops for good once it is not."""

    def __init__(self, interval: float, healthy: Callable[[], bool], environ: Mapping[str, str] | None = None):
        super().__init__(name="es-watchdog", daemon=True)
        self.interval = interval
        self.healthy = healthy
        self.environ = dict(os.environ if environ is None else environ)
        self.pings = 0
        self.unhealthy: str | None = None  # why pinging stopped, if it did because of health
        self._stop_requested = threading.Event()

    def run(self) -> None:
        while True:
            try:
                ok = bool(self.healthy())
                why = "healthy() returned False"
            except Exception as exc:  # noqa: BLE001 - a failing check counts as unhealthy
                ok, why = False, f"healthy() raised {exc!r}"
            if not ok:
                self.unhealthy = why
                log.error(
                    "watchdog_stopped_pinging",
                    reason=why,
                    effect="systemd restarts the service at the watchdog deadline",
                )
                return
            if notify("WATCHDOG=1", self.environ):
                self.pings += 1
            if self._stop_requested.wait(self.interval):
                return

    def stop(self, timeout: float | None = None) -> None:
        self._stop_requested.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def start_watchdog(healthy: Callable[[], bool], environ: Mapping[str, str] | None = None) -> Watchdog | None:
    """Start the keep-alive thread if systemd asked for one (see `watchdog_interval`); else None."""
    interval = watchdog_interval(environ)
    if interval is None or socket_address(environ) is None:
        return None
    wd = Watchdog(interval, healthy, environ)
    wd.start()
    log.info("watchdog_started", interval_s=interval)
    return wd

"""systemd notifications (runtime/notify.py): real AF_UNIX datagram sockets, real threads, and a real
`eventstream serve` process that reports READY=1, WATCHDOG=1 and STOPPING=1 to a socket the test binds."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from eventstream.runtime import notify


def parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode("utf-8").split("\n") if line)


@pytest.fixture
def listener():
    """A bound AF_UNIX datagram socket on a short path (sun_path holds 108 bytes) and its
    NOTIFY_SOCKET value."""
    with tempfile.TemporaryDirectory(prefix="es-notify-") as d:
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield sock, path
        finally:
            sock.close()


def recv(sock: socket.socket, timeout: float = 10.0) -> dict[str, str]:
    sock.settimeout(timeout)
    return parse(sock.recv(4096))


def pending(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram already queued on `sock` (non-blocking)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(parse(sock.recv(4096)))
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


# ------------------------------------------------------------------------------------ messages
def test_without_notify_socket_every_call_is_a_noop():
    assert notify.socket_address({}) is None
    assert notify.ready(environ={}) is False
    assert notify.stopping(environ={}) is False
    assert notify.status("x", environ={}) is False
    assert notify.start_watchdog(lambda: True, {"WATCHDOG_USEC": "1000000"}) is None


def test_ready_stopping_status_reach_a_path_socket(listener):
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert notify.ready("serving", env) is True
    assert recv(sock) == {"READY": "1", "STATUS": "serving"}
    assert notify.status("line one\nline two", env) is True
    assert recv(sock) == {"STATUS": "line one line two"}  # one line: the protocol is line-based
    assert notify.stopping(environ=env) is True
    assert recv(sock) == {"STOPPING": "1"}


def test_abstract_socket_named_with_at_sign():
    name = f"eventstream-test-{os.getpid()}-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # Linux abstract namespace: no file anywhere
        env = {"NOTIFY_SOCKET": "@" + name}
        assert notify.socket_address(env) == b"\0" + name.encode()
        assert notify.ready(environ=env) is True
        assert recv(sock) == {"READY": "1"}
        assert notify.stopping("draining", env) is True
        assert recv(sock) == {"STOPPING": "1", "STATUS": "draining"}


def test_unreachable_or_unsupported_socket_is_reported_not_raised(tmp_path):
    assert notify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert notify.ready(environ={"NOTIFY_SOCKET": "relative/path"}) is False
    assert notify.socket_address({"NOTIFY_SOCKET": "relative/path"}) is None


def test_sent_through_os_environ_like_under_systemd(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.ready() is True
    assert recv(sock) == {"READY": "1"}


# ------------------------------------------------------------------------------------ watchdog
def test_watchdog_interval_is_half_of_watchdog_usec_and_respects_watchdog_pid():
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 1.5
    other = os.getppid()
    assert notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(other)}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pings_while_healthy_and_stops_for_good_when_not(listener):
    sock, path = listener
    healthy = threading.Event()
    healthy.set()
    wd = notify.start_watchdog(healthy.is_set, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert wd is not None and wd.interval == 0.01 and wd.daemon
    try:
        for _ in range(3):
            assert recv(sock) == {"WATCHDOG": "1"}
        healthy.clear()
        wd.join(30)
        assert not wd.is_alive(), "the watchdog must stop once healthy() is False"
        assert wd.unhealthy == "healthy() returned False"
        # the thread is gone, so nothing more can come: what it sent is all queued, all pings
        rest = pending(sock)
        assert rest == [{"WATCHDOG": "1"}] * len(rest)
        assert 3 + len(rest) == wd.pings
    finally:
        wd.stop(5)


def test_watchdog_treats_a_failing_health_check_as_unhealthy(listener):
    sock, path = listener

    def broken() -> bool:
        raise RuntimeError("cannot tell")

    wd = notify.start_watchdog(broken, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    wd.join(30)
    assert not wd.is_alive()
    assert wd.pings == 0 and pending(sock) == []
    assert "RuntimeError('cannot tell')" in wd.unhealthy


def test_watchdog_stop_ends_the_thread(listener):
    sock, path = listener
    wd = notify.start_watchdog(lambda: True, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert recv(sock) == {"WATCHDOG": "1"}  # the first ping goes out at once
    wd.stop(30)
    assert not wd.is_alive() and wd.unhealthy is None


def test_watchdog_for_another_pid_is_not_started(listener):
    _, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000", "WATCHDOG_PID": str(os.getppid())}
    assert notify.start_watchdog(lambda: True, env) is None


# ------------------------------------------------------------------------------------ serve
def test_serve_notifies_ready_watchdog_and_stopping_then_exits_0(listener, tmp_path: Path):
    sock, path = listener
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "EVENTSTREAM_NO_REEXEC")}
    env.update(PYTHON_GIL="0", NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")  # ping every 0.2 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0", "--metrics-port", "0", "--subscribe-port", "0",
         "--data-dir", str(tmp_path / "data"), "--set", "records.payload_bytes=64",
         "--set", "logging.format=json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        seen: list[dict[str, str]] = []

        def wait_for(key: str, timeout: float) -> dict[str, str]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited {proc.returncode} before {key}: {proc.stderr.read()}")
                try:
                    msg = recv(sock, 0.5)  # short reads so an early exit is noticed
                except TimeoutError:
                    continue
                seen.append(msg)
                if key in msg:
                    return msg
            raise AssertionError(f"no {key} from serve within {timeout}s; got {seen}")

        assert wait_for("READY", 60) == {"READY": "1", "STATUS": "serving"}
        assert wait_for("WATCHDOG", 30) == {"WATCHDOG": "1"}
        proc.send_signal(signal.SIGTERM)
        assert wait_for("STOPPING", 60) == {"STOPPING": "1", "STATUS": "draining"}
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "service_stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)

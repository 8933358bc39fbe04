"""Helpers of the stress suite (a module with its own name: `conftest` names collide when several
test folders are collected together): work scale, a Config per test, bounded waits, thread runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eventstream.config import _ENV_NOT_CONFIG, load_config

SCALES = {"quick": 0.08, "full": 1.0, "heavy": 3.0}
SCALE_NAME = os.environ.get("STRESS_SCALE", "full")
if SCALE_NAME not in SCALES:
    raise pytest.UsageError(f"STRESS_SCALE={SCALE_NAME!r} is not allowed; allowed: {', '.join(SCALES)}")
FACTOR = SCALES[SCALE_NAME]


def scaled(n: int, minimum: int = 1) -> int:
    """`n` events at full scale, proportionally fewer (at least `minimum`) at quick scale."""
    return max(minimum, int(n * FACTOR))


def service_config(data_dir: Path, **overrides):
    """A Config for one test: every port 0 (ephemeral), its own data dir, small fast flushes."""
    base = {
        "server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0,
        "storage.data_dir": str(data_dir), "storage.fsync": "none",
        "logging.level": "warning",
    }
    base.update(overrides)
    return load_config(overrides=base, environ={})


def wait_until(pred, timeout: float, what: str, interval: float = 0.005) -> None:
    """Poll `pred` until true; fail naming `what` after `timeout` seconds (never sleeps blindly)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_threads(fns: list, names: list[str], join_s: float) -> None:
    """Run each fn in its own thread, join all within `join_s` seconds, re-raise the first error."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(f), name=n, daemon=True) for f, n in zip(fns, names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_s)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads did not finish within {join_s}s: {stuck}"
    if errors:
        raise errors[0]


class Server:
    """One `eventstream serve` child on ephemeral ports."""

    def __init__(self, data_dir: Path, log_path: Path, *settings: str):
        """`settings`: extra `--set key=value` arguments."""
        self.ready = data_dir.parent / f"ready-{time.monotonic_ns()}"
        # configuration from the caller's environment must not leak into the child
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTREAM_") or k in _ENV_NOT_CONFIG}
        env.update(PYTHON_GIL="0", EVENTSTREAM_NO_REEXEC="1")
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "gil=0", "-m", "eventstream", "serve", "--port", "0", "--udp-port", "0",
             "--metrics-port", "0", "--subscribe-port", "0", "--data-dir", str(data_dir), "--ready-file", str(self.ready),
             "--set", "storage.fsync=none", "--set", "logging.level=warning",
             *[arg for kv in settings for arg in ("--set", kv)]],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode} before ready; log: {log_path}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"serve not ready within 90s; log: {log_path}")
            time.sleep(0.02)
        tcp, _udp, _metrics, _subscribe = map(int, self.ready.read_text().split())
        self.address = ("127.0.0.1", tcp)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.wait(30) == -signal.SIGKILL

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("serve did not drain and exit within 90s of SIGTERM") from None

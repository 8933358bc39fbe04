"""Helpers for ingest tests (a uniquely named module: every test directory has its own conftest)."""

from __future__ import annotations

import socket
import threading
import time

from eventstream.protocol.frames import split_control_frames


class Rejects:
    """on_reject callback that records (records, reason, rejections) calls."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, records, reason, rejections):
        with self.lock:
            self.calls.append((None if records is None else records.copy(), reason, list(rejections)))

    def rejections(self):
        with self.lock:
            return [r for _rec, _reason, rs in self.calls for r in rs]

    def dropped(self):
        with self.lock:
            return [(len(rec), reason) for rec, reason, _rs in self.calls if rec is not None]


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> list[tuple[int, int, bytes]]:
    """Every ACK/NACK frame the server sends until it closes the connection (fails on timeout)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return split_control_frames(buf)
        buf += data


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a server-side counter (no event to wait on) with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)

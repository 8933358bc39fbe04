"""UDP sender: fire-and-forget frames, several frames per datagram when batching.

There is no ACK on UDP; a datagram the server cannot parse is counted there (datagrams_bad). Keep
datagrams under the path MTU (default 1,400 bytes) on real networks; on loopback up to 65,507 works.
"""

from __future__ import annotations

import socket
import time

from eventstream.protocol.frames import EventIds, encode_v1, encode_v2


class UdpSender:
    def __init__(self, host: str = "127.0.0.1", port: int = 9001, *, version: int = 2, max_datagram_bytes: int = 1400):
        if version not in (1, 2):
            raise ValueError(f"version={version!r} is not allowed; allowed: 1 or 2")
        self.address = (host, port)
        self.version = version
        self.max_datagram_bytes = max_datagram_bytes
        self.sent = 0
        self.datagrams = 0
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self._ids = EventIds()
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def frame(
        self,
        topic: str | bytes,
        payload: bytes = b"",
        priority: int = 2,
        event_id: int | None = None,
        timestamp_ns: int | None = None,
    ) -> bytes:
        if self.version == 1:
            return encode_v1(topic, payload, priority)
        if event_id is None:
            event_id = self._ids.next()
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        return encode_v2(topic, payload, priority, event_id, ts)

    def send(
        self,
        topic: str | bytes,
        payload: bytes = b"",
        priority: int = 2,
        event_id: int | None = None,
        timestamp_ns: int | None = None,
    ) -> None:
        """One event in one datagram, now."""
        self._sock.sendto(self.frame(topic, payload, priority, event_id, timestamp_ns), self.address)
        self.sent += 1
        self.datagrams += 1

    def queue(
        self,
        topic: str | bytes,
        payload: bytes = b"",
        priority: int = 2,
        event_id: int | None = None,
        timestamp_ns: int | None = None,
    ) -> None:
        """Add one event to the current datagram; sends it when the next frame would not fit."""
        f = self.frame(topic, payload, priority, event_id, timestamp_ns)
        if self._pending and self._pending_bytes + len(f) > self.max_datagram_bytes:
            self.flush()
        self._pending.append(f)
        self._pending_bytes += len(f)

    def flush(self) -> None:
        if self._pending:
            self._sock.sendto(b"".join(self._pending), self.address)
            self.sent += len(self._pending)
            self.datagrams += 1
            self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._sock.close()

    def __enter__(self) -> UdpSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

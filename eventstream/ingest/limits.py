"""Per-client limits of the TCP ingest: connections per IP, bytes held in partial frames.

Why: one client must not lock the others out. Without these, 50 idle sockets or 100 connections
sending a byte a second took every slot, and 300 half-sent 1 MiB frames took the RSS to 619 MB
(hardening issue #11).

* PeerLimit: open connections per client IP (`server.tcp.max_connections_per_ip`). The acceptor
  admits, the reader that closes the connection releases; a lock guards the small dict (one
  acquisition per accept and per close, never per read).
* PartialBudget: bytes held by partial frames (a frame's head arrived, its end not yet) summed over
  every reader of one server (`server.tcp.max_partial_bytes`). Each reader keeps its own total (one
  writer, plain int); the sum is read only when a read added partial bytes. Past the bound the
  connection with the largest partial frame is closed: by its own reader, which is asked through
  `Reader.evict()` when another reader noticed (a connection belongs to one reader thread).

* RejectMeter: rejected frames of one connection (or of the UDP socket) per one-second window
  (`server.tcp.max_rejects_per_s`, `server.udp.max_rejects_per_s`). Past the limit, rejects are still
  counted (frames_rejected, events_dropped_total{reason="rejects_limited"}) and NACKed, but not each
  written to the DLQ: one summary line per window instead. A TCP connection whose window went over
  the limit without one good frame is closed (too_many_rejects): it only sends garbage.

The frame-progress timeout (`server.tcp.frame_timeout_s`) lives in the reader loop, which knows
whether a connection is held (pushed back by the engine: never timed out for that).

Why connections are closed: CLOSE_REASONS, a fixed set (the `reason` label of
`connections_limited_total`).
"""

from __future__ import annotations

import threading

REASON_PER_IP = "max_connections_per_ip"
REASON_FRAME_TIMEOUT = "frame_timeout"
REASON_PARTIAL_BYTES = "max_partial_bytes"
REASON_TOO_MANY_REJECTS = "too_many_rejects"
REASON_AUTH = "auth"
REASON_TENANT = "tenant"  # a principal over server.tenants.max_connections (ingest/tenants.py)
REASON_EVICTED = "evicted_idle"  # max_connections reached: the idlest connection made room for a new one
REASON_MAX_CONNECTIONS = "max_connections"  # refused: the table is full and no connection was idle enough
REASON_MIN_RATE = "min_rate"  # delivered less than server.tcp.min_bytes_per_s over min_rate_window_s
CLOSE_REASONS = (
    REASON_PER_IP,
    REASON_FRAME_TIMEOUT,
    REASON_PARTIAL_BYTES,
    REASON_TOO_MANY_REJECTS,
    REASON_AUTH,
    REASON_TENANT,
    REASON_EVICTED,
    REASON_MAX_CONNECTIONS,
    REASON_MIN_RATE,
)


class PeerLimit:
    """Open connections per client IP address."""

    def __init__(self, max_per_ip: int):
        self.max_per_ip = max_per_ip
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, ip: str) -> bool:
        """Count one more connection from `ip`; False (nothing counted) when it already has the most."""
        with self._lock:
            n = self._open.get(ip, 0)
            if n >= self.max_per_ip:
                return False
            self._open[ip] = n + 1
            return True

    def release(self, ip: str) -> None:
        with self._lock:
            n = self._open.get(ip, 0) - 1
            if n > 0:
                self._open[ip] = n
            else:
                self._open.pop(ip, None)

    def open_from(self, ip: str) -> int:
        return self._open.get(ip, 0)


class PartialBudget:
    """Bytes in partial frames over every reader of one server (0 = no bound)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.readers: list = []  # set by TcpServer: objects with .partial_bytes and .conns

    def total(self) -> int:
        return sum(r.partial_bytes for r in self.readers)

    def over(self) -> bool:
        return bool(self.limit) and self.total() > self.limit

    def largest(self):
        """(reader, connection) holding the largest partial frame, or (None, None). Reads other
        readers' connection tables: a snapshot (list() of a dict is safe across threads), and the
        owner re-checks before it closes anything."""
        best, owner, size = None, None, 0
        for r in self.readers:
            for c in list(r.conns.values()):
                if c.partial > size and not c.closed:
                    best, owner, size = c, r, c.partial
        return owner, best


class RejectMeter:
    """Rejected frames per one-second window, and how many of them were not reported one by one."""

    __slots__ = ("limit", "start", "rejects", "good", "suppressed")

    def __init__(self, limit: int, now: float = 0.0):
        self.limit = limit
        self.start = now
        self.rejects = 0
        self.good = 0
        self.suppressed = 0

    def admit(self, rejects: int, good: int, now: float) -> tuple[int, int]:
        """Count a read's `rejects` and `good` frames. Returns (how many of these rejects may be
        reported one by one, suppressed count of the window that just ended: report it as a summary)."""
        ended = 0
        if now - self.start >= 1.0:
            ended, self.suppressed = self.suppressed, 0
            self.start, self.rejects, self.good = now, 0, 0
        self.good += good
        room = max(0, self.limit - self.rejects)
        report = min(room, rejects)
        self.rejects += rejects
        self.suppressed += rejects - report
        return report, ended

    def take_suppressed(self) -> int:
        """The suppressed count not yet summarised (at close)."""
        n, self.suppressed = self.suppressed, 0
        return n

    @property
    def garbage_only(self) -> bool:
        """This window went over the limit without a single good frame."""
        return self.rejects > self.limit and self.good == 0

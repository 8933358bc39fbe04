"""What a TCP reader does to enforce per-client limits (limits.py) and the connection preamble: the
TLS handshake (tls.py), refusal with a lingering close (auth), the partial-frame budget, the
frame-progress and idle timeouts. A mixin of reader.Reader: these run on the reader's own thread, on
connections it owns (see reader.py for the loop that calls them).
"""

from __future__ import annotations

import socket
import ssl
import time

import structlog

from eventstream.ingest.connection import Connection
from eventstream.ingest.limits import REASON_AUTH, REASON_FRAME_TIMEOUT, REASON_PARTIAL_BYTES
from eventstream.ingest.tls import handshake_step
from eventstream.protocol.frames import encode_nack

log = structlog.get_logger("eventstream.ingest.tcp")

LINGER_S = 2.0  # a refused connection is read (and discarded) this long so its NACK is not lost to a reset


class Guard:
    """Reader methods that close or refuse connections for a limit (counted in stats.limit_closes)."""

    def _handshake(self, c: Connection) -> None:
        """One step of a TLS handshake (tls.py); reading starts when it is done."""
        try:
            want = handshake_step(c.sock)
        except (ssl.SSLError, OSError) as exc:
            self._close(c, "tls_error", error=str(exc))
            return
        if want:
            try:
                self._sel.modify(c.sock, want, c)
            except (KeyError, ValueError, OSError):
                self._close(c, "socket_error")
            return
        c.handshaking = False
        self._interest(c, True)
        if c.sock.pending():
            self.tls_pending.add(c)

    def _refuse(self, c: Connection, reason: str) -> None:
        """Refuse a connection before its events: NACK of frame 0 (the HELLO), half-close, then
        discard what it still sends until it closes (at most LINGER_S): closing with unread bytes
        would send a reset, and a reset can destroy the NACK before the client reads it."""
        self.stats.limit_closes[REASON_AUTH] += 1
        log.warning("connection_limited", conn_id=c.conn_id, peer=str(c.peer), reason=REASON_AUTH, why=reason)
        self._write(c, encode_nack(0, reason))
        self._flush_blocking(c, 0.5)
        c.preamble = None
        c.closing = REASON_AUTH
        c.linger_until = time.monotonic() + LINGER_S
        try:
            c.sock.setblocking(False)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c, REASON_AUTH, quiet=True)
            return
        self._interest(c, True)

    def _close_lingering(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.conns.values() if c.linger_until and c.linger_until < now]:
            self._close(c, REASON_AUTH, quiet=True)

    def _account_partial(self, c: Connection, buffered: int, completed: bool, now: float) -> None:
        """After a read: the connection's partial frame is `buffered` bytes; `completed`: frames
        ended in this read (so a partial frame now is a new one)."""
        grew = buffered > c.partial
        if buffered and (not c.partial or completed):
            c.partial_since = now
        self.partial_bytes += buffered - c.partial
        c.partial = buffered
        if grew and self.budget is not None and self.budget.over():
            owner, victim = self.budget.largest()
            if owner is self:
                self._close_limited(victim, REASON_PARTIAL_BYTES, partial_bytes=victim.partial,
                                    max_partial_bytes=self.budget.limit)
            elif owner is not None:
                owner.evict(victim.conn_id)

    def _close_stalled_frames(self, timeout: float) -> None:
        """Close connections whose partial frame has not completed within `timeout` seconds while
        being read (slowloris). Held or throttled ones are not read, so they are not judged."""
        limit = time.monotonic() - timeout
        auth = self.tokens is not None  # then a connection that sent nothing yet is waited for this long too
        for c in [c for c in self.conns.values()
                  if (c.partial or c.handshaking or (c.preamble is not None and (auth or c.preamble.buf)))
                  and c.partial_since < limit and c.reading and c.held is None and c not in self.throttled
                  and not c.closing]:
            self._close_limited(c, REASON_FRAME_TIMEOUT, partial_bytes=c.partial, frame_timeout_s=timeout)

    def _close_limited(self, c: Connection, reason: str, **kw) -> None:
        """Close `c` for a per-client limit: counted by reason (limits.CLOSE_REASONS) and logged."""
        self.stats.limit_closes[reason] += 1
        log.warning("connection_limited", conn_id=c.conn_id, peer=str(c.peer), reason=reason, **kw)
        self._close(c, reason, quiet=True)

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.config.idle_timeout_s
        for c in [c for c in self.conns.values() if c.last_active < limit and not c.busy and not c.closing]:
            self._close(c, "idle_timeout", idle_s=self.config.idle_timeout_s)

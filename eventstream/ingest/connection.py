"""TCP reader thread: many connections on one selector, decode, deliver, ACK/NACK.

Each connection is owned by exactly one reader thread for its whole life, so its decoder, counters and
outbox need no locks. New connections arrive from the acceptor through a deque plus a wake-up socket.

ACK rule (v2 connections only, i.e. once a v2 frame has been seen): ACK(cumulative accepted events)
is sent when ack_every_events are unacknowledged, when the oldest unacknowledged event is
ack_interval_ms old, together with any NACKs, on client half-close, and on a draining stop. NACKs of
one chunk are sent in frame-index order before the ACK that follows them.
"""

from __future__ import annotations

import collections
import selectors
import socket
import threading
import time

import structlog

from eventstream.core.topics import TopicTable
from eventstream.ingest.delivery import Delivery, IngestStats
from eventstream.protocol.decoder import FrameDecoder
from eventstream.protocol.frames import encode_ack
from eventstream.runtime.affinity import pin_current_thread

log = structlog.get_logger("eventstream.ingest.tcp")

MAX_OUTBOX_BYTES = 4 << 20  # a client that never reads its ACKs is disconnected past this


class Connection:
    __slots__ = ("sock", "conn_id", "peer", "decoder", "v2", "accepted", "acked", "ack_due_ns", "outbox",
                 "last_active", "tokens", "resume_at", "reading", "closed")

    def __init__(self, sock: socket.socket, conn_id: int, peer, decoder: FrameDecoder, now: float, burst: float):
        self.sock = sock
        self.conn_id = conn_id
        self.peer = peer
        self.decoder = decoder
        self.v2 = False
        self.accepted = 0
        self.acked = 0
        self.ack_due_ns = 0  # monotonic ns of the oldest unacknowledged acceptance, 0 = none
        self.outbox = bytearray()
        self.last_active = now
        self.tokens = burst
        self.resume_at = 0.0
        self.reading = True
        self.closed = False


class Reader(threading.Thread):
    def __init__(self, n: int, config, topics: TopicTable, delivery: Delivery, stats: IngestStats,
                 admission, cpus, payload_bytes: int):
        super().__init__(name=f"es-tcp-reader-{n}", daemon=True)
        self.config = config
        self.topics = topics
        self.delivery = delivery
        self.stats = stats
        self.admission = delivery.admission
        self.cpus = cpus
        self.payload_bytes = payload_bytes
        self.incoming: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.stopping = False
        self.drain = True
        self.conns: dict[int, Connection] = {}
        self.open_count = 0
        self._sel = selectors.DefaultSelector()
        self._buf = bytearray(config.recv_bytes)
        rate = config.rate_limit_events_per_s
        self._rate = rate
        self._burst = max(rate * 0.1, 1.0) if rate else 0.0
        self._ack_every = config.ack_every_events
        self._ack_ns = int(config.ack_interval_ms * 1e6)

    # ---------------------------------------------------------------- called from other threads
    def hand_over(self, sock: socket.socket, conn_id: int, peer) -> None:
        self.incoming.append((sock, conn_id, peer))
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def request_stop(self, drain: bool) -> None:
        self.drain = drain
        self.stopping = True
        self.wake()

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        pin_current_thread(self.cpus, self.name)
        sel = self._sel
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        paused = False
        next_idle_check = time.monotonic() + 1.0
        pending: set[Connection] = set()
        throttled: set[Connection] = set()
        try:
            while not self.stopping:
                if self.admission.paused != paused:
                    paused = self.admission.paused
                    for c in list(self.conns.values()):
                        self._interest(c, not paused and c.resume_at == 0.0)
                timeout = 0.5
                if pending:
                    timeout = self._ack_ns / 1e9
                if paused or throttled:
                    timeout = min(timeout, 0.01)
                for key, mask in sel.select(timeout):
                    c = key.data
                    if c is None:
                        self._accept_incoming(paused)
                        continue
                    if mask & selectors.EVENT_WRITE and not c.closed:
                        self._flush(c)
                    if mask & selectors.EVENT_READ and not c.closed:
                        self._read(c, pending, throttled)
                now_ns = time.monotonic_ns()
                if pending:
                    for c in list(pending):
                        if c.closed:
                            pending.discard(c)
                        elif now_ns - c.ack_due_ns >= self._ack_ns:
                            self._send_ack(c)
                            pending.discard(c)
                if throttled:
                    now = time.monotonic()
                    for c in list(throttled):
                        if c.closed or now >= c.resume_at:
                            throttled.discard(c)
                            c.resume_at = 0.0
                            c.tokens = self._burst
                            if not c.closed:
                                self._interest(c, not paused)
                if self.config.idle_timeout_s and not paused and time.monotonic() >= next_idle_check:
                    next_idle_check = time.monotonic() + min(1.0, self.config.idle_timeout_s / 2)
                    self._close_idle()
        except Exception:
            log.exception("reader_crashed", reader=self.name)
        finally:
            self._shutdown()

    def _accept_incoming(self, paused: bool) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        now = time.monotonic()
        while self.incoming:
            sock, conn_id, peer = self.incoming.popleft()
            sock.setblocking(False)
            dec = FrameDecoder(self.topics, max_frame_bytes=self.config.max_frame_bytes,
                               payload_bytes=self.payload_bytes, conn_id=conn_id)
            c = Connection(sock, conn_id, peer, dec, now, self._burst)
            self.conns[conn_id] = c
            self.open_count += 1
            c.reading = not paused
            if c.reading:
                self._sel.register(sock, selectors.EVENT_READ, c)

    def _interest(self, c: Connection, reading: bool) -> None:
        """Register what the selector should watch for `c`: reads (unless paused/throttled), writes."""
        if c.closed:
            return
        c.reading = reading
        mask = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if c.outbox else 0)
        try:
            if mask:
                try:
                    self._sel.modify(c.sock, mask, c)
                except KeyError:
                    self._sel.register(c.sock, mask, c)
            else:
                try:
                    self._sel.unregister(c.sock)
                except KeyError:
                    pass
        except (ValueError, OSError):
            self._close(c, "socket_error")

    def _read(self, c: Connection, pending: set, throttled: set) -> None:
        try:
            n = c.sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(c, "reset", error=str(exc))
            return
        if n == 0:  # client half-closed (or closed): final ACK, then close
            if c.v2 and c.accepted != c.acked:
                self._send_ack(c)
            pending.discard(c)
            self._close(c, "client_closed", final=True)
            return
        now = time.monotonic()
        if self._rate:
            c.tokens = min(self._burst, c.tokens + (now - c.last_active) * self._rate)
        c.last_active = now
        self.stats.bytes_received += n
        data = memoryview(self._buf)[:n]
        records, indices, errors = c.decoder.feed_indexed(data)
        data.release()
        if not c.v2 and (records["flags"].any() if len(records) else any(e.version == 2 for e in errors)):
            c.v2 = True
        fatal = errors[-1] if errors and errors[-1].fatal else None
        if fatal is not None and fatal.version == 2:
            c.v2 = True
        accepted, nacks = self.delivery.deliver(records, indices, errors, c.conn_id, want_nacks=c.v2)
        if accepted and not c.ack_due_ns:
            c.ack_due_ns = time.monotonic_ns()
        c.accepted += accepted
        if fatal is not None:
            log.warning("framing_error", conn_id=c.conn_id, peer=str(c.peer), frame=fatal.index, reason=fatal.reason)
            if c.v2:
                self._write(c, nacks + (encode_ack(c.accepted) if c.accepted != c.acked else b""))
                self._flush_blocking(c, 0.5)
            self._close(c, "framing_error")
            pending.discard(c)
            return
        if c.v2 and (nacks or c.accepted - c.acked >= self._ack_every):
            self._write(c, nacks + encode_ack(c.accepted))
            c.acked = c.accepted
            c.ack_due_ns = 0
            pending.discard(c)
        elif c.v2 and c.accepted != c.acked:
            pending.add(c)
        if self._rate:
            c.tokens -= len(records) + len(errors)
            if c.tokens < 0:
                c.resume_at = time.monotonic() + (-c.tokens) / self._rate
                throttled.add(c)
                self._interest(c, False)

    def _send_ack(self, c: Connection) -> None:
        self._write(c, encode_ack(c.accepted))
        c.acked = c.accepted
        c.ack_due_ns = 0

    def _write(self, c: Connection, data: bytes) -> None:
        if c.closed or not data:
            return
        if c.outbox:
            c.outbox += data
        else:
            try:
                sent = c.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(c, "reset")
                return
            if sent < len(data):
                c.outbox += data[sent:]
        if len(c.outbox) > MAX_OUTBOX_BYTES:
            self._close(c, "not_reading_acks", outbox=len(c.outbox))
        elif c.outbox:
            self._interest(c, c.reading)

    def _flush(self, c: Connection) -> None:
        try:
            sent = c.sock.send(c.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c, "reset")
            return
        del c.outbox[:sent]
        if not c.outbox:
            self._interest(c, c.reading)

    def _flush_blocking(self, c: Connection, timeout: float) -> None:
        if c.closed or not c.outbox:
            return
        try:
            c.sock.settimeout(timeout)
            c.sock.sendall(bytes(c.outbox))
            c.outbox.clear()
        except OSError:
            pass

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.config.idle_timeout_s
        for c in [c for c in self.conns.values() if c.last_active < limit]:
            self._close(c, "idle_timeout", idle_s=self.config.idle_timeout_s)

    def _close(self, c: Connection, why: str, **kw) -> None:
        if c.closed:
            return
        c.closed = True
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass
        self.conns.pop(c.conn_id, None)
        self.stats.connections_closed += 1
        if why not in ("client_closed", "server_stop"):
            log.info("connection_closed", conn_id=c.conn_id, reason=why, **kw)

    def _shutdown(self) -> None:
        # connections handed over but never registered still count as open: close them too
        self._accept_incoming(True)
        deadline = time.monotonic() + 2.0  # one budget for all connections: a stop stays bounded
        for c in list(self.conns.values()):
            if self.drain and c.v2 and c.accepted != c.acked:
                self._send_ack(c)
            if self.drain:
                self._flush_blocking(c, max(0.01, deadline - time.monotonic()))
            self._close(c, "server_stop")
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


"""TCP reader thread: the socket loop of many connections on one selector.

Each connection's protocol is its `Connection` (connection.py, no socket: the preamble, decoding,
offering, holding, NACKs and the ACK watermarks; tested without sockets). This module feeds it the
bytes it reads and writes what it returns, stops reading a connection that holds records, and applies
the limits (limits.py) across connections: partial bytes, frame timeouts, rates, TLS, refusals.

Each connection is owned by exactly one reader thread for its whole life, so its decoder, counters and
outbox need no locks. New connections arrive from the acceptor through a deque plus a wake-up socket.

ACKs are watermarks, never timers (v2 connections: once a v2 frame has been seen). Each read becomes
a *chunk*: the cumulative accepted count after it, the completion marks of its records (ring, end:
done once ``ring.completed() >= end``, i.e. the processor handled, stored or dead-lettered them and
released them) and the NACKs of its rejected frames. Chunks complete in order; when the head chunks
are complete their NACKs and one cumulative ACK go out together. Records whose ACK mode is
`accepted` carry no marks, so their chunk completes as soon as it is placed. Processors call
`nudge()` after each released batch; a reader with chunks in flight wakes up (one byte on its wake
socket, at most one outstanding) and sends whatever became due: an idle connection's ACK leaves
right after its event is stored, a busy one's ACKs are coalesced by what is ready.

Limits (limits.py): each connection's partial-frame bytes are accounted in the reader's total and the
server's PartialBudget; a partial frame that makes no progress to its end within frame_timeout_s
closes the connection (slowloris), unless the connection is held or throttled (we stopped reading it,
so it cannot progress: its clock restarts when reading resumes) and except for the time the reader
itself was stalled (a turn of its loop over `stall_credit_s`: nobody was read then). Closing releases the peer's slot in
PeerLimit. Past max_rejects_per_s rejects in a second, a connection's rejects are summarised
(RejectMeter), and one that sends nothing valid is closed.

Before its events: with TLS (tls.py) the handshake is driven by this loop; then the first frame goes
through the connection's Preamble (preamble.py: an optional HELLO, required with client tokens). A
refused connection gets NACK(0, "auth: ...") and is half-closed, its further bytes discarded until
EOF (LINGER_S at most), so a reset cannot destroy the NACK. Both are timed like a partial frame.

Backpressure: records the queues cannot take now (or that the control plane does not admit now) are
held by the connection, which stops reading until they went in, so TCP flow control pushes back on
the client; nothing the engine could take later is shed. On client half-close, and on a draining
stop, the final ACK goes out once everything read is complete.
"""

from __future__ import annotations

import collections
import selectors
import socket
import ssl
import threading
import time

import numpy as np
import structlog

from eventstream.core.records import ACK_STORED, SMALL_BATCH
from eventstream.core.topics import TopicTable
from eventstream.ingest.auth import TokenSet
from eventstream.ingest.connection import Connection, Step, peer_ip
from eventstream.ingest.delivery import Delivery, IngestStats
from eventstream.ingest.limits import (
    REASON_AUTH,
    REASON_EVICTED,
    REASON_FRAME_TIMEOUT,
    REASON_MIN_RATE,
    REASON_PARTIAL_BYTES,
    REASON_TOO_MANY_REJECTS,
    PartialBudget,
    PeerLimit,
    RejectMeter,
)
from eventstream.ingest.preamble import Preamble
from eventstream.ingest.tenants import Tenants
from eventstream.ingest.tls import handshake_step
from eventstream.protocol.decoder import FrameDecoder
from eventstream.runtime.affinity import pin_current_thread
from eventstream.runtime.scheduling import apply_current_thread

log = structlog.get_logger("eventstream.ingest.tcp")

HELD_RETRY_S = 0.001  # how often held records are offered again (only while a queue is full)
STOP_BUDGET_S = 4.0  # a draining stop waits at most this long for held records and final ACKs
LINGER_S = 2.0  # a refused connection is read (and discarded) this long so its NACK is not lost to a reset
ACKED_BATCH = 256  # small ACKs' "acked" latencies are recorded this many at a time (or when the reader is idle)
MAX_OUTBOX_BYTES = 4 << 20  # a client that never reads its ACKs is disconnected past this
# a non-blocking send/recv that cannot proceed now (TLS: a record needs more bytes or room)
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Reader(threading.Thread):
    def __init__(
        self,
        n: int,
        config,
        topics: TopicTable,
        delivery: Delivery,
        stats: IngestStats,
        cpus,
        payload_bytes: int,
        ack_default: int = ACK_STORED,
        *,
        peer_limit: PeerLimit | None = None,
        budget: PartialBudget | None = None,
        tokens: TokenSet | None = None,
        tls: ssl.SSLContext | None = None,
        on_acked=None,
        payloads=None,
        tenants: Tenants | None = None,
    ):
        super().__init__(name=f"es-tcp-reader-{n}", daemon=True)
        self.config = config
        self.topics = topics
        self.delivery = delivery
        self.stats = stats
        self.cpus = cpus
        self.scheduling = "normal"  # the OS policy this thread asks for (runtime/scheduling.py); set by TcpServer
        self.payload_bytes = payload_bytes
        self.payloads = payloads  # PayloadArena for payloads over payload_bytes (None: refused)
        self.on_acked = on_acked  # callable(latencies_ns): decode-to-ACK of every event an ACK covers
        self.ack_default = ack_default
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
        self.awaiting: set[Connection] = set()  # connections with chunks in flight
        self.stalled: set[Connection] = set()  # connections holding records
        self.throttled: set[Connection] = set()
        self.want_nudge = False  # some chunk waits for a processor: nudge() should wake us
        self._nudged = False  # a wake byte is on its way (at most one outstanding)
        self.error: BaseException | None = None
        self.peer_limit = peer_limit
        self.budget = budget
        self.partial_bytes = 0  # sum of this reader's connections' partial frames (read by other readers)
        self.evictions: collections.deque = collections.deque()  # conn ids other readers want closed
        self.finished = False  # the loop ended: nothing handed over from now on is served
        self.tokens = tokens
        self.tenants = tenants if tenants is not None else Tenants.unbounded()
        self.idle_evictions: collections.deque = collections.deque()  # conn ids the acceptor wants closed
        self.tls = tls
        self.tls_pending: set[Connection] = set()  # TLS connections with decrypted bytes not read yet
        self._acked: list[int] = []  # "acked" latencies of small ACKs not recorded yet (_record_acked)

    # ---------------------------------------------------------------- called from other threads
    def hand_over(self, sock: socket.socket, conn_id: int, peer) -> None:
        self.incoming.append((sock, conn_id, peer))
        if self.finished:  # lost the race with _shutdown: nobody reads this deque any more
            self._refuse_incoming()
            return
        self.wake()

    def _refuse_incoming(self) -> None:
        while True:
            try:
                sock, _conn_id, peer = self.incoming.popleft()
            except IndexError:
                return
            try:
                sock.close()
            except OSError:
                pass
            self.stats.connections_closed += 1
            if self.peer_limit is not None:
                self.peer_limit.release(peer_ip(peer))

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def evict(self, conn_id: int) -> None:
        """Another reader found our connection `conn_id` holding the largest partial frame while the
        server is over max_partial_bytes: close it (if still so) from our own thread."""
        self.evictions.append(conn_id)
        self.wake()

    def evict_idle(self, conn_id: int) -> None:
        """The server is at max_connections and our connection `conn_id` is the idlest: close it (if
        still idle) from our own thread to make room for a new one."""
        self.idle_evictions.append(conn_id)
        self.wake()

    def nudge(self) -> None:
        """A completion watermark moved (a processor released a batch): wake up if we wait for one."""
        if self.want_nudge and not self._nudged:
            self._nudged = True
            self.wake()

    def request_stop(self, drain: bool) -> None:
        self.drain = drain
        self.stopping = True
        self.wake()

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        pin_current_thread(self.cpus, self.name)
        apply_current_thread(self.scheduling, self.name)
        sel = self._sel
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        next_idle_check = next_frame_check = time.monotonic() + 1.0
        frame_timeout = self.config.frame_timeout_s
        stall_credit = self.config.stall_credit_s
        try:
            while not self.stopping:
                timeout = 0.5
                if self.stalled or self.throttled:
                    timeout = HELD_RETRY_S if self.stalled else 0.01
                if self.tls_pending:
                    timeout = 0.0
                    for c in list(self.tls_pending):
                        self.tls_pending.discard(c)
                        if not c.closed and c.reading:
                            self._read(c)
                ready = sel.select(timeout)
                turn_started = time.monotonic()
                if not ready and self._acked:  # idle: record what small ACKs left
                    self._record_acked()
                for key, mask in ready:
                    c = key.data
                    if c is None:
                        self._drain_wake()
                        continue
                    if c.handshaking:
                        if not c.closed:
                            self._handshake(c)
                        continue
                    if mask & selectors.EVENT_WRITE and not c.closed:
                        self._flush(c)
                    if mask & selectors.EVENT_READ and not c.closed:
                        self._read(c)
                if self.stalled:
                    for c in list(self.stalled):
                        self._retry_held(c)
                if self.awaiting:
                    for c in list(self.awaiting):
                        self._ack_due(c)
                self.want_nudge = bool(self.awaiting)
                if self.throttled:
                    now = time.monotonic()
                    for c in list(self.throttled):
                        if c.closed or now >= c.resume_at:
                            self.throttled.discard(c)
                            c.resume_at = 0.0
                            c.tokens = self._burst
                            if not c.closed and c.held is None and not c.closing:
                                c.partial_since = now  # it could not progress while throttled
                                self._interest(c, True)
                stalled_for = time.monotonic() - turn_started
                if stalled_for > stall_credit:
                    self._credit_stall(stalled_for)
                if time.monotonic() >= next_frame_check:
                    next_frame_check = time.monotonic() + min(1.0, (frame_timeout or 4.0) / 4)
                    if frame_timeout:
                        self._close_stalled_frames(frame_timeout)
                    if self.config.min_bytes_per_s:
                        self._close_slow(time.monotonic())
                    self._close_lingering()
                if self.config.idle_timeout_s and time.monotonic() >= next_idle_check:
                    next_idle_check = time.monotonic() + min(1.0, self.config.idle_timeout_s / 2)
                    self._close_idle()
        except Exception as exc:
            self.error = exc
            log.exception("reader_crashed", reader=self.name)
        finally:
            self._shutdown()

    def _drain_wake(self) -> None:
        self._nudged = False  # before looking at the watermarks: a later nudge sends a new byte
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        if self.incoming:
            self._accept_incoming()
        while self.idle_evictions:
            c = self.conns.get(self.idle_evictions.popleft())
            if c is not None and not c.closed and not c.busy:
                self._close_limited(
                    c,
                    REASON_EVICTED,
                    idle_s=round(time.monotonic() - c.last_active, 3),
                    max_connections=self.config.max_connections,
                )
        while self.evictions:
            c = self.conns.get(self.evictions.popleft())
            if c is not None and c.partial and self.budget is not None and self.budget.over():
                self._close_limited(
                    c, REASON_PARTIAL_BYTES, partial_bytes=c.partial, max_partial_bytes=self.budget.limit
                )

    def _accept_incoming(self) -> None:
        now = time.monotonic()
        while self.incoming:
            sock, conn_id, peer = self.incoming.popleft()
            sock.setblocking(False)
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (ssl.SSLError, OSError) as exc:
                    log.info("connection_closed", conn_id=conn_id, reason="tls_error", error=str(exc))
                    sock.close()
                    self.stats.connections_closed += 1
                    if self.peer_limit is not None:
                        self.peer_limit.release(peer_ip(peer))
                    continue
            dec = FrameDecoder(
                self.topics,
                max_frame_bytes=self.config.max_frame_bytes,
                payload_bytes=self.payload_bytes,
                conn_id=conn_id,
                ack_default=self.ack_default,
                payloads=self.payloads,
            )
            c = Connection(
                sock,
                conn_id,
                peer,
                dec,
                now,
                self._burst,
                delivery=self.delivery,
                preamble=Preamble(self.tokens),
                meter=RejectMeter(self.config.max_rejects_per_s, now),
                tenants=self.tenants,
            )
            c.partial_since = now  # the handshake and the HELLO are timed like a partial frame
            c.handshaking = self.tls is not None
            self.conns[conn_id] = c
            self.open_count += 1
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _interest(self, c: Connection, reading: bool) -> None:
        """Register what the selector should watch for `c`: reads (unless held/throttled), writes."""
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

    def _read(self, c: Connection) -> None:
        try:
            n = c.sock.recv_into(self._buf)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self._close(c, "reset", error=str(exc))
            return
        if c.linger_until:  # refused: discard, close at EOF
            if n == 0 or time.monotonic() > c.linger_until:
                self._close(c, REASON_AUTH, quiet=True)
            return
        if n == 0:  # client half-closed (or closed): final ACK once everything read is complete
            self._finish(c, "client_closed")
            return
        now = time.monotonic()
        if self._rate:
            c.tokens = min(self._burst, c.tokens + (now - c.last_active) * self._rate)
        c.last_active = now
        c.window_bytes += n
        self.stats.bytes_received += n
        if self.tls is not None and isinstance(c.sock, ssl.SSLSocket) and c.sock.pending():
            self.tls_pending.add(c)  # decrypted bytes the selector cannot see: read them next round
        step = c.receive(memoryview(self._buf)[:n], now)
        if step.refusal:
            self._refuse(c, step)
        elif not step.pending:
            self._after_read(c, step, now)

    def _after_read(self, c: Connection, step: Step, now: float) -> None:
        """What the socket loop does after the connection took a read: hold (stop reading), ACKs due,
        the partial-frame limits, closing on a framing error or garbage, the rate limits."""
        if c.held is not None:
            self._hold(c)
        elif step.chunk_ended:
            self._ack_due(c)
        if c.decoder.arena_blocked and c not in self.stalled:
            # the payload arena is full: push back like a full queue (stop reading this connection;
            # _retry_held decodes the rest once the arena has room)
            self.stats.holds += 1
            self.stalled.add(c)
            self._interest(c, False)
        buffered = c.decoder.buffered  # after delivery: closing c for the budget keeps this read's events
        if buffered or c.partial:
            self._account_partial(c, buffered, bool(step.records or step.errors), now)
            if c.closed:
                return
        fatal = step.fatal
        if fatal is not None:
            log.warning("framing_error", conn_id=c.conn_id, peer=str(c.peer), frame=fatal.index, reason=fatal.reason)
            self._finish(c, "framing_error")
            return
        if step.garbage and not c.closing:
            meter = c.meter
            assert meter is not None  # every connection has one
            self.stats.limit_closes[REASON_TOO_MANY_REJECTS] += 1
            log.warning(
                "connection_limited",
                conn_id=c.conn_id,
                peer=str(c.peer),
                reason=REASON_TOO_MANY_REJECTS,
                rejects=meter.rejects,
                max_rejects_per_s=meter.limit,
            )
            self._finish(c, REASON_TOO_MANY_REJECTS)  # after the NACKs and the ACK of what it sent
            return
        if self._rate:
            c.tokens -= step.records + step.errors
            if c.tokens < 0:
                c.resume_at = time.monotonic() + (-c.tokens) / self._rate
                self.throttled.add(c)
                self._interest(c, False)
        if self.tenants.rate and c.tenant is not None and step.records:
            wait = self.tenants.take(c.tenant, step.records, now)  # events/s over all the tenant's connections
            if wait > 0:
                c.resume_at = max(c.resume_at, now + wait)
                self.throttled.add(c)
                self._interest(c, False)

    def _close(self, c: Connection, why: str, quiet: bool = False, **kw) -> None:
        if c.closed:
            return
        c.closed = True
        c.release()  # held records' payload slots back, suppressed rejects summarised
        if c.partial:
            self.partial_bytes -= c.partial
            c.partial = 0
        if self.peer_limit is not None:
            self.peer_limit.release(peer_ip(c.peer))
        if c.tenant is not None:
            self.tenants.disconnect(c.tenant)
            c.tenant = None
        self.awaiting.discard(c)
        self.stalled.discard(c)
        self.throttled.discard(c)
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
        if why not in ("client_closed", "server_stop") and not quiet:
            log.info("connection_closed", conn_id=c.conn_id, reason=why, **kw)

    def _shutdown(self) -> None:
        """Stop reading everything; with `drain`, place what is held and send every ACK that becomes
        due within one shared budget (the processors are still running), then close."""
        self._accept_incoming()  # connections handed over but never registered are closed too
        for c in list(self.conns.values()):
            if not c.closing:
                c.closing = "server_stop"
                self._interest(c, False)
        deadline = time.monotonic() + STOP_BUDGET_S
        if self.drain:
            while time.monotonic() < deadline and (self.stalled or self.awaiting):
                for c in list(self.stalled):
                    self._retry_held(c)
                for c in list(self.conns.values()):
                    if c.held is None:
                        self._end_chunk(c)
                    self._ack_due(c)
                if self.stalled or self.awaiting:
                    time.sleep(HELD_RETRY_S)
        for c in list(self.conns.values()):
            if c.held is not None:
                c.dead_letter_held()
                self.stalled.discard(c)
                if c.chunks:
                    self._ack_due(c)
            if self.drain:
                self._flush_blocking(c, max(0.01, deadline - time.monotonic()))
            self._close(c, "server_stop")
        self._record_acked()
        self.finished = True
        self._refuse_incoming()  # handed over after the _accept_incoming above
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---------------------------------------------------------------- ACKs and NACKs (see the module docstring)

    def _end_chunk(self, c: Connection) -> None:
        """Everything read so far is placed: it becomes a chunk waiting for its marks."""
        if c.end_chunk():
            self._ack_due(c)

    def _ack_due(self, c: Connection) -> None:
        """Send the NACKs and the cumulative ACK of every leading chunk that is complete."""
        if c.closed:
            self.awaiting.discard(c)
            return
        if c.chunks:
            self.want_nudge = True  # before reading the marks: a release after this point wakes us
        data, done = c.take_due()
        if data:
            self._write(c, data)
        if done and self.on_acked is not None:  # (events, decode ns) per chunk: the "acked" stage latency
            now = time.monotonic_ns()
            if len(done) == 1 and done[0][0] <= SMALL_BATCH:  # a few events: kept, recorded ACKED_BATCH at a time
                self._acked.extend([now - done[0][1]] * done[0][0])
                if len(self._acked) >= ACKED_BATCH:
                    self._record_acked()
            else:
                self.on_acked(np.repeat(np.array([now - ts for _, ts in done], dtype=np.int64), [k for k, _ in done]))
        if c.chunks:
            self.awaiting.add(c)
        else:
            self.awaiting.discard(c)
            if c.closing and c.held is None:
                self._flush_blocking(c, 0.5)
                self._close(c, c.closing)

    def _record_acked(self) -> None:
        """Record the kept "acked" latencies (one metrics call for many small ACKs, off their way out)."""
        if self._acked and self.on_acked is not None:
            self.on_acked(self._acked)
        self._acked = []

    def _finish(self, c: Connection, why: str) -> None:
        """Stop reading `c`; close it once what it sent is placed and acknowledged."""
        c.closing = why
        self._interest(c, False)
        if c.held is not None:
            return  # closes once the held records went in (_retry_held)
        if not c.v2:
            self._close(c, why)
            return
        if c.held is None:
            self._end_chunk(c)
            self._ack_due(c)

    def _write(self, c: Connection, data: bytes) -> None:
        if c.closed or not data:
            return
        if c.outbox:
            c.outbox += data
        else:
            try:
                sent = c.sock.send(data)
            except WOULD_BLOCK:
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
        except WOULD_BLOCK:
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

    # ---------------------------------------------------------------- held records (pushback)

    def _hold(self, c: Connection) -> None:
        """`c` holds records the engine could not take: stop reading it until they went in."""
        if c not in self.stalled:
            self.stalled.add(c)
            self._interest(c, False)

    def _retry_held(self, c: Connection) -> None:
        if c.closed:
            self.stalled.discard(c)
            return
        if c.held is not None:
            if not c.retry_held():
                return
            if c.chunks:
                self._ack_due(c)
                if c.closed:
                    return
        need = c.decoder.arena_blocked
        if need:  # frames kept undecoded while the payload arena was full
            if not self.payloads.has_room(need):
                return
            self.stalled.discard(c)
            now = time.monotonic()
            self._after_read(c, c.receive(b"", now), now)
            if c.closed or c in self.stalled:
                return
        self.stalled.discard(c)
        if c.closing and not c.v2:
            self._close(c, c.closing)
        elif not c.closing and c not in self.throttled:
            c.partial_since = time.monotonic()  # it could not progress while held
            self._interest(c, True)

    # ---------------------------------------------------------------- limits, TLS handshake, refusal

    def _handshake(self, c: Connection) -> None:
        """One step of a TLS handshake (tls.py); reading starts when it is done."""
        assert isinstance(c.sock, ssl.SSLSocket)  # handshaking: a TLS connection
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

    def _refuse(self, c: Connection, step: Step) -> None:
        """Refuse a connection before its events: NACK of frame 0 (the HELLO), half-close, then
        discard what it still sends until it closes (at most LINGER_S): closing with unread bytes
        would send a reset, and a reset can destroy the NACK before the client reads it."""
        self.stats.limit_closes[step.counted] += 1
        log.warning("connection_limited", conn_id=c.conn_id, peer=str(c.peer), reason=step.counted, why=step.refusal)
        self._write(c, step.send)
        self._flush_blocking(c, 0.5)
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
                self._close_limited(
                    victim, REASON_PARTIAL_BYTES, partial_bytes=victim.partial, max_partial_bytes=self.budget.limit
                )
            elif owner is not None:
                owner.evict(victim.conn_id)

    def _credit_stall(self, seconds: float) -> None:
        """One turn of this loop took `seconds` (the thread waited for a lock or the CPU, or a handler
        ran long on it): nobody's socket was read meanwhile, so that time is not charged to the partial
        frames being timed (frame_timeout_s is about the client's progress, not the server's)."""
        for c in self.conns.values():
            if c.partial or c.handshaking or c.preamble is not None:
                c.partial_since += seconds

    def _close_stalled_frames(self, timeout: float) -> None:
        """Close connections whose partial frame has not completed within `timeout` seconds while
        being read (slowloris). Held or throttled ones are not read, so they are not judged."""
        limit = time.monotonic() - timeout
        auth = self.tokens is not None  # then a connection that sent nothing yet is waited for this long too
        for c in [
            c
            for c in self.conns.values()
            if (c.partial or c.handshaking or (c.preamble is not None and (auth or c.preamble.buf)))
            and c.partial_since < limit
            and c.reading
            and c.held is None
            and c not in self.throttled
            and not c.closing
        ]:
            self._close_limited(c, REASON_FRAME_TIMEOUT, partial_bytes=c.partial, frame_timeout_s=timeout)

    def _close_slow(self, now: float) -> None:
        """Close connections that delivered fewer than min_bytes_per_s over the last min_rate_window_s
        (slow senders holding a slot). A connection we do not read (held, throttled, refused) is not
        judged: its window starts again."""
        window, rate = self.config.min_rate_window_s, self.config.min_bytes_per_s
        for c in list(self.conns.values()):
            if c.closed or c.closing:
                continue
            if c.held is not None or c in self.throttled or not c.reading:
                c.window_start, c.window_bytes = now, 0
                continue
            if now - c.window_start < window:
                continue
            if c.window_bytes < rate * window and not c.busy:
                self._close_limited(c, REASON_MIN_RATE, bytes=c.window_bytes, window_s=window, min_bytes_per_s=rate)
            else:
                c.window_start, c.window_bytes = now, 0

    def _close_limited(self, c: Connection, reason: str, **kw) -> None:
        """Close `c` for a per-client limit: counted by reason (limits.CLOSE_REASONS) and logged."""
        self.stats.limit_closes[reason] += 1
        log.warning("connection_limited", conn_id=c.conn_id, peer=str(c.peer), reason=reason, **kw)
        self._close(c, reason, quiet=True)

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.config.idle_timeout_s
        for c in [c for c in self.conns.values() if c.last_active < limit and not c.busy and not c.closing]:
            self._close(c, "idle_timeout", idle_s=self.config.idle_timeout_s)

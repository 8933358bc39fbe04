"""TCP client: batching, ACK tracking, and retry of unacknowledged events on reconnect (protocol v2).

How acknowledgements map to events (docs/protocol.md, "Client rule"): frames are numbered 1, 2, ... per
connection. The server sends NACKs in frame order before any later ACK, so after reading ACK(a) and n
NACKs in total, every frame numbered <= a + n is resolved: NACKed if its number was NACKed, accepted
otherwise.

Batching (v2, `frame="batch"`, the default): queued events leave as BATCH frames (docs/protocol.md), one
header and one CRC for up to `batch_bytes` of events; a batch of N takes N indices, so the rule above
is unchanged. `linger_ms` (default 0) is how long send() may hold an event back to fill a batch: 0
sends whatever is queued at once (never waits to fill a batch); send_many() hands over many events at
once, which go out together. With linger_ms > 0 queued events leave when batch_size events or
batch_bytes are queued, or on the first send() after the oldest waited linger_ms, and always on
flush(), wait_acked() and close() (there is no timer thread). `frame="single"` sends one v2 EVENT
frame per event, as before.

Threads: the caller's thread does all writes (and reconnects); a reader thread per connection only
parses ACK/NACK frames and resolves pending events under a lock. Events still unresolved when the
connection breaks are sent again, in order and with the same event_id, on the next connection (the
engine deduplicates by event_id).

Security (docs/protocol.md, HELLO): `token=` sends a HELLO frame with the token first on every
connection; `tls=True` (system trust store) or `ssl_context=` wraps the socket in TLS. A server that
refuses the token answers NACK(0, "auth: ...") and closes: the client raises AuthError (no retry).

An SSL object must not be used by two threads at once (the ACK reader reading while the caller
writes), so a TLS socket is non-blocking and every read or write on it holds `_io_lock` for one
call; the waits happen outside the lock (select on the socket). A TLS connection is not half-closed
(a half-close cannot be expressed below TLS): close() waits for the outstanding ACKs, then closes.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import threading
import time

from eventstream.protocol.frames import (
    BATCH_RECORD_BYTES,
    KIND_ACK,
    KIND_NACK,
    LENGTH_BYTES,
    V2_HEADER_BYTES,
    EventIds,
    check_event,
    encode_batch_columns,
    encode_hello,
    encode_v1,
    encode_v2,
    split_control_frames,
)

FRAMES = ("batch", "single")


class ClientError(ConnectionError):
    """The server cannot be reached or stopped answering within the timeout."""


class AuthError(ClientError):
    """The server refused the connection's token (or wanted one): its reason, starting with "auth:"."""


class _Pending:
    """One event: its frame (single frames) or its fields (batch frames: encoded with its batch)."""

    __slots__ = ("index", "event_id", "frame", "sent_ns", "topic", "payload", "priority", "ts")

    def __init__(
        self,
        event_id: int,
        frame: bytes | None,
        topic: bytes = b"",
        payload: bytes = b"",
        priority: int = 0,
        ts: int = 0,
    ):
        self.index = 0
        self.event_id = event_id
        self.frame = frame
        self.sent_ns = 0
        self.topic = topic
        self.payload = payload
        self.priority = priority
        self.ts = ts

    @property
    def size(self) -> int:
        """Bytes this event adds to a frame."""
        if self.frame is not None:
            return len(self.frame)
        return 1 + len(self.topic) + BATCH_RECORD_BYTES + len(self.payload)


def encode_batches(items: list[_Pending], batch_bytes: int) -> bytes:
    """BATCH frames of `items` in order, each at most `batch_bytes` long (an event larger than that
    gets a frame of its own; one already encoded as a single frame, too large for a batch of its own,
    goes as that frame)."""
    out: list[bytes] = []
    i, n = 0, len(items)
    head = LENGTH_BYTES + V2_HEADER_BYTES
    while i < n:
        frame = items[i].frame
        if frame is not None:
            out.append(frame)
            i += 1
            continue
        topics: dict[bytes, int] = {}
        tix: list[int] = []
        prios: list[int] = []
        ids: list[int] = []
        tss: list[int] = []
        pays: list[bytes] = []
        size = head
        while i < n:
            p = items[i]
            if p.frame is not None:
                break
            k = topics.get(p.topic)
            grow = BATCH_RECORD_BYTES + len(p.payload) + (0 if k is not None else 1 + len(p.topic))
            if tix and (size + grow > batch_bytes or len(tix) >= 65535 or (k is None and len(topics) >= 65535)):
                break
            if k is None:
                k = topics[p.topic] = len(topics)
            tix.append(k)
            prios.append(p.priority)
            ids.append(p.event_id)
            tss.append(p.ts)
            pays.append(p.payload)
            size += grow
            i += 1
        out.append(encode_batch_columns(list(topics), tix, [len(x) for x in pays], b"".join(pays), prios, ids, tss))
    return b"".join(out)


class TcpClient:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9000,
        *,
        version: int = 2,
        batch_size: int = 256,
        timeout: float = 10.0,
        max_inflight: int = 65536,
        reconnect: bool = True,
        token: str | bytes | None = None,
        tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_bytes: int = 1 << 20,
        frame: str = "batch",
        linger_ms: float = 0.0,
        batch_bytes: int = 256 << 10,
    ):
        """`max_frame_bytes`: the server's server.tcp.max_frame_bytes; send() refuses a bigger frame
        (the server would close the connection on it). Payloads of any size up to that are fine.
        `frame`: "batch" (v2 BATCH frames, the default) or "single" (one frame per event; v1 is always
        single). `linger_ms`, `batch_size`, `batch_bytes`: see the module doc (batch_bytes is capped at
        max_frame_bytes + 4)."""
        if version not in (1, 2):
            raise ValueError(f"version={version!r} is not allowed; allowed: 1 or 2")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; allowed: an integer >= 1")
        if frame not in FRAMES:
            raise ValueError(f"frame={frame!r} is not allowed; allowed: {', '.join(FRAMES)}")
        if not linger_ms >= 0:
            raise ValueError(f"linger_ms={linger_ms!r} is not allowed; allowed: a number >= 0")
        if batch_bytes < 1:
            raise ValueError(f"batch_bytes={batch_bytes!r} is not allowed; allowed: an integer >= 1")
        self.host, self.port, self.version = host, port, version
        self.batch_size = batch_size
        self.max_frame_bytes = max_frame_bytes
        self.batching = version == 2 and frame == "batch"
        self.linger_ns = int(linger_ms * 1e6)
        self.batch_bytes = min(batch_bytes, max_frame_bytes + LENGTH_BYTES)
        self._queued_bytes = 0
        self._queued_since = 0
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.reconnect = reconnect
        self.token = token
        self._hello = encode_hello(token) if token is not None else b""
        self.ssl_context = ssl_context if ssl_context is not None else (ssl.create_default_context() if tls else None)
        self.auth_error = ""
        self._io_lock = threading.Lock()
        self.sent = 0
        self.acked = 0
        self.nacked = 0
        self.reconnects = 0
        self.nacks: list[tuple[int, str]] = []  # (event_id, reason)
        self.ack_latencies_ns: list[int] = []
        self._batch: list[_Pending] = []
        self._pending: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._broken = False
        self._next_index = 1
        self._acked_count = 0  # last ACK value on this connection
        self._nacked_here: dict[int, str] = {}
        self._ids = EventIds()
        self._failures = 0  # reconnects since the last acknowledgement

    # ------------------------------------------------------------------ connection
    def connect(self, *, retry: bool = False) -> TcpClient:
        """Connect; a refused first connect fails at once, reconnects (retry=True) keep trying up to timeout."""
        deadline = time.monotonic() + self.timeout
        delay = 0.02
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError as exc:
                if not retry or time.monotonic() + delay >= deadline:
                    raise ClientError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise ClientError(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
        sock.settimeout(None)
        if self.ssl_context is not None:
            sock.setblocking(False)
        if self._hello:
            try:
                self._sendall(sock, self._hello)
            except OSError as exc:
                sock.close()
                raise ClientError(f"send to {self.host}:{self.port} failed: {exc}") from None
        with self._cond:
            self._sock = sock
            self._broken = False
            self._next_index = 1
            self._acked_count = 0
            self._nacked_here = {}
        if self.version == 2:
            self._reader = threading.Thread(target=self._read_loop, args=(sock,), name="tcp-client-acks", daemon=True)
            self._reader.start()
        return self

    def __enter__(self) -> TcpClient:
        return self.connect()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
                if self.version == 2:
                    self.wait_acked(self.timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Half-close (the server answers with a final ACK), wait for its close, release the socket."""
        sock = self._sock
        if sock is None:
            return
        if self.ssl_context is not None:
            if self._pending and not self._broken:
                self._wait_until(lambda: not self._pending or self._broken, self.timeout)
            with self._cond:
                self._sock = None  # the reader sees it is no longer current and stops
            with self._io_lock:
                sock.close()
            if self._reader is not None:
                self._reader.join(self.timeout)
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(self.timeout)
        sock.close()
        self._sock = None

    # ------------------------------------------------------------------ sending
    def send(
        self,
        topic: str | bytes,
        payload: bytes = b"",
        priority: int = 2,
        event_id: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        """Queue one event; it leaves at once with linger_ms 0 (else see the module doc). Returns its
        event_id."""
        eid = self._queue(topic, payload, priority, event_id, timestamp_ns)
        self._flush_if_due()
        return eid

    def send_many(self, events) -> list[int]:
        """Queue many events at once, (topic, payload[, priority[, event_id[, timestamp_ns]]]) each, and
        send them (with linger_ms 0; in BATCH frames of up to batch_bytes). Returns their event_ids."""
        ids = [self._queue(*ev) for ev in events]
        self._flush_if_due()
        return ids

    def _flush_if_due(self) -> None:
        """Send what is queued unless linger_ms holds it: a batch waits only while it is under
        batch_size events and batch_bytes, and younger than linger_ms."""
        if (
            not self.linger_ns
            or len(self._batch) >= self.batch_size
            or self._queued_bytes >= self.batch_bytes
            or time.monotonic_ns() - self._queued_since >= self.linger_ns
        ):
            self.flush()

    def _queue(
        self,
        topic: str | bytes,
        payload: bytes = b"",
        priority: int = 2,
        event_id: int | None = None,
        timestamp_ns: int | None = None,
    ) -> int:
        if self.version == 1:
            frame = encode_v1(topic, payload, priority)
            p = _Pending(0, frame)
            size = len(frame) - 4
        else:
            eid = self._ids.next() if event_id is None else event_id
            ts = time.time_ns() if timestamp_ns is None else timestamp_ns
            if self.batching:
                t = check_event(topic, priority, eid, ts)
                p = _Pending(eid, None, t, bytes(payload), priority, ts)
                size = V2_HEADER_BYTES + p.size  # alone in a batch
                if size > self.max_frame_bytes:  # the largest payloads only fit a single frame
                    frame = encode_v2(topic, payload, priority, eid, ts)
                    p = _Pending(eid, frame)
                    size = len(frame) - 4
            else:
                frame = encode_v2(topic, payload, priority, eid, ts)
                p = _Pending(eid, frame)
                size = len(frame) - 4
        if size > self.max_frame_bytes:
            head = size - len(payload)
            raise ValueError(
                f"payload of {len(payload)} bytes makes a frame of {size} bytes; allowed: "
                f"payloads of 0..{self.max_frame_bytes - head} bytes with this topic "
                f"(max_frame_bytes={self.max_frame_bytes}, the server's server.tcp.max_frame_bytes)"
            )
        if not self._batch:
            self._queued_since = time.monotonic_ns()
        self._batch.append(p)
        self._queued_bytes += size
        return p.event_id

    def _encode(self, items: list[_Pending]) -> bytes:
        if self.batching:
            return encode_batches(items, self.batch_bytes)
        return b"".join(p.frame for p in items)  # type: ignore[misc]  # not batching: every event has its frame

    def flush(self) -> None:
        """Send every queued event (reconnecting and resending unresolved ones if the link broke)."""
        if self._sock is None:
            raise ClientError("TcpClient is not connected; use it as a context manager or call connect()")
        batch, self._batch = self._batch, []
        self._queued_bytes = 0
        if not batch and not self._broken:
            return
        if self.version == 2 and len(self._pending) + len(batch) > self.max_inflight:
            self._wait_until(lambda: len(self._pending) + len(batch) <= self.max_inflight, self.timeout)
        if self._broken:
            self._recover()
        now = time.monotonic_ns()
        with self._cond:
            for p in batch:
                p.index = self._next_index
                self._next_index += 1
                p.sent_ns = now
            if self.version == 2:
                self._pending.extend(batch)
        self.sent += len(batch)
        data = self._encode(batch)
        try:
            self._sendall(self._sock, data)
        except OSError as exc:
            if self.version == 1 or not self.reconnect:
                raise ClientError(f"send to {self.host}:{self.port} failed: {exc}") from None
            self._broken = True
            self._recover()

    def _recover(self) -> None:
        """Reconnect and resend every unresolved event, in order, with its original event_id."""
        if self.auth_error:
            raise AuthError(f"{self.host}:{self.port} refused the connection: {self.auth_error}")
        if not self.reconnect:
            raise ClientError(
                f"connection to {self.host}:{self.port} lost with {len(self._pending)} events "
                "unacknowledged (reconnect=False)"
            )
        old = self._sock
        if self._reader is not None:  # a server that closed on purpose said why first: read it
            self._reader.join(min(1.0, self.timeout))
        if self.auth_error:
            raise AuthError(f"{self.host}:{self.port} refused the connection: {self.auth_error}")
        if old is not None:
            try:
                old.close()
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(self.timeout)
        if self._failures:  # back off when connections keep breaking without progress
            time.sleep(min(0.5, 0.01 * 2 ** min(self._failures, 6)))
        self._failures += 1
        self.connect(retry=True)
        self.reconnects += 1
        now = time.monotonic_ns()
        with self._cond:
            resend = list(self._pending)
            for p in resend:
                p.index = self._next_index
                self._next_index += 1
                p.sent_ns = now
        sock = self._sock
        assert sock is not None  # connect() made it (or raised)
        try:
            self._sendall(sock, self._encode(resend))
        except OSError:
            self._broken = True

    def wait_acked(self, timeout: float | None = None) -> bool:
        """Flush, then wait until every sent event is ACKed or NACKed. False on timeout. v1: True at once."""
        self.flush()
        if self.version == 1:
            return True
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self._wait_until(lambda: not self._pending or self._broken, deadline - time.monotonic()):
                if not self._broken:
                    return True
                self._recover()
            if time.monotonic() >= deadline:
                return False

    def _wait_until(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, max(0.0, timeout))

    # ------------------------------------------------------------------ acknowledgements (reader thread)
    def _read_loop(self, sock: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                data = self._recv(sock)
                if not data:
                    break
                buf += data
                frames = split_control_frames(buf)
                if frames:
                    self._resolve(frames)
        except (OSError, ValueError):
            pass
        with self._cond:
            # the connection ended: even with nothing pending now (a server that refused the token may
            # close before the first flush), the next flush must reconnect (or raise AuthError)
            if self._sock is sock and (self._pending or self.auth_error):
                self._broken = True
            self._cond.notify_all()

    def _sendall(self, sock: socket.socket, data: bytes) -> None:
        if self.ssl_context is None:
            sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            with self._io_lock:
                try:
                    n = sock.send(view[:65536])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    n = 0
            if n:
                view = view[n:]
            else:
                select.select([], [sock], [], 1.0)

    def _recv(self, sock: socket.socket) -> bytes:
        if self.ssl_context is None:
            return sock.recv(65536)
        while True:
            with self._io_lock:
                if self._sock is not sock:
                    return b""  # closed by close(): stop reading
                try:
                    return sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    pass
            select.select([sock], [], [], 0.2)

    def _resolve(self, frames) -> None:
        now = time.monotonic_ns()
        with self._cond:
            for kind, value, payload in frames:
                if kind == KIND_ACK:
                    self._acked_count = value
                elif kind == KIND_NACK and value == 0:  # frame 0: the HELLO (or its absence) refused
                    self.auth_error = payload.decode("utf-8", "replace")
                elif kind == KIND_NACK:
                    self._nacked_here[value] = payload.decode("utf-8", "replace")
            prefix = self._acked_count + len(self._nacked_here)
            pend = self._pending
            if pend and pend[0].index <= prefix:
                self._failures = 0
            lat = self.ack_latencies_ns
            while pend and pend[0].index <= prefix:
                p = pend.popleft()
                reason = self._nacked_here.get(p.index)
                if reason is None:
                    self.acked += 1
                    lat.append(now - p.sent_ns)
                else:
                    self.nacked += 1
                    self.nacks.append((p.event_id, reason))
            self._cond.notify_all()

    @property
    def unacknowledged(self) -> int:
        return len(self._pending)
